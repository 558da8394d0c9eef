"""Import Unsloth first (it patches transformers, peft and TRL at import) and only when it will be
used on CUDA (without CUDA it patches in CPU fallbacks). Runs at the top of ``python -m amzft``."""

from __future__ import annotations

import importlib.util
import os
import re
from contextlib import suppress
from pathlib import Path

from amzft.sources import force_offline

_ASKS_FOR_UNSLOTH = re.compile(r"backend\s*[:=]\s*['\"]?unsloth\b")


def wants_unsloth(argv: list[str]) -> bool:
    """True if ``--model.backend`` (which wins), a ``--config`` file, or the ``--ckpt_path`` run's
    hparams.yaml (no torch.load before Unsloth) selects ``backend: unsloth``."""
    for i, arg in enumerate(argv):
        if arg.startswith("--model.backend="):
            return arg.split("=", 1)[1] == "unsloth"
        if arg == "--model.backend" and i + 1 < len(argv):
            return argv[i + 1] == "unsloth"
    texts = []
    for arg, value in zip(argv, argv[1:]):
        if arg in ("--config", "-c"):
            path = Path(value)
        elif arg == "--ckpt_path" and value not in ("last", "best", "hpc"):
            path = Path(value).parent.parent / "hparams.yaml"  # …/version_N/checkpoints/x.ckpt -> the run's
        else:
            continue
        with suppress(OSError):  # the CLI, or the backend builder, reports what is missing
            texts.append(path.read_text(errors="replace"))
    return bool(_ASKS_FOR_UNSLOTH.search("\n".join(texts)))


def import_unsloth_if_wanted(argv: list[str]) -> bool:
    """Import unsloth now if it is asked for, installed and CUDA is present; returns whether it was
    (without CUDA the backend later says to use ``backend: hf``)."""
    if not argv or argv[0] in ("-h", "--help", "data") or not wants_unsloth(argv) or importlib.util.find_spec("unsloth") is None:
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
