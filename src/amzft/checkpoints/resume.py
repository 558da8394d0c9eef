"""Exact resume: ``last.ckpt`` on demand, and Lightning's epoch bookkeeping repaired for a run stopped mid-epoch."""

from __future__ import annotations

from lightning.pytorch import Callback

from amzft.lightning_compat import reopen_interrupted_epoch


def save_last_now(trainer) -> str | None:
    """Write ``last.ckpt`` now (ModelCheckpoint writes it on its own schedule): ``fit --ckpt_path last`` continues here."""
    callback = trainer.checkpoint_callback
    if callback is None or callback.dirpath is None:
        return None
    path = f"{callback.dirpath}/{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    trainer.save_checkpoint(path)
    return path


class ResumeMidEpoch(Callback):
    """``reopen_interrupted_epoch`` on the checkpoint being resumed (before Lightning restores its loops)."""

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        reopen_interrupted_epoch(checkpoint)
