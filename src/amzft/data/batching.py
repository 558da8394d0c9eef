"""Batches for training: a seeded, resumable batch sampler that knows the gradient-accumulation
window, and a collator that pads dynamically.

Why the sampler knows the window: the loss is normalised by the number of label tokens in the
whole accumulation window (so every label token weighs the same whichever micro-batch holds it;
see docs/architecture.md), and that number depends on batches the model has not seen yet.
Every example's label count is in the dataset, so the sampler, which decides the order, can
attach the window total to each batch it yields.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from amzft.data.encode import IGNORE_INDEX

LAYOUTS = ("plain", "grouped", "packed")
PACK_CHUNKS = 8  # a packing chunk is this many grouping chunks (mega_batch batches) of examples
ESTIMATE_SAMPLE = 2048  # examples whose lengths estimate a lazily packed epoch's row count


class WindowBatch(list):
    """A list of dataset indices that also carries its window's label-token total and, when
    packed, how many consecutive examples go into each row."""

    window_label_tokens: int | None = None
    rows: list[int] | None = None
    window: list | None = None  # the batches of its accumulation window (all ranks')


def _counts(values):
    """A ready numpy array, or a lazy one (data.lazy: counted when indexed) kept as it is."""
    if values is None or getattr(values, "lazy", False):
        return values
    return np.asarray(values, dtype=np.int64)


class ResumableBatchSampler:
    """Seeded, resumable batches in accumulation windows, optionally length-grouped or packed,
    and sharded across DDP ranks.

    Epoch: read from ``epoch_source`` (the trainer's epoch counter) when an epoch's iteration
    starts. Lightning only calls ``set_epoch`` on ``loader.sampler`` / ``batch_sampler.sampler``,
    never on a batch sampler, so without it every epoch would replay epoch 0's order.
    ``set_epoch`` is kept for use without a trainer.

    Layout (``layout``):
      * ``plain``: consecutive examples of the shuffled order.
      * ``grouped``: the shuffled order is cut into mega-batches of ``mega_batch`` batches,
        each sorted by length and cut into batches, whose order within the mega-batch is then
        shuffled: similar lengths share a batch (little padding), the epoch stays random.
      * ``packed``: the examples of each chunk of ``PACK_CHUNKS`` mega-batches are packed
        first-fit-decreasing into rows of at most ``max_length`` tokens, whose order within the
        chunk is shuffled; a batch is ``batch_size`` rows. The collator restarts position ids
        per example so attention never crosses an example.

    Chunk by chunk: an epoch's batches are made as iteration reaches each chunk, so lengths may
    be lazy (tokenised when asked) and the first batch of a 2.2 M-record epoch needs the lengths
    of one chunk, not of the whole file. ``len()`` then needs no lengths either (plain,
    grouped) or estimates packed rows from a fixed sample (``_estimated_rows``).

    Ranks: the epoch's batches are made identically on every rank (same seed), cut to a
    multiple of ``num_replicas`` and dealt round-robin, so that optimizer step s of rank r
    sees global batch ``s * num_replicas + r``: W ranks x batch b see what one process with
    batch W*b sees. Windows (and their label-token totals, the loss normaliser) span
    ``accumulate`` steps of *all* ranks.

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
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, found {layout!r}")
        if layout != "plain" and lengths is None:
            raise ValueError(f"layout {layout!r} needs the example lengths")
        if layout == "packed" and not max_length:
            raise ValueError("layout 'packed' needs max_length")
        # Either may be lazy (tokenised when indexed): then window totals are counted as their
        # batches are yielded, so training starts without counting the whole epoch.
        self.num_labels, self.lengths = _counts(num_labels), _counts(lengths)
        self.batch_size, self.accumulate = batch_size, max(1, accumulate)
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.layout, self.max_length, self.mega_batch = layout, max_length, max(1, mega_batch)
        self.num_replicas, self.rank = max(1, num_replicas), rank
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches already consumed)
        self._cache: tuple[int, list[WindowBatch]] | None = None
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
            self._length = self._count_batches()
        return self._length

    def _count_batches(self) -> int:
        """This rank's batches in epoch 0. Plain and grouped batches are counted from the
        number of examples alone; packed rows from the packing itself, or, when the lengths are
        lazy (a split too big to count first), estimated from a fixed sample (``_estimated_rows``)."""
        n, size = len(self.num_labels), self.batch_size
        if self.layout == "packed":
            if not getattr(self.lengths, "lazy", False):
                return len(self.batches(0))
            total = -(-self._estimated_rows(n) // size)
        else:
            def batches_of(examples: int) -> int:  # a short last batch counts unless dropped
                return examples // size + (examples % size != 0 and not self.drop_last)

            # plain: one chunk; grouped: whole chunks of mega_batch full batches, then the rest
            chunk = max(n, 1) if self.layout == "plain" else size * self.mega_batch
            total = n // chunk * batches_of(chunk) + batches_of(n % chunk)
        return total // self.num_replicas

    def _estimated_rows(self, n: int) -> int:
        """Packed rows an epoch of ``n`` examples makes, from packing a fixed random sample of
        them (at most ``ESTIMATE_SAMPLE``) in chunks as big as the epoch's: the lengths of a few
        thousand examples instead of all of them. A pure function of the data and the seed, so
        every run of the same data (cold or warm cache, resumed or not) gets the same value."""
        chunk = self.batch_size * self.mega_batch * PACK_CHUNKS
        take = min(n, max(ESTIMATE_SAMPLE, chunk))
        sample = np.sort(np.random.default_rng([self.seed, n]).choice(n, take, replace=False))
        sizes = np.asarray(self.lengths[sample], dtype=np.int64)
        rows = sum(len(pack_first_fit(np.arange(a, min(a + chunk, take)), sizes, self.max_length))
                   for a in range(0, take, chunk))
        return max(1, round(rows * n / take))

    # ------------------------------------------------------------- layouts
    def _global_batches(self, epoch: int) -> Iterator[WindowBatch]:
        """Epoch ``epoch``'s batches (all ranks'), made as they are reached: grouped and packed
        batches are made and shuffled one chunk of the epoch's order at a time, so only the
        chunks reached so far need their lengths (lazy lengths are tokenised then)."""
        n = len(self.num_labels)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        size = self.batch_size
        if self.layout == "plain":
            stop = n - n % size if self.drop_last else n
            yield from (WindowBatch(order[i : i + size].tolist()) for i in range(0, stop, size))
            return
        chunk = size * self.mega_batch
        if self.layout == "grouped":
            for start in range(0, n, chunk):
                part = order[start : start + chunk]
                part = part[np.argsort(-np.asarray(self.lengths[part]), kind="stable")]
                batches = [WindowBatch(part[i : i + size].tolist()) for i in range(0, len(part), size)]
                if self.drop_last and len(batches[-1]) < size:
                    batches.pop()  # the epoch's one short batch (its last chunk's shortest examples)
                if self.shuffle:
                    batches = [batches[i] for i in rng.permutation(len(batches))]
                yield from batches
            return
        pending: list[list[int]] = []
        for start in range(0, n, chunk * PACK_CHUNKS):  # a pack chunk holds many rows' worth of examples
            part = order[start : start + chunk * PACK_CHUNKS]
            rows = pack_first_fit(np.arange(len(part)), np.asarray(self.lengths[part]), self.max_length)
            if self.shuffle:
                rows = [rows[i] for i in rng.permutation(len(rows))]
            pending += [[int(part[j]) for j in row] for row in rows]
            while len(pending) >= size or (pending and start + chunk * PACK_CHUNKS >= n):
                group, pending = pending[:size], pending[size:]
                batch = WindowBatch(idx for row in group for idx in row)
                batch.rows = [len(row) for row in group]
                yield batch

    def _rank_batches(self, epoch: int) -> Iterator[WindowBatch]:
        """This rank's batches of ``epoch``, window by window, each knowing its window."""
        world = self.num_replicas
        # Windows are aligned to the epoch start, as Lightning's accumulation is; the last one
        # may be short, and its total then covers only the batches it has.
        span = self.accumulate * world
        source = self._global_batches(epoch)
        window = list(itertools.islice(source, span))
        while window:
            following = list(itertools.islice(source, span))
            if not following and world > 1:
                # Every rank must run the same number of steps (DDP all-reduces each backward):
                # drop the last < world batches of the epoch (a fresh order comes next epoch).
                window = window[: len(window) - len(window) % world]
            for b in window:
                b.window = window
            if window and not getattr(self.num_labels, "lazy", False):
                self._count_window(window[0])
            yield from window[self.rank :: world]
            window = following

    def batches(self, epoch: int) -> list[WindowBatch]:
        """This rank's batches of ``epoch``, each carrying its window's label-token total (all
        made at once: for tests and small data; training iterates them as they are made)."""
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, list(self._rank_batches(epoch)))
        return self._cache[1]

    def _count_window(self, batch: WindowBatch) -> WindowBatch:
        """Give every batch of ``batch``'s window the window's label-token total."""
        if batch.window_label_tokens is None:
            total = int(sum(self.num_labels[b].sum() for b in batch.window))
            for b in batch.window:
                b.window_label_tokens = total
        return batch

    def __iter__(self) -> Iterator[WindowBatch]:
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


