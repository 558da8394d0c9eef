"""``describe`` on Lightning's predict loop: one process, or several (DDP, one shard each).

Lightning provides the processes (its launcher re-runs the command per extra device), placement and
precision; amzft the batches (``plan``), the generation (``generate_ids``) and the writing (``store``).
Predict needs no collective per step: shards may differ in length, a process out of batches waits at the end.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import BasePredictionWriter

from amzft.catalogue.plan import Batch, PlanSettings, plan_batches, shard
from amzft.catalogue.store import OutputStore, row_bytes
from amzft.catalogue.titles import read_titles
from amzft.data.encode import PromptEncoder
from amzft.data.stats import PipelineStats
from amzft.errors import AmzftError
from amzft.model.decoding import GenerationOptions
from amzft.model.generation import generate_ids


class StoppedBySignal(AmzftError):
    """SIGTERM (a scheduler's preemption, ``kill``): the batch in flight was finished and written."""


class CatalogueBatches(torch.utils.data.IterableDataset):
    """This process's batches of the plan, read from the file as they are needed."""

    def __init__(self, batches: Callable[[], Iterator[Batch]]):
        self.batches = batches

    def __iter__(self) -> Iterator[dict]:
        for batch in self.batches():
            yield batch._asdict()  # index, records, prompt_ids


class CatalogueData(LightningDataModule):
    """The titles file as this rank's shard of the batch plan, less what ``done`` holds."""

    def __init__(self, path: str, tokenizer, prompt_format, plan: PlanSettings, done: np.ndarray,
                 strict: bool = False, strip_boilerplate: bool = True):
        super().__init__()
        self.path, self.plan, self.done, self.strict = path, plan, done, strict
        self.strip_boilerplate = strip_boilerplate
        self.encoder = PromptEncoder(tokenizer, prompt_format)
        self.stats = PipelineStats()  # this rank's pass over the file (every rank reads all of it)

    def all_batches(self) -> Iterator[Batch]:
        self.stats = PipelineStats()
        records = read_titles(self.path, self.stats, self.strict, self.strip_boilerplate)
        return plan_batches(records, self.encoder, self.plan, self.stats)

    def predict_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        dataset = CatalogueBatches(lambda: shard(self.all_batches(), rank, world, self.done))
        # batch_size=None: the dataset yields whole batches; no worker processes (tokenising a
        # chunk takes milliseconds next to generating it).
        return torch.utils.data.DataLoader(dataset, batch_size=None, collate_fn=lambda batch: batch)


class Describer(LightningModule):
    """The fine-tuned (or base) module, answering one planned batch per predict step."""

    def __init__(self, module, options: GenerationOptions, use_adapter: bool = True):
        super().__init__()
        self.lm, self.options, self.use_adapter = module, options, use_adapter

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        answers = generate_ids(self.lm, batch["prompt_ids"], self.options, self.use_adapter)
        rows = []
        for record, answer in zip(batch["records"], answers):
            row = {"line": record.line, **({"uid": record.uid} if record.uid is not None else {}), "title": record.title,
                   "description": answer.text, "new_tokens": answer.new_tokens, "stop": "eos" if answer.stopped else "length"}
            if record.reference is not None:
                row["reference"] = record.reference
            rows.append(row)
        return rows


class PartWriter(BasePredictionWriter):
    """Appends each finished batch's rows to this rank's part file, flushed and synced (a kill
    loses at most the batches in flight); rank 0 shows products/s and an ETA, and merges the
    parts in input order once every rank is done."""

    def __init__(self, store: OutputStore, total: int, summary: Callable[[], dict], every_s: float = 10.0):
        super().__init__(write_interval="batch")
        self.store, self.total, self.summary, self.every_s = store, total, summary, every_s
        self.handle, self.written, self.merged = None, 0, None  # merged: the output's row count, on rank 0
        self.started = self.last_shown = 0.0

    def on_predict_start(self, trainer, pl_module) -> None:
        self.handle = self.store.open_part(trainer.global_rank)
        self.started = self.last_shown = time.perf_counter()

    def write_on_batch_end(self, trainer, pl_module, outputs, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        self.handle.write(b"".join(row_bytes(row) for row in outputs))
        self.handle.flush()
        # fsync: a batch takes seconds to generate, a sync milliseconds; without it a machine
        # crash (not just a kill) could lose rows the file claimed to have.
        os.fsync(self.handle.fileno())
        self.written += len(outputs)
        if trainer.received_sigterm:
            # Lightning's predict loop notes SIGTERM but runs on; stop here, every row on disk.
            raise StoppedBySignal(f"stopped by SIGTERM after {self.written} descriptions on this process; they are in "
                                  f"{self.store.partial}: the same command resumes")
        if trainer.is_global_zero and time.perf_counter() - self.last_shown >= self.every_s:
            self._show(trainer.world_size)

    def _show(self, world: int, final: bool = False) -> None:
        self.last_shown = now = time.perf_counter()
        rate = self.written * world / max(now - self.started, 1e-9)  # rank 0's pace, for all ranks
        if final:
            print(f"describe: {self.written} products on this process in {now - self.started:.0f} s "
                  f"({self.written / max(now - self.started, 1e-9):.2f} products/s)", file=sys.stderr)
            return
        left = max(self.total - self.written * world, 0)
        eta = left / rate if rate > 0 else float("inf")
        print(f"describe: ~{min(self.written * world, self.total)}/{self.total} products, {rate:.2f} products/s, "
              f"ETA {_duration(eta)}", file=sys.stderr, flush=True)

    def on_predict_end(self, trainer, pl_module) -> None:
        self.handle.close()
        if trainer.is_global_zero:
            self._show(trainer.world_size, final=True)
        trainer.strategy.barrier("describe parts written")  # every rank's rows are on disk
        if trainer.is_global_zero:
            self.merged = self.store.merge(self.summary())
        trainer.strategy.barrier("describe merged")


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
