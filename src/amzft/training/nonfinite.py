"""A NaN or infinite loss or gradient: stop before the update, or skip that optimizer step."""

from __future__ import annotations

import math

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn

from amzft.errors import ModelError

MAX_CONSECUTIVE_SKIPS = 10  # with on_nonfinite=skip: beyond this the weights themselves are likely broken


class NonFiniteGuard(Callback):
    """Checks each accumulation window before the update (``model.on_nonfinite``): ``stop`` raises a
    one-line error; ``skip`` drops the step (counted in ``train/skipped_steps``), up to
    ``MAX_CONSECUTIVE_SKIPS`` in a row. Runs before the module's hook, which logs the window as it was."""

    def __init__(self):
        self.consecutive_skips = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        window = pl_module.window_summary()
        # fp16 AMP's GradScaler skips inf-gradient steps itself (they are normal there).
        scaled = str(trainer.precision).startswith("16")
        if math.isfinite(window.loss) and (scaled or math.isfinite(window.grad_norm)):
            self.consecutive_skips = 0
            return
        what = (f"the training loss is {window.loss}" if not math.isfinite(window.loss)
                else f"the gradient norm is {window.grad_norm}")
        batches = window.batches
        span = (f"batch {batches[0]}" if len(batches) == 1
                else f"batches {batches[0]}-{batches[-1]}" if batches else "no batch")
        where = f"at step {trainer.global_step + 1} (epoch {trainer.current_epoch}, {span})"
        skip = pl_module.hparams.on_nonfinite == "skip"
        if skip and self.consecutive_skips < MAX_CONSECUTIVE_SKIPS:
            # Dropping every gradient makes the optimizer leave the weights *and* its moments
            # untouched (torch and bitsandbytes AdamW skip parameters whose grad is None).
            for p in pl_module.parameters():
                p.grad = None
            pl_module.skipped_steps += 1
            self.consecutive_skips += 1
            rank_zero_warn(f"amzft: {what} {where}: step skipped (model.on_nonfinite=skip)")
            return
        checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
        also = f" ({MAX_CONSECUTIVE_SKIPS} steps in a row were skipped)" if skip else ""
        raise ModelError(f"{what} {where}{also}; training stopped before the update, the last checkpoint ({checkpoint}) "
                         "is intact: lower model.optim.lr, look at those records, or set model.on_nonfinite=skip")
