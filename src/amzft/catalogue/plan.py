"""The batch plan: which titles are generated together, fixed by the input alone.

Records are taken ``chunk`` at a time in file order, sorted by prompt length inside a chunk and cut into
batches whose rows x (longest prompt + max_new_tokens) stay within ``token_budget`` (at most ``max_batch``
rows): little padding, a known KV-cache bound. Process R of W takes the batches numbered R, R + W, ...
The plan depends neither on the number of processes nor on what is already written, so greedy answers of
a resumed or sharded run are those of a straight single-process run, row for row. One chunk is held at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import NamedTuple

import numpy as np

from amzft.catalogue.titles import TitleRecord
from amzft.data.stats import PipelineStats
from amzft.errors import ConfigError


@dataclass(frozen=True)
class PlanSettings:
    """How titles are batched (all of it recorded in the run's manifest: changing it changes
    which answers a resumed run would give)."""

    token_budget: int = 16384  # rows x (longest prompt + max_new_tokens) per batch
    max_batch: int = 64  # rows per batch at most
    chunk: int = 4096  # records sorted by length together
    max_new_tokens: int = 256
    max_prompt_tokens: int = 2048  # longer prompts are skipped (prompt_too_long): never trained on

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.max_batch < 1 or self.chunk < 1:
            raise ConfigError(f"max_new_tokens, max_batch and chunk must be >= 1, found "
                              f"{self.max_new_tokens}, {self.max_batch}, {self.chunk}")
        if self.token_budget < self.max_new_tokens + 1:
            raise ConfigError(f"--token_budget must fit one prompt and its answer (> max_new_tokens "
                              f"{self.max_new_tokens}), found {self.token_budget}")


class Batch(NamedTuple):
    index: int  # number in the plan
    records: list[TitleRecord]
    prompt_ids: list[list[int]]


def plan_batches(records: Iterable[TitleRecord], encode: Callable[[list[str]], list[list[int]]],
                 settings: PlanSettings, stats: PipelineStats) -> Iterator[Batch]:
    """Every batch of the plan, in order. ``encode`` tokenises titles into prompts (as
    training did); a prompt over ``max_prompt_tokens`` is a counted skip."""
    index, records = 0, iter(records)
    while chunk := list(islice(records, settings.chunk)):
        for rows, ids in _chunk_batches(chunk, encode([r.title for r in chunk]), settings, stats):
            yield Batch(index, rows, ids)
            index += 1


def _chunk_batches(chunk: list[TitleRecord], ids: list[list[int]], settings: PlanSettings, stats: PipelineStats):
    lengths = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
    order = np.lexsort((np.arange(len(ids)), lengths))  # by length; file order among equals
    rows: list[int] = []
    longest = 0
    for i in order.tolist():
        n = int(lengths[i])
        if n > settings.max_prompt_tokens:
            stats.skip("prompt_too_long", chunk[i].line)
            continue
        if rows and (len(rows) >= settings.max_batch
                     or (len(rows) + 1) * (max(longest, n) + settings.max_new_tokens) > settings.token_budget):
            yield [chunk[j] for j in rows], [ids[j] for j in rows]
            rows, longest = [], 0
        rows.append(i)
        longest = max(longest, n)
    if rows:
        yield [chunk[j] for j in rows], [ids[j] for j in rows]


def shard(batches: Iterable[Batch], rank: int, world: int, done: np.ndarray | None = None) -> Iterator[Batch]:
    """This process's batches (``index % world == rank``), less those whose every line is in
    ``done`` (sorted line numbers). A batch cut short by a kill is generated again whole, with
    the same companions, so its answers come out as before."""
    for batch in batches:
        if batch.index % world != rank:
            continue
        if done is not None and len(done):
            lines = np.fromiter((r.line for r in batch.records), dtype=np.int64, count=len(batch.records))
            found = np.searchsorted(done, lines)
            if np.all((found < len(done)) & (done[np.minimum(found, len(done) - 1)] == lines)):
                continue
        yield batch
