"""The GPU check's figures as data: ``benchmarks/results/gpu-YYYYMMDD.json``.

One JSON object per check: ``schema``, ``date``, ``command``, ``device``, ``versions`` and
``runs``, a list in the order the runs ran (the most wanted figures first). Each run stands on
its own (a row can be copied into a table or another file without its header):

    {"name": "base.yaml", "ok": true, "tokens_per_s": 3068.2, "peak_gib": 3.71, "vs_reference": 1.83,
     "device": "NVIDIA H200", "versions": {"torch": "2.11.0+cu130", ...}, "date": "2026-11-26",
     "command": "bash gpu/run_on_device.sh", "config": ["fit", "--config", "configs/base.yaml", ...],
     "first_step_s": 24.9, "last_loss": 1.93, "steps": 30, "seconds": 14.2, "tokens": 43612,
     "padding_efficiency": 0.71, "tflops_per_s": 14.5, "mm_tflops_per_s": {"mlp": 610.0, "8192^3": 790.0},
     "utilisation": {"mlp": 0.024, "8192^3": 0.018}, "error": null}

``tokens_per_s`` counts real (non-pad) tokens, timed from the end of step 1 (amzft's
``ThroughputMeter`` and the reference's own clock alike); ``peak_gib`` is the CUDA allocator's
peak during training; ``tflops_per_s`` is a step's FLOPs counted from the model's shapes
(amzft.training.flops) over its time, ``utilisation`` its share of the GPU's bf16 ``torch.mm``
rate at each probed shape (``mm_tflops_per_s``), amzft runs only (null for the reference). A
failed or skipped run keeps its row with ``ok`` false, null figures and the ``error``.
Everything here is plain Python (no torch): the check's reference process and the CPU tests
import it.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from amzft.files import atomic_write

SCHEMA = 1
MIB_PER_GIB = 1024
# The packages whose versions decide the figures (liger-kernel only where installed).
PACKAGES = ("torch", "transformers", "peft", "unsloth", "trl", "lightning", "liger-kernel")
# Per-run figures copied from a run's summary when present (ThroughputMeter or the reference).
# tflops_per_s, mm_tflops_per_s and utilisation: amzft runs only (gpu/check.py's add_utilisation).
EXTRA = ("first_step_s", "last_loss", "steps", "seconds", "tokens", "padding_efficiency", "tflops_per_s",
         "mm_tflops_per_s", "utilisation")


def peak_gib(summary: dict) -> float | None:
    """Peak memory in GiB: the one place MiB become GiB. amzft's ThroughputMeter summary and the
    reference write ``peak_memory_mib`` (kept for their older readers); a ``peak_gib`` already
    there wins."""
    if summary.get("peak_gib") is not None:
        return float(summary["peak_gib"])
    mib = summary.get("peak_memory_mib")
    return None if mib is None else float(mib) / MIB_PER_GIB


def package_versions(names=PACKAGES) -> dict[str, str]:
    """Installed versions of ``names``; a package that is not installed is left out."""
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def assemble(summaries: dict[str, dict], *, device: str, versions: dict[str, str], date: str, command: str,
             configs: dict[str, list[str]] | None = None, reference: str = "reference") -> dict:
    """The results document from each run's summary (name -> ThroughputMeter / reference summary,
    or ``{"error": ...}``), in the summaries' order. Pure: same input, same output."""
    configs = configs or {}
    ref_rate = (summaries.get(reference) or {}).get("tokens_per_s")
    runs = []
    for name, summary in summaries.items():
        rate = summary.get("tokens_per_s")
        ok = "error" not in summary and rate is not None
        runs.append({
            "name": name, "ok": ok,
            "tokens_per_s": float(rate) if ok else None,
            "peak_gib": peak_gib(summary) if ok else None,
            "vs_reference": float(rate) / ref_rate if ok and ref_rate else None,
            "device": device, "versions": dict(versions), "date": date, "command": command,
            "config": list(configs.get(name, [])),
            **{k: summary.get(k) for k in EXTRA},
            "error": summary.get("error") if not ok else None,
        })
    return {"schema": SCHEMA, "date": date, "command": command, "device": device, "versions": dict(versions),
            "runs": runs}


def write(document: dict, path: Path) -> Path:
    """Write atomically (``amzft.files.atomic_write``), so a check killed mid-write leaves the previous runs' file."""
    atomic_write(path, lambda f: f.write((json.dumps(document, indent=1) + "\n").encode()))
    return path
