"""Where amzft's derived files live, and the one atomic write for every file a reader or a kill must
never see half-written."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


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
    """A temporary folder beside its final place, to fill and then rename into place (atomic)."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700; a plain mkdir would not
    return path


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Fill a temporary file beside ``path`` with ``write(handle)``, sync it, rename it into place and
    sync the folder: readers see the old file or the whole new one. ``OSError`` is the caller's to word."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600; a plain file is 0644
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(path: Path) -> None:
    """Remove ``path``'s temporaries left by a writer killed mid-write (call after a successful write)."""
    for stale in Path(path).parent.glob(_temp_prefix(Path(path)) + "*.tmp"):
        stale.unlink(missing_ok=True)
