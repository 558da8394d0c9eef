"""Batch stage, sampler: the epoch's batches dealt to this DDP rank in accumulation windows, with their label totals."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from amzft.data.batch_order import BatchOrder

# Why not torchdata's StatefulDataLoader: each batch must carry its whole accumulation window's label-token
# total (the loss normaliser, which needs batches not yet yielded), also when a resume lands mid-window, and
# windows are dealt across DDP ranks. So the order is recomputed from (seed, epoch), and a resume skips the batches run.


class Batch(list):
    """A batch's dataset indices, with what a step needs beyond them."""

    filler = False  # an evaluation batch scored with no labels (data.module.eval_shards)

    def __init__(self, indices, rows: list[int] | None = None):
        super().__init__(indices)
        self.rows = rows  # examples per packed row; None: one example per row
        self.window: list[Batch] = []  # its accumulation window (all ranks')
        self.window_label_tokens: int | None = None  # the window's label-token total, once counted


def rank_windows(batches: Iterable, accumulate: int, world: int, rank: int) -> Iterator[tuple]:
    """This rank's batches, each with its window (every rank's batches of ``accumulate`` steps).

    Batches are dealt round-robin, so step s of rank r sees global batch s * world + r (W ranks x
    batch b see what one process with batch W*b sees). Windows are aligned to the epoch start, as
    Lightning's accumulation is; the last may be short. Every rank must run the same number of
    steps (DDP all-reduces each backward), so the epoch's last < ``world`` batches are dropped."""
    span = accumulate * world
    source = iter(batches)
    window = list(itertools.islice(source, span))
    while window:
        following = list(itertools.islice(source, span))
        if not following and world > 1:
            window = window[: len(window) - len(window) % world]
        for batch in window[rank::world]:
            yield batch, window
        window = following


class ResumableBatchSampler:
    """Seeded, resumable batches in accumulation windows, plain, length-grouped or packed.

    The epoch is read from ``epoch_source`` (the trainer's counter) as iteration starts: Lightning never
    calls ``set_epoch`` on a batch sampler. ``state_dict`` records the epoch and the batches this rank
    consumed (asked of ``progress``, the trainer's count, as loaders fetch ahead); the next iteration of
    that epoch after ``load_state_dict`` skips exactly those."""

    def __init__(self, num_labels: Sequence[int], batch_size: int, accumulate: int = 1, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, lengths: Sequence[int] | None = None, layout: str = "plain",
                 max_length: int | None = None, mega_batch: int = 64, num_replicas: int = 1, rank: int = 0):
        if layout != "plain" and lengths is None:
            raise ValueError(f"layout {layout!r} needs the example lengths")
        self.order = BatchOrder(batch_size, seed, shuffle, drop_last, layout, max_length, max(1, mega_batch))
        # Either may be lazy (data.lazy.LazyCounts, kept): window totals counted as yielded, not the whole epoch first
        self.num_labels, self.lengths = (v if v is None or getattr(v, "lazy", False) else np.asarray(v, dtype=np.int64)
                                         for v in (num_labels, lengths))
        self.accumulate = max(1, accumulate)
        self.num_replicas, self.rank = max(1, num_replicas), rank
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches already consumed)
        self._cache: tuple[int, list[Batch]] | None = None
        self._length: int | None = None
        self.progress = None  # callable -> batches consumed in the current epoch
        self.epoch_source = None  # callable -> the epoch about to be iterated

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        # Lightning reads len() once: epoch 0's count for every epoch (packed ones vary a little; cut or end early)
        if self._length is None:
            self._length = self.order.count(len(self.num_labels), self.lengths) // self.num_replicas
        return self._length

    def _rank_batches(self, epoch: int) -> Iterator[Batch]:
        made = (Batch(indices, rows) for indices, rows in self.order.batches(len(self.num_labels), self.lengths, epoch))
        lazy = getattr(self.num_labels, "lazy", False)
        for batch, window in rank_windows(made, self.accumulate, self.num_replicas, self.rank):
            batch.window = window
            yield batch if lazy else self._count_window(batch)

    def batches(self, epoch: int) -> list[Batch]:
        """This rank's batches of ``epoch`` with their window totals, all at once (tests, evaluation)."""
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, [self._count_window(b) for b in self._rank_batches(epoch)])
        return self._cache[1]

    def _count_window(self, batch: Batch) -> Batch:
        if batch.window_label_tokens is None:
            total = int(sum(self.num_labels[list(b)].sum() for b in batch.window))
            for b in batch.window:
                b.window_label_tokens = total
        return batch

    def __iter__(self) -> Iterator[Batch]:
        if self.epoch_source is not None:
            self.epoch = int(self.epoch_source())
        resume, self._resume = self._resume, None  # applies once
        skip = resume[1] if resume is not None and resume[0] == self.epoch else 0
        cached = self._cache is not None and self._cache[0] == self.epoch
        batches = self._cache[1] if cached else self._rank_batches(self.epoch)
        for batch in itertools.islice(batches, skip, None):
            yield self._count_window(batch)

    def state_dict(self) -> dict:
        done = int(self.progress()) if self.progress is not None else 0
        return {"epoch": self.epoch, "batches_done": done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._resume = (self.epoch, int(state["batches_done"]))
