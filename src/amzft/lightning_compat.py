"""Every use of Lightning's private internals, in one place.

Lightning has no public hook for a few things amzft needs (validation after optimizer step N,
the loop's batch count for an exact resume, callbacks chosen after the config is parsed). Each
function below names what it reaches into and why no public API does the job; nothing else in
``amzft`` names a private Lightning attribute (``tests/test_lightning_compat.py`` fails if one
does) and each use is exercised against the installed Lightning by the same tests.

Checked against: lightning ``CHECKED_WITH`` (``pyproject.toml`` pins ``lightning>=2.6,<2.7``).
A new minor version means re-running ``tests/test_lightning_compat.py`` and the resume tests,
then widening both.
"""

from __future__ import annotations

from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf

CHECKED_WITH = ("2.6",)

# Lightning's own type of ``Trainer(precision=...)``; a private alias, and the only statement of
# its accepted values, so the CLI still rejects an unknown precision at parse time.
PrecisionInput = _PRECISION_INPUT


def attached_trainer(module):
    """The trainer a LightningModule is attached to, or None (``LightningModule.trainer`` raises
    when there is none, and has no public "is attached" test): ``module._trainer``."""
    return module._trainer


# ------------------------------------------------------------------------------- fit loop
def decide_validation_with(trainer, should_validate) -> None:
    """Make ``should_validate(data_fetcher=None) -> bool`` the fit loop's per-batch "validate
    now?" decision, for this trainer only. Lightning counts ``val_check_interval`` in batches,
    not optimizer steps, and has no hook for "after step N"; ``epoch_loop._should_check_val_fx``
    is the one function both its interval and its epoch-end checks go through."""
    trainer.fit_loop.epoch_loop._should_check_val_fx = should_validate


def inside_accumulation_window(trainer) -> bool:
    """Whether the batch just run ends no optimizer step (``epoch_loop._should_accumulate``: the
    loop's own rule, which counts an epoch's part window at its end as a step)."""
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
    """Work around Lightning marking an epoch *finished* when training stops inside it, by
    editing the saved loop state (``loops.fit_loop.epoch_progress``) before it is restored.

    When fit ends (``max_steps``, ``should_stop`` from SIGTERM or the demo's stop), Lightning
    closes the epoch before ``ModelCheckpoint.on_train_end`` writes ``last.ckpt``, even if only
    some of its batches ran, while the epoch's batch counter is kept. Resuming that state goes
    wrong both ways: cut short, the resume starts epoch e + 1 and silently skips the rest of
    epoch e; at the exact end of an epoch, epoch e + 1 starts with the old batch counter and ends
    after one batch. So whenever an epoch is marked closed while its batch counter still holds
    batches, mark it "started, not finished": Lightning then restarts it mid-epoch, the
    resumable sampler skips exactly the batches already run (all of them at an epoch's end), and
    the next epoch starts cleanly. Returns whether it changed anything.
    """
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not fit:
        return False
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
    """Mixed into a ``LightningCLI`` subclass: ``trainer_parts(config, callbacks)`` returns the
    trainer's config and callbacks just before the trainer is built. LightningCLI's only
    public place for them, ``trainer_defaults``, is fixed before parsing, but the logger's
    version (a resumed run's) and the callbacks that depend on the config are known only
    after it; ``_instantiate_trainer`` is the step that builds the trainer from both."""

    def trainer_parts(self, config: dict, callbacks: list) -> tuple[dict, list]:
        return config, callbacks

    def _instantiate_trainer(self, config, callbacks):
        config, callbacks = self.trainer_parts(config, callbacks)
        return super()._instantiate_trainer(config, callbacks)
