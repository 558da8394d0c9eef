"""The CPU a benchmark ran on, printed beside its figures (CPU figures are only comparable with
the CPU named), and its measured matrix-multiply rate. Kept free of amzft imports: amzft.training.precision
reads the same /proc/cpuinfo, but importing it loads Lightning, which would add to the start-up and
RSS that first_step.py measures; torch is imported only by ``gemm_rate``."""

from __future__ import annotations

import platform
import time
from pathlib import Path


def _cpuinfo_line(field: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == field:
                return value.strip()
    except OSError:  # not Linux
        pass
    return None


def cpu_name() -> str:
    return _cpuinfo_line("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> str:
    """The flags that decide CPU training speed (docs/performance.md, The machines)."""
    flags = _cpuinfo_line("flags")
    if flags is None:
        return "flags unknown"
    wanted = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")
    return ", ".join(f for f in wanted if f in flags.split()) or "no avx2"


def has_bf16_matmul() -> bool:
    """Whether the CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX): only then is a
    bf16 matrix-multiply rate worth measuring (without, bf16 products are emulated, many times slower)."""
    flags = (_cpuinfo_line("flags") or "").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def gemm_rate(tokens: int, hidden: int, intermediate: int, dtype: str = "float32", rounds: int = 5) -> float:
    """GFLOP/s of torch.mm at an MLP projection's shape (tokens x hidden @ hidden x intermediate),
    in ``dtype`` (a torch dtype's name): the machine's matrix-multiply rate at a step's shapes.
    The best of ``rounds`` rounds of 10 products: what the machine can do, the least disturbed
    by whatever else runs on it."""
    import torch  # noqa: PLC0415 - the benchmarks import torch after force_offline (their module docs)

    kind = getattr(torch, dtype)
    a, b = torch.randn(tokens, hidden, dtype=kind), torch.randn(hidden, intermediate, dtype=kind)
    for _ in range(5):
        a @ b
    best, reps = float("inf"), 10
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * tokens * hidden * intermediate * reps / best / 1e9
