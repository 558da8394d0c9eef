"""From a batch's indices to tensors: the dataset fetches (and tokenises) a whole batch in one
read, the collator pads dynamically or packs rows."""

from __future__ import annotations

import numpy as np
import torch

from amzft.data.encode import IGNORE_INDEX


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

    def __getitems__(self, indices) -> dict:
        """``indices``: a sampler's ``Batch`` (or any list of indices)."""
        examples = self.examples.encode(list(indices))
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
        return self._finish(batch, input_ids, labels, [len(s) for s in seqs], attention_mask=attention_mask)

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
        return self._finish(batch, input_ids, labels, row_lengths, real_tokens=sum(len(s) for s in seqs), **extra)

    @staticmethod
    def _finish(batch, input_ids, labels, row_lengths: list[int], real_tokens: int | None = None,
                **extra) -> dict[str, torch.Tensor]:
        """``row_lengths``: the positions each row computes, padding excluded (a packed row's
        shared preamble once); ``real_tokens``: the examples' own tokens when sharing makes
        them more than the rows' (default: the rows' sum)."""
        label_tokens = int((labels != IGNORE_INDEX).sum())
        window = batch.get("window_label_tokens") or label_tokens
        input_tokens = sum(row_lengths)
        return {
            "input_ids": input_ids,
            "labels": labels,
            **extra,
            "real_tokens": torch.tensor(input_tokens if real_tokens is None else real_tokens),
            "input_tokens": torch.tensor(input_tokens),
            "row_lengths": torch.tensor(row_lengths),
            "label_tokens": torch.tensor(label_tokens),
            "window_label_tokens": torch.tensor(window),
        }
