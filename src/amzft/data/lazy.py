"""Encode stage, on demand: records become examples as batches ask for them, their token counts kept for the sampler."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from amzft.data.encode import Encoded, PromptEncoder, encode_texts, join_example
from amzft.files import atomic_write

log = logging.getLogger(__name__)

COUNT_CHUNK = 8192  # records tokenised per call when all counts are wanted
REMEMBER = 8192  # recently tokenised examples kept (the sampler's window count, then the batch)
PARALLEL_FROM = 4 * COUNT_CHUNK  # fewer examples than this are counted in this process (no fork)


def default_num_proc() -> int:
    """One process per core this process may run on (off Linux: every core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def tokenizer_processes():
    """While worker processes tokenise: no Rust thread pool (and so no fork warning) in them."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
        if previous is not None:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


_COUNTING = None  # the LazyExamples a counting worker counts (inherited through fork)


def _count_init(examples) -> None:
    global _COUNTING
    _COUNTING = examples


def _count_chunk(part: list[int]) -> tuple[list[int], list[list[int]]]:
    return _COUNTING._count_rows(part)


def count_row(example: Encoded) -> list[int]:
    """What is kept of an example once counted: (tokens, label tokens, response cut)."""
    return [len(example.input_ids), len(example.input_ids) - example.prompt_len, int(example.truncated)]


def encode_records(titles, contents, tokenizer, encoder: PromptEncoder, max_length: int) -> list[Encoded]:
    """Examples of cleaned records. One that still does not fit (a tokenizer that expands text
    beyond the build's byte bound) keeps its prompt's head and EOS: one harmless label."""
    prompts = encoder(list(titles))
    responses = encode_texts(tokenizer, list(contents), False)
    eos = tokenizer.eos_token_id
    out = []
    for p_ids, r_ids in zip(prompts, responses):
        example = join_example(p_ids, r_ids, eos, max_length)
        if example is None:
            log.warning("an example did not fit max_length=%d after all; kept its prompt head only", max_length)
            example = Encoded(p_ids[: max_length - 1] + [eos], min(len(p_ids), max_length - 1), True)
        out.append(example)
    return out


class LazyCounts:
    """``counts[indices]`` as a numpy array, tokenising the examples not counted yet (so ``lazy``, for the sampler)."""

    lazy = True

    def __init__(self, examples: LazyExamples, which: str):
        self.examples, self.which = examples, which

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, indices):
        indices = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        self.examples.count(indices)
        return getattr(self.examples, self.which)[indices].astype(np.int64)


class LazyExamples:
    """A split's cleaned records (a ``datasets.Dataset``), tokenised on demand into (input_ids, prompt_len)."""

    def __init__(self, records, tokenizer, settings, encoder: PromptEncoder, counts_file: Path | None = None,
                 counts: np.ndarray | None = None):
        """``counts``: known (lengths, num_labels, truncated) rows, -1 where not counted; else ``counts_file``'s if it fits."""
        self.records = records.select_columns(["title", "content"])
        self.tokenizer, self.max_length, self.settings = tokenizer, settings.max_length, settings
        self.encoder = encoder  # one per dataset (its check settled on fixed titles), shared by its splits
        n = len(self.records)
        self.counts = np.full((3, n), -1, dtype=np.int32)
        self.lengths, self.num_labels, self.truncated = self.counts  # views
        self.counts_file = counts_file
        if counts is None and counts_file is not None and counts_file.is_file():
            counts = np.load(counts_file)
        if counts is not None and counts.shape == (3, n):
            self.counts[:] = counts
        self._recent: OrderedDict[int, Encoded] = OrderedDict()

    def __len__(self) -> int:
        return len(self.num_labels)

    def __deepcopy__(self, memo) -> LazyExamples:
        # datasets deep-copies its format transform (a bound method of this) on every
        # select_columns / with_format, tokenizer included; what this caches is the same for any copy.
        return self

    def label_counts(self) -> LazyCounts:
        return LazyCounts(self, "num_labels")

    def token_lengths(self) -> LazyCounts:
        return LazyCounts(self, "lengths")

    def _encoded(self, indices: list[int]) -> list[Encoded]:
        rows = self.records[indices]
        return encode_records(rows["title"], rows["content"], self.tokenizer, self.encoder, self.max_length)

    def _count_rows(self, part: list[int]) -> tuple[list[int], list[list[int]]]:
        return part, [count_row(e) for e in self._encoded(part)]

    def encode(self, indices) -> list[Encoded]:
        """The examples at ``indices`` (in that order)."""
        indices = [int(i) for i in indices]
        missing = sorted({i for i in indices if i not in self._recent})
        for i, example in zip(missing, self._encoded(missing) if missing else []):
            self.counts[:, i] = count_row(example)
            self._recent[i] = example
            if len(self._recent) > REMEMBER:
                self._recent.popitem(last=False)
        return [self._recent[i] for i in indices]

    def count(self, indices: np.ndarray) -> None:
        """Make sure the counts at ``indices`` are known."""
        todo = indices[self.lengths[indices] < 0]
        if len(todo):
            self.encode(np.unique(todo))

    def ensure_counts(self, num_proc: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(label counts, lengths) of every example, counting the rest with ``num_proc`` processes, kept beside the cache."""
        todo = np.flatnonzero(self.lengths < 0)
        if not len(todo):
            return self.num_labels, self.lengths
        procs = default_num_proc() if num_proc is None else max(1, num_proc)
        log.info("counting the tokens of %d examples (%d process%s)", len(todo), procs, "es" * (procs > 1))
        parts = [todo[start : start + COUNT_CHUNK].tolist() for start in range(0, len(todo), COUNT_CHUNK)]
        for part, rows in self._count_parts(parts, procs if len(todo) >= PARALLEL_FROM else 1):
            self.counts[:, part] = np.asarray(rows, dtype=np.int32).T
        if self.counts_file is not None:
            try:
                atomic_write(self.counts_file, lambda f: np.save(f, self.counts))  # a reader sees all or none
            except OSError as exc:  # a read-only cache still works, it just counts again next time
                log.info("could not keep the token counts in %s: %s", self.counts_file, exc)
        return self.num_labels, self.lengths

    def _count_parts(self, parts: list[list[int]], procs: int):
        if procs == 1 or "fork" not in mp.get_all_start_methods():
            yield from map(self._count_rows, parts)
            return
        # fork: workers inherit the tokenizer and memory-mapped records at once (spawn: re-import torch, pickle the tokenizer)
        with tokenizer_processes(), mp.get_context("fork").Pool(procs, initializer=_count_init, initargs=(self,)) as pool:
            yield from pool.imap_unordered(_count_chunk, parts)

    def subset(self, indices) -> LazyExamples:
        """The examples at ``indices`` as their own (in-memory) collection, counts carried over."""
        indices = np.asarray(indices, dtype=np.int64)
        records = self.records.select(indices).flatten_indices(keep_in_memory=True)
        return LazyExamples(records, self.tokenizer, self.settings, self.encoder, counts=self.counts[:, indices])

    def transform(self, batch: dict) -> dict:
        """A ``datasets`` transform: rows come with ``input_ids``, ``prompt_len``, ``num_labels`` (unless no text is read)."""
        if "title" not in batch or "content" not in batch:
            return batch
        examples = encode_records(batch["title"], batch["content"], self.tokenizer, self.encoder, self.max_length)
        return {**batch, "input_ids": [e.input_ids for e in examples], "prompt_len": [e.prompt_len for e in examples],
                "num_labels": [len(e.input_ids) - e.prompt_len for e in examples]}
