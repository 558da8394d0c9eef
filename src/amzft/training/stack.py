"""The callbacks of every ``fit``, in the order they run, and why in that order.

Lightning calls callbacks in list order (it moves ``ModelCheckpoint`` ones to the end itself).
The order matters in three places:

1. ``NonFiniteGuard`` first: it decides in ``on_before_optimizer_step`` whether the update
   happens, before any other callback (or the module) looks at that step's gradients.
2. ``ThroughputMeter`` before ``StepProgressBar``: the bar shows the tokens/s the meter logs at
   the same batch end.
3. ``EarlyStop`` before the best-checkpoint callback (a ``ModelCheckpoint``, so last): both act
   after a validation, and the best file of the step early stopping ends on is still written.

The config's callback groups (``checkpoint.*``, ``sample_answers.*``, ``validation.*``,
``best.*``), then the ``trainer.callbacks`` a user or a benchmark gives, come between the guard
and the rest (LightningCLI on its own would put ``trainer.callbacks`` first).
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelSummary, ProgressBar

from amzft.checkpoints.resume import ResumeMidEpoch
from amzft.training.callbacks import GracefulStop, PredictionsWriter, Preflight
from amzft.training.nonfinite import NonFiniteGuard
from amzft.training.progress import ParameterSummary, StepProgressBar
from amzft.training.throughput import ThroughputMeter
from amzft.training.validation import EarlyStop


def fit_callbacks(from_config: list[Callback], given: list[Callback], *, early_stop: dict | None,
                  progress_bar: bool, model_summary: bool) -> list[Callback]:
    """Every callback of a run: ``from_config`` (the CLI's callback groups), amzft's own, and the
    defaults ``given`` (``trainer.callbacks``) does not replace: one throughput meter (the GPU
    check passes its own), one progress bar (Lightning refuses two, or one when the bar is
    off), one model summary."""
    callbacks = [
        NonFiniteGuard(),
        *from_config,
        *given,
        Preflight(),
        ResumeMidEpoch(),
        LearningRateMonitor(logging_interval="step"),
        PredictionsWriter(),
        GracefulStop(),
        *([EarlyStop(**early_stop)] if early_stop else []),
    ]
    if not any(isinstance(c, ThroughputMeter) for c in given):
        callbacks.append(ThroughputMeter())
    if progress_bar and not any(isinstance(c, ProgressBar) for c in given):
        callbacks.append(StepProgressBar())
    if model_summary and not any(isinstance(c, ModelSummary) for c in given):
        callbacks.append(ParameterSummary())
    return callbacks
