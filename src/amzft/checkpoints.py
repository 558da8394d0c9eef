"""Everything about checkpoints, in one place: writing, finding, loading, validating, rebuilding.

* Written atomically: Lightning's ``TorchCheckpointIO`` writes straight to the final path, so a
  crash mid-write would leave a broken ``last.ckpt``. We write a temporary file in the same
  folder, fsync it, rename it over the target (atomic on POSIX) and fsync the folder so the
  rename itself survives a power loss. Loading is ``weights_only=True``.
* Adapter only: a checkpoint holds the trainable (LoRA) parameters and the training state,
  never the frozen base, which is rebuilt from ``model.name_or_path`` (``AdapterCheckpointing``,
  mixed into the LightningModule). Loading checks that every adapter tensor is there with the
  right shape, so a checkpoint of another base or LoRA config is a one-line error, not a
  silently half-loaded model.
* Found by name: ``--ckpt_path last`` is the newest ``last.ckpt`` under the log folder,
  ``--ckpt_path best`` the newest run's best monitored checkpoint (``resolve_ckpt_path``).
* Rebuilt whole: ``LoraCausalLM.from_checkpoint`` (module + the prompt it was trained with)
  and ``datamodule_from_checkpoint`` (same file, filters and product split) serve ``ask``,
  ``evaluate``, ``export`` and the demo.
* Resumed exactly: ``ResumeMidEpoch`` repairs Lightning's epoch bookkeeping of a run that
  stopped inside an epoch (see ``reopen_interrupted_epoch``).
"""

from __future__ import annotations

import errno
import inspect
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from amzft.data.module import AmazonTitlesDataModule
from amzft.data.prompt import PromptFormat, prompt_format_from
from amzft.errors import ConfigError, ModelError
from amzft.paths import current_umask

LOG_NAME = "amzft"  # runs live in <trainer.default_root_dir>/amzft/version_N/
SKIPPED_STEPS_KEY = "amzft_skipped_steps"  # optimizer steps skipped for a non-finite loss


# ------------------------------------------------------------------------------------ writing
def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ModelError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600; a plain file is 0644
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
            full = " (disk full)" if exc.errno == errno.ENOSPC else ""
            raise ModelError(f"cannot write checkpoint {path}{full}: {exc.strerror or exc}; {kept}") from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    remove_stale_temporaries(path)


def remove_stale_temporaries(path: Path) -> None:
    """Temporary files of ``path`` left by a process killed mid-write (one writer per path:
    rank 0 under DDP), removed once a newer write of the same file has succeeded."""
    for stale in path.parent.glob(_temp_prefix(path) + "*.tmp"):
        stale.unlink(missing_ok=True)


