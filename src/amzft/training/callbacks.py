"""Training callbacks: stop at a step, stop gracefully, preflight checks, predictions, sample answers, ``val/rougeL``."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import BasePredictionWriter

from amzft.checkpoints.best import BestCheckpoint
from amzft.checkpoints.io import check_writable
from amzft.checkpoints.resume import save_last_now
from amzft.data.split import seeded_sample
from amzft.errors import ConfigError
from amzft.evaluation.scoring import overlap_scores
from amzft.model.decoding import DEFAULT_DECODING, GenerationOptions
from amzft.model.generation import generate_answers
from amzft.training.validation import find_schedule


class StopAtStep(Callback):
    """Ends fit cleanly after ``step`` optimizer steps, writing ``last.ckpt`` there (the demo's interrupted run)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step and not trainer.should_stop:
            trainer.should_stop = True
            save_last_now(trainer)


class PredictionsWriter(BasePredictionWriter):
    """``predict`` results (``LoraCausalLM.predict_step``) as JSON Lines (title, reference, answer, stopped) in
    the run's log folder, appended per batch. A whole catalogue, resumable and sharded: ``python -m amzft describe``."""

    def __init__(self):
        super().__init__(write_interval="batch")
        self._handle = None
        self._rows = 0

    def on_predict_start(self, trainer, pl_module):
        # Rank 0 only: amzft's predict loader is not sharded, every rank answers the same rows.
        if trainer.is_global_zero and trainer.log_dir is not None:
            path = Path(trainer.log_dir) / "predictions.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handle, self._rows = path.open("w"), 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if self._handle is not None:
            self._handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in prediction))
            self._handle.flush()
            self._rows += len(prediction)

    def on_predict_end(self, trainer, pl_module):
        if self._handle is not None:
            self._handle.close()
            pl_module.print(f"amzft: {self._rows} predictions written to {self._handle.name}")
            self._handle = None


