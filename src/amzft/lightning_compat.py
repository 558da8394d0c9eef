"""Every use of Lightning's private internals, each naming what it reaches into and why no public
API does the job; tests/test_lightning_compat.py checks them against the installed Lightning.
Checked with ``CHECKED_WITH`` (pyproject.toml pins it): a new minor means re-running those tests."""

from __future__ import annotations

from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf

CHECKED_WITH = ("2.6",)

# ``Trainer(precision=...)``'s type, the only statement of its values: the CLI rejects unknown ones.
PrecisionInput = _PRECISION_INPUT


def attached_trainer(module):
    """The trainer a LightningModule is attached to, or None (``LightningModule.trainer`` raises
    when there is none, and has no public "is attached" test): ``module._trainer``."""
    return module._trainer


# ------------------------------------------------------------------------------- fit loop
def decide_validation_with(trainer, should_validate) -> None:
    """Make ``should_validate(data_fetcher=None) -> bool`` this trainer's per-batch "validate now?"
    (no hook for "after step N"; ``epoch_loop._should_check_val_fx`` decides both interval and epoch end)."""
    trainer.fit_loop.epoch_loop._should_check_val_fx = should_validate


def inside_accumulation_window(trainer) -> bool:
    """Whether the batch just run ends no optimizer step (``epoch_loop._should_accumulate``, the loop's rule)."""
    return trainer.fit_loop.epoch_loop._should_accumulate()


def at_last_batch(trainer) -> bool:
    """Whether the loop is at its epoch's last batch (``epoch_loop.batch_progress``)."""
    return trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


def batches_run_this_epoch(trainer) -> int:
    """The loop's count of training batches run this epoch (``epoch_loop.batch_progress``):
    loaders fetch ahead, so counting what a sampler yielded would over-count on resume."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


def epoch_number(trainer) -> int:
    """The epoch number Lightning itself passes to samplers' ``set_epoch`` (``epoch_progress``)."""
    return trainer.fit_loop.epoch_progress.current.processed


def reopen_interrupted_epoch(checkpoint: dict) -> bool:
    """Work around Lightning closing the epoch before ``last.ckpt`` is written when fit stops inside it
    (``max_steps``, SIGTERM), keeping its batch counter: a resume would skip the epoch's rest, or end the
    next after one batch. An epoch closed with batches counted is reopened in the saved
    ``loops.fit_loop.epoch_progress``, so the resumable sampler skips exactly what ran. Returns whether it changed anything."""
    fit = checkpoint.get("loops", {}).get("fit_loop") or {}
    epochs, batches = fit.get("epoch_progress"), fit.get("epoch_loop.batch_progress")
    if not epochs or not batches:
        return False
    current = epochs["current"]
    closed = current["ready"] == current["started"] == current["processed"] == current["completed"] > 0
    if not (closed and batches["current"]["processed"] > 0):
        return False
    for counts in (epochs["current"], epochs["total"]):
        counts["processed"] -= 1
        counts["completed"] -= 1
    return True


# ------------------------------------------------------------------------------ progress bar
def finite_total(total):
    """A bar total tqdm accepts (``tqdm_progress.convert_inf``: inf / NaN become None)."""
    return convert_inf(total)


def bar_refresh_due(bar, step: int, total) -> bool:
    """Whether ``TQDMProgressBar`` would refresh at ``step`` (its ``_should_update``: every
    ``refresh_rate`` steps and at the end), so a subclass counting steps keeps its rate."""
    return bar._should_update(step, total)


# ------------------------------------------------------------------------------------- CLI
class TrainerBuildHook:
    """Mixed into a ``LightningCLI``: ``trainer_parts(config, callbacks)`` edits both just before the
    trainer is built (``trainer_defaults`` is fixed before parsing; ``_instantiate_trainer`` is after)."""

    def trainer_parts(self, config: dict, callbacks: list) -> tuple[dict, list]:
        return config, callbacks

    def _instantiate_trainer(self, config, callbacks):
        config, callbacks = self.trainer_parts(config, callbacks)
        return super()._instantiate_trainer(config, callbacks)
