"""trainer.precision: auto (amzft.training.precision): the rule on fake /proc/cpuinfo texts, the probe
and its cap, and the CLI resolving it (logged, recorded in the run's config.yaml, resumable)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import yaml

import amzft.training.precision as precision
from amzft.cli.lightning_cli import cli_main
from amzft.cli.main import main
from amzft.errors import ConfigError
from amzft.training.precision import ProbeResult, for_cpu, for_cuda, probe, resolve
from helpers import fit_args


def cpuinfo(name: str, *flags: str) -> str:
    # Two logical CPUs, as /proc/cpuinfo lists them: the first one's lines count.
    one = f"processor\t: 0\nvendor_id\t: X\nmodel name\t: {name}\nflags\t\t: fpu sse2 {' '.join(flags)}\n\n"
    return one + one.replace(": 0", ": 1", 1)


AVX2 = cpuinfo("AMD EPYC", "avx", "avx2", "fma")
XEON_BF16 = cpuinfo("Intel Xeon Platinum 8370C", "avx2", "avx512f", "avx512_bf16")
SAPPHIRE = cpuinfo("Intel Xeon Platinum 8480+", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd bf16\nCPU implementer\t: 0x41\n"


def no_probe():
    raise AssertionError("the flags decide: no probe")


def fake_probe(bf16_s: float | None):
    calls = []

    def run():
        calls.append(1)
        return ProbeResult(5, 1.0, bf16_s)

    return run, calls


@pytest.mark.parametrize("text, expected, words", [
    (SAPPHIRE, "bf16-mixed", "has AMX (amx_bf16)"),
    (AVX2, "32-true", "CPU 'AMD EPYC' has no AMX (avx2 only); bf16 autocast is many times slower than fp32"),
], ids=["amx", "avx2"])
def test_cpu_rule_reads_the_flags(text, expected, words):
    choice = for_cpu(text, no_probe)
    assert choice.precision == expected and words in choice.reason


@pytest.mark.parametrize("text", [None, ARM], ids=["unreadable", "no-x86-flags"])
@pytest.mark.parametrize("bf16_s, expected", [(0.5, "bf16-mixed"), (None, "32-true"), (1.2, "32-true")])
def test_without_flags_the_probe_decides(text, bf16_s, expected):
    run, calls = fake_probe(bf16_s)
    choice = for_cpu(text, run)
    assert calls == [1] and choice.precision == expected
    assert "its flags cannot be read; probe (5 forward+backward steps" in choice.reason and "fp32 1.00 s" in choice.reason


@pytest.mark.parametrize("bf16_s, expected", [(0.6, "bf16-mixed"), (1.7, "32-true"), (None, "32-true")])
def test_avx512_bf16_without_amx_is_probed(bf16_s, expected):
    """bf16 autocast is slower than fp32 on some CPUs with AVX512-BF16 and faster on others
    (docs/performance.md, "The machines"): on such a CPU the probe decides."""
    run, calls = fake_probe(bf16_s)
    choice = for_cpu(XEON_BF16, run)
    assert calls == [1] and choice.precision == expected
    assert "has AVX512-BF16 but no AMX" in choice.reason and "probe (5 forward+backward steps" in choice.reason


def test_the_probe_can_be_forced_where_flags_are_readable():
    run, calls = fake_probe(None)
    choice = for_cpu(SAPPHIRE, run, force_probe=True)
    assert calls == [1] and choice.precision == "32-true" and "AMZFT_PRECISION_PROBE set" in choice.reason


def test_cuda_rule():
    assert for_cuda(True, "NVIDIA H200").precision == "bf16-mixed"
    fp16 = for_cuda(False, "Tesla T4")
    assert fp16.precision == "16-mixed" and "no native bf16" in fp16.reason


@pytest.mark.parametrize("value", ["bf16-mixed", "32-true", "16-mixed", 32, None])
def test_an_explicit_precision_wins(value, monkeypatch):
    monkeypatch.setattr(precision, "choose", lambda kind: pytest.fail("auto only"))
    assert resolve(value, "cpu") == value


def test_a_process_started_after_the_choice_takes_it(monkeypatch):
    """DDP ranks started by rank 0 (a copy of its environment) train in rank 0's precision, not in
    that of a probe of their own; the choosing process itself, and its later fits, choose again."""
    assert precision.RESOLVED_ENV == "AMZFT_PRECISION_AUTO"  # the name conftest clears
    monkeypatch.setattr(precision, "read_cpuinfo", lambda: AVX2)
    assert resolve("auto", "cpu") == "32-true"
    assert os.environ[precision.RESOLVED_ENV] == f"{os.getpid()}:cpu:32-true"
    monkeypatch.setattr(precision, "read_cpuinfo", lambda: SAPPHIRE)
    assert resolve("auto", "cpu") == "bf16-mixed"  # this process chose: it chooses again
    monkeypatch.setenv(precision.RESOLVED_ENV, "1:cpu:32-true")  # chosen by the process that started this one
    monkeypatch.setattr(precision, "choose", lambda kind: pytest.fail("the starter chose"))
    assert resolve("auto", "cpu") == "32-true"
    assert resolve("bf16-mixed", "cpu") == "bf16-mixed"  # an explicit value still wins
    monkeypatch.setattr(precision, "choose", lambda kind: precision.Choice("bf16-mixed", f"a {kind} rule"))
    assert resolve("auto", "cuda") == "bf16-mixed"  # the starter chose for a CPU: no answer for a GPU
    monkeypatch.setenv(precision.RESOLVED_ENV, "1:32-true")  # malformed: chosen again, not misread
    assert resolve("auto", "cpu") == "bf16-mixed"


def test_auto_on_an_unknown_accelerator_asks_for_an_explicit_value():
    with pytest.raises(ConfigError, match="set trainer.precision explicitly"):
        resolve("auto", "tpu")


def fake_clock(monkeypatch, seconds: dict) -> tuple:
    """The probe's clock made a counter that each fake step advances by its kind's ``seconds``
    (None: fp32): the probe's decisions, not this machine's speed or load, are what is tested.
    Returns the steps run of each kind."""
    now, ran = [0.0], {kind: 0 for kind in seconds}
    monkeypatch.setattr(precision, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def step_of(dtype):
        kind = None if dtype is None else "bf16"

        def step():
            ran[kind] += 1
            now[0] += seconds[kind]

        return step

    return step_of, ran


def test_probe_stops_a_slow_bf16_at_the_cap(monkeypatch):
    """A bf16 step 30x slower than fp32 is cut off at 1.5x fp32's time, not run to the end."""
    step_of, ran = fake_clock(monkeypatch, {None: 0.01, "bf16": 0.3})
    result = probe(step_factory=step_of, fp32_seconds=0.1)
    assert result.bf16_s is None and not result.bf16_faster and result.steps >= 3
    assert ran[None] == result.steps and result.fp32_s == pytest.approx(0.01 * result.steps)
    assert ran["bf16"] == 1  # fp32, then one bf16 step past the cap: not steps x 0.3 s
    assert "stopped past 1.5x fp32" in result.figures()


