"""Training callbacks: stop at a step, stop gracefully, preflight checks, predictions, sample answers."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

from lightning.pytorch import Callback

from amzft.checkpoints import check_writable, save_last_now
from amzft.generate import generate_answers


class StopAtStep(Callback):
    """Ends fit cleanly after ``step`` optimizer steps and writes ``last.ckpt`` there (the
    demo's stand-in for an interrupted run)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step and not trainer.should_stop:
            trainer.should_stop = True
            save_last_now(trainer)


class PredictionsWriter(Callback):
    """``predict`` results as JSON Lines (title, reference, answer) in the run's log folder."""

    def on_predict_epoch_end(self, trainer, pl_module):
        rows = [row for batch in trainer.predict_loop.predictions for row in batch]
        if not rows or trainer.log_dir is None:
            return
        path = Path(trainer.log_dir) / "predictions.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        pl_module.print(f"amzft: {len(rows)} predictions written to {path}")


class SampleAnswers(Callback):
    """Every ``every_n_steps`` optimizer steps, answers for a few fixed validation products go to
    TensorBoard as text, so the answers can be watched changing along the loss curve.

    Args:
        every_n_steps: 0 turns it off.
        products: how many products (the first of the validation split, else of train).
        max_new_tokens: answer length cap (greedy; greedy uses no RNG, so runs stay exact).
    """

    def __init__(self, every_n_steps: int = 20, products: int = 3, max_new_tokens: int = 64):
        self.every_n_steps, self.products, self.max_new_tokens = every_n_steps, products, max_new_tokens
        self._done_step = -1

    def _rows(self, trainer):
        dm = trainer.datamodule
        for split in ("validation", "train"):
            data = dm.split(split)
            if len(data):
                n = min(self.products, len(data))
                return split, data.select(range(n)).select_columns(["title", "content"])
        return None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not self.every_n_steps or step == 0 or step % self.every_n_steps or step == self._done_step:
            return
        self._done_step = step
        if not trainer.is_global_zero or trainer.datamodule is None or not trainer.loggers:
            return
        split, rows = self._rows(trainer)
        if rows is None:
            return
        answers = generate_answers(pl_module, list(rows["title"]), trainer.datamodule.settings.prompt, self.max_new_tokens)
        text = "\n\n".join(
            f"**{t}** ({split})  \nreference: {c}  \nanswer: {a or '(empty)'}"
            for t, c, a in zip(rows["title"], rows["content"], answers)
        )
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text("samples/answers", text, step)


class GracefulStop(Callback):
    """SIGTERM or Ctrl-C during training: finish the current accumulation window, write
    ``last.ckpt`` at that optimizer-step boundary (so the resume is exact), stop, and say how
    to resume. A second Ctrl-C interrupts at once, as usual.

    Registered at train start, after Lightning's own SIGTERM handler, which it replaces for
    the duration of training (Lightning's would raise mid-window and lose the window's work).
    """

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

    def _restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.requested or trainer.should_stop:
            return
        if trainer.global_step == self._step_at_batch_start:
            return  # mid-window: stopping now would lose the window's gradients
        trainer.should_stop = True
        path = save_last_now(trainer)
        pl_module.print(
            f"\namzft: {self.requested} received; stopped after optimizer step {trainer.global_step}, "
            f"checkpoint written to {path}.\nResume exactly with the same command plus: --ckpt_path last"
        )

    def on_train_end(self, trainer, pl_module):
        self._restore()

    def on_exception(self, trainer, pl_module, exception):
        self._restore()


class Preflight(Callback):
    """A check that would otherwise fail at the first checkpoint, minutes or hours in: the
    checkpoint folder is writable and its disk can hold a few checkpoints, once the model (hence
    the adapter and optimizer-state size) is known. (The log folder itself is checked by the
    CLI before anything is written.)"""

    CHECKPOINTS_OF_ROOM = 3  # a new step file, last.ckpt and its temporary copy

    def on_fit_start(self, trainer, pl_module):
        if not trainer.is_global_zero or trainer.checkpoint_callback is None:
            return
        trainable = [p for p in pl_module.parameters() if p.requires_grad]
        # weights + two AdamW moments (fp32 upper bound; 8-bit moments are smaller)
        one = sum(p.numel() * (p.element_size() + 8) for p in trainable) + (1 << 20)
        folder = trainer.checkpoint_callback.dirpath or trainer.default_root_dir
        check_writable(folder, self.CHECKPOINTS_OF_ROOM * one, what="checkpoint folder")
