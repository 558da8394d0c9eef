"""Exact resume: ``last.ckpt`` on demand, and the repair of Lightning's epoch bookkeeping of a run
that stopped inside an epoch."""

from __future__ import annotations

from lightning.pytorch import Callback

from amzft.lightning_compat import reopen_interrupted_epoch


def save_last_now(trainer) -> str | None:
    """Write ``last.ckpt`` at this point of training (ModelCheckpoint only writes it on its own
    schedule), so that ``fit --ckpt_path last`` continues from here."""
    callback = trainer.checkpoint_callback
    if callback is None or callback.dirpath is None:
        return None
    path = f"{callback.dirpath}/{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    trainer.save_checkpoint(path)
    return path


class ResumeMidEpoch(Callback):
    """Applies ``reopen_interrupted_epoch`` to the checkpoint being resumed (callbacks'
    ``on_load_checkpoint`` runs before Lightning restores its loops)."""

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        reopen_interrupted_epoch(checkpoint)
