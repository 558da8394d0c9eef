"""The best-k checkpoints by ``val/loss`` or ``val/rougeL`` (``best.*``), as ``best-step00020-val_loss3.2153.ckpt``
beside the periodic step files and ``last.ckpt`` that resume reads."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from amzft.checkpoints.locate import BEST_PREFIX, MONITOR_MODES, UNRANKED_KEY, best_record
from amzft.errors import ConfigError

Monitor = Literal["val/loss", "val/rougeL"]
# Fewer products: the monitor moves more between draws than between checkpoints (docs/performance.md).
MIN_PRODUCTS = 24


class BestCheckpoint(ModelCheckpoint):
    """The ``save_top_k`` best checkpoints by ``monitor``, written after each validation (a second
    ModelCheckpoint: the periodic one writes before its step's validation, and resume relies on its files).

    Args:
        monitor: ``val/loss`` (lowest is best) or ``val/rougeL`` (highest; needs ``sample_answers.rouge_products`` > 0); null keeps none.
        save_top_k: how many best checkpoints to keep.
        min_products: the fewest validation products the monitor may be averaged over to rank checkpoints
            (fewer: no best file is written, and ``--ckpt_path best`` is the run's last checkpoint).
    """

    def __init__(self, monitor: Monitor | None = "val/loss", save_top_k: int = 2, min_products: int = MIN_PRODUCTS):
        if save_top_k < 1:
            raise ConfigError(f"best.save_top_k must be >= 1 (best.monitor: null keeps none), found {save_top_k}")
        if min_products < 1:
            raise ConfigError(f"best.min_products must be >= 1, found {min_products}")
        super().__init__(
            monitor=monitor,
            mode=MONITOR_MODES.get(monitor or "val/loss", "min"),
            save_top_k=save_top_k if monitor else 0,
            # Step and score in the name (best-step00020-val_loss3.2153.ckpt): a listing says which is which.
            filename=f"{BEST_PREFIX}step{{step:05d}}-{monitor.replace('/', '_')}{{{monitor}:.4f}}" if monitor else None,
            auto_insert_metric_name=False,
            save_last=False,
            save_on_train_epoch_end=False,  # after validation, with that step's fresh metric
            enable_version_counter=False,  # a resumed run re-creating a step overwrites its file
        )
        self.min_products, self.top_k_asked = min_products, self.save_top_k
        self.unranked: str | None = None  # why this run keeps no best file (too few validation products)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if not self.monitor:
            return
        # Too few products: save_top_k 0, so that Lightning's ModelCheckpoint writes nothing.
        products = scored_products(trainer, self.monitor)
        self.save_top_k, self.unranked = self.top_k_asked, None
        if products is not None and products < self.min_products:
            self.save_top_k = 0
            self.unranked = (f"{self.monitor} over {products} validation products cannot rank checkpoints "
                             f"(best.min_products: {self.min_products})")
            if trainer.is_global_zero:
                print(f"amzft: {self.unranked}; no best-*.ckpt is kept and --ckpt_path best will be the last checkpoint",
                      flush=True)
        # Unranked, the folder's best files (of a run before with more products) stay untouched.
        elif trainer.global_step > 0 and self.dirpath:
            self._adopt_kept_files(trainer)

    def state_dict(self) -> dict:
        return {**super().state_dict(), UNRANKED_KEY: self.unranked}

    def _adopt_kept_files(self, trainer) -> None:
        """On resume, adopt the folder's best files up to the resumed step (``last.ckpt``, written before its step's
        validation, lacks that one's), forget recorded ones that are gone, then keep the top k."""
        for path in [p for p in self.best_k_models if not Path(p).is_file()]:
            self.best_k_models.pop(path)
        for path in Path(self.dirpath).glob(BEST_PREFIX + "step*.ckpt"):
            match = re.match(re.escape(BEST_PREFIX) + r"step(\d+)", path.name)
            if str(path) in self.best_k_models or not match or int(match.group(1)) > trainer.global_step:
                continue
            record = best_record(path)
            if record is not None and record[1] == self.monitor:
                self.best_k_models[str(path)] = torch.tensor(record[2])
        if not self.best_k_models:
            self.best_model_path, self.best_model_score, self.kth_best_model_path = "", None, ""
            self.kth_value = torch.tensor(float("inf") if self.mode == "min" else float("-inf"))
            return
        ranked = sorted(self.best_k_models, key=lambda p: float(self.best_k_models[p]), reverse=self.mode == "max")
        for path in ranked[self.save_top_k :]:
            self.best_k_models.pop(path)
            if trainer.is_global_zero:
                Path(path).unlink(missing_ok=True)
        kept = ranked[: self.save_top_k]
        self.best_model_path, self.best_model_score = kept[0], self.best_k_models[kept[0]]
        self.kth_best_model_path, self.kth_value = kept[-1], self.best_k_models[kept[-1]]


def scored_products(trainer, monitor: str) -> int | None:
    """How many validation products ``monitor`` is averaged over (``val/rougeL``: at most SampleAnswers'
    ``rouge_products``, read by name: training imports this module); None without a data module to ask."""
    datamodule = trainer.datamodule
    if datamodule is None or not hasattr(datamodule, "split"):
        return None
    products = len(datamodule.split("validation"))
    cap = getattr(getattr(datamodule, "holdout", None), "val_max_examples", None)
    if monitor == "val/loss" and cap:
        products = min(products, cap)
    if monitor == "val/rougeL":
        products = min([products, *(c.rouge_products for c in trainer.callbacks if hasattr(c, "rouge_products"))])
    return products
