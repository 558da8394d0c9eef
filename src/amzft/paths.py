"""Where amzft keeps files it derives (tokenised datasets, the materialised embedded model)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$AMZFT_CACHE``, else ``$XDG_CACHE_HOME/amzft``, else ``~/.cache/amzft``."""
    if env := os.environ.get("AMZFT_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "amzft"


def shipped_sample() -> Path:
    """The small hand-written sample in ``trn.json`` format that ships with the package."""
    return Path(__file__).parent / "sample" / "trn_sample.json"
