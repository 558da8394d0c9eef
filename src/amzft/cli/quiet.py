"""Silence library chatter that says nothing to an amzft user (one place, with reasons)."""

from __future__ import annotations

import logging
import os
import warnings


class _DropLines(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


# Lightning log lines with nothing to act on, by the logger that emits them.
_LIGHTNING_LINES = {
    # On every machine without a TPU; the GPU line (available, used) stays.
    "lightning.pytorch.utilities.rank_zero": _DropLines("TPU available: False"),
    # Every Trainer.save_checkpoint without weights_only: Lightning's default is what amzft wants.
    "lightning.pytorch.trainer.connectors.checkpoint_connector": _DropLines("`weights_only` was not set"),
}


def quiet_libraries() -> None:
    # bitsandbytes warns when optional CPU 4-bit `kernels` are absent; its own CPU path works.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # Lightning advertises a cloud logger at every start.
    os.environ.setdefault("LITLOGGER_TIP_DISABLED", "1")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage()
    )
    # amzft passes argv to LightningCLI explicitly, which Lightning flags as a possible mistake.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    # Lightning calls a torch pytree API that newer torch deprecates; nothing for users to do.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    for name, line_filter in _LIGHTNING_LINES.items():
        logging.getLogger(name).addFilter(line_filter)  # the same object: added once, however often this runs
    # `--ckpt_path last` resumes into the run's own version folder, checkpoints and all, by design.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # HF loaders' per-tensor progress bars, on every model load.
    from transformers.utils import logging as hf_logging  # noqa: PLC0415 - seconds to import

    hf_logging.disable_progress_bar()
