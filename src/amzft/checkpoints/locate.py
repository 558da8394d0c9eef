"""Finding checkpoints by name: ``--ckpt_path last`` is the newest ``last.ckpt`` under the log
folder, ``--ckpt_path best`` the newest run's best monitored checkpoint."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only

from amzft.errors import ConfigError

LOG_NAME = "amzft"  # runs live in <trainer.default_root_dir>/amzft/version_N/


def find_last_checkpoint(root: str | os.PathLike) -> Path:
    """The newest ``last.ckpt`` under ``root/amzft/version_*/checkpoints`` (``--ckpt_path last``)."""
    candidates = list(Path(root, LOG_NAME).glob("version_*/checkpoints/last.ckpt"))
    if not candidates:
        raise ConfigError(f"--ckpt_path last: no last.ckpt under {root}/{LOG_NAME}/version_*/checkpoints")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def resolve_ckpt_path(ckpt_path: str | os.PathLike, log_root: str | os.PathLike = "logs") -> str:
    """A checkpoint file from what a user typed: a path, ``last`` or ``best`` (which also says,
    on rank 0, which step it is and why)."""
    if str(ckpt_path) == "last":
        return str(find_last_checkpoint(log_root))
    if str(ckpt_path) == "best":
        best = find_best_checkpoint(log_root)
        _print_rank_zero(f"amzft: {best.describe()}")
        return str(best.path)
    return str(ckpt_path)


@rank_zero_only
def _print_rank_zero(text: str) -> None:
    print(text, flush=True)


# The direction of each metric a best checkpoint can monitor (amzft.checkpoints.best.BestCheckpoint).
MONITOR_MODES = {"val/loss": "min", "val/rougeL": "max"}
BEST_PREFIX = "best-"
# The key of BestCheckpoint's saved state saying why its run kept no best file (None: it ranked).
UNRANKED_KEY = "unranked"


def best_filename(monitor: str) -> str:
    """ModelCheckpoint's filename template for best checkpoints: step and score in the name
    (``best-step00020-val_loss3.2153.ckpt``), so a listing already says which is which."""
    return f"{BEST_PREFIX}step{{step:05d}}-{monitor.replace('/', '_')}{{{monitor}:.4f}}"


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
        run = self.path.parent.parent.name
        if self.unranked:
            return f"best checkpoint: the last, step {self.step} ({self.unranked}): {self.path}"
        better = "lowest" if MONITOR_MODES.get(self.monitor, "min") == "min" else "highest"
        return (f"best checkpoint: step {self.step}, {self.monitor} {self.score:.4f} ({better} of the {len(self.kept)} "
                f"kept in {run}): {self.path}")


def saved_callback_states(path: str | os.PathLike) -> tuple[int, list[dict]] | None:
    """(global step, the callbacks' saved states) of a checkpoint, memory-mapped: only the
    small entries are read. None for a file being written or broken."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    states = [s for s in (checkpoint.get("callbacks") or {}).values() if isinstance(s, dict)]
    return int(checkpoint.get("global_step", 0)), states


def best_record(path: str | os.PathLike) -> tuple[int, str, float] | None:
    """(step, monitor, score) a best-k checkpoint was saved with, read from the ModelCheckpoint
    state inside it (Lightning sets ``current_score`` before writing the file); None if it
    holds no monitored checkpoint state (or cannot be read: not a candidate)."""
    saved = saved_callback_states(path)
    for state in saved[1] if saved else ():
        if state.get("monitor") and state.get("current_score") is not None:
            return saved[0], state["monitor"], float(state["current_score"])
    return None


def find_best_checkpoint(root: str | os.PathLike) -> BestChoice:
    """``--ckpt_path best``: the best of the ``best-*.ckpt`` files of the newest run under
    ``root/amzft`` (the run holding the newest checkpoint of any kind), scored by the state each
    file was saved with. Read from the files rather than from ``last.ckpt``'s callback state:
    ``last.ckpt`` is written before the validation of its step, so its record can lag one
    validation behind the files."""
    runs = list(Path(root, LOG_NAME).glob("version_*/checkpoints"))
    newest = {run: max((p.stat().st_mtime for p in run.glob("*.ckpt")), default=None) for run in runs}
    newest = {run: t for run, t in newest.items() if t is not None}
    how = ("set validation.every_n_steps > 0 (with a validation split: data.holdout.val_fraction > 0) and best.monitor "
           "(val/loss or val/rougeL), then fit again")
    if not newest:
        raise ConfigError(f"--ckpt_path best: no checkpoint under {root}/{LOG_NAME}/version_*/checkpoints; {how}")
    run = max(newest, key=newest.get)
    records = [(p, best_record(p)) for p in sorted(run.glob(BEST_PREFIX + "*.ckpt"))]
    records = [(p, r) for p, r in records if r is not None]
    if not records:
        unranked = unranked_choice(run)
        if unranked is not None:
            return unranked
        raise ConfigError(f"--ckpt_path best: the newest run {run.parent} kept no monitored best checkpoint; {how}")
    monitor = records[-1][1][1]  # the newest file's monitor (a resumed run may have changed it)
    records = [(p, r) for p, r in records if r[1] == monitor]
    sign = 1 if MONITOR_MODES.get(monitor, "min") == "min" else -1
    # Ties go to the earlier step (fewer steps for the same score).
    records.sort(key=lambda pr: (sign * pr[1][2], pr[1][0]))
    (path, (step, _, score)) = records[0]
    return BestChoice(path, step, monitor, score, [(r[0], r[2]) for _, r in records])


def unranked_choice(run: Path) -> BestChoice | None:
    """The run's last checkpoint (``last.ckpt``, else its newest step file) when its
    BestCheckpoint said it could not rank (too few validation products); None otherwise."""
    last = run / "last.ckpt"
    path = last if last.is_file() else max(run.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, default=None)
    saved = saved_callback_states(path) if path is not None else None
    for state in saved[1] if saved else ():
        if state.get(UNRANKED_KEY):
            return BestChoice(path, saved[0], state.get("monitor") or "", float("nan"), [], unranked=state[UNRANKED_KEY])
    return None


def run_version(ckpt_path: str | os.PathLike) -> int | None:
    """N of the ``version_N/checkpoints/`` folder a checkpoint sits in (to keep logging into
    that TensorBoard run on resume); None for a checkpoint elsewhere."""
    match = re.fullmatch(r"version_(\d+)", Path(ckpt_path).parent.parent.name)
    return int(match.group(1)) if match else None
