"""Checkpoint files written atomically: a crash or kill mid-write never leaves a broken file.

Lightning's TorchCheckpointIO writes straight to the final path. We write to a temporary file
in the same folder, fsync it, and rename it over the target (atomic on POSIX), then fsync the
folder so the rename itself survives a power loss. Loading is ``weights_only=True``.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from amzft.errors import ModelError
from amzft.paths import current_umask


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ModelError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600; a plain file is 0644
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
            full = " (disk full)" if exc.errno == errno.ENOSPC else ""
            raise ModelError(f"cannot write checkpoint {path}{full}: {exc.strerror or exc}; {kept}") from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    remove_stale_temporaries(path)


def remove_stale_temporaries(path: Path) -> None:
    """Temporary files of ``path`` left by a process killed mid-write (one writer per path:
    rank 0 under DDP), removed once a newer write of the same file has succeeded."""
    for stale in path.parent.glob(_temp_prefix(path) + "*.tmp"):
        stale.unlink(missing_ok=True)


def check_writable(folder: str | os.PathLike, need_bytes: int = 0, what: str = "log folder") -> None:
    """Fail before training, not at the first checkpoint, if ``folder`` cannot be created or
    written, or its disk has less than ``need_bytes`` free."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".amzft-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ModelError(f"the {what} {folder} is not writable: {exc.strerror or exc}") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise ModelError(
            f"the {what} {folder} has {free / 2**20:.0f} MiB free; checkpoints need about "
            f"{need_bytes / 2**20:.0f} MiB: free some space or set trainer.default_root_dir elsewhere"
        )


def load_checkpoint_file(path: str | os.PathLike) -> dict:
    """``torch.load(weights_only=True)`` with one-line errors for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"checkpoint {path} is corrupt or not a checkpoint ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ModelError(f"checkpoint {path} is not an amzft checkpoint (no state_dict / hyper_parameters)")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint_file(path)
