"""Keep the best, stop when it stops improving: validation every N optimizer steps, best-k
checkpoints by val/loss or val/rougeL, ``--ckpt_path best`` everywhere a checkpoint is taken,
early stopping, and the demo's pick (tiny models, fast)."""

from __future__ import annotations

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import EarlyStopping
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from amzft.checkpoints import locate
from amzft.checkpoints.best import BestCheckpoint
from amzft.checkpoints.io import load_checkpoint_file
from amzft.checkpoints.locate import BestChoice, find_best_checkpoint
from amzft.cli import demo
from amzft.cli.lightning_cli import cli_main
from amzft.cli.main import main
from amzft.model.generation import GenerationOptions
from amzft.training.callbacks import StopAtStep
from amzft.training.validation import EarlyStop, ValidationSchedule
from helpers import REPO, RecordSteps, fit_args, one_line_error, run_fit, tiny_records


class CountValidations(Callback):
    """The optimizer step and batch counter at each validation run during fit."""

    def __init__(self):
        self.steps: list[int] = []
        self.mid_window: list[bool] = []

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.steps.append(trainer.global_step)
            self.mid_window.append(trainer.fit_loop.epoch_loop._should_accumulate())


def _args(tiny_model_dir, data, tmp_path, *extra):
    # A validation split (fit_args turns it off), validation every 2 steps, short answers; its
    # 6 validation products rank checkpoints (best.min_products 1) unless a test says otherwise.
    return fit_args(tiny_model_dir, data, tmp_path, "--data.holdout.val_fraction", "0.25", "--validation.every_n_steps", "2",
                    "--sample_answers.every_n_steps", "0", "--sample_answers.max_new_tokens", "4",
                    "--sample_answers.rouge_products", "3", "--best.min_products", "1", *extra)


def _ckpt_dir(tmp_path):
    return tmp_path / "logs" / "amzft" / "version_0" / "checkpoints"


def test_validation_runs_every_n_optimizer_steps_with_accumulate_4(tiny_model_dir, write_jsonl, tmp_path):
    # 18 training products of batch 2 = 9 batches an epoch: windows of 4, 4, 1 -> 3 steps an
    # epoch, so a batch count (3 x 4 = 12 batches) would validate after step 4, not 3.
    data = write_jsonl(tiny_records(24))
    counter = CountValidations()
    cli = run_fit(_args(tiny_model_dir, data, tmp_path, "--trainer.max_steps", "7",
                        "--trainer.accumulate_grad_batches", "4", "--validation.every_n_steps", "3"), counter)
    assert cli.trainer.num_training_batches == 9  # the drift case is really exercised
    assert counter.steps == [3, 6, 7]  # every 3 optimizer steps, and the last step
    assert not any(counter.mid_window)  # always right after an optimizer step


def _val_losses(cli) -> dict[int, float]:
    schedule = next(c for c in cli.trainer.callbacks if isinstance(c, ValidationSchedule))
    return {step: metrics["val/loss"] for step, metrics in schedule.history}


def test_best_k_survive_a_resume_and_ckpt_path_best_serves_every_command(tiny_model_dir, write_jsonl, tmp_path, capsys,
                                                                         monkeypatch):
    data = write_jsonl(tiny_records(24))
    common = ("--trainer.max_steps", "6", "--trainer.accumulate_grad_batches", "2", "--best.save_top_k", "2")
    straight_losses = RecordSteps()
    a = run_fit(_args(tiny_model_dir, data, tmp_path / "a", *common), straight_losses)
    straight = _val_losses(a)
    assert sorted(straight) == [2, 4, 6]
    # Stopped at a validation step: last.ckpt is written before step 4's validation (and its
    # best file), so the resumed run must adopt that file from the folder, not from last.ckpt.
    first, resumed = RecordSteps(), RecordSteps()
    b1 = run_fit(_args(tiny_model_dir, data, tmp_path / "b", *common), first, StopAtStep(4))
    b2 = run_fit(_args(tiny_model_dir, data, tmp_path / "b", *common, "--ckpt_path", "last"), resumed, resumed_from_last=True)
    assert first.losses + resumed.losses == straight_losses.losses  # validation does not disturb exact resume
    assert {**_val_losses(b1), **_val_losses(b2)} == straight

    kept = sorted(p.name for p in _ckpt_dir(tmp_path / "b").glob("best-*.ckpt"))
    ranked = sorted(straight, key=straight.get)[:2]
    assert kept == sorted(f"best-step{s:05d}-val_loss{straight[s]:.4f}.ckpt" for s in ranked)
    assert (_ckpt_dir(tmp_path / "b") / "last.ckpt").is_file()  # and the periodic last.ckpt as before
    best = find_best_checkpoint(tmp_path / "b" / "logs")
    assert (best.step, best.monitor, len(best.kept)) == (ranked[0], "val/loss", 2)
    assert abs(best.score - straight[ranked[0]]) < 1e-6
    assert load_checkpoint_file(best.path)["global_step"] == ranked[0]

    # --ckpt_path best, end to end through the command line: validate, ask, export.
    monkeypatch.chdir(tmp_path / "b")  # `best` is looked up under ./logs
    capsys.readouterr()
    main(["validate", *_args(tiny_model_dir, data, tmp_path / "b", "--ckpt_path", "best")[1:]])
    said = f"amzft: best checkpoint: step {ranked[0]}, val/loss {straight[ranked[0]]:.4f} (lowest of the 2 kept in version_0)"
    assert said in capsys.readouterr().out
    main(["ask", "Item 3 book", "--ckpt_path", "best", "--max_new_tokens", "2"])
    out = capsys.readouterr().out
    assert said in out and "A:" in out
    main(["export", "--ckpt_path", "best", "--out", str(tmp_path / "exported")])
    assert said in capsys.readouterr().out and (tmp_path / "exported" / "adapter_model.safetensors").is_file()

    # A run without a monitored checkpoint: one line saying how to get one.
    lone = tmp_path / "lone" / "amzft" / "version_0" / "checkpoints"
    lone.mkdir(parents=True)
    (lone / "last.ckpt").write_bytes((_ckpt_dir(tmp_path / "b") / "last.ckpt").read_bytes())
    for command in (["ask", "x"], ["export", "--out", str(tmp_path / "x")], ["evaluate"]):
        err = one_line_error(capsys, *command, "--ckpt_path", "best", "--log_root", str(tmp_path / "lone"))
        assert "kept no monitored best checkpoint" in err and "validation.every_n_steps" in err and "best.monitor" in err
    err = one_line_error(capsys, *_args(tiny_model_dir, data, tmp_path / "lone", "--ckpt_path", "best"))
    assert "fit --ckpt_path best is not supported" in err