def pack_first_fit(indices: np.ndarray, lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of examples into rows of at most ``capacity`` tokens.

    Rows are kept in a list sorted by free space; each example (longest first) goes to the row
    with the least free space that still fits it (best fit), found by bisection: O(n log n).
    """
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


class TokenizedDataset(torch.utils.data.Dataset):
    """A split's examples (data.lazy.LazyExamples: tokenised on demand); fetches a whole batch
    in one read."""

    def __init__(self, examples):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples.encode([index])[0]
        return {"input_ids": example.input_ids, "prompt_len": example.prompt_len}

    def __getitems__(self, indices: list[int]) -> dict:
        examples = self.examples.encode(indices)
        return {
            "input_ids": [e.input_ids for e in examples],
            "prompt_len": [e.prompt_len for e in examples],
            "window_label_tokens": getattr(indices, "window_label_tokens", None),
            "rows": getattr(indices, "rows", None),
        }


class Collator:
    """Right-pads to the longest row in the batch.

    Unpacked: one example per row; the attention mask comes from the lengths, never from
    ``input_ids != pad``, because the pad id may equal EOS and the EOS that ends each response
    must be attended and learnt.

    Packed (the batch says how many examples each row holds): examples are concatenated, their
    ``position_ids`` restart at 0, and no attention mask is returned: transformers then builds a
    block-diagonal causal mask from the position ids (``find_packed_sequence_indices``; varlen
    flash-attention does the same on GPU), so no token attends across an example boundary. The
    padded tail is a segment of its own, with no labels. No label crosses a boundary either:
    each example starts with its (unlabelled) prompt.

    Packed with ``share_prefix``: the tokens every example of the batch starts with (the
    Alpaca preamble, a sizeable share of each example on the real records; docs/performance.md,
    "Training throughput (CPU)") are stored once at the head of each row, each example follows without them, its position ids
    continuing from the prefix's, and a 4-D boolean mask lets every token see the prefix and,
    causally, its own example only. Each example's loss and gradients are those of the example
    alone (tested); a row of k examples processes (k - 1) x prefix fewer tokens. The prefix is
    cut one token short of the shortest prompt, so no label is predicted from it.
    ``real_tokens`` still counts every example's full length (the work, as an unshared batch
    or HF's Trainer counts it); ``input_tokens`` counts the non-pad positions processed.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1, share_prefix: bool = False):
        self.pad_id, self.multiple, self.share_prefix = pad_id, max(1, pad_to_multiple_of), share_prefix

    def _width(self, lengths) -> int:
        width = max(lengths)
        return -(-width // self.multiple) * self.multiple

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        """``batch`` is what TokenizedDataset.__getitems__ returns (DataLoader always uses it)."""
        if batch.get("rows"):
            return self._packed(batch)
        seqs, prompt_lens = batch["input_ids"], batch["prompt_len"]
        width = self._width([len(s) for s in seqs])
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, (ids, p) in enumerate(zip(seqs, prompt_lens)):
            ids = torch.as_tensor(ids, dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            labels[row, p : len(ids)] = ids[p:]
            attention_mask[row, : len(ids)] = 1
        return self._finish(batch, input_ids, labels, int(attention_mask.sum()), attention_mask=attention_mask)

    @staticmethod
    def shared_prefix_length(seqs, prompt_lens) -> int:
        """Tokens all ``seqs`` start with, at most the shortest prompt minus one."""
        limit = min(prompt_lens) - 1
        first = seqs[0]
        n = 0
        while n < limit and all(s[n] == first[n] for s in seqs):
            n += 1
        return n

    def _packed(self, batch: dict) -> dict[str, torch.Tensor]:
        seqs, prompt_lens, counts = batch["input_ids"], batch["prompt_len"], batch["rows"]
        # Without sharing, shared = 0: every example starts its row segment at position 0.
        shared = self.shared_prefix_length(seqs, prompt_lens) if self.share_prefix else 0
        bounds = np.cumsum([0, *counts])
        row_lengths = [shared + sum(len(seqs[i]) - shared for i in range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
        width = self._width(row_lengths)
        rows = len(counts)
        input_ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((rows, width), dtype=torch.long)
        segment = torch.zeros((rows, width), dtype=torch.long)  # 0: the shared prefix; k: example k
        prefix = torch.as_tensor(seqs[0][:shared], dtype=torch.long)
        for row, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            input_ids[row, :shared] = prefix
            position_ids[row, :shared] = torch.arange(shared)
            at = shared
            for k, i in enumerate(range(a, b), start=1):
                ids = torch.as_tensor(seqs[i], dtype=torch.long)
                n, p = len(ids), prompt_lens[i]
                input_ids[row, at : at + n - shared] = ids[shared:]
                labels[row, at + p - shared : at + n - shared] = ids[p:]
                position_ids[row, at : at + n - shared] = torch.arange(shared, n)
                segment[row, at : at + n - shared] = k
                at += n - shared
            position_ids[row, at:] = torch.arange(width - at)  # the pad tail: a segment of its own
            segment[row, at:] = b - a + 1
        extra = {"position_ids": position_ids}
        if shared:  # position ids alone cannot say "see the prefix too": a 4-D mask does
            causal = torch.ones((width, width), dtype=torch.bool).tril()
            visible = (segment[:, :, None] == segment[:, None, :]) | (segment == 0)[:, None, :]
            extra["attention_mask"] = (causal & visible)[:, None]  # (rows, 1, query, key): True = may attend
        return self._finish(batch, input_ids, labels, sum(len(s) for s in seqs), input_tokens=sum(row_lengths), **extra)

    @staticmethod
    def _finish(batch, input_ids, labels, real_tokens: int, input_tokens: int | None = None,
                **extra) -> dict[str, torch.Tensor]:
        label_tokens = int((labels != IGNORE_INDEX).sum())
        window = batch.get("window_label_tokens") or label_tokens
        return {
            "input_ids": input_ids,
            "labels": labels,
            **extra,
            "real_tokens": torch.tensor(real_tokens),
            "input_tokens": torch.tensor(real_tokens if input_tokens is None else input_tokens),
            "label_tokens": torch.tensor(label_tokens),
            "window_label_tokens": torch.tensor(window),
        }
