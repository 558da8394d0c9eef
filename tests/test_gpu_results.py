"""The GPU check's results file (gpu/result_file.py) from fake run summaries, on CPU: the
check itself needs CUDA (tests/test_gpu.py, gpu/run_on_device.sh)."""

from __future__ import annotations

import json
import sys

import pytest

from amzft.training.flops import PROJECTIONS, ModelShape, StepTokens, step_flops
from helpers import REPO

sys.path.insert(0, str(REPO / "gpu"))
import check  # noqa: E402 - gpu/ is put on sys.path just above
import result_file  # noqa: E402

VERSIONS = {"torch": "2.11.0+cu130", "transformers": "5.17.0", "peft": "0.21.0", "unsloth": "2026.10.9", "trl": "1.15.0",
            "lightning": "2.6.0", "liger-kernel": "0.8.5"}


def _meter(tokens_per_s: float, peak_mib: float) -> dict:
    """A ThroughputMeter summary as amzft writes it (peak in MiB, as its older readers expect)."""
    return {"tokens_per_s": tokens_per_s, "label_tokens_per_s": tokens_per_s / 2, "padding_efficiency": 0.7,
            "seconds": 14.0, "steps": 30, "steps_timed": 29, "first_step_s": 20.0, "tokens": int(14 * tokens_per_s),
            "processed_tokens": 1, "padded_tokens": 2, "label_tokens": 3, "peak_memory_mib": peak_mib, "last_loss": 1.9}


def _document(summaries: dict) -> dict:
    return result_file.assemble(summaries, device="NVIDIA H200", versions=VERSIONS, date="2026-11-30",
                                command="bash gpu/run_on_device.sh", configs={"base.yaml": ["fit", "--config", "x"]})


def test_results_document_from_fake_summaries():
    summaries = {
        "base.yaml": _meter(3072.0, 3.5 * 1024),
        "reference": {"tokens_per_s": 1536.0, "seconds": 10.0, "tokens": 15360, "peak_memory_mib": 1680.0, "steps": 30,
                      "first_step_s": 9.6, "last_loss": 2.0},
        "large-batch": _meter(9000.0, 20 * 1024),
        "hf": {"error": "exit 1:\nmodel.kernels=liger needs a CUDA GPU ..."},
        "hf-plain": {"error": "skipped: the 380 s budget is spent"},
    }
    document = json.loads(json.dumps(_document(summaries)))  # JSON all the way through
    assert {k: document[k] for k in ("schema", "date", "command", "device")} == {
        "schema": 1, "date": "2026-11-30", "command": "bash gpu/run_on_device.sh", "device": "NVIDIA H200"}
    assert document["versions"] == VERSIONS
    runs = document["runs"]
    assert [r["name"] for r in runs] == ["base.yaml", "reference", "large-batch", "hf", "hf-plain"]  # as they ran
    required = {"name", "ok", "tokens_per_s", "peak_gib", "vs_reference", "device", "versions", "date", "command",
                "config", "first_step_s", "last_loss", "steps", "seconds", "tokens", "padding_efficiency", "tflops_per_s",
                "mm_tflops_per_s", "utilisation", "error"}
    for run in runs:
        assert set(run) == required
        assert run["device"] == "NVIDIA H200" and run["versions"] == VERSIONS and run["date"] == "2026-11-30"
    base, ref, large, hf, plain = runs
    assert base["ok"] and base["tokens_per_s"] == 3072.0 and isinstance(base["peak_gib"], float)
    assert base["peak_gib"] == 3.5 and ref["peak_gib"] == pytest.approx(1680 / 1024)  # MiB -> GiB, once
    assert base["vs_reference"] == 2.0 and ref["vs_reference"] == 1.0 and large["vs_reference"] == pytest.approx(9000 / 1536)
    assert base["config"] == ["fit", "--config", "x"] and ref["config"] == []
    assert base["error"] is None and base["last_loss"] == 1.9 and ref["padding_efficiency"] is None
    for failed in (hf, plain):
        assert not failed["ok"] and failed["tokens_per_s"] is None and failed["peak_gib"] is None
        assert failed["vs_reference"] is None
    assert "needs a CUDA GPU" in hf["error"] and "budget is spent" in plain["error"]
    text = check.report(_document(summaries), "header", {"export": "ok"})
    assert "base.yaml" in text and " 2.00x " in text and "FAILED: skipped" in text and text.endswith("export       ok")