def test_early_stopping_on_val_rouge_l_stops_a_tiny_run(tiny_model_dir, write_jsonl, tmp_path, capsys):
    data = write_jsonl(tiny_records(24))
    # min_delta 10: ROUGE-L (0..1) can never improve that much, so patience 1 stops at the
    # second validation (step 4) of a 40-step run.
    cli = run_fit(_args(tiny_model_dir, data, tmp_path, "--trainer.max_steps", "40", "--best.monitor", "val/rougeL",
                        "--early_stopping.patience", "1", "--early_stopping.min_delta", "10"))
    assert cli.trainer.global_step == 4
    assert any(isinstance(c, EarlyStop) and c.monitor == "val/rougeL" and c.mode == "max" for c in cli.trainer.callbacks)
    assert "amzft: early stopping after step 4: val/rougeL did not improve" in capsys.readouterr().out
    assert load_checkpoint_file(_ckpt_dir(tmp_path) / "last.ckpt")["global_step"] == 4  # last.ckpt where it ended
    rouge = {step: m["val/rougeL"] for step, m in _history(cli)}
    assert sorted(rouge) == [2, 4] and all(0 <= v <= 1 for v in rouge.values())
    best = find_best_checkpoint(tmp_path / "logs")
    assert best.monitor == "val/rougeL" and best.score == max(rouge.values())
    assert best.step == min(s for s in rouge if rouge[s] == best.score)  # ties: the earlier step
    assert all("val_rougeL" in p.name for p in _ckpt_dir(tmp_path).glob("best-*.ckpt"))
    acc = EventAccumulator(str(tmp_path / "logs" / "amzft" / "version_0"))
    acc.Reload()
    assert [round(e.value, 5) for e in acc.Scalars("val/rougeL")] == [round(rouge[s], 5) for s in sorted(rouge)]
    # Off by default: no EarlyStopping callback at all.
    plain = cli_main(_args(tiny_model_dir, data, tmp_path / "plain"), run=False)
    assert not any(isinstance(c, EarlyStopping) for c in plain.trainer.callbacks)
    assert any(isinstance(c, BestCheckpoint) and c.monitor == "val/loss" and c.mode == "min" for c in plain.trainer.callbacks)


