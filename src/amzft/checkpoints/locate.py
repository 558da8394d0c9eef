"""Finding checkpoints by name (``--ckpt_path last`` / ``best``) and reading what a best checkpoint was ranked by."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only

from amzft.errors import ConfigError

LOG_NAME = "amzft"  # runs live in <trainer.default_root_dir>/amzft/version_N/


def resolve_ckpt_path(ckpt_path: str | os.PathLike, log_root: str | os.PathLike = "logs") -> str:
    """A checkpoint file from a path, ``last`` (the newest last.ckpt) or ``best`` (described on rank 0)."""
    if str(ckpt_path) == "last":
        if not (candidates := list(Path(log_root, LOG_NAME).glob("version_*/checkpoints/last.ckpt"))):
            raise ConfigError(f"--ckpt_path last: no last.ckpt under {log_root}/{LOG_NAME}/version_*/checkpoints")
        return str(max(candidates, key=lambda p: p.stat().st_mtime))
    if str(ckpt_path) == "best":
        best = find_best_checkpoint(log_root)
        rank_zero_only(print)(f"amzft: {best.describe()}", flush=True)
        return str(best.path)
    return str(ckpt_path)


# The direction of each metric a best checkpoint can monitor (amzft.checkpoints.best.BestCheckpoint).
MONITOR_MODES = {"val/loss": "min", "val/rougeL": "max"}
BEST_PREFIX = "best-"
# The key of BestCheckpoint's saved state saying why its run kept no best file (None: it ranked).
UNRANKED_KEY = "unranked"


@dataclass(frozen=True)
class BestChoice:
    """The best monitored checkpoint of a run, and the record it was chosen from."""

    path: Path
    step: int
    monitor: str
    score: float
    kept: list[tuple[int, float]]  # (step, score) of every best-k file of the run, best first
    unranked: str | None = None  # the run could not rank: path is its last checkpoint, and this says why

    def describe(self) -> str:
        if self.unranked:
            return f"best checkpoint: the last, step {self.step} ({self.unranked}): {self.path}"
        better = "lowest" if MONITOR_MODES.get(self.monitor, "min") == "min" else "highest"
        return (f"best checkpoint: step {self.step}, {self.monitor} {self.score:.4f} ({better} of the {len(self.kept)} "
                f"kept in {self.path.parent.parent.name}): {self.path}")


def saved_callback_states(path: str | os.PathLike) -> tuple[int, list[dict]] | None:
    """(global step, callbacks' saved states) of a checkpoint, memory-mapped; None for a file being written or broken."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    states = [s for s in (checkpoint.get("callbacks") or {}).values() if isinstance(s, dict)]
    return int(checkpoint.get("global_step", 0)), states


def best_record(path: str | os.PathLike) -> tuple[int, str, float] | None:
    """(step, monitor, ModelCheckpoint's ``current_score``) a best-k checkpoint was saved with, else None."""
    saved = saved_callback_states(path)
    for state in saved[1] if saved else ():
        if state.get("monitor") and state.get("current_score") is not None:
            return saved[0], state["monitor"], float(state["current_score"])
    return None


def find_best_checkpoint(root: str | os.PathLike) -> BestChoice:
    """``--ckpt_path best``: the best ``best-*.ckpt`` of the run holding the newest checkpoint, by the state
    each file was saved with (``last.ckpt`` is written before its step's validation: its record can lag)."""
    newest = {run: t for run in Path(root, LOG_NAME).glob("version_*/checkpoints")
              if (t := max((p.stat().st_mtime for p in run.glob("*.ckpt")), default=None)) is not None}
    how = ("set validation.every_n_steps > 0 (with a validation split: data.holdout.val_fraction > 0) and best.monitor "
           "(val/loss or val/rougeL), then fit again")
    if not newest:
        raise ConfigError(f"--ckpt_path best: no checkpoint under {root}/{LOG_NAME}/version_*/checkpoints; {how}")
    run = max(newest, key=newest.get)
    records = [(p, r) for p in sorted(run.glob(BEST_PREFIX + "*.ckpt")) if (r := best_record(p)) is not None]
    if not records:
        # A run whose BestCheckpoint could not rank: its last checkpoint (last.ckpt, else its newest file).
        last = run / "last.ckpt"
        path = last if last.is_file() else max(run.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, default=None)
        saved = saved_callback_states(path) if path is not None else None
        for state in saved[1] if saved else ():
            if state.get(UNRANKED_KEY):
                return BestChoice(path, saved[0], state.get("monitor") or "", float("nan"), [], unranked=state[UNRANKED_KEY])
        raise ConfigError(f"--ckpt_path best: the newest run {run.parent} kept no monitored best checkpoint; {how}")
    monitor = records[-1][1][1]  # the newest file's monitor (a resumed run may have changed it)
    records = [(p, r) for p, r in records if r[1] == monitor]
    sign = 1 if MONITOR_MODES.get(monitor, "min") == "min" else -1
    # Ties go to the earlier step (fewer steps for the same score).
    records.sort(key=lambda pr: (sign * pr[1][2], pr[1][0]))
    (path, (step, _, score)) = records[0]
    return BestChoice(path, step, monitor, score, [(r[0], r[2]) for _, r in records])


def run_version(ckpt_path: str | os.PathLike) -> int | None:
    """N of the ``version_N/checkpoints/`` folder a checkpoint is in (resume logs into that run), else None."""
    match = re.fullmatch(r"version_(\d+)", Path(ckpt_path).parent.parent.name)
    return int(match.group(1)) if match else None
