"""The one throughput meter (amzft.training.throughput), the step progress bar and the parameter summary
(amzft.training.progress), and the output noise amzft.cli.quiet silences, on tiny fits."""

from __future__ import annotations

import json
import math
import warnings

import pytest
from lightning.pytorch import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from amzft.cli.lightning_cli import cli_main
from amzft.cli.main import main
from amzft.training.progress import StepProgressBar
from amzft.training.throughput import ThroughputMeter
from helpers import fit_args, tiny_records

PER_STEP = ("train/tokens_per_s", "train/label_tokens_per_s", "train/padding_efficiency", "train/peak_memory_mib")


class CountPerStep(Callback):
    """Counts the tokens of each optimizer step's batches, apart from the meter: a batch belongs
    to step ``global_step + 1`` as it starts."""

    def __init__(self):
        self.steps: dict[int, dict[str, int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        counts = self.steps.setdefault(trainer.global_step + 1, {"real": 0, "processed": 0, "padded": 0, "labels": 0})
        counts["real"] += int(batch["real_tokens"])
        counts["processed"] += int(batch.get("input_tokens", batch["real_tokens"]))
        counts["padded"] += batch["input_ids"].numel()
        counts["labels"] += int(batch["label_tokens"])


@pytest.fixture(scope="module")
def fitted(tiny_model_dir, tmp_path_factory):
    """One tiny fit of 4 optimizer steps (accumulate 4; 15 batches an epoch, so the 4th step is
    the epoch's short 3-batch window), with the progress bar, and the meter given on the command
    line as gpu/check.py does."""
    tmp = tmp_path_factory.mktemp("meter")
    data = tmp / "trn.json"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny_records(30)))
    summary_path = tmp / "summary.json"
    meter = json.dumps({"class_path": "amzft.training.throughput.ThroughputMeter", "init_args": {"summary_path": str(summary_path)}})
    args = fit_args(tiny_model_dir, data, tmp, "--trainer.max_steps", "4", "--trainer.enable_progress_bar", "true",
                    f"--trainer.callbacks+={meter}")
    cli = cli_main(args, run=False)
    counter = CountPerStep()
    cli.trainer.callbacks.append(counter)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, counter, summary_path, tmp / "logs" / "amzft" / "version_0"


def the_meter(cli) -> ThroughputMeter:
    meters = [c for c in cli.trainer.callbacks if isinstance(c, ThroughputMeter)]
    assert len(meters) == 1, meters  # the one given replaces the CLI's own
    return meters[0]


def test_totals_are_steps_2_to_n(fitted):
    cli, counter, _, _ = fitted
    assert sorted(counter.steps) == [1, 2, 3, 4]
    timed = [counter.steps[s] for s in (2, 3, 4)]  # step 1 (compilation, warm-up) is left out
    summary = the_meter(cli).summary()
    assert summary["tokens"] == sum(c["real"] for c in timed)
    assert summary["processed_tokens"] == sum(c["processed"] for c in timed)
    assert summary["padded_tokens"] == sum(c["padded"] for c in timed)
    assert summary["label_tokens"] == sum(c["labels"] for c in timed)
    assert summary["steps"] == 4 and summary["steps_timed"] == 3
    assert summary["seconds"] > 0 and summary["first_step_s"] > 0
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["seconds"])
    assert summary["padding_efficiency"] == pytest.approx(summary["processed_tokens"] / summary["padded_tokens"])
    assert summary["peak_memory_mib"] > 0
    assert summary["last_loss"] == pytest.approx(float(cli.trainer.callback_metrics["train/loss"]))


def test_per_step_metrics_keep_their_names(fitted):
    _, counter, _, run = fitted
    acc = EventAccumulator(str(run))
    acc.Reload()
    for tag in PER_STEP:
        assert len(acc.Scalars(tag)) == 4, tag
    efficiency = [e.value for e in acc.Scalars("train/padding_efficiency")]
    expected = [counter.steps[s]["processed"] / counter.steps[s]["padded"] for s in (1, 2, 3, 4)]
    assert efficiency == pytest.approx(expected, rel=1e-6)
    assert all(e.value > 0 for e in acc.Scalars("train/tokens_per_s"))


def test_summary_is_written_as_json(fitted):
    cli, _, summary_path, _ = fitted
    written = json.loads(summary_path.read_text())
    summary = the_meter(cli).summary()
    assert written.keys() == summary.keys()
    assert {k: written[k] for k in ("tokens", "steps", "steps_timed", "padded_tokens")} == {
        k: summary[k] for k in ("tokens", "steps", "steps_timed", "padded_tokens")}
    assert math.isfinite(written["last_loss"]) and written["tokens_per_s"] > 0


def test_progress_bar_counts_optimizer_steps(fitted):
    cli, _, _, _ = fitted
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepProgressBar)
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (4, 4)  # steps, across the epoch boundary
    assert set(bar.get_metrics(cli.trainer, cli.model)) == {"loss", "tokens/s"}  # no v_num; no validation here


def test_no_progress_bar_when_disabled(tiny_model_dir, tiny_data, tmp_path):
    cli = cli_main(fit_args(tiny_model_dir, tiny_data, tmp_path), run=False)  # fit_args disables it
    assert cli.trainer.progress_bar_callback is None


NOISE = ("FLOPs", "weights_only", "exists and is not empty", "Loading weights", "TPU available", "Epoch", "v_num")


def test_fit_prints_no_noise(tiny_model_dir, tiny_data, tmp_path, capfd, caplog):
    """A fit stopped and resumed the way users do (stop-and-save, then ``--ckpt_path last``),
    with the progress bar and model summary on, prints none of the lines amzft.cli.quiet drops."""
    stop = json.dumps({"class_path": "amzft.training.callbacks.StopAtStep", "init_args": {"step": 2}})
    shown = ("--trainer.enable_progress_bar", "true", "--trainer.enable_model_summary", "true")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # what amzft.cli.quiet does not drop reaches `caught`
        main(fit_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.max_steps", "3", *shown, f"--trainer.callbacks+={stop}"))
        main(fit_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.max_steps", "3", *shown, "--ckpt_path", "last"))
    captured = capfd.readouterr()
    text = "\n".join([captured.out, captured.err, caplog.text, *(str(w.message) for w in caught)])
    assert "parameters:" in text and "trainable" in text  # the parameter summary, hence Lightning's log lines, are seen
    assert "step 3/3" in text and "loss=" in text and "tokens/s=" in text  # the step progress bar
    for noise in NOISE:
        assert noise not in text, noise
