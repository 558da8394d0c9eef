"""Batches for training: a seeded, resumable batch sampler that knows the gradient-accumulation
window, and a collator that pads dynamically.

Why the sampler knows the window: the loss is normalised by the number of label tokens in the
whole accumulation window (DESIGN.md §5), and that number depends on batches the model has not
seen yet. Every example's label count is in the dataset, so the sampler, which decides the
order, can attach the window total to each batch it yields.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from amzft.data.encode import IGNORE_INDEX


class WindowBatch(list):
    """A list of dataset indices that also carries its window's label-token total."""

    window_label_tokens: int | None = None


class ResumableBatchSampler:
    """Shuffles by ``seed + epoch`` and groups batches into accumulation windows.

    Epoch: read from ``epoch_source`` (the trainer's epoch counter) when an epoch's iteration
    starts. Lightning only calls ``set_epoch`` on ``loader.sampler`` / ``batch_sampler.sampler``,
    never on a batch sampler, so without it every epoch would replay epoch 0's order.
    ``set_epoch`` is kept for use without a trainer.

    Resume: ``state_dict()`` records the epoch and how many batches of it were consumed (asked
    of ``progress``, the trainer's counter, because data loaders fetch ahead of training);
    after ``load_state_dict`` the next iteration of *that* epoch skips exactly those batches
    (all of them if the checkpoint was written at the epoch's end); any other epoch skips none.
    """

    def __init__(
        self,
        num_labels: Sequence[int],
        batch_size: int,
        accumulate: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ):
        self.num_labels = np.asarray(num_labels, dtype=np.int64)
        self.batch_size, self.accumulate = batch_size, max(1, accumulate)
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches already consumed)
        self.progress = None  # callable -> batches consumed in the current epoch
        self.epoch_source = None  # callable -> the epoch about to be iterated

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.num_labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batches(self, epoch: int) -> list[WindowBatch]:
        n = len(self.num_labels)
        order = (
            np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        )
        batches = [WindowBatch(order[i : i + self.batch_size].tolist()) for i in range(0, n, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        # Windows are aligned to the epoch start, as Lightning's accumulation is; the last one
        # may be short, and its total then covers only the batches it has.
        for start in range(0, len(batches), self.accumulate):
            window = batches[start : start + self.accumulate]
            total = int(sum(self.num_labels[b].sum() for b in window))
            for b in window:
                b.window_label_tokens = total
        return batches

    def __iter__(self) -> Iterator[WindowBatch]:
        if self.epoch_source is not None:
            self.epoch = int(self.epoch_source())
        skip = 0
        if self._resume is not None:
            resume_epoch, done = self._resume
            self._resume = None  # applies once
            skip = done if resume_epoch == self.epoch else 0
        yield from self.batches(self.epoch)[skip:]

    def state_dict(self) -> dict:
        done = int(self.progress()) if self.progress is not None else 0
        return {"epoch": self.epoch, "batches_done": done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._resume = (self.epoch, int(state["batches_done"]))


class TokenizedDataset(torch.utils.data.Dataset):
    """Rows of the Arrow cache as examples; fetches a whole batch in one Arrow read."""

    COLUMNS = ["input_ids", "prompt_len"]

    def __init__(self, arrow_dataset):
        self.data = arrow_dataset.select_columns(self.COLUMNS)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        return self.data[int(index)]

    def __getitems__(self, indices: list[int]) -> dict:
        rows = self.data[list(map(int, indices))]
        return {
            "input_ids": rows["input_ids"],
            "prompt_len": rows["prompt_len"],
            "window_label_tokens": getattr(indices, "window_label_tokens", None),
        }


class Collator:
    """Right-pads to the longest sequence in the batch.

    The attention mask comes from the lengths, never from ``input_ids != pad``, because the pad
    id may equal EOS and the EOS that ends each response must be attended and learnt.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1):
        self.pad_id, self.multiple = pad_id, max(1, pad_to_multiple_of)

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        """``batch`` is what TokenizedDataset.__getitems__ returns (DataLoader always uses it)."""
        seqs, prompt_lens = batch["input_ids"], batch["prompt_len"]
        width = max(len(s) for s in seqs)
        width = -(-width // self.multiple) * self.multiple
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, (ids, p) in enumerate(zip(seqs, prompt_lens)):
            ids = torch.as_tensor(ids, dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            labels[row, p : len(ids)] = ids[p:]
            attention_mask[row, : len(ids)] = 1
        label_tokens = int((labels != IGNORE_INDEX).sum())
        window = batch.get("window_label_tokens") or label_tokens
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "label_tokens": torch.tensor(label_tokens),
            "window_label_tokens": torch.tensor(window),
        }
