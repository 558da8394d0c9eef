"""benchmarks/quality.py, the quality protocol: its slicing never lets a product a slice trained on
into that slice's unseen products, the dry run writes the slice files and prints the commands,
and the pooled interval is the paired bootstrap of the pooled per-product scores. No fit: the
real protocol takes hours; its runs are faked here by writing the reports evaluate would write."""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path

import pytest
from datasets import Dataset

from amzft.data.split import product_key
from amzft.errors import ConfigError
from amzft.evaluation.bootstrap import paired_ratio_interval
from amzft.evaluation.run import add_uncertainty, split_by_seen
from helpers import REPO

VIEWS = ("empty", "title_only", "never_stopped", "looping", "collapsed", "facts_recalled", "facts_invented", "mean_new_tokens")


@pytest.fixture
def quality(monkeypatch):
    # Run as a script, the benchmark finds its sibling benchmarks/machine.py on sys.path[0]; loaded by path, it does not.
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("quality_protocol", REPO / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def products(n: int) -> list[dict]:
    return [{"title": f"Product {i} thing", "content": f"The description of product number {i}."} for i in range(n)]


def test_a_product_of_a_slice_repeated_later_is_never_unseen_in_its_file(quality, write_jsonl, tmp_path):
    rows = products(12)
    rows[9]["title"] = "  PRODUCT 1   thing "  # slice 1's second product again, other case and spacing
    rows[10]["title"] = "product 5 THING"  # slice 2's second product again
    data = write_jsonl([*rows[:11], "{not json", rows[11]])  # a bad line counts as a record, as data.limit counts it
    paths = quality.write_slices(data, tmp_path / "out", slices=2, slice_size=4)
    files = [p.read_text().splitlines() for p in paths]
    assert [p.name for p in paths] == ["slice_1.jsonl", "slice_2.jsonl"]
    assert [[json.loads(x) for x in f[:4]] for f in files] == [rows[0:4], rows[4:8]]  # each file starts with its slice
    assert all(f[4:] == files[0][4:] and len(f) == 4 + 5 for f in files)  # then the records after the slices, alone
    for k, lines in enumerate(files):
        titles = [json.loads(x)["title"] for x in lines if x.startswith("{\"")]
        head = titles[:4]  # every product of the slice, a superset of the ones its fit trains on
        parts = split_by_seen(Dataset.from_dict({"title": titles}), head)  # what evaluate --data.path does
        unseen = {product_key(t) for t in parts["unseen"]["title"]}
        assert unseen.isdisjoint(product_key(t) for t in head)
        assert rows[9 + k]["title"] in parts["seen"]["title"] and rows[9 + k]["title"] not in parts["unseen"]["title"]
        assert quality.repeated_later([x.encode() for x in lines], 4) == 1
        if k == 0:  # slice 2's product is a new one to slice 1's fit
            assert rows[10]["title"] in parts["unseen"]["title"]


def test_slices_are_disjoint_and_too_few_records_is_a_one_line_error(quality):
    records = [f"{i}\n".encode() for i in range(10)]
    files = quality.slice_files(records, slices=3, slice_size=3)
    assert files == [records[0:3] + records[9:], records[3:6] + records[9:], records[6:9] + records[9:]]
    heads = [set(f[:3]) for f in files]
    assert not (heads[0] & heads[1] or heads[0] & heads[2] or heads[1] & heads[2])
    for slices, size in ((4, 3), (2, 5), (0, 3), (3, 0)):
        with pytest.raises(ConfigError) as error:
            quality.slice_files(records, slices, size)
        assert "\n" not in str(error.value)


def test_the_dry_run_writes_the_slices_and_prints_every_command(quality, write_jsonl, tmp_path, capsys):
    data = write_jsonl(products(10))
    out = tmp_path / "q"
    config = str(REPO / "configs" / "cpu-real.yaml")
    assert quality.main(["--config", config, "--data", str(data), "--slices", "2", "--slice_size", "3", "--out", str(out),
                         "--override", "model.optim.lr=1e-4", "--override", "model.optim.lr=1e-3 trainer.max_steps=40",
                         "--dry_run"]) is None
    printed = capsys.readouterr().out
    commands = [shlex.split(line) for line in printed.splitlines() if " -m amzft " in line]
    assert len(commands) == 2 * 2 * 3  # variants x slices x (fit, evaluate best, evaluate last)
    fit = commands[0]
    slice_1 = str(out.resolve() / "slices" / "slice_1.jsonl")
    assert fit[3:] == ["fit", "--config", config, "--data.path", slice_1, "--data.limit", "3", "--trainer.default_root_dir",
                       str(out.resolve() / "v0_model.optim.lr=1e-4" / "slice_1"), "--model.optim.lr", "1e-4"]
    assert commands[6][3] == "fit" and commands[6][-4:] == ["--model.optim.lr", "1e-3", "--trainer.max_steps", "40"]
    for cmd, ckpt in ((commands[1], "best"), (commands[2], "last")):
        assert cmd[3:7] == ["evaluate", "--config", config, "--ckpt_path"] and cmd[7] == ckpt
        assert cmd[cmd.index("--data.path") + 1] == slice_1 and cmd[cmd.index("--samples") + 1] == "24"
        assert cmd[cmd.index("--log_root") + 1] == fit[fit.index("--trainer.default_root_dir") + 1]
    assert "records 1-3 then the 4 after the slices" in printed
    assert sorted(p.name for p in (out / "slices").iterdir()) == ["slice_1.jsonl", "slice_2.jsonl"]
    assert not (out / "summary.json").exists() and not (out / "v0_model.optim.lr=1e-4").exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--override", "model.optim.lr"], "is not key=value"),
    (["--override", "data.limit=200"], "data.limit is set by the protocol"),
    (["--slices", "4"], "leave no record after the slices"),
    (["--samples", "0"], "--samples should be >= 1"),
])
def test_bad_input_is_one_line(quality, write_jsonl, tmp_path, extra, message):
    data = write_jsonl(products(10))
    with pytest.raises(SystemExit) as done:
        quality.main(["--config", str(REPO / "configs" / "cpu-real.yaml"), "--data", str(data), "--slice_size", "3",
                      "--out", str(tmp_path / "q"), "--dry_run", *extra])
    assert str(done.value).startswith("quality.py: error: ") and message in str(done.value) and "\n" not in str(done.value)


