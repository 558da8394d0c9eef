"""Validation every N optimizer steps (``validation.every_n_steps``) and early stopping (``early_stopping.*``)."""

from __future__ import annotations

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import EarlyStopping

from amzft.checkpoints.locate import MONITOR_MODES
from amzft.checkpoints.resume import save_last_now
from amzft.errors import ConfigError
from amzft.lightning_compat import at_last_batch, decide_validation_with, inside_accumulation_window


class ValidationSchedule(Callback):
    """Validation after every ``every_n_steps`` optimizer steps and after the last one. It replaces Lightning's
    per-batch decision (``lightning_compat.decide_validation_with``): ``val_check_interval`` counts batches,
    which drift from optimizer steps with accumulation.

    Args:
        every_n_steps: validate after every N optimizer steps; 0: Lightning's own schedule.
    """

    def __init__(self, every_n_steps: int = 0):
        if every_n_steps < 0:
            raise ConfigError(f"validation.every_n_steps must be >= 0 (0: Lightning's own schedule), found {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.history: list[tuple[int, dict[str, float]]] = []  # (step, val/* metrics) of this process's validations
        self._validated_step = -1
        self._fit_trainer = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.every_n_steps:
            self._fit_trainer = trainer
            decide_validation_with(trainer, self._should_validate)

    def on_train_start(self, trainer, pl_module) -> None:
        # A resumed run does not repeat its step's validation: it ran right after last.ckpt was written.
        self._validated_step = trainer.global_step

    def is_due(self, trainer) -> bool:
        """Validation runs after the optimizer step ``trainer.global_step`` has just made."""
        step = trainer.global_step
        return (bool(self.every_n_steps) and step > 0 and step != self._validated_step
                and (step % self.every_n_steps == 0 or self._is_last_step(trainer)))

    @staticmethod
    def _is_last_step(trainer) -> bool:
        """The run's last optimizer step: ``max_steps``, or the last batch of the last epoch."""
        if trainer.max_steps is not None and 0 < trainer.max_steps == trainer.global_step:
            return True
        last_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
        return last_epoch and at_last_batch(trainer)

    def _should_validate(self, data_fetcher=None) -> bool:
        trainer = self._fit_trainer
        # From the step counter, so every DDP rank decides the same; a stop request forces none.
        if not trainer.enable_validation or inside_accumulation_window(trainer) or not self.is_due(trainer):
            return False
        self._validated_step = trainer.global_step
        return True

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self.history.append((trainer.global_step, metrics))


def find_schedule(trainer) -> ValidationSchedule | None:
    return next((c for c in trainer.callbacks if isinstance(c, ValidationSchedule)), None)


class EarlyStop(EarlyStopping):
    """Lightning's ``EarlyStopping`` after each validation, then ``last.ckpt`` written where training
    ended (not at the last periodic save) and a word on where the best checkpoint is."""

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
        # At train end, as ModelCheckpoint's own last.ckpt is (a state the resume handles).
        if self._stopped_at is not None:
            save_last_now(trainer)
            self._stopped_at = None