def test_too_few_validation_products_keep_no_best_and_best_is_the_last(tiny_model_dir, write_jsonl, tmp_path, capsys,
                                                                        monkeypatch):
    # 6 validation products, val/rougeL over 3 of them: below best.min_products 4, so no
    # best file; --ckpt_path best is the last checkpoint, also after a resume, and says why.
    data = write_jsonl(tiny_records(24))
    common = ("--trainer.max_steps", "4", "--best.monitor", "val/rougeL", "--best.min_products", "4")
    run_fit(_args(tiny_model_dir, data, tmp_path, *common), StopAtStep(2))
    cli = run_fit(_args(tiny_model_dir, data, tmp_path, *common, "--ckpt_path", "last"), resumed_from_last=True)
    why = "val/rougeL over 3 validation products cannot rank checkpoints (best.min_products: 4)"
    assert capsys.readouterr().out.count(f"amzft: {why}; no best-*.ckpt is kept") == 2  # the run and its resume
    assert sorted(_history(cli)) and not list(_ckpt_dir(tmp_path).glob("best-*.ckpt"))
    best = find_best_checkpoint(tmp_path / "logs")
    assert (best.path, best.step, best.unranked) == (_ckpt_dir(tmp_path) / "last.ckpt", 4, why)
    assert best.describe() == f"best checkpoint: the last, step 4 ({why}): {best.path}"
    path, said = demo._demo_pick(tmp_path / "elsewhere.ckpt", _history(cli), str(tmp_path / "logs"))
    assert (path, said) == (best.path, f"the last checkpoint ({why})")
    monkeypatch.chdir(tmp_path)
    main(["ask", "Item 3 book", "--ckpt_path", "best", "--max_new_tokens", "2"])
    said = f"amzft: best checkpoint: the last, step 4 ({why}): logs/amzft/version_0/checkpoints/last.ckpt"
    assert said in capsys.readouterr().out
    # val/rougeL over 6 products (rouge_products 8, capped by the split) ranks at the floor 6.
    ranked = run_fit(_args(tiny_model_dir, data, tmp_path / "six", *common, "--best.min_products", "6",
                           "--sample_answers.rouge_products", "8"))
    assert list(_ckpt_dir(tmp_path / "six").glob("best-*.ckpt"))
    assert not next(c for c in ranked.trainer.callbacks if isinstance(c, BestCheckpoint)).unranked
    assert "must be >= 1" in one_line_error(capsys, *_args(tiny_model_dir, data, tmp_path, "--best.min_products", "0"))


def _history(cli):
    return next(c for c in cli.trainer.callbacks if isinstance(c, ValidationSchedule)).history


def test_bad_selection_options_are_one_line(tiny_model_dir, tiny_data, tmp_path, capsys):
    args = fit_args(tiny_model_dir, tiny_data, tmp_path)
    err = one_line_error(capsys, *args, "--best.monitor", "val/rougeL", "--sample_answers.rouge_products", "0")
    assert "needs sample_answers.rouge_products > 0" in err
    err = one_line_error(capsys, *args, "--trainer.val_check_interval", "5")
    assert "either validation.every_n_steps" in err
    err = one_line_error(capsys, *args, "--best.monitor", "train/loss", code=2)  # the parser's: says what it takes
    assert '"best.monitor"' in err and "'val/loss', 'val/rougeL'" in err and "train/loss" in err
    assert "validation.every_n_steps must be >= 0" in one_line_error(capsys, *args, "--validation.every_n_steps", "-1")


def test_the_demo_says_which_step_is_best_and_why(tmp_path, monkeypatch):
    best = BestChoice(tmp_path / "version_0" / "checkpoints" / "best.ckpt", 20, "val/loss", 3.2153, [(20, 3.2153)])
    history = [(s, {"val/loss": v}) for s, v in [(10, 3.5), (20, 3.2153), (30, 3.3), (40, 3.9), (50, 4.2), (60, 4.6612)]]
    with monkeypatch.context() as m:
        m.setattr(locate, "find_best_checkpoint", lambda root: best)
        path, why = demo._demo_pick(tmp_path / "last.ckpt", history, str(tmp_path))
    assert path == best.path
    assert why == "the best checkpoint: step 20 (lowest val/loss 3.2153 of the 6 validations; the last, step 60, had 4.6612)"
    path, why = demo._demo_pick(tmp_path / "last.ckpt", [], str(tmp_path / "nothing"))
    assert path.name == "last.ckpt" and "no validation kept a best one" in why


def test_the_demo_trains_stops_resumes_and_picks_the_best(tiny_model_dir, write_jsonl, tmp_path, capsys):
    data = write_jsonl(tiny_records(24))
    extra = _args(tiny_model_dir, data, tmp_path, "--trainer.max_steps", "4")[3:]  # without "fit --config cpu.yaml"
    last, datamodule, history = demo._demo_train(str(REPO / "configs" / "cpu.yaml"), extra, str(tmp_path / "logs"))
    assert [step for step, _ in history] == [2, 4]  # step 2 in the stopped run, 4 after the resume
    chosen, why = demo._demo_pick(last, history, str(tmp_path / "logs"))
    losses = {step: m["val/loss"] for step, m in history}
    step = min(losses, key=losses.get)
    assert chosen.name == f"best-step{step:05d}-val_loss{losses[step]:.4f}.ckpt"
    assert why.startswith(f"the best checkpoint: step {step} (lowest val/loss {losses[step]:.4f} of the 2 validations; ")
    # the answers: base, the chosen checkpoint's and, when it is not the last, the last one's too
    capsys.readouterr()
    demo._demo_answers(chosen, datamodule, GenerationOptions(max_new_tokens=3), last)
    out = capsys.readouterr().out
    assert out.count("base model:") == out.count(f"fine-tuned, best (step {step}):") == out.count("fine-tuned, last (step 4):") >= 3