def fake_split(titles: list[str], base: list[str], tuned: list[str], references: list[str]) -> dict:
    """A split as evaluate's report.json holds it: its per-product scores computed, its views made up."""
    result = {"n": len(titles), "examples": [],
              "models": {m: dict.fromkeys(VIEWS, share) | {"rougeL": 0.0} for m, share in (("base", 0.5), ("fine-tuned", 0.25))}}
    result = add_uncertainty(result, titles, {"base": base, "fine-tuned": tuned}, references)
    for model, scores in result["per_product"]["rougeL"].items():
        result["models"][model]["rougeL"] = sum(scores) / len(scores)
    return result


REFS = {"Mug": "A white ceramic mug for coffee.", "Lamp": "A desk lamp with a warm light.", "Tutu": "A pink tutu for ballet class.",
        "Kettle": "A steel kettle that whistles."}


def test_the_pooled_interval_is_the_bootstrap_of_the_pooled_per_product_scores(quality):
    # Two slices; the unseen product "Kettle" is scored in both (as the unseen pool is): one product, drawn with both rows.
    first = fake_split(["Mug", "Kettle"], ["A cup.", "A pot."], ["A white mug.", "A steel kettle."], [REFS["Mug"], REFS["Kettle"]])
    second = fake_split(["Lamp", "Tutu", "Kettle"], ["A light.", "A dress.", "A pot."],
                        ["A desk lamp.", "A pink tutu.", "A kettle that whistles."], [REFS["Lamp"], REFS["Tutu"], REFS["Kettle"]])
    pooled = quality.pool([first, second])
    keys = first["per_product"]["products"] + second["per_product"]["products"]
    base = first["per_product"]["rougeL"]["base"] + second["per_product"]["rougeL"]["base"]
    tuned = first["per_product"]["rougeL"]["fine-tuned"] + second["per_product"]["rougeL"]["fine-tuned"]
    expected = paired_ratio_interval(base, tuned, groups=keys)
    assert pooled["ratio"] == {"metric": "rougeL", "tuned": "fine-tuned", "base": "base", **expected.as_dict()}
    assert pooled["n"] == 5 and pooled["n_products"] == expected.n_products == 4
    assert pooled["base"]["rougeL"] == pytest.approx(sum(base) / 5) and pooled["tuned"]["rougeL"] == pytest.approx(sum(tuned) / 5)
    assert pooled["tuned"]["looping"] == pytest.approx(0.25) and pooled["base"]["collapsed"] == pytest.approx(0.5)
    # Not the mean of the slices' ratios: the pool is one sample.
    assert pooled["ratio"]["value"] == pytest.approx(sum(tuned) / sum(base))


