"""Where amzft keeps files it derives (cleaned datasets, the materialised embedded model)."""

from __future__ import annotations

import os
import tempfile
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


def staging_dir(parent: Path, prefix: str) -> Path:
    """A temporary folder beside its final place, to fill and then rename into place (atomic).

    mkdtemp makes it private (0700); after the rename it is a normal folder, so give it the
    permissions a plain mkdir would (0777 less the umask).
    """
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o777 & ~current_umask())
    return path


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
