"""Batch stage, order: an epoch's seeded example order cut into ``plain``, ``grouped`` or ``packed`` batches, by chunk."""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

LAYOUTS = ("plain", "grouped", "packed")
PACK_CHUNKS = 8  # a packing chunk is this many grouping chunks (mega_batch batches) of examples
ESTIMATE_SAMPLE = 2048  # examples whose lengths estimate a lazily packed epoch's row count


@dataclass(frozen=True)
class BatchOrder:
    """How an epoch's examples become batches (all ranks' batches: the sampler deals them)."""

    batch_size: int
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False
    layout: str = "plain"
    max_length: int | None = None  # packed rows' capacity in tokens
    mega_batch: int = 64

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, found {self.layout!r}")
        if self.layout == "packed" and not self.max_length:
            raise ValueError("layout 'packed' needs max_length")

    def batches(self, n: int, lengths: Sequence[int] | None, epoch: int) -> Iterator[tuple[list[int], list[int] | None]]:
        """Epoch ``epoch``'s batches of ``n`` examples as (indices, examples per row or None)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        size = self.batch_size
        if self.layout == "plain":
            stop = n - n % size if self.drop_last else n
            yield from ((order[i : i + size].tolist(), None) for i in range(0, stop, size))
        elif self.layout == "grouped":
            yield from self._grouped(order, lengths, rng)
        else:
            yield from self._packed(order, lengths, rng)

    def _grouped(self, order: np.ndarray, lengths, rng) -> Iterator[tuple[list[int], None]]:
        size, chunk = self.batch_size, self.batch_size * self.mega_batch
        for start in range(0, len(order), chunk):
            part = order[start : start + chunk]
            part = part[np.argsort(-np.asarray(lengths[part]), kind="stable")]
            batches = [part[i : i + size].tolist() for i in range(0, len(part), size)]
            if self.drop_last and len(batches[-1]) < size:
                batches.pop()  # the epoch's one short batch (its last chunk's shortest examples)
            if self.shuffle:
                batches = [batches[i] for i in rng.permutation(len(batches))]
            yield from ((batch, None) for batch in batches)

    def _packed(self, order: np.ndarray, lengths, rng) -> Iterator[tuple[list[int], list[int]]]:
        n, size, chunk = len(order), self.batch_size, self.batch_size * self.mega_batch * PACK_CHUNKS
        pending: list[list[int]] = []
        for start in range(0, n, chunk):  # a pack chunk holds many rows' worth of examples
            part = order[start : start + chunk]
            rows = pack_first_fit(np.arange(len(part)), np.asarray(lengths[part]), self.max_length)
            if self.shuffle:
                rows = [rows[i] for i in rng.permutation(len(rows))]
            pending += [[int(part[j]) for j in row] for row in rows]
            while len(pending) >= size or (pending and start + chunk >= n):
                group, pending = pending[:size], pending[size:]
                yield [idx for row in group for idx in row], [len(row) for row in group]

    def count(self, n: int, lengths: Sequence[int] | None) -> int:
        """Batches (all ranks') in epoch 0 of ``n`` examples: from ``n`` alone, by packing, or estimated if lengths are lazy."""
        size = self.batch_size
        if self.layout == "packed":
            if not getattr(lengths, "lazy", False):
                return sum(1 for _ in self.batches(n, lengths, 0))
            return -(-self.estimated_rows(n, lengths) // size)

        def batches_of(examples: int) -> int:  # a short last batch counts unless dropped
            return examples // size + (examples % size != 0 and not self.drop_last)

        # plain: one chunk; grouped: whole chunks of mega_batch full batches, then the rest
        chunk = max(n, 1) if self.layout == "plain" else size * self.mega_batch
        return n // chunk * batches_of(chunk) + batches_of(n % chunk)

    def estimated_rows(self, n: int, lengths) -> int:
        """Packed rows of ``n`` examples, from packing a fixed seeded sample of them in chunks as big
        as the epoch's: the same for every run of the same data, cold or warm, resumed or not."""
        chunk = self.batch_size * self.mega_batch * PACK_CHUNKS
        take = min(n, max(ESTIMATE_SAMPLE, chunk))
        sample = np.sort(np.random.default_rng([self.seed, n]).choice(n, take, replace=False))
        sizes = np.asarray(lengths[sample], dtype=np.int64)
        rows = sum(len(pack_first_fit(np.arange(a, min(a + chunk, take)), sizes, self.max_length))
                   for a in range(0, take, chunk))
        return max(1, round(rows * n / take))


def pack_first_fit(indices: np.ndarray, lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Examples into rows of at most ``capacity`` tokens: longest first, each into the fullest row it fits (bisection)."""
    ordered = sorted(indices.tolist(), key=lambda i: -int(lengths[i]))
    free: list[tuple[int, int]] = []  # (free tokens, row id), sorted
    rows: list[list[int]] = []
    for i in ordered:
        need = int(lengths[i])
        at = bisect.bisect_left(free, (need, -1))
        if at == len(free):
            rows.append([i])
            bisect.insort(free, (capacity - need, len(rows) - 1))
        else:
            room, row = free.pop(at)
            rows[row].append(i)
            bisect.insort(free, (room - need, row))
    return rows