def test_a_run_pools_the_reports_of_every_slice(quality, write_jsonl, tmp_path, monkeypatch, capsys):
    data = write_jsonl(products(8))
    written = []

    def fake_run(cmd, log):  # what fit and evaluate would leave: evaluate's report.json in its --out
        written.append(cmd[3])
        if cmd[3] == "evaluate":
            name = Path(cmd[cmd.index("--data.path") + 1]).stem  # slice_1, slice_2: a seen product of its own
            # slice 2 kept no best file (too few validation products): best is its last.ckpt
            kept = "best" in cmd and name == "slice_1"
            report = {"step": 48 if kept else 80, "checkpoint": "best-step00048.ckpt" if kept else "v/last.ckpt", "splits": {
                "seen": fake_split([f"Product of {name}"], ["A thing."], ["The description of product."],
                                   ["The description of product 1."]),
                "unseen": fake_split(["Mug", "Lamp"], ["A cup.", "A light."], ["A white mug.", "A desk lamp."],
                                     [REFS["Mug"], REFS["Lamp"]])}}
            out = Path(cmd[cmd.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "report.json").write_text(json.dumps(report))

    monkeypatch.setattr(quality, "run_command", fake_run)
    summary = quality.main(["--config", str(REPO / "configs" / "cpu-real.yaml"), "--data", str(data), "--slices", "2",
                            "--slice_size", "3", "--out", str(tmp_path / "q")])
    assert written == ["fit", "evaluate", "evaluate", "fit", "evaluate"]  # slice 2's last is its best: reused
    (variant,) = summary["variants"]
    assert [(r["slice"], r["checkpoint"], r["step"]) for r in variant["runs"]] == [(1, "best", 48), (1, "last", 80),
                                                                                (2, "best", 80), (2, "last", 80)]
    unseen = variant["pooled"][0]["splits"]["unseen"]
    assert unseen["n"] == 4 and unseen["n_products"] == 2  # Mug and Lamp, scored in both slices
    assert json.loads((tmp_path / "q" / "summary.json").read_text()) == summary
    md = (tmp_path / "q" / "summary.md").read_text()
    assert "| pooled | best | unseen | 4 (2) |" in md and "paired bootstrap" in md and "best (step 48)" in md
    assert [m["val_rougeL"] for m in variant["monitor"]] == [[], []]  # the fake fits logged no events
    assert sorted(variant["monitor"][0]["spread"]) == ["24", "6"] and "- slice 2 monitor, val/rougeL at each validation" in md
    assert "| 2 | best = last (step 80) | seen |" in md and "| 2 | last (step 80)" not in md  # one row when best is last
    assert "| 1 | last (step 80) | seen |" in md
    assert "summary.md" in capsys.readouterr().out
    # --report_only: the same summary from the reports left in --out, nothing run
    again = quality.main(["--config", str(REPO / "configs" / "cpu-real.yaml"), "--data", str(data), "--slices", "2",
                          "--slice_size", "3", "--out", str(tmp_path / "q"), "--report_only"])
    assert written == ["fit", "evaluate", "evaluate", "fit", "evaluate"] and again["variants"] == summary["variants"]
    with pytest.raises(SystemExit, match="eval_best/report.json: its evaluation has not run"):
        quality.main(["--config", str(REPO / "configs" / "cpu-real.yaml"), "--data", str(data), "--slices", "2",
                      "--slice_size", "3", "--out", str(tmp_path / "empty"), "--report_only"])


def test_the_monitor_spread_is_that_of_a_mean_of_k_products(quality, tmp_path):
    # One product scores 1, the other 0: a mean of k re-drawn products has SD 0.5 / sqrt(k).
    assert quality.redraw_spread([1.0, 1.0, 1.0], 6) == 0.0
    assert abs(quality.redraw_spread([0.0, 1.0], 1, draws=20000) - 0.5) < 0.01
    assert abs(quality.redraw_spread([0.0, 1.0], 25, draws=20000) - 0.1) < 0.005
    report = {"splits": {"unseen": {"per_product": {"rougeL": {"fine-tuned": [0.0, 1.0]}}}}}
    noise = quality.monitor_noise(tmp_path, report, sizes=(4,))  # a run without events: no curve
    assert noise["val_rougeL"] == [] and noise["range"] is None and abs(noise["spread"]["4"] - 0.25) < 0.02
