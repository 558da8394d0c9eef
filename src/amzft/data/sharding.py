"""Accumulation windows across DDP ranks.

The epoch's batches are made identically on every rank (same RNG seed), cut to a multiple of
the number of ranks and dealt round-robin, so that optimizer step s of rank r sees global batch
``s * world + r``: W ranks x batch b see what one process with batch W*b sees. A window spans
``accumulate`` steps of *all* ranks (its label-token total is the loss normaliser).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def rank_windows(batches: Iterable[T], accumulate: int, world: int, rank: int) -> Iterator[tuple[T, list[T]]]:
    """This rank's batches, each with its window (every rank's batches of that window).

    Windows are aligned to the epoch start, as Lightning's accumulation is; the last one may be
    short, and its total then covers only the batches it has. Every rank must run the same
    number of steps (DDP all-reduces each backward), so the epoch's last < ``world`` batches are
    dropped (a fresh order comes next epoch)."""
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
