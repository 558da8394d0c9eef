"""The data module a checkpoint was trained with (kept apart from ``adapter`` so that importing
the model does not import the data pipeline)."""

from __future__ import annotations

import os

from amzft.checkpoints.io import load_checkpoint_file
from amzft.data.module import AmazonTitlesDataModule
from amzft.settings import with_overrides


def datamodule_from_checkpoint(ckpt_path: str | os.PathLike, **overrides) -> tuple[AmazonTitlesDataModule, int]:
    """The data module a checkpoint was trained with (same file, filters and product split),
    and the optimizer step it was saved at."""
    checkpoint = load_checkpoint_file(ckpt_path)
    saved = checkpoint.get("datamodule_hyper_parameters") or {}
    datamodule = AmazonTitlesDataModule(**with_overrides(AmazonTitlesDataModule, saved, overrides))
    return datamodule, int(checkpoint.get("global_step", 0))