def test_without_a_reference_or_with_nothing_timed():
    runs = _document({"base.yaml": _meter(3000.0, 1024.0), "unsloth-gc": {**_meter(0, 1), "tokens_per_s": None}})["runs"]
    assert runs[0]["ok"] and runs[0]["vs_reference"] is None and runs[0]["peak_gib"] == 1.0
    assert not runs[1]["ok"] and runs[1]["error"] is None  # fewer than two steps: nothing was timed
    assert result_file.peak_gib({"peak_gib": 2.5, "peak_memory_mib": 1.0}) == 2.5  # a new writer's GiB wins


def test_written_after_every_run_atomically(tmp_path):
    path = tmp_path / "results" / "gpu-20261130.json"
    result_file.write(_document({"base.yaml": _meter(3000.0, 1024.0)}), path)
    result_file.write(_document({"base.yaml": _meter(3000.0, 1024.0), "reference": _meter(1500.0, 512.0)}), path)
    assert [r["name"] for r in json.loads(path.read_text())["runs"]] == ["base.yaml", "reference"]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no .partial left behind


def test_the_check_runs_the_most_wanted_first():
    assert check.DEFAULT_RUNS[:2] == ["base.yaml", "reference"]
    assert set(check.DEFAULT_RUNS) == {"base.yaml", "reference", "large-batch", "hf", "hf-plain"} <= set(check.RUNS)
    assert check.RUNS["large-batch"][1] == "full.yaml" and "liger" in check.RUNS["hf"][2]
    installed = result_file.package_versions(("torch", "no-such-package-amzft"))
    assert list(installed) == ["torch"]  # a package that is not installed is left out


def test_utilisation_is_the_counted_flops_over_time_against_the_probed_rates(tmp_path):
    """gpu/check.py's utilisation column: amzft.training.flops' count at the summary's real
    lengths, over the timed seconds, as a share of each probed torch.mm rate; none for the
    reference, whose rows are not recorded; shown in the report."""
    config = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
              "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256}
    (tmp_path / "config.json").write_text(json.dumps(config))
    meter = {**_meter(3000.0, 2800.0), "processed_tokens": 43554, "row_length_squares": 11107758, "label_tokens": 31149,
             "seconds": 14.4}
    shape = ModelShape(2048, 8192, 16, 32, 8, 64, 128256)
    expected = step_flops(shape, 16, PROJECTIONS, StepTokens(43554, 11107758, 31149)).total / 14.4 / 1e12
    rates = {"mlp": 600.0, "8192^3": 800.0}
    counted = check.add_utilisation(meter, tmp_path / "config.json", rates)
    assert counted["tflops_per_s"] == pytest.approx(expected) and 10 < expected < 20  # ~4.8 GFLOP a token
    assert counted["utilisation"] == pytest.approx({"mlp": expected / 600, "8192^3": expected / 800})
    reference = {"tokens_per_s": 1650.0, "seconds": 26.5, "tokens": 43882, "peak_memory_mib": 1680.0}
    assert check.add_utilisation(reference, tmp_path / "config.json", rates) == reference
    assert check.add_utilisation({"error": "exit 1"}, tmp_path / "config.json", rates) == {"error": "exit 1"}
    document = _document({"base.yaml": counted, "reference": reference})
    assert document["runs"][1]["utilisation"] is None
    table = check.report(document, "header", {})
    assert f"{expected:.1f}" in table and f"{expected / 600:.1%}" in table and "600 TFLOP/s" in table
