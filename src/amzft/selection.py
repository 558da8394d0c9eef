"""Keep the best, stop when it stops improving: validation on an optimizer-step schedule, the
best-k checkpoints by a monitored metric, and early stopping on the same metric.

* ``ValidationSchedule`` (``validation.every_n_steps``): validation after every N optimizer
  steps, whatever ``accumulate_grad_batches`` is, and after the last step.
* ``BestCheckpoint`` (``best.*``): Lightning's ``ModelCheckpoint`` keeping the ``save_top_k``
  best checkpoints by ``val/loss`` (lowest) or ``val/rougeL`` (highest) as
  ``best-step00020-val_loss3.2153.ckpt``, beside the periodic step files and ``last.ckpt`` of
  the ``checkpoint.*`` callback, which stay as they were (resume keeps working unchanged).
* ``EarlyStop`` (``early_stopping.*``): Lightning's ``EarlyStopping`` on the best checkpoint's
  metric; added only when ``patience`` > 0.

``--ckpt_path best`` is resolved in ``amzft.checkpoints.find_best_checkpoint``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from amzft.checkpoints import BEST_PREFIX, MONITOR_MODES, best_filename, best_record, save_last_now
from amzft.errors import ConfigError

Monitor = Literal["val/loss", "val/rougeL"]


class ValidationSchedule(Callback):
    """Validation every ``every_n_steps`` optimizer steps (and after the last step, so the final
    model is always scored).

    Lightning counts ``val_check_interval`` in training batches, not optimizer steps: with
    accumulation, ``n x accumulate`` batches drifts away from step n as soon as an epoch ends on
    a part window (Lightning steps on it), and can land mid-window. Lightning has no hook for
    "validate after optimizer step N", so this replaces its per-batch decision,
    ``fit_loop.epoch_loop._should_check_val_fx``, for this trainer only: the one function both
    its interval and its epoch-end checks go through. Validation then always runs right after an
    optimizer step, at the same place in the loop as Lightning's own, never mid-window.

    Args:
        every_n_steps: validate after every N optimizer steps; 0: Lightning's own schedule
            (``trainer.val_check_interval`` / ``check_val_every_n_epoch``).
    """

    def __init__(self, every_n_steps: int = 0):
        if every_n_steps < 0:
            raise ConfigError(f"validation.every_n_steps must be >= 0 (0: Lightning's own schedule), found {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.history: list[tuple[int, dict[str, float]]] = []  # (step, val/* metrics) of this process's validations
        self._validated_step = -1
        self._trainer = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.every_n_steps:
            self._trainer = trainer
            trainer.fit_loop.epoch_loop._should_check_val_fx = self._should_validate

    def on_train_start(self, trainer, pl_module) -> None:
        # A resumed run does not repeat the validation of the step it resumes at: it ran (when
        # due) right after last.ckpt was written, before the interruption.
        self._validated_step = trainer.global_step

    def is_due(self, trainer) -> bool:
        """Validation runs after the optimizer step ``trainer.global_step`` has just made."""
        step = trainer.global_step
        return (bool(self.every_n_steps) and step > 0 and step != self._validated_step
                and (step % self.every_n_steps == 0 or self._is_last_step(trainer)))

    @staticmethod
    def _is_last_step(trainer) -> bool:
        """The run's last optimizer step: ``max_steps``, or the last batch of the last epoch (an
        epoch-based run, ``max_steps`` -1, or one that ends by ``max_epochs`` first), so every
        run is scored at its end."""
        if trainer.max_steps is not None and 0 < trainer.max_steps == trainer.global_step:
            return True
        last_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
        return last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch

    def _should_validate(self, data_fetcher=None) -> bool:
        trainer = self._trainer
        # Deterministic from the step counter, so every DDP rank decides the same. Unlike
        # Lightning's own, a stop request (SIGTERM, the demo's stop) does not force a
        # validation: the run stops promptly; a due one still runs.
        if not trainer.enable_validation or trainer.fit_loop.epoch_loop._should_accumulate() or not self.is_due(trainer):
            return False
        self._validated_step = trainer.global_step
        return True

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self.history.append((trainer.global_step, metrics))


def find_schedule(trainer) -> ValidationSchedule | None:
    return next((c for c in trainer.callbacks if isinstance(c, ValidationSchedule)), None)


class BestCheckpoint(ModelCheckpoint):
    """The ``save_top_k`` best checkpoints by ``monitor``, written after each validation.

    A second ``ModelCheckpoint`` rather than a monitor on the periodic one: the periodic callback
    writes at ``on_train_batch_end``, before that step's validation, so it would rank each step
    by the previous validation's score; and its step files and ``last.ckpt`` are what resume
    relies on, which stay exactly as before.

    Args:
        monitor: ``val/loss`` (lowest is best) or ``val/rougeL`` (highest is best; needs
            ``sample_answers.rouge_products`` > 0); null keeps no best checkpoints.
        save_top_k: how many best checkpoints to keep.
    """

    def __init__(self, monitor: Monitor | None = "val/loss", save_top_k: int = 2):
        if save_top_k < 1:
            raise ConfigError(f"best.save_top_k must be >= 1 (best.monitor: null keeps none), found {save_top_k}")
        super().__init__(
            monitor=monitor,
            mode=MONITOR_MODES.get(monitor or "val/loss", "min"),
            save_top_k=save_top_k if monitor else 0,
            filename=best_filename(monitor) if monitor else None,
            auto_insert_metric_name=False,
            save_last=False,
            save_on_train_epoch_end=False,  # after validation, with that step's fresh metric
            enable_version_counter=False,  # a resumed run re-creating a step overwrites its file
        )

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if self.monitor and trainer.global_step > 0 and self.dirpath:
            self._adopt_kept_files(trainer)

    def _adopt_kept_files(self, trainer) -> None:
        """On resume: ``last.ckpt`` is written before its step's validation, so a best file
        written by that validation is missing from the restored record. Adopt every best file
        of this folder up to the resumed step (later ones belong to a run beyond the checkpoint,
        which this one re-creates), forget recorded files that are gone, then keep the top k."""
        for path in [p for p in self.best_k_models if not Path(p).is_file()]:
            self.best_k_models.pop(path)
        for path in Path(self.dirpath).glob(BEST_PREFIX + "step*.ckpt"):
            match = re.match(re.escape(BEST_PREFIX) + r"step(\d+)", path.name)
            if str(path) in self.best_k_models or not match or int(match.group(1)) > trainer.global_step:
                continue
            record = best_record(path)
            if record is not None and record[1] == self.monitor:
                self.best_k_models[str(path)] = torch.tensor(record[2])
        if not self.best_k_models:
            self.best_model_path, self.best_model_score, self.kth_best_model_path = "", None, ""
            self.kth_value = torch.tensor(float("inf") if self.mode == "min" else float("-inf"))
            return
        ranked = sorted(self.best_k_models, key=lambda p: float(self.best_k_models[p]), reverse=self.mode == "max")
        for path in ranked[self.save_top_k :]:
            self.best_k_models.pop(path)
            if trainer.is_global_zero:
                Path(path).unlink(missing_ok=True)
        kept = ranked[: self.save_top_k]
        self.best_model_path, self.best_model_score = kept[0], self.best_k_models[kept[0]]
        self.kth_best_model_path, self.kth_value = kept[-1], self.best_k_models[kept[-1]]


class EarlyStop(EarlyStopping):
    """Lightning's ``EarlyStopping`` after each validation: stops when ``monitor`` has not
    improved by more than ``min_delta`` in ``patience`` validations in a row, then writes
    ``last.ckpt`` where training ended (the periodic callback would leave it at its last
    multiple of ``checkpoint.every_n_train_steps``) and says where the best checkpoint is."""

    def __init__(self, monitor: str, patience: int, min_delta: float = 0.0):
        if patience < 1 or min_delta < 0:
            raise ConfigError(f"early_stopping.patience must be >= 1 to enable it and min_delta >= 0, found {patience}, {min_delta}")
        super().__init__(monitor=monitor, patience=patience, min_delta=min_delta, mode=MONITOR_MODES.get(monitor, "min"),
                         check_on_train_epoch_end=False)
        self._stopped_at: int | None = None

    def on_validation_end(self, trainer, pl_module) -> None:
        stopping = trainer.should_stop
        super().on_validation_end(trainer, pl_module)
        if trainer.should_stop and not stopping:
            self._stopped_at = trainer.global_step
            pl_module.print(f"amzft: early stopping after step {trainer.global_step}: {self.monitor} did not improve by "
                            f"more than {self.min_delta} in {self.patience} validations (best {float(self.best_score):.4f}); "
                            "use it with --ckpt_path best")

    def on_train_end(self, trainer, pl_module) -> None:
        # Written at train end, as ModelCheckpoint's own end-of-fit last.ckpt is (a state the
        # mid-epoch resume handles), not inside the validation.
        if self._stopped_at is not None:
            save_last_now(trainer)
            self._stopped_at = None
