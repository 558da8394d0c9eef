"""The Lightning callback gpu/check.py hands to ``amzft fit`` (``--trainer.callbacks+=``).

Kept apart from check.py so that the reference process, which must import Unsloth before
transformers, never imports Lightning (Lightning -> torchmetrics -> transformers)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lightning.pytorch import Callback


def sync() -> None:
    import torch

    if torch.cuda.is_available():  # CPU: only the command-line test in tests/test_backends.py
        torch.cuda.synchronize()


class Measure(Callback):
    """Real tokens/s from the end of optimizer step 1 (the reference is timed the same way),
    peak GPU memory and the last logged train loss, written as JSON when training ends."""

    def __init__(self, path: str):
        self.path, self.start, self.tokens, self.first_step_s, self.t0 = path, None, 0, None, None

    def on_train_start(self, trainer, pl_module):
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        sync()
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= 1 and self.start is None:
            sync()
            self.start = time.perf_counter()
            self.first_step_s = self.start - self.t0
        elif self.start is not None:
            self.tokens += int(batch["real_tokens"])

    def on_train_end(self, trainer, pl_module):
        import torch

        sync()
        seconds = time.perf_counter() - self.start
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        loss = trainer.callback_metrics.get("train/loss")
        Path(self.path).write_text(json.dumps({
            "tokens_per_s": self.tokens / seconds, "seconds": seconds, "tokens": self.tokens, "peak_gib": peak,
            "steps": trainer.global_step, "first_step_s": self.first_step_s,
            "last_loss": float(loss) if loss is not None else None,
        }))
