"""The best-k checkpoints by a monitored metric (``best.*``).

Lightning's ``ModelCheckpoint`` keeping the ``save_top_k`` best checkpoints by ``val/loss``
(lowest) or ``val/rougeL`` (highest) as ``best-step00020-val_loss3.2153.ckpt``, beside the
periodic step files and ``last.ckpt`` of the ``checkpoint.*`` callback, which stay as they were
(resume keeps working unchanged). ``--ckpt_path best`` is resolved in
``amzft.checkpoints.locate.find_best_checkpoint``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from amzft.checkpoints.locate import BEST_PREFIX, MONITOR_MODES, UNRANKED_KEY, best_filename, best_record
from amzft.errors import ConfigError

Monitor = Literal["val/loss", "val/rougeL"]
# A monitor averaged over fewer validation products than this does not rank checkpoints: with 6
# products (cpu-real.yaml's 120 records) the mean ROUGE-L of one validation moves more between
# re-draws of its products than it moves between the checkpoints it must rank (docs/performance.md,
# "Which checkpoint to keep"). 24 is also evaluate's --samples default.
MIN_PRODUCTS = 24


class BestCheckpoint(ModelCheckpoint):
    """The ``save_top_k`` best checkpoints by ``monitor``, written after each validation.

    A second ``ModelCheckpoint`` rather than a monitor on the periodic one: the periodic callback
    writes at ``on_train_batch_end``, before that step's validation, so it would rank each step
    by the previous validation's score; and its step files and ``last.ckpt`` are what resume
    relies on, which stay exactly as before.

    Args:
        monitor: ``val/loss`` (lowest is best) or ``val/rougeL`` (highest is best; needs
            ``sample_answers.rouge_products`` > 0); null keeps no best checkpoints.
        save_top_k: how many best checkpoints to keep.
        min_products: the fewest validation products the monitor may be averaged over to rank
            checkpoints (``val/rougeL``: ``sample_answers.rouge_products`` of them at most;
            ``val/loss``: the whole validation split). Fewer: no best file is written, the run
            says why, and ``--ckpt_path best`` is the run's last checkpoint.
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
            filename=best_filename(monitor) if monitor else None,
            auto_insert_metric_name=False,
            save_last=False,
            save_on_train_epoch_end=False,  # after validation, with that step's fresh metric
            enable_version_counter=False,  # a resumed run re-creating a step overwrites its file
        )
        self.min_products, self.top_k_asked = min_products, self.save_top_k
        self.unranked: str | None = None  # why this run keeps no best file (too few validation products)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if self.monitor:
            self._check_rankable(trainer)
        # Unranked, the folder's best files (of a run before with more products) stay untouched.
        if self.monitor and not self.unranked and trainer.global_step > 0 and self.dirpath:
            self._adopt_kept_files(trainer)

    def _check_rankable(self, trainer) -> None:
        """Switch ranking off (``save_top_k`` 0: Lightning's ModelCheckpoint then writes nothing)
        when the monitor is averaged over fewer than ``min_products`` validation products."""
        products = scored_products(trainer, self.monitor)
        self.save_top_k = self.top_k_asked
        self.unranked = None
        if products is None or products >= self.min_products:
            return
        self.save_top_k = 0
        self.unranked = (f"{self.monitor} over {products} validation products cannot rank checkpoints "
                         f"(best.min_products: {self.min_products})")
        if trainer.is_global_zero:
            print(f"amzft: {self.unranked}; no best-*.ckpt is kept and --ckpt_path best will be the last checkpoint",
                  flush=True)

    def state_dict(self) -> dict:
        return {**super().state_dict(), UNRANKED_KEY: self.unranked}

    def _adopt_kept_files(self, trainer) -> None:
        """On resume: ``last.ckpt`` is written before its step's validation, so a best file
        written by that validation is missing from the restored record. Adopt every best file
        of this folder up to the resumed step (later ones belong to a run beyond the checkpoint,
        which this one re-creates), forget recorded files that are gone, then keep the top k."""
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
    """How many validation products ``monitor`` is averaged over in this run: the validation
    split (up to ``data.holdout.val_max_examples``), and for ``val/rougeL`` at most the
    ``rouge_products`` that ``SampleAnswers`` scores (read by name: amzft.training.callbacks
    imports this module). None when the run has no data module to ask (the monitor is then trusted)."""
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
