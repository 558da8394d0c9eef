"""Silence library chatter that says nothing to an amzft user (one place, with reasons)."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    # bitsandbytes looks for optional `kernels` CPU 4-bit kernels and warns when absent;
    # its own CPU path works (DESIGN.md §3).
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # Lightning advertises a cloud logger at every start.
    os.environ.setdefault("LITLOGGER_TIP_DISABLED", "1")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage()
    )
    # We pass argv to LightningCLI explicitly (the `python -m amzft fit …` argv minus the
    # subcommand routing), which Lightning flags as a possible mistake.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    # Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates; nothing for users to do.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # HF loaders' per-tensor progress bars, on every model load.
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