class SampleAnswers(Callback):
    """Answers decoded as every command decodes them (``options``: ``DEFAULT_DECODING`` unless the CLI's
    ``--decoding`` … say otherwise; greedy, so runs stay exact) for a fixed, seeded sample of validation products:

    * every ``every_n_steps`` optimizer steps, the first ``products`` go to TensorBoard as text
      (``samples/answers``), to watch the answers change along the loss curve;
    * at every validation (also in ``validate``), the first ``rouge_products`` are scored against their
      descriptions with ROUGE-L F1 (``scoring.overlap_scores``, as ``evaluate``) and logged as ``val/rougeL``,
      which ``best.monitor`` and early stopping can use. Answers are capped at ``max_new_tokens``, so it
      ranks checkpoints rather than measuring full descriptions.

    One generation pass serves both: text due at a validating step is written from the scored answers.
    Under DDP rank 0 generates and every rank logs the score it broadcasts.

    Args:
        every_n_steps: text every N optimizer steps; 0 turns the text off.
        products: products in the text (of the validation split, else of train).
        max_new_tokens: answer length cap.
        rouge_products: products scored at each validation (one batch up to 8); 0 turns
            ``val/rougeL`` off.
        seed: picks the sample.
    """

    def __init__(self, every_n_steps: int = 20, products: int = 3, max_new_tokens: int = 64, rouge_products: int = 8,
                 seed: int = 3407):
        if min(every_n_steps, products, rouge_products) < 0 or max_new_tokens < 1:
            raise ConfigError("sample_answers.every_n_steps, products and rouge_products must be >= 0 (0: off), "
                              "max_new_tokens >= 1")
        self.every_n_steps, self.products, self.max_new_tokens = every_n_steps, products, max_new_tokens
        self.rouge_products, self.seed = rouge_products, seed
        self._done_step = -1
        self.options: GenerationOptions = DEFAULT_DECODING  # the CLI sets its --decoding here
        self._text_pending: int | None = None  # a step whose text waits for that step's validation
        self.last_seconds: float | None = None  # the last val/rougeL generation + scoring, for the record

    def _rows(self, trainer, n: int, splits=("validation", "train")):
        """The first ``n`` of a seeded order of the split's products (the same order every call)."""
        for split in splits:
            data = trainer.datamodule.split(split)
            if len(data):
                order = seeded_sample(len(data), max(n, self.products, self.rouge_products), self.seed)
                return split, data.select(order[:n]).select_columns(["title", "content"])
        return None, None

    def _write_text(self, trainer, step: int, split: str, rows, answers: list[str]) -> None:
        text = "\n\n".join(f"**{t}** ({split})  \nreference: {c}  \nanswer: {a or '(empty)'}"
                           for t, c, a in zip(rows["title"], rows["content"], answers))
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text("samples/answers", text, step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not self.every_n_steps or step == 0 or step % self.every_n_steps or step == self._done_step:
            return
        self._done_step = step
        if not trainer.is_global_zero or trainer.datamodule is None or not trainer.loggers:
            return
        schedule = find_schedule(trainer)
        if self.rouge_products and schedule is not None and schedule.is_due(trainer) and trainer.enable_validation:
            self._text_pending = step  # the validation right after this batch generates them anyway
            return
        split, rows = self._rows(trainer, self.products)
        if rows is not None:
            answers = generate_answers(pl_module, list(rows["title"]), trainer.datamodule.settings.prompt, self.max_new_tokens,
                                       options=self.options)
            self._write_text(trainer, step, split, rows, answers)

    def on_validation_epoch_end(self, trainer, pl_module):
        if not self.rouge_products or trainer.sanity_checking or trainer.datamodule is None:
            return
        score = None
        if trainer.is_global_zero:
            started = time.perf_counter()
            split, rows = self._rows(trainer, self.rouge_products, splits=("validation",))
            if rows is not None:
                titles, references = list(rows["title"]), list(rows["content"])
                answers = generate_answers(pl_module, titles, trainer.datamodule.settings.prompt, self.max_new_tokens,
                                           batch_size=8, options=self.options)
                score = overlap_scores(answers, references)["rougeL"]
                self.last_seconds = time.perf_counter() - started
                if self._text_pending == trainer.global_step and trainer.loggers:
                    n = min(self.products, len(titles))
                    self._write_text(trainer, trainer.global_step, split, rows.select(range(n)), answers[:n])
        self._text_pending = None
        score = trainer.strategy.broadcast(score, src=0)
        if score is not None:
            pl_module.log("val/rougeL", float(score), prog_bar=True)


class GracefulStop(Callback):
    """SIGTERM or Ctrl-C during training: finish the accumulation window, write ``last.ckpt`` at that step
    boundary (so the resume is exact), stop, and say how to resume. A second Ctrl-C interrupts at once.
    Replaces Lightning's SIGTERM handler during training (it would raise mid-window, losing the window's work)."""

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def on_train_start(self, trainer, pl_module):
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Mid-window (the step unchanged), stopping now would lose the window's gradients.
        if not self.requested or trainer.should_stop or trainer.global_step == self._step_at_batch_start:
            return
        trainer.should_stop = True
        path = save_last_now(trainer)
        pl_module.print(f"\namzft: {self.requested} received; stopped after optimizer step {trainer.global_step}, "
                        f"checkpoint written to {path}.\nResume exactly with the same command plus: --ckpt_path last")

    def on_train_end(self, trainer, pl_module, exception=None):
        for sig, handler in self._previous.items():  # the handlers from before training
            signal.signal(sig, handler)
        self._previous = {}

    on_exception = on_train_end


class Preflight(Callback):
    """At fit start, what would otherwise fail at the first checkpoint, hours in: the checkpoint folder is
    writable and its disk holds a few checkpoints (the CLI checks the log folder before anything is written)."""

    CHECKPOINTS_OF_ROOM = 3  # a new step file, last.ckpt and its temporary copy (plus the best-k files)

    def on_fit_start(self, trainer, pl_module):
        if not trainer.is_global_zero or trainer.checkpoint_callback is None:
            return
        # weights + two AdamW moments (fp32 upper bound; 8-bit moments are smaller)
        one = sum(p.numel() * (p.element_size() + 8) for p in pl_module.parameters() if p.requires_grad) + (1 << 20)
        folder = trainer.checkpoint_callback.dirpath or trainer.default_root_dir
        best = sum(c.save_top_k for c in trainer.checkpoint_callbacks if isinstance(c, BestCheckpoint))
        check_writable(folder, (self.CHECKPOINTS_OF_ROOM + best) * one, what="checkpoint folder")
