"""``amzft.lightning_compat`` is the only module that touches Lightning's internals, and
each use still means what it did with the Lightning installed (the versions it names)."""

from __future__ import annotations

import re
from pathlib import Path

import lightning
import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from amzft import lightning_compat as compat
from amzft.training.stack import fit_callbacks

SRC = Path(__file__).resolve().parents[1] / "src" / "amzft"

# What a private use of Lightning looks like in source: its loops' and progress trackers'
# attributes, a private name imported from it, a trainer's or module's private attribute.
PRIVATE = re.compile(
    r"fit_loop|epoch_loop|batch_progress|epoch_progress|_should_check_val_fx|_should_accumulate|_should_update"
    r"|_instantiate_trainer|_PRECISION_INPUT|convert_inf|\b_trainer\b|from lightning[\w.]* import _"
)


def test_no_other_module_names_a_lightning_internal():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "lightning_compat.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if PRIVATE.search(code):
                offenders.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert not offenders, "Lightning internals outside lightning_compat.py:\n" + "\n".join(offenders)


def test_the_installed_lightning_is_one_the_uses_were_checked_against():
    minor = ".".join(lightning.__version__.split(".")[:2])
    assert minor in compat.CHECKED_WITH, (
        f"lightning {lightning.__version__}: re-check amzft.lightning_compat, then add {minor} to CHECKED_WITH")


