"""Checkpoint files written atomically (``amzft.files.atomic_write``: Lightning's TorchCheckpointIO writes
in place, so a crash mid-write would break ``last.ckpt``) and read with ``weights_only`` and one-line errors."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from amzft.checkpoints.locate import saved_callback_states
from amzft.errors import ModelError
from amzft.files import atomic_write, remove_stale_temporaries


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through ``atomic_write``, its failures as one line saying what was kept."""
    path = Path(path)
    try:
        atomic_write(path, lambda handle: torch.save(obj, handle))
    except OSError as exc:
        kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
        full = " (disk full)" if exc.errno == errno.ENOSPC else ""
        raise ModelError(f"cannot write checkpoint {path}{full}: {exc.strerror or exc}; {kept}") from None
    remove_stale_temporaries(path)


def check_writable(folder: str | os.PathLike, need_bytes: int = 0, what: str = "log folder") -> None:
    """Fail before training, not at the first checkpoint, if ``folder`` is not writable or has under ``need_bytes`` free."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".amzft-write-test.", dir=folder):
            pass
    except OSError as exc:
        raise ModelError(f"the {what} {folder} is not writable: {exc.strerror or exc}") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise ModelError(f"the {what} {folder} has {free / 2**20:.0f} MiB free; checkpoints need about "
                         f"{need_bytes / 2**20:.0f} MiB: free some space or set trainer.default_root_dir elsewhere")


def _what_is_wrong(path: Path, exc: Exception) -> str:
    text = str(exc)
    with path.open("rb") as handle:
        head = handle.read(4)
    if not head:
        return "the file is empty (an interrupted copy or write?)"
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        return "the file is not a torch checkpoint"
    if "central directory" in text or isinstance(exc, EOFError):
        return "the file is truncated or is not a torch checkpoint (an interrupted copy or write?)"
    if "Weights only load failed" in text:
        return "it holds Python objects beyond tensors, which amzft does not unpickle (weights_only)"
    return f"{type(exc).__name__}: {text[:120]}"


def unreadable_checkpoint(path: str | os.PathLike, exc: Exception) -> ModelError:
    """The one message for a checkpoint that cannot be read, wherever it is read: the file, what is
    wrong with it, and the newest other checkpoint of its folder that opens (a run keeps several)."""
    path = Path(path)
    others = sorted((p for p in path.parent.glob("*.ckpt") if p.resolve() != path.resolve()),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    good = next((p for p in others if saved_callback_states(p) is not None), None)  # opens, memory-mapped
    where = f"the newest good checkpoint beside it is {good}" if good else f"no other readable checkpoint in {path.parent}"
    return ModelError(f"checkpoint {path} is corrupt or not a checkpoint: {_what_is_wrong(path, exc)}; {where}")


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """A one-line error now for a checkpoint that does not open (what Lightning's CLI would load first)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise unreadable_checkpoint(path, exc) from None


def load_checkpoint_file(path: str | os.PathLike) -> dict:
    """``torch.load(weights_only=True)`` with one-line errors for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise unreadable_checkpoint(path, exc) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ModelError(f"checkpoint {path} is not an amzft checkpoint (no state_dict / hyper_parameters)")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint_file(path)
