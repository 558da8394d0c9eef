"""The CPU a benchmark ran on, printed beside its figures (CPU figures are only comparable with
the CPU named). Kept free of amzft imports: amzft.model.precision reads the same /proc/cpuinfo, but
importing it loads Lightning, which would add to the start-up and RSS that first_step.py measures."""

from __future__ import annotations

import platform
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
