"""``fit``'s console: a progress bar in optimizer steps (Lightning's counts an epoch's batches,
``Epoch 7/-2`` for a ``max_steps`` run) and a one-line parameter summary."""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count

from amzft.lightning_compat import bar_refresh_due, finite_total

# (logged metric, label on the bar, as a whole number): tokens/s reads better without decimals
SHOWN = (("train/loss", "loss", False), ("val/loss", "val_loss", False), ("train/tokens_per_s", "tokens/s", True))


class StepProgressBar(TQDMProgressBar):
    """The training bar counts optimizer steps (``step 12/60``) across epochs, with loss and tokens/s."""

    TRAIN_FORMAT = "step {n_fmt}/{total_fmt} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def init_train_tqdm(self) -> Tqdm:
        trainer = self.trainer
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        return Tqdm(  # Lightning's training bar, in steps; `initial`: a resumed run continues from its step
            total=finite_total(total), initial=trainer.global_step, unit="step", bar_format=self.TRAIN_FORMAT,
            position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
            file=sys.stdout, smoothing=0)

    def on_train_epoch_start(self, trainer, *_):
        pass  # Lightning's resets the bar to the epoch's batches; this one spans the run

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar = self.train_progress_bar
        step = trainer.global_step
        if step == bar.n or not bar_refresh_due(self, step, bar.total):
            return  # inside an accumulation window, or between refreshes
        bar.n = step
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()
        if step == bar.total:
            bar.close()  # now, so that Lightning's "`Trainer.fit` stopped" starts a line of its own

    def on_train_epoch_end(self, trainer, pl_module):
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))  # never closed per epoch

    def get_metrics(self, trainer, pl_module) -> dict:
        """Only what a user watches (Lightning's adds the TensorBoard version, ``v_num``)."""
        metrics = trainer.progress_bar_metrics
        return {label: round(float(metrics[key])) if whole else float(metrics[key])
                for key, label, whole in SHOWN if key in metrics}


class ParameterSummary(ModelSummary):
    """The parameter counts only: Lightning's table has one row here (the PEFT model) and zero FLOPs."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:
        rank_zero_info(f"parameters: {get_human_readable_count(int(trainable_parameters))} trainable, "
                       f"{get_human_readable_count(int(total_parameters - trainable_parameters))} frozen, "
                       f"{get_human_readable_count(int(total_parameters))} in all ({get_formatted_model_size(model_size)} MB)")
