"""The one token-throughput meter (``fit``, benchmarks/train_throughput.py, gpu/check.py), so every
figure amzft reports counts the same tokens over the same time. Per batch (amzft.data.collate):
real (non-pad), processed (positions computed), padded (all positions) and label tokens."""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from lightning.pytorch import Callback


def peak_memory_mib(device: torch.device) -> float:
    """The CUDA allocator's peak on a GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def row_lengths(batch: dict) -> list[int]:
    """The positions each row of a batch computes, padding excluded (a shared preamble once)."""
    return batch["row_lengths"].tolist()


@dataclass
class TokenCounts:
    real: int = 0
    processed: int = 0
    padded: int = 0
    labels: int = 0
    squares: int = 0  # Σ over rows of (positions computed)²

    def add_batch(self, batch: dict) -> None:
        self.real += int(batch["real_tokens"])
        self.processed += int(batch.get("input_tokens", batch["real_tokens"]))
        self.padded += batch["input_ids"].numel()
        self.labels += int(batch["label_tokens"])
        self.squares += sum(n * n for n in row_lengths(batch))

    def add(self, other: TokenCounts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class ThroughputMeter(Callback):
    """Logs tokens/s, label tokens/s, padding efficiency and peak memory per optimizer step, timed from the
    window's first batch (validation and checkpoint writes between steps excluded). ``summary()`` times the run
    from the end of its first step (compilation, warm-up) to its last, written as JSON to ``summary_path`` at train end."""

    def __init__(self, summary_path: str | None = None):
        self.summary_path = summary_path
        self._reset_run()

    def _reset_run(self) -> None:
        self._device = torch.device("cpu")
        self._window, self._total = TokenCounts(), TokenCounts()
        self._window_start = self._last_step = self._last_loss = None  # float, int, float once set
        self._train_start = self._timed_from = self._timed_to = None
        self._steps = self._steps_timed = 0

    def _now(self) -> float:
        if self._device.type == "cuda":  # kernels run asynchronously
            torch.cuda.synchronize(self._device)
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module):
        self._reset_run()
        self._device = pl_module.device
        if self._device.type == "cuda":  # the training's peak, not the model loading's
            torch.cuda.reset_peak_memory_stats(self._device)
        self._last_step = self._steps = trainer.global_step  # not 0 when resuming
        self._train_start = self._now()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._window_start is None:
            self._window_start = self._now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._window.add_batch(batch)
        if trainer.global_step == self._last_step:
            return  # still inside an accumulation window
        now = self._now()
        counts, elapsed = self._window, now - self._window_start
        pl_module.log("train/tokens_per_s", counts.real / elapsed, on_step=True, prog_bar=True)
        pl_module.log("train/label_tokens_per_s", counts.labels / elapsed, on_step=True)
        pl_module.log("train/padding_efficiency", counts.processed / counts.padded, on_step=True)
        pl_module.log("train/peak_memory_mib", peak_memory_mib(self._device), on_step=True)
        if self._timed_from is None:  # this fit's first optimizer step: compilation, warm-up
            self._timed_from = now
        else:
            self._total.add(self._window)
            self._steps_timed += 1
        self._timed_to = now
        self._last_step = self._steps = trainer.global_step
        loss = trainer.callback_metrics.get("train/loss")
        self._last_loss = float(loss) if loss is not None else self._last_loss
        self._window, self._window_start = TokenCounts(), None

    def summary(self) -> dict:
        """The run's totals over its timed steps (all but the first; rates None when none was timed)."""
        seconds = self._timed_to - self._timed_from if self._steps_timed else 0.0
        total = self._total

        def rate(count: int) -> float | None:
            return count / seconds if seconds > 0 else None

        return {
            "tokens_per_s": rate(total.real),
            "label_tokens_per_s": rate(total.labels),
            "padding_efficiency": total.processed / total.padded if total.padded else None,
            "seconds": seconds,
            "steps": self._steps,  # trainer.global_step at the last step (resumed steps included)
            "steps_timed": self._steps_timed,
            "first_step_s": self._timed_from - self._train_start if self._timed_from is not None else None,
            "tokens": total.real,
            "processed_tokens": total.processed,
            "padded_tokens": total.padded,
            "label_tokens": total.labels,
            "row_length_squares": total.squares,
            "peak_memory_mib": peak_memory_mib(self._device),
            "last_loss": self._last_loss,
        }

    def on_train_end(self, trainer, pl_module):
        if self.summary_path and trainer.is_global_zero:
            Path(self.summary_path).write_text(json.dumps(self.summary(), indent=1))
