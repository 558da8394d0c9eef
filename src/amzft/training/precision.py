"""``trainer.precision: auto``: the fastest correct precision for this machine, with the reason.

* CUDA: ``bf16-mixed`` where the GPU has native bf16 (compute capability >= 8), else
  ``16-mixed`` (fp16 with loss scaling).
* CPU with AMX (``amx_bf16`` in ``/proc/cpuinfo``): ``bf16-mixed``. Without AVX512-BF16:
  ``32-true``: with no bf16 instructions, bf16 autocast is many times *slower* than fp32.
* CPU with AVX512-BF16 but no AMX: the flags do not decide, a probe does: in training, bf16
  autocast is slower than fp32 on some such CPUs and faster on others.
* CPU without readable x86 flags (macOS, ARM) and Apple GPUs (MPS): the probe.
  The probe (about a second) times fp32 against bf16 autocast on a small Linear stack and
  keeps the faster.
  ``AMZFT_PRECISION_PROBE=1`` runs the probe on any CPU instead of reading the flags.

The measurements behind these rules, per CPU: docs/performance.md, "The machines".

The functions below take the cpuinfo text and the probe as arguments, so tests feed them fake
machines. Any other precision value is passed through untouched: an explicit one wins.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info

from amzft.errors import ConfigError
from amzft.lightning_compat import PrecisionInput

PROBE_ENV = "AMZFT_PRECISION_PROBE"
RESOLVED_ENV = "AMZFT_PRECISION_AUTO"  # "<pid>:<device kind>:<precision>": what process <pid> chose
# The probe stops timing bf16 once it has taken this many times fp32's time: it lost, and a
# bf16 many times slower than fp32 (module doc) must not hold a run for a minute.
PROBE_CAP = 1.5
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
    """``auto`` -> the chosen precision, logged with its reason (one INFO line); anything else as
    given. A process started by one that already chose (Lightning's DDP launcher starts the
    other ranks with a copy of rank 0's environment) takes that choice: a probe run by each
    rank, on cores the ranks share, could choose differently. Only a choice for the same kind of
    device is taken: a CPU's is no answer for a GPU."""
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
    """The precision for a device of this kind (``device_kind``), with its reason."""
    if kind == "cuda":
        import torch  # noqa: PLC0415 - `python -m amzft --help` must not import torch

        name = torch.cuda.get_device_name()
        return for_cuda(torch.cuda.is_bf16_supported(including_emulation=False), name)
    if kind == "mps":
        return _from_probe(probe("mps"), "Apple GPU (MPS): no measured rule")
    return for_cpu(read_cpuinfo(), probe, force_probe=os.environ.get(PROBE_ENV, "") not in ("", "0"))


def device_kind(accelerator) -> str:
    """``cpu``, ``cuda`` or ``mps``: where ``trainer.accelerator`` will train (``auto`` and
    ``gpu`` resolved the way Lightning resolves them)."""
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
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == field:
            return value.strip()
    return None


def for_cpu(cpuinfo: str | None, run_probe: Callable[[], ProbeResult], force_probe: bool = False) -> Choice:
    """The CPU rule on ``/proc/cpuinfo``'s text (None: unreadable); ``run_probe`` is called
    only for AVX512-BF16 without AMX, when the x86 flags cannot be read, or with ``force_probe``."""
    name = (cpuinfo and _cpuinfo_field(cpuinfo, "model name")) or "unknown"
    flags_line = cpuinfo and _cpuinfo_field(cpuinfo, "flags")
    if force_probe or not flags_line:
        why = f"{PROBE_ENV} set" if force_probe else "its flags cannot be read"
        return _from_probe(run_probe(), f"CPU '{name}', {why}")
    flags = set(flags_line.split())
    if "amx_bf16" in flags:
        return Choice("bf16-mixed", f"CPU '{name}' has AMX (amx_bf16): bf16 matrix units")
    if "avx512_bf16" in flags:  # bf16 wins on some such CPUs and loses on others (module doc): measure this one
        return _from_probe(run_probe(), f"CPU '{name}' has AVX512-BF16 but no AMX (bf16 autocast is slower "
                                        "than fp32 on some such CPUs, faster on others)")
    best = next((f for f in ("avx512f", "avx2", "avx") if f in flags), "no avx")
    return Choice("32-true", f"CPU '{name}' has no AMX ({best} only); bf16 autocast is many times slower "
                             "than fp32 on such CPUs")


def _from_probe(result: ProbeResult, context: str) -> Choice:
    chosen = "bf16-mixed" if result.bf16_faster else "32-true"
    return Choice(chosen, f"{context}; probe ({result.steps} forward+backward steps of a 4-layer Linear "
                          f"stack): {result.figures()}")


def probe(device: str = "cpu", cap: float = PROBE_CAP, fp32_seconds: float = PROBE_FP32_SECONDS,
          step_factory: Callable | None = None) -> ProbeResult:
    """Times fp32, then bf16 autocast for as many steps, stopping bf16 once it has taken ``cap``
    x fp32's time. Each side's first (warm-up) step counts: the same for both, and a bf16 whose
    first step alone is slow has lost anyway. ``step_factory(dtype)`` replaces the Linear stack
    (tests)."""
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
            if time.perf_counter() - start > cap * fp32_s:
                return ProbeResult(steps, fp32_s, None)
    except RuntimeError as exc:  # no bf16 autocast here (e.g. an older macOS)
        return ProbeResult(steps, fp32_s, None, f"failed ({str(exc).splitlines()[0][:80]})")
    return ProbeResult(steps, fp32_s, time.perf_counter() - start)


def _linear_stack_step(device: str, dtype):
    """One forward + backward of 4 Linear(512, 512) layers on 256 rows: the matmul-bound shape
    of a small LM's training step, a few ms in fp32 on one core."""
    import torch  # noqa: PLC0415

    generator = torch.Generator().manual_seed(0)
    layers = [torch.nn.Linear(512, 512) for _ in range(4)]
    stack = torch.nn.Sequential(*(m for layer in layers for m in (layer, torch.nn.GELU()))).to(device)
    x = torch.randn(256, 512, generator=generator).to(device)

    def step():
        with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = stack(x)
        out.float().square().mean().backward()

    return step


class AmzftTrainer(Trainer):
    """Lightning's Trainer with ``precision: auto`` accepted (and resolved before Lightning
    checks the value). ``AmzftCLI`` resolves it earlier still, so the run's saved config.yaml
    records the precision actually used."""

    def __init__(self, *, precision: PrecisionInput | Literal["auto"] | None = None, **kwargs):
        super().__init__(precision=resolve(precision, kwargs.get("accelerator", "auto")), **kwargs)
