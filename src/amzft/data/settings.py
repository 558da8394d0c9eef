"""The data settings' groups (``data.prompt/filters/holdout/batches``): dataclasses LightningCLI reads, each checking itself."""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Literal

from amzft.data.clean import FilterSettings
from amzft.data.prompt import PromptFormat


@dataclass(frozen=True)
class HoldoutOptions:
    """Which products are held out, and how many of them are used.

    Args:
        val_fraction: share of products held out for validation (by title hash).
        test_fraction: share of products held out for the final test (by title hash).
        salt: change to draw a different product split.
        val_max_examples: validate on at most this many examples (a fixed, seeded sample); null: all.
        predict_split: the split whose products ``predict`` answers (``test``: held-out products).
        predict_limit: answer at most this many products in ``predict``.
    """

    val_fraction: float = 0.05
    test_fraction: float = 0.05
    salt: str = ""
    val_max_examples: int | None = 2000
    predict_split: Literal["train", "validation", "test"] = "test"
    predict_limit: int | None = 32

    def problems(self) -> list[str]:
        problems = []
        v, t = self.val_fraction, self.test_fraction
        if not (0 <= v < 1 and 0 <= t < 1 and v + t < 1):
            problems.append(f"data.holdout.val_fraction + test_fraction must be in [0, 1), found {v} + {t}")
        if self.val_max_examples is not None and self.val_max_examples < 1:
            problems.append(f"data.holdout.val_max_examples must be >= 1 or null, found {self.val_max_examples}")
        return problems


@dataclass(frozen=True)
class BatchOptions:
    """How training examples are ordered and put into batches.

    Args:
        layout: ``plain`` (the notebook's batches), ``grouped`` (similar lengths batched together
            within random mega-batches: less padding) or ``packed`` (several examples per row of
            up to max_length tokens, attention kept inside each example). All seeded, all resume exactly.
        share_prefix: with ``packed``, store the tokens every example of a batch starts with once
            per row; a 4-D mask keeps each example's loss its own. ``backend: hf`` only (sdpa / eager).
        pack_length: with ``packed``, tokens per row (null: max_length); a longer example gets its own row.
        mega_batch: batches per length-grouping / packing chunk (bigger: tighter, less random).
        shuffle: shuffle training batches.
        seed: RNG seed of the batch order (each epoch reshuffles with seed + epoch).
        pad_to_multiple_of: round padded lengths up (8 helps tensor cores on GPU).
        num_workers: DataLoader worker processes (0 is fastest: examples tokenise in microseconds).
    """

    layout: Literal["plain", "grouped", "packed"] = "plain"
    share_prefix: bool = False
    pack_length: int | None = None
    mega_batch: int = 64
    shuffle: bool = True
    seed: int = 3407
    pad_to_multiple_of: int = 1
    num_workers: int = 0

    def problems(self) -> list[str]:
        problems = []
        if self.mega_batch < 1:
            problems.append(f"data.batches.mega_batch must be >= 1, found {self.mega_batch}")
        if self.share_prefix and self.layout != "packed":
            problems.append(f"data.batches.share_prefix needs data.batches.layout=packed (rows of several examples), "
                            f"found {self.layout!r}")
        if self.pack_length is not None and (self.layout != "packed" or self.pack_length < 8):
            problems.append(f"data.batches.pack_length needs data.batches.layout=packed and >= 8 tokens, found {self.pack_length} "
                            f"with {self.layout!r}")
        if self.pad_to_multiple_of < 1 or self.num_workers < 0:
            problems.append(f"data.batches.pad_to_multiple_of must be >= 1 and num_workers >= 0, found "
                            f"{self.pad_to_multiple_of}, {self.num_workers}")
        return problems


@dataclass(frozen=True)
class ReadOptions:
    """How the file is read.

    Args:
        strict: stop at the first bad line (a one-line error naming it) instead of counting it as skipped.
        encoding: the file's text encoding when it is not Unicode (e.g. ``cp1252`` for Windows-1252,
            ``latin-1``); null: UTF-8, or UTF-16/32 told by a byte-order mark.
    """

    strict: bool = False
    encoding: str | None = None

    def codec(self) -> str | None:
        """The encoding's canonical codec name (``Windows-1252`` -> ``cp1252``), or None."""
        return codecs.lookup(self.encoding).name if self.encoding is not None else None

    def problems(self) -> list[str]:
        try:
            self.codec()
        except LookupError:
            return [f"data.read.encoding: unknown encoding {self.encoding!r}; use a codec name such as cp1252 or latin-1"]
        return []


GROUPS = {"prompt": PromptFormat, "filters": FilterSettings, "holdout": HoldoutOptions, "batches": BatchOptions,
          "read": ReadOptions}