def test_probe_keeps_a_faster_bf16_and_its_figures(monkeypatch):
    step_of, ran = fake_clock(monkeypatch, {None: 0.01, "bf16": 0.002})
    result = probe(step_factory=step_of, fp32_seconds=0.05)
    assert ran[None] == ran["bf16"] == result.steps  # bf16 ran as many steps as fp32
    assert result.bf16_s == pytest.approx(0.002 * result.steps) and result.fp32_s == pytest.approx(0.01 * result.steps)
    assert result.bf16_faster and result.bf16_s < result.fp32_s and "bf16 autocast" in result.figures()


def test_the_real_probe_times_fp32_then_bf16_within_the_cap():
    """The real Linear-stack probe on this machine: fp32 timed for at least PROBE_FP32_SECONDS and
    PROBE_MIN_STEPS steps, then bf16 autocast either finished within the cap, stopped past it, or
    failed with a note; figures() says which (no wall-time bound: that is the cap's own test above)."""
    result = probe()
    assert result.steps >= precision.PROBE_MIN_STEPS and result.fp32_s >= precision.PROBE_FP32_SECONDS
    if result.bf16_s is not None:
        assert 0 < result.bf16_s and " s (" in result.figures()
    else:
        assert result.note.startswith("failed (") or "stopped past 1.5x fp32" in result.figures()


def logged(caplog) -> str:
    """Lightning's INFO lines since the last call."""
    text = caplog.text
    caplog.clear()
    return text


def shipped_precision_args(*args) -> list[str]:
    """fit_args without conftest's `--trainer.precision 32-true` pin: these tests run
    configs/cpu.yaml's own `precision: auto`."""
    args = list(fit_args(*args))
    at = args.index("--trainer.precision")
    del args[at:at + 2]
    return args


def run_config(tmp_path) -> dict:
    return yaml.safe_load(next((tmp_path / "logs").rglob("config.yaml")).read_text())


def test_fit_resolves_auto_logs_why_records_it_and_resumes(tiny_model_dir, tiny_data, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(precision, "read_cpuinfo", lambda: AVX2)  # the same answer on any test machine
    main(shipped_precision_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.max_steps", "1"))
    assert "precision auto -> 32-true: CPU 'AMD EPYC' has no AMX (avx2 only)" in logged(caplog)
    assert run_config(tmp_path)["trainer"]["precision"] == "32-true"  # what the run used, not "auto"
    main(shipped_precision_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.max_steps", "2", "--ckpt_path", "last"))
    assert "precision auto -> 32-true" in logged(caplog)
    assert run_config(tmp_path)["trainer"]["precision"] == "32-true"
    validate = shipped_precision_args(tiny_model_dir, tiny_data, tmp_path, "--ckpt_path", "last", "--data.holdout.val_fraction", "0.3")
    validate[0] = "validate"
    main(validate)
    assert "precision auto -> 32-true" in logged(caplog)


def test_an_explicit_precision_wins_in_the_cli(tiny_model_dir, tiny_data, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(precision, "read_cpuinfo", lambda: SAPPHIRE)  # auto would pick bf16-mixed
    cli = cli_main(fit_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.precision", "32-true"), run=False)
    assert cli.trainer.precision == "32-true" and "precision auto" not in logged(caplog)
    cli = cli_main(shipped_precision_args(tiny_model_dir, tiny_data, tmp_path), run=False)  # cpu.yaml: auto
    assert cli.trainer.precision == "bf16-mixed" and "has AMX" in logged(caplog)
