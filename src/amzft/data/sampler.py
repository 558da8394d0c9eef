"""The batch sampler of every loader: seeded, resumable batches that know their accumulation
window.

Why the sampler knows the window: the loss is normalised by the number of label tokens in the
whole accumulation window (so every label token weighs the same whichever micro-batch holds it;
see docs/architecture.md), and that number depends on batches the model has not seen yet.
Every example's label count is in the dataset, so the sampler, which decides the order, can
attach the window total to each batch it yields. The work is split by concern: the order and
layout of an epoch's batches and their count (``batch_order``), the windows across ranks
(``sharding``), and here what a resume needs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from amzft.data.batch_order import BatchOrder
from amzft.data.sharding import rank_windows


@dataclass(eq=False)
class Batch:
    """A batch's dataset indices and what a step needs beyond them; reads as its indices."""

    indices: list[int]
    rows: list[int] | None = None  # examples per packed row; None: one example per row
    window: list[Batch] = field(default_factory=list, repr=False)  # its accumulation window (all ranks')
    window_label_tokens: int | None = None  # the window's label-token total, once counted

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.indices[i]


def _counts(values):
    """A ready numpy array, or a lazy one (data.lazy: counted when indexed) kept as it is."""
    if values is None or getattr(values, "lazy", False):
        return values
    return np.asarray(values, dtype=np.int64)


class ResumableBatchSampler:
    """Seeded, resumable batches in accumulation windows, optionally length-grouped or packed
    (``batch_order``), and sharded across DDP ranks (``sharding``).

    Epoch: read from ``epoch_source`` (the trainer's epoch counter) when an epoch's iteration
    starts. Lightning only calls ``set_epoch`` on ``loader.sampler`` / ``batch_sampler.sampler``,
    never on a batch sampler, so without it every epoch would replay epoch 0's order.
    ``set_epoch`` is kept for use without a trainer.

    Resume: ``state_dict()`` records the epoch and how many batches of it this rank consumed
    (asked of ``progress``, the trainer's counter, because loaders fetch ahead); after
    ``load_state_dict`` the next iteration of *that* epoch skips exactly those batches (all of
    them if the checkpoint was written at the epoch's end); any other epoch skips none.
    """

    def __init__(
        self,
        num_labels: Sequence[int],
        batch_size: int,
        accumulate: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        lengths: Sequence[int] | None = None,
        layout: str = "plain",
        max_length: int | None = None,
        mega_batch: int = 64,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if layout != "plain" and lengths is None:
            raise ValueError(f"layout {layout!r} needs the example lengths")
        self.order = BatchOrder(batch_size, seed, shuffle, drop_last, layout, max_length, max(1, mega_batch))
        # Either may be lazy (tokenised when indexed): then window totals are counted as their
        # batches are yielded, so training starts without counting the whole epoch.
        self.num_labels, self.lengths = _counts(num_labels), _counts(lengths)
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
        # Lightning reads len() once, to know when an epoch ends, so it must not depend on which
        # epoch happens to be loaded (a resumed run would end its epochs elsewhere): epoch 0's
        # count (packed rows: the count varies a little per epoch), always. An epoch with more
        # batches is cut there, deterministically; one with fewer ends when the batches do.
        if self._length is None:
            self._length = self.order.count(len(self.num_labels), self.lengths) // self.num_replicas
        return self._length

    def _rank_batches(self, epoch: int) -> Iterator[Batch]:
        """This rank's batches of ``epoch``, each knowing its window (and, when the label
        counts are ready, the window's total)."""
        made = (Batch(indices, rows) for indices, rows in self.order.batches(len(self.num_labels), self.lengths, epoch))
        lazy = getattr(self.num_labels, "lazy", False)
        for batch, window in rank_windows(made, self.accumulate, self.num_replicas, self.rank):
            batch.window = window
            yield batch if lazy else self._count_window(batch)

    def batches(self, epoch: int) -> list[Batch]:
        """This rank's batches of ``epoch``, each carrying its window's label-token total (all
        made at once: for tests and small data; training iterates them as they are made)."""
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, [self._count_window(b) for b in self._rank_batches(epoch)])
        return self._cache[1]

    def _count_window(self, batch: Batch) -> Batch:
        """Give every batch of ``batch``'s window the window's label-token total."""
        if batch.window_label_tokens is None:
            total = int(sum(self.num_labels[b.indices].sum() for b in batch.window))
            for b in batch.window:
                b.window_label_tokens = total
        return batch

    def __iter__(self) -> Iterator[Batch]:
        if self.epoch_source is not None:
            self.epoch = int(self.epoch_source())
        skip = 0
        if self._resume is not None:
            resume_epoch, done = self._resume
            self._resume = None  # applies once
            skip = done if resume_epoch == self.epoch else 0
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