def check_writable(folder: str | os.PathLike, need_bytes: int = 0, what: str = "log folder") -> None:
    """Fail before training, not at the first checkpoint, if ``folder`` cannot be created or
    written, or its disk has less than ``need_bytes`` free."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".amzft-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ModelError(f"the {what} {folder} is not writable: {exc.strerror or exc}") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise ModelError(
            f"the {what} {folder} has {free / 2**20:.0f} MiB free; checkpoints need about "
            f"{need_bytes / 2**20:.0f} MiB: free some space or set trainer.default_root_dir elsewhere"
        )


def save_last_now(trainer) -> str | None:
    """Write ``last.ckpt`` at this point of training (ModelCheckpoint only writes it on its own
    schedule), so that ``fit --ckpt_path last`` continues from here."""
    callback = trainer.checkpoint_callback
    if callback is None or callback.dirpath is None:
        return None
    path = f"{callback.dirpath}/{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    trainer.save_checkpoint(path)
    return path


# ---------------------------------------------------------------------------- finding, loading
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


# The direction of each metric a best checkpoint can monitor (amzft.callbacks.BestCheckpoint).
MONITOR_MODES = {"val/loss": "min", "val/rougeL": "max"}
BEST_PREFIX = "best-"


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

    def describe(self) -> str:
        run = self.path.parent.parent.name
        better = "lowest" if MONITOR_MODES.get(self.monitor, "min") == "min" else "highest"
        return (f"best checkpoint: step {self.step}, {self.monitor} {self.score:.4f} ({better} of the {len(self.kept)} "
                f"kept in {run}): {self.path}")


def best_record(path: str | os.PathLike) -> tuple[int, str, float] | None:
    """(step, monitor, score) a best-k checkpoint was saved with, read from the ModelCheckpoint
    state inside it (Lightning sets ``current_score`` before writing the file); None if it
    holds no monitored checkpoint state. Memory-mapped: only the small entries are read."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None  # a file being written or broken: not a candidate
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("monitor") and state.get("current_score") is not None:
            return int(checkpoint.get("global_step", 0)), state["monitor"], float(state["current_score"])
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
    how = ("set validation.every_n_steps > 0 (with a validation split: data.val_fraction > 0) and best.monitor "
           "(val/loss or val/rougeL), then fit again")
    if not newest:
        raise ConfigError(f"--ckpt_path best: no checkpoint under {root}/{LOG_NAME}/version_*/checkpoints; {how}")
    run = max(newest, key=newest.get)
    records = [(p, best_record(p)) for p in sorted(run.glob(BEST_PREFIX + "*.ckpt"))]
    records = [(p, r) for p, r in records if r is not None]
    if not records:
        raise ConfigError(f"--ckpt_path best: the newest run {run.parent} kept no monitored best checkpoint; {how}")
    monitor = records[-1][1][1]  # the newest file's monitor (a resumed run may have changed it)
    records = [(p, r) for p, r in records if r[1] == monitor]
    sign = 1 if MONITOR_MODES.get(monitor, "min") == "min" else -1
    # Ties go to the earlier step (fewer steps for the same score).
    records.sort(key=lambda pr: (sign * pr[1][2], pr[1][0]))
    (path, (step, _, score)) = records[0]
    return BestChoice(path, step, monitor, score, [(r[0], r[2]) for _, r in records])


def run_version(ckpt_path: str | os.PathLike) -> int | None:
    """N of the ``version_N/checkpoints/`` folder a checkpoint sits in (to keep logging into
    that TensorBoard run on resume); None for a checkpoint elsewhere."""
    match = re.fullmatch(r"version_(\d+)", Path(ckpt_path).parent.parent.name)
    return int(match.group(1)) if match else None


