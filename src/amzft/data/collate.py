"""Batch stage, tensors: a batch's examples fetched (and tokenised) in one read, padded or packed into a step's tensors."""

from __future__ import annotations

import os

import numpy as np
import torch

from amzft.data.encode import IGNORE_INDEX


class TokenizedDataset(torch.utils.data.Dataset):
    """A split's examples (data.lazy.LazyExamples), fetched a whole batch at a time."""

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
        return {"input_ids": [e.input_ids for e in examples], "prompt_len": [e.prompt_len for e in examples],
                "window_label_tokens": getattr(indices, "window_label_tokens", None), "rows": getattr(indices, "rows", None)}


class Collator:
    """Right-pads to the longest row. Unpacked: the attention mask comes from the lengths (the pad id may
    equal EOS, which must be learnt). Packed: examples concatenated, ``position_ids`` restarting at 0 and
    no mask, so transformers builds a block-diagonal causal mask. ``share_prefix``: the tokens all examples
    start with stored once per row, and a 4-D mask letting each token see the prefix and its own example.
    ``real_tokens`` counts every example's full length, ``input_tokens`` the positions processed."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1, share_prefix: bool = False):
        self.pad_id, self.multiple, self.share_prefix = pad_id, max(1, pad_to_multiple_of), share_prefix

    def _width(self, lengths) -> int:
        return -(-max(lengths) // self.multiple) * self.multiple

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
        return max(0, min(len(os.path.commonprefix(seqs)), min(prompt_lens) - 1))  # commonprefix takes any sequences

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
        """``row_lengths``: positions each row computes, padding excluded; ``real_tokens``: the
        examples' own tokens where a shared prefix makes them more (default: the rows' sum)."""
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
