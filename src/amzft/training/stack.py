"""The callbacks of every ``fit``, in the order they run, each by its job.

Lightning calls callbacks in list order (``ModelCheckpoint`` ones last), each hook before the
module's own. One optimizer step (``accumulate_grad_batches`` micro-batches), hook by hook:

=========================== ======================= =================================================
hook                        callback (in order)     job
=========================== ======================= =================================================
on_train_batch_start        LearningRateMonitor     log ``lr-*``, the scheduler's value for this step
on_train_batch_start        GracefulStop            note the step, so a stop waits for the window's end
on_train_batch_start        ThroughputMeter         start the window's clock
(module) training_step      LoraCausalLM            one micro-batch's loss into ``module.window``
(Lightning) backward                                gradients accumulate in the LoRA weights
on_before_optimizer_step    NonFiniteGuard          NaN/inf window: stop, or drop the gradients (skip)
(module) on_before_opt...   LoraCausalLM            log train/loss, grad_norm, label_tokens; new window
(Lightning) optimizer.step                          AdamW (8-bit), then the warm-up/decay scheduler
on_train_batch_end          SampleAnswers           every N steps, answers into TensorBoard
on_train_batch_end          GracefulStop            a signal came: ``last.ckpt`` now, then stop
on_train_batch_end          ThroughputMeter         tokens/s, padding efficiency, peak memory
on_train_batch_end          StepProgressBar         the bar, in optimizer steps, with tokens/s
on_train_batch_end          ModelCheckpoint         every ``checkpoint.every_n_train_steps`` steps
on_train_batch_end          BestCheckpoint          nothing (it saves after validations only)
(loop) validate?            ValidationSchedule      whether a validation runs after this step
on_validation_end           ValidationSchedule      record the step's ``val/*`` metrics
on_validation_end           EarlyStop               stop when ``best.monitor`` stopped improving
on_validation_end           StepProgressBar         close the validation bar
on_validation_end           ModelCheckpoint         nothing (it saves on train batches)
on_validation_end           BestCheckpoint          keep the ``best.save_top_k`` best files
=========================== ======================= =================================================

Once per run: ``Preflight`` (disk room, at fit start), ``ResumeMidEpoch`` (the sampler's place, on load),
``PredictionsWriter`` (``predict``), ``ParameterSummary``. Order matters three times: ``NonFiniteGuard`` first
(it decides whether the update happens before anything reads the gradients); ``ThroughputMeter`` before
``StepProgressBar`` (the bar shows what the meter logged); ``EarlyStop`` before the best-checkpoint callback
(the best file of the step early stopping ends on is still written). The config's groups (``checkpoint.*``,
``sample_answers.*``, ``validation.*``, ``best.*``) and then ``trainer.callbacks`` come right after the guard.
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
    """Every callback of a run: ``from_config`` (the CLI's callback groups), amzft's own, and the defaults
    ``given`` (``trainer.callbacks``) does not replace: one throughput meter (the GPU check passes its own),
    one progress bar (Lightning refuses two, or one when the bar is off), one model summary."""
    callbacks = [NonFiniteGuard(), *from_config, *given, Preflight(), ResumeMidEpoch(),
                 LearningRateMonitor(logging_interval="step"), PredictionsWriter(), GracefulStop(),
                 *([EarlyStop(**early_stop)] if early_stop else [])]
    defaults = ((ThroughputMeter, True, ThroughputMeter), (ProgressBar, progress_bar, StepProgressBar),
                (ModelSummary, model_summary, ParameterSummary))
    for kind, wanted, default in defaults:
        if wanted and not any(isinstance(c, kind) for c in given):
            callbacks.append(default())
    return callbacks