class _Tiny(LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Watch(Callback):
    """Records, at each training batch's end, what each accessor says."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((compat.epoch_number(trainer), compat.batches_run_this_epoch(trainer),
                          compat.inside_accumulation_window(trainer), compat.at_last_batch(trainer),
                          compat.attached_trainer(pl_module) is trainer))


def _trainer(tmp_path, *callbacks, **kwargs):
    return Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks), **kwargs)


def _loader(batches: int):
    return DataLoader(TensorDataset(torch.ones(batches, 2)), batch_size=1)


def test_the_loop_accessors_read_the_loop_as_named(tmp_path):
    """5 batches an epoch, 2 epochs, accumulating 2: the counts, the part window at each epoch's
    end (an optimizer step, by Lightning's rule) and the last batch."""
    watch, module = _Watch(), _Tiny()
    assert compat.attached_trainer(module) is None
    _trainer(tmp_path, watch, max_epochs=2, accumulate_grad_batches=2).fit(module, _loader(5))
    # (epoch, batches run this epoch (this one included), no step after this batch, last batch,
    # trainer attached)
    assert watch.seen == [(e, i + 1, i in (0, 2), i == 4, True) for e in (0, 1) for i in range(5)]


def test_the_validation_decision_is_the_loops_own(tmp_path):
    """What ``decide_validation_with`` installs is what the loop asks, once per batch."""
    asked = []

    class Decide(Callback):
        def setup(self, trainer, pl_module, stage):
            compat.decide_validation_with(trainer, lambda data_fetcher=None: asked.append(trainer.global_step) or False)

    module = _Tiny()
    module.validation_step = lambda batch, batch_idx: None
    _trainer(tmp_path, Decide(), max_steps=3, num_sanity_val_steps=0).fit(module, _loader(4), _loader(1))
    assert asked == [1, 2, 3]


def test_reopen_interrupted_epoch_reopens_a_closed_epoch_with_batches_run():
    def state(done: int, batches: int) -> dict:
        counts = {"ready": 1, "started": 1, "processed": done, "completed": done}
        return {"loops": {"fit_loop": {"epoch_progress": {"current": dict(counts), "total": dict(counts)},
                                       "epoch_loop.batch_progress": {"current": {"processed": batches}}}}}

    closed = state(1, 8)
    assert compat.reopen_interrupted_epoch(closed)
    assert closed["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 0
    for untouched in (state(0, 8), state(1, 0), {"loops": {}}):
        assert not compat.reopen_interrupted_epoch(untouched)


def test_the_progress_bar_helpers():
    from lightning.pytorch.callbacks import TQDMProgressBar  # noqa: PLC0415 - only this test needs it

    assert compat.finite_total(float("inf")) is None and compat.finite_total(7) == 7
    bar = TQDMProgressBar(refresh_rate=5)
    assert [s for s in range(1, 13) if compat.bar_refresh_due(bar, s, 12)] == [5, 10, 12]


@pytest.mark.parametrize("early", [None, {"monitor": "val/loss", "patience": 2}])
def test_the_callbacks_run_in_the_stated_order(early):
    from amzft.training.nonfinite import NonFiniteGuard  # noqa: PLC0415
    from amzft.training.progress import StepProgressBar  # noqa: PLC0415
    from amzft.training.throughput import ThroughputMeter  # noqa: PLC0415
    from amzft.training.validation import EarlyStop  # noqa: PLC0415

    grouped, given = Callback(), Callback()
    callbacks = fit_callbacks([grouped], [given], early_stop=early, progress_bar=True, model_summary=True)
    kinds = [type(c) for c in callbacks]
    assert isinstance(callbacks[0], NonFiniteGuard) and callbacks[1:3] == [grouped, given]
    assert kinds.index(ThroughputMeter) < kinds.index(StepProgressBar)
    assert (EarlyStop in kinds) == bool(early)
    # Nothing before the guard could look at a step's gradients first.
    assert all(type(c).on_before_optimizer_step is Callback.on_before_optimizer_step for c in callbacks[1:])
    meter = ThroughputMeter()  # one given (the GPU check's) replaces the default one
    alone = fit_callbacks([], [meter], early_stop=None, progress_bar=False, model_summary=False)
    assert [c for c in alone if isinstance(c, ThroughputMeter)] == [meter]


def test_a_fit_runs_the_guard_before_the_callbacks_a_user_gives(tiny_model_dir, tiny_data, tmp_path):
    import json  # noqa: PLC0415

    from amzft.cli.lightning_cli import cli_main  # noqa: PLC0415
    from amzft.training.callbacks import StopAtStep  # noqa: PLC0415
    from amzft.training.nonfinite import NonFiniteGuard  # noqa: PLC0415
    from helpers import fit_args  # noqa: PLC0415

    given = json.dumps({"class_path": "amzft.training.callbacks.StopAtStep", "init_args": {"step": 2}})
    cli = cli_main(fit_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.callbacks", given), run=False)
    kinds = [type(c) for c in cli.trainer.callbacks]
    assert kinds[0] is NonFiniteGuard and kinds.count(StopAtStep) == 1 and kinds.count(NonFiniteGuard) == 1


STEP_HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end", "on_validation_end")


def _stated_step_order() -> dict[str, list[str]]:
    """training/stack.py's table: for each per-step hook, the callbacks in the order stated."""
    from amzft.training import stack  # noqa: PLC0415

    stated: dict[str, list[str]] = {hook: [] for hook in STEP_HOOKS}
    hook = None
    for line in stack.__doc__.splitlines():
        if not line.strip() or line.startswith("=") or line.startswith("hook "):
            continue
        first, rest = line[:28].strip(), line[28:52]
        if first:
            hook = first if first in stated else None
        if hook is not None:
            stated[hook] += [name.strip() for name in rest.split(",") if name.strip()]
    return stated


def test_the_step_table_in_stack_is_the_order_a_fit_runs(tiny_model_dir, tiny_data, tmp_path):
    """Each per-step hook of a real fit's callbacks (early stopping on, the progress bar on),
    in the order Lightning calls them, is the list training/stack.py's docstring states."""
    from amzft.cli.lightning_cli import cli_main  # noqa: PLC0415
    from helpers import fit_args  # noqa: PLC0415

    args = fit_args(tiny_model_dir, tiny_data, tmp_path, "--early_stopping.patience", "2",
                    "--trainer.enable_progress_bar", "true")
    callbacks = cli_main(args, run=False).trainer.callbacks
    ran = {hook: [type(c).__name__ for c in callbacks if getattr(type(c), hook) is not getattr(Callback, hook)]
           for hook in STEP_HOOKS}
    assert ran == _stated_step_order()
