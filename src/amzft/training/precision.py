"""``trainer.precision: auto``: the fastest correct precision for this machine, with the reason.
CUDA: bf16 where native, else fp16; CPU: AMX -> bf16, no AVX512-BF16 -> fp32, otherwise (or
with ``AMZFT_PRECISION_PROBE=1``, on MPS, without x86 flags) a short fp32-vs-bf16 probe decides."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info

from amzft.errors import ConfigError
from amzft.lightning_compat import PrecisionInput
from amzft.training.out_of_memory import out_of_memory_error

PROBE_ENV = "AMZFT_PRECISION_PROBE"
RESOLVED_ENV = "AMZFT_PRECISION_AUTO"  # "<pid>:<device kind>:<precision>": what process <pid> chose
PROBE_CAP = 1.5  # bf16 stops once it took this many times fp32's time: a very slow bf16 must not hold a run
PROBE_FP32_SECONDS = 0.3  # how long fp32 is timed (at least PROBE_MIN_STEPS steps)
PROBE_MIN_STEPS = 3


@dataclass(frozen=True)
class Choice:
    precision: str
    reason: str


@dataclass(frozen=True)
class ProbeResult:
    steps: int
    fp32_s: float
    bf16_s: float | None  # None: stopped at the cap (or bf16 autocast failed)
    note: str = ""

    @property
    def bf16_faster(self) -> bool:
        return self.bf16_s is not None and self.bf16_s < self.fp32_s

    def figures(self) -> str:
        fp32 = f"fp32 {self.fp32_s:.2f} s"
        if self.bf16_s is not None:
            return f"{fp32}, bf16 autocast {self.bf16_s:.2f} s ({self.bf16_s / self.fp32_s:.2f}x)"
        return f"{fp32}, bf16 autocast {self.note or f'stopped past {PROBE_CAP}x fp32'}"


def resolve(precision, accelerator):
    """``auto`` -> the chosen precision, logged with its reason; anything else as given. DDP ranks (started with
    rank 0's environment) take rank 0's choice for the same device kind: probes on shared cores could disagree."""
    if precision != "auto":
        return precision
    kind = device_kind(accelerator)
    chooser, chosen_for, inherited = (os.environ.get(RESOLVED_ENV, "").split(":", 2) + ["", ""])[:3]
    if inherited and chosen_for == kind and chooser != str(os.getpid()):
        return inherited
    choice = choose(kind)
    rank_zero_info(f"precision auto -> {choice.precision}: {choice.reason}")
    os.environ[RESOLVED_ENV] = f"{os.getpid()}:{kind}:{choice.precision}"  # for the processes this one starts
    return choice.precision


def choose(kind: str) -> Choice:
    if kind == "cuda":
        import torch  # noqa: PLC0415 - `python -m amzft --help` must not import torch

        return for_cuda(torch.cuda.is_bf16_supported(including_emulation=False), torch.cuda.get_device_name())
    if kind == "mps":
        return _from_probe(probe("mps"), "Apple GPU (MPS): no measured rule")
    return for_cpu(read_cpuinfo(), probe, force_probe=os.environ.get(PROBE_ENV, "") not in ("", "0"))


def device_kind(accelerator) -> str:
    """``cpu``, ``cuda`` or ``mps``: where ``trainer.accelerator`` trains (``auto``/``gpu`` as Lightning resolves them)."""
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator  # noqa: PLC0415

    name = str(getattr(accelerator, "class_path", None) or (accelerator if isinstance(accelerator, str)
                                                           else type(accelerator).__name__)).lower()
    for kind in ("cpu", "cuda", "mps"):
        if kind in name:
            return kind
    if name in ("auto", "gpu"):
        if MPSAccelerator.is_available():
            return "mps"
        if CUDAAccelerator.is_available():
            return "cuda"
        return "cpu" if name == "auto" else "cuda"  # gpu without one: Lightning's own error follows
    raise ConfigError(f"trainer.precision auto knows CPU, CUDA and MPS accelerators, not trainer.accelerator="
                      f"{accelerator!r}: set trainer.precision explicitly")


def for_cuda(bf16_native: bool, name: str = "this GPU") -> Choice:
    if bf16_native:
        return Choice("bf16-mixed", f"GPU '{name}' has native bf16")
    return Choice("16-mixed", f"GPU '{name}' has no native bf16 (compute capability < 8): fp16 with loss scaling")


def read_cpuinfo() -> str | None:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return None


def _cpuinfo_field(cpuinfo: str, field: str) -> str | None:
    found = re.search(rf"^[ \t]*{re.escape(field)}[ \t]*:(.*)$", cpuinfo, re.MULTILINE)
    return found.group(1).strip() if found else None


def for_cpu(cpuinfo: str | None, run_probe: Callable[[], ProbeResult], force_probe: bool = False) -> Choice:
    """The CPU rule on ``/proc/cpuinfo``'s text (None: unreadable); probes only where the flags cannot decide."""
    name = (cpuinfo and _cpuinfo_field(cpuinfo, "model name")) or "unknown"
    flags_line = cpuinfo and _cpuinfo_field(cpuinfo, "flags")
    if force_probe or not flags_line:
        why = f"{PROBE_ENV} set" if force_probe else "its flags cannot be read"
        return _from_probe(run_probe(), f"CPU '{name}', {why}")
    flags = set(flags_line.split())
    if "amx_bf16" in flags:
        return Choice("bf16-mixed", f"CPU '{name}' has AMX (amx_bf16): bf16 matrix units")
    if "avx512_bf16" in flags:  # bf16 wins on some such CPUs and loses on others: measure this one
        return _from_probe(run_probe(), f"CPU '{name}' has AVX512-BF16 but no AMX (bf16 autocast is slower "
                                        "than fp32 on some such CPUs, faster on others)")
    best = next((f for f in ("avx512f", "avx2", "avx") if f in flags), "no avx")
    return Choice("32-true", f"CPU '{name}' has no AMX ({best} only); bf16 autocast is many times slower "
                             "than fp32 on such CPUs")


def _from_probe(result: ProbeResult, context: str) -> Choice:
    chosen = "bf16-mixed" if result.bf16_faster else "32-true"
    return Choice(chosen, f"{context}; probe ({result.steps} forward+backward steps of a 4-layer Linear "
                          f"stack): {result.figures()}")


def probe(device: str = "cpu", fp32_seconds: float = PROBE_FP32_SECONDS, step_factory: Callable | None = None) -> ProbeResult:
    """Times fp32, then bf16 autocast for as many steps, stopping past ``PROBE_CAP`` x fp32's time.
    Warm-up steps count for both sides. ``step_factory(dtype)`` replaces the Linear stack (tests)."""
    import torch  # noqa: PLC0415

    sync = torch.mps.synchronize if device == "mps" else (lambda: None)
    step_of = step_factory or (lambda dtype: _linear_stack_step(device, dtype))
    step = step_of(None)
    start, steps = time.perf_counter(), 0
    while steps < PROBE_MIN_STEPS or time.perf_counter() - start < fp32_seconds:
        step()
        sync()
        steps += 1
    fp32_s = time.perf_counter() - start
    try:
        step = step_of(torch.bfloat16)
        start = time.perf_counter()
        for _ in range(steps):
            step()
            sync()
            if time.perf_counter() - start > PROBE_CAP * fp32_s:
                return ProbeResult(steps, fp32_s, None)
    except RuntimeError as exc:  # no bf16 autocast here (e.g. an older macOS)
        return ProbeResult(steps, fp32_s, None, f"failed ({str(exc).splitlines()[0][:80]})")
    return ProbeResult(steps, fp32_s, time.perf_counter() - start)


def _linear_stack_step(device: str, dtype):
    """One forward + backward of 4 Linear(512, 512) layers on 256 rows: a small LM's matmul-bound step."""
    import torch  # noqa: PLC0415

    generator = torch.Generator().manual_seed(0)
    stack = torch.nn.Sequential(*(m for _ in range(4) for m in (torch.nn.Linear(512, 512), torch.nn.GELU()))).to(device)
    x = torch.randn(256, 512, generator=generator).to(device)

    def step():
        with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = stack(x)
        out.float().square().mean().backward()

    return step


class AmzftTrainer(Trainer):
    """Lightning's Trainer accepting ``precision: auto`` (``AmzftCLI`` resolves it earlier, for config.yaml)."""

    def __init__(self, *, precision: PrecisionInput | Literal["auto"] | None = None, **kwargs):
        super().__init__(precision=resolve(precision, kwargs.get("accelerator", "auto")), **kwargs)

    def fit(self, *args, **kwargs) -> None:
        try:
            super().fit(*args, **kwargs)
        except torch.OutOfMemoryError as exc:  # once Lightning has run its exception hooks and torn down
            raise out_of_memory_error(self, exc) from None
