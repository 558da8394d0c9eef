"""Import Unsloth first, and only when it will be used.

Unsloth patches transformers, peft and TRL at import time, so it must be imported before them
(and Lightning imports torchmetrics, which imports transformers). On a machine without CUDA it
silently falls back to CPU code paths and patches the HF Trainer, so there it is never imported.
This runs at the top of ``python -m amzft``, before the CLI imports anything heavy; ``--help``
and an install without the ``gpu`` extra never even import torch here.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from amzft.sources import force_offline

_ASKS_FOR_UNSLOTH = re.compile(r"backend\s*[:=]\s*['\"]?unsloth\b")


def _run_hparams(ckpt_path: str) -> Path:
    """``…/version_N/checkpoints/last.ckpt`` -> ``…/version_N/hparams.yaml`` (Lightning's logger
    writes the module's hyper-parameters there, backend included)."""
    return Path(ckpt_path).parent.parent / "hparams.yaml"


def wants_unsloth(argv: list[str]) -> bool:
    """True if the command line or one of its ``--config`` files selects ``backend: unsloth``
    (an explicit ``--model.backend`` on the command line wins, as it does in the parser), or,
    for ``evaluate`` / ``export`` / a resumed ``fit``, the checkpoint's run was trained with it
    (read from the run's hparams.yaml: cheap, no torch.load before Unsloth)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--model.backend="):
            return arg.split("=", 1)[1] == "unsloth"
        if arg == "--model.backend" and i + 1 < len(argv):
            return argv[i + 1] == "unsloth"
    texts = []
    for i, arg in enumerate(argv[:-1]):
        if arg in ("--config", "-c"):
            try:
                texts.append(Path(argv[i + 1]).read_text(errors="replace"))
            except OSError:
                pass  # the CLI reports a missing config file itself
        elif arg == "--ckpt_path" and argv[i + 1] not in ("last", "best", "hpc"):
            try:
                texts.append(_run_hparams(argv[i + 1]).read_text(errors="replace"))
            except OSError:
                pass  # no run folder beside the checkpoint: the backend builder still says what is wrong
    return bool(_ASKS_FOR_UNSLOTH.search("\n".join(texts)))


def import_unsloth_if_wanted(argv: list[str]) -> bool:
    """Import unsloth now if it is asked for, installed and CUDA is present; returns whether
    it was imported. Without CUDA nothing happens here: the backend then says, in one line,
    to use ``backend: hf``."""
    if not argv or argv[0] in ("-h", "--help", "data") or not wants_unsloth(argv):
        return False
    if importlib.util.find_spec("unsloth") is None:
        return False
    import torch  # noqa: PLC0415 - only when Unsloth is asked for: `--help` never imports torch

    if not torch.cuda.is_available():
        return False
    import_unsloth()
    return True


def import_unsloth() -> None:
    """Import Unsloth offline (also the GPU check's reference process): call it before
    anything imports transformers / peft / lightning."""
    force_offline()  # amzft never downloads: nor may Unsloth (it fetches usage statistics unless told)
    os.environ.setdefault("UNSLOTH_DISABLE_CPU_FALLBACK", "1")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    import unsloth  # noqa: F401, PLC0415  (patches transformers / peft before they are imported)