def load_checkpoint_file(path: str | os.PathLike) -> dict:
    """``torch.load(weights_only=True)`` with one-line errors for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"checkpoint {path} is corrupt or not a checkpoint ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ModelError(f"checkpoint {path} is not an amzft checkpoint (no state_dict / hyper_parameters)")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint_file(path)


def init_kwargs(cls: type, saved: dict) -> dict:
    """The saved hyper-parameters ``cls(...)`` accepts: drops Lightning's private entries
    (``_instantiator``) and keys another version or tool added to the section."""
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in saved.items() if k in accepted and not k.startswith("_")}


# ------------------------------------------------------------------------ adapter-only state
class AdapterCheckpointing:
    """Mixed into the LightningModule (before ``LightningModule``): its checkpoints hold the
    adapter only, are validated against the base on load, and rebuild a whole module."""

    def trainable_keys(self) -> dict[str, torch.Size]:
        return {f"model.{n}": p.shape for n, p in self.model.named_parameters() if p.requires_grad}

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        full = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self.model is None:
            return full
        keep = {prefix + k for k in self.trainable_keys()}
        return type(full)((k, v) for k, v in full.items() if k in keep)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[SKIPPED_STEPS_KEY] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_adapter_state(checkpoint.get("state_dict", {}))
        self.skipped_steps = int(checkpoint.get(SKIPPED_STEPS_KEY, 0))

    def check_adapter_state(self, state: dict) -> None:
        """A checkpoint must hold exactly this model's adapter: name it clearly if not (the
        module loads with ``strict_loading=False``, since the frozen base is not in the file)."""
        expected = self.trainable_keys()
        missing = [k for k in expected if k not in state]
        wrong = [k for k, shape in expected.items() if k in state and tuple(state[k].shape) != tuple(shape)]
        if missing or wrong:
            what = f"{len(missing)} adapter tensors missing" if missing else f"shape mismatch in {wrong[0]}"
            raise ModelError(
                f"the checkpoint does not fit this model ({what}): it was made with another base model "
                f"or LoRA config than name_or_path={self.hparams.name_or_path!r}, lora_r={self.hparams.lora_r}"
            )

    @classmethod
    def from_checkpoint(cls, ckpt_path: str | os.PathLike, **overrides) -> tuple[Any, PromptFormat]:
        """Base model + adapter rebuilt from a checkpoint's saved hyper-parameters (``overrides``
        replace some, e.g. a full-precision base for merging), in eval mode, and the prompt
        format it was trained with."""
        checkpoint = load_checkpoint_file(ckpt_path)
        module = cls(**{**init_kwargs(cls, checkpoint["hyper_parameters"]), **overrides})
        module.configure_model()
        module.check_adapter_state(checkpoint["state_dict"])
        module.load_state_dict(checkpoint["state_dict"], strict=False)
        module.eval()
        module.checkpoint_step = int(checkpoint.get("global_step", 0))  # for labels ("best (step 6)")
        return module, prompt_format_from(checkpoint.get("datamodule_hyper_parameters"))


def datamodule_from_checkpoint(ckpt_path: str | os.PathLike, **overrides) -> tuple[AmazonTitlesDataModule, int]:
    """The data module a checkpoint was trained with (same file, filters and product split),
    and the optimizer step it was saved at."""
    checkpoint = load_checkpoint_file(ckpt_path)
    saved = checkpoint.get("datamodule_hyper_parameters") or {}
    datamodule = AmazonTitlesDataModule(**{**init_kwargs(AmazonTitlesDataModule, saved), **overrides})
    return datamodule, int(checkpoint.get("global_step", 0))


# ------------------------------------------------------------------------------- exact resume
def reopen_interrupted_epoch(checkpoint: dict) -> bool:
    """Work around Lightning marking an epoch *finished* when training stops inside it.

    When fit ends (``max_steps``, ``should_stop`` from SIGTERM or the demo's stop), Lightning
    closes the epoch before ``ModelCheckpoint.on_train_end`` writes ``last.ckpt``, even if only
    some of its batches ran, while the epoch's batch counter is kept. Resuming that state goes
    wrong both ways (seen with lightning 2.6): cut short, the resume starts epoch e + 1 and
    silently skips the rest of epoch e; at the exact end of an epoch, epoch e + 1 starts with
    the old batch counter and ends after one batch. So whenever an epoch is marked closed while
    its batch counter still holds batches, mark it "started, not finished": Lightning then
    restarts it mid-epoch, the resumable sampler skips exactly the batches already run (all of
    them at an epoch's end), and the next epoch starts cleanly. Returns whether it changed
    anything.
    """
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not fit:
        return False
    epochs, batches = fit.get("epoch_progress"), fit.get("epoch_loop.batch_progress")
    if not epochs or not batches:
        return False
    current = epochs["current"]
    closed = current["ready"] == current["started"] == current["processed"] == current["completed"] > 0
    if not (closed and batches["current"]["processed"] > 0):
        return False
    for counts in (epochs["current"], epochs["total"]):
        counts["processed"] -= 1
        counts["completed"] -= 1
    return True


class ResumeMidEpoch(Callback):
    """Applies ``reopen_interrupted_epoch`` to the checkpoint being resumed (callbacks'
    ``on_load_checkpoint`` runs before Lightning restores its loops)."""

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        reopen_interrupted_epoch(checkpoint)
