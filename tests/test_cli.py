import json
import math
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

import amzft.cli.commands as commands
import amzft.cli.demo as demo
import amzft.training.precision as precision
from amzft.cli.lightning_cli import cli_main
from amzft.cli.main import main
from amzft.training.validation import ValidationSchedule
from helpers import REPO, SEED_SHAPED_BATCHES, copy_run, fit_args, one_line_error

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_help_prints_the_usage_and_imports_nothing_heavy():
    """main(['--help']) prints the usage, every command in it, without importing a heavy library
    (what keeps it instant; `python -m amzft --help` itself: test_codebase.py; no wall-time bound)."""
    code = ("import sys, amzft.cli.main as c; c.main(['--help']); "
            "print(sorted(m for m in ('torch','transformers','lightning','peft','datasets','unsloth') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: python -m amzft") and out.strip().endswith("[]")
    for command in ("fit", "validate", "test", "predict", "describe", "data", "ask", "evaluate", "export", "demo"):
        assert f"\n  {command} " in out, command


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_starts_with_its_command_and_parses(config, monkeypatch):
    text = config.read_text()
    assert text.startswith("# python -m amzft fit --config configs/" + config.name)
    yaml.safe_load(text)
    chosen = []  # what `precision: auto` chose on this machine (the real rule, probe included), recorded

    def choose(kind):
        chosen.append(real_choose(kind))
        return chosen[-1]

    real_choose = precision.choose
    monkeypatch.setattr(precision, "choose", choose)
    cli = cli_main(["--config", str(config)], run=False)
    assert cli.model.lora.r == 16 and cli.model.lora.alpha == 16
    assert cli.datamodule.settings.max_length == cli.model.hparams.max_length == 2048  # linked once
    if config.name == "base.yaml":  # the seed's; the others depart from it, each saying why in its header
        assert cli.trainer.accumulate_grad_batches == 4 and cli.datamodule.batch_size == 2
        assert cli.trainer.max_steps == 60
    if config.name.startswith("cpu"):  # packed rows, the shared preamble: the fastest CPU layout measured
        assert cli.datamodule.batches.layout == "packed" and cli.datamodule.batches.share_prefix
        # auto, resolved once, by the machine's own rule, and the trainer runs in what it chose
        assert len(chosen) == 1 and chosen[0].precision in ("32-true", "bf16-mixed")
        assert cli.trainer.precision == chosen[0].precision
    else:  # an explicit precision: nothing to choose
        assert not chosen


def test_full_yaml_is_base_yaml_scaled_to_the_whole_file():
    """configs/full.yaml: the departures its header lists, and nothing else of base.yaml's recipe."""
    base = yaml.safe_load((REPO / "configs" / "base.yaml").read_text())
    full = yaml.safe_load((REPO / "configs" / "full.yaml").read_text())
    assert full["model"]["lora"] == base["model"]["lora"] and full["model"]["backend"] == base["model"]["backend"]
    same = ("optimizer", "weight_decay")
    assert {k: full["model"]["optim"][k] for k in same} == {k: base["model"]["optim"][k] for k in same}
    assert full["model"]["compute"]["loss_chunk_tokens"] == base["model"]["compute"]["loss_chunk_tokens"]
    assert full["seed_everything"] == base["seed_everything"] and full["trainer"]["precision"] == "bf16-mixed"
    assert full["model"]["optim"]["lr"] == pytest.approx(2e-4 * math.sqrt(16 / 8), rel=0.01)  # sqrt scaling from 8 examples/step
    cli = cli_main(["--config", str(REPO / "configs" / "full.yaml")], run=False)
    assert cli.datamodule.batch_size * cli.trainer.accumulate_grad_batches == 16
    assert cli.trainer.max_steps == -1 and cli.trainer.max_epochs == 1 and cli.model.optim.warmup_steps == 1000
    periodic = [c for c in cli.trainer.checkpoint_callbacks if type(c) is ModelCheckpoint]
    assert len(periodic) == 1 and periodic[0]._train_time_interval == timedelta(minutes=30)
    schedule = next(c for c in cli.trainer.callbacks if isinstance(c, ValidationSchedule))
    assert schedule.every_n_steps == 2000
    assert cli.datamodule.settings.val_fraction == cli.datamodule.settings.test_fraction == 0.001


def test_base_yaml_is_the_notebook_recipe():
    cfg = yaml.safe_load((REPO / "configs" / "base.yaml").read_text())
    assert cfg["seed_everything"] == 3407 and cfg["model"]["backend"] == "unsloth"
    assert cfg["trainer"]["precision"] == "bf16-mixed"
    optim, lora = cfg["model"]["optim"], cfg["model"]["lora"]
    assert optim["optimizer"] == "adamw_8bit" and optim["lr"] == 2e-4 and optim["warmup_steps"] == 5
    assert lora == {"r": 16, "alpha": 16, "dropout": 0,
                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    assert cfg["data"]["prompt"]["question"] == "What is the description of product {title}?"


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_two_steps_of_fit_run_from_every_config(config, tiny_model_dir, tiny_data, tmp_path):
    # base.yaml asks for the unsloth backend (CUDA only): the rest of its recipe runs on hf here
    args = fit_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.max_steps", "2", "--model.backend", "hf")
    args[args.index("--config") + 1] = str(config)
    at = args.index(SEED_SHAPED_BATCHES[0])
    del args[at : at + len(SEED_SHAPED_BATCHES)]  # each config's own batches, as shipped
    cli = cli_main(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    assert Path(cli.trainer.checkpoint_callback.last_model_path).is_file()


def test_cli_fit_then_ask_through_main(tiny_model_dir, tiny_data, tmp_path, capsys, monkeypatch):
    main(fit_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.max_steps", "1"))
    ckpt = next((tmp_path / "logs").rglob("last.ckpt"))
    main(["ask", "Item 3 book", "--ckpt_path", str(ckpt), "--compare", "true", "--max_new_tokens", "4"])
    out = capsys.readouterr().out
    assert "Q: What is the description of product Item 3 book?" in out
    assert "base:" in out and "fine-tuned:" in out
    monkeypatch.chdir(tmp_path)  # `last` is looked up under ./logs
    main(["ask", "Item 3 book", "--ckpt_path", "last", "--max_new_tokens", "2"])
    assert "A:" in capsys.readouterr().out


def test_print_config(capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(["fit", "--config", str(REPO / "configs" / "cpu.yaml"), "--print_config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["name_or_path"] == "embedded" and printed["data"]["batch_size"] == 1
    assert printed["data"]["batches"]["layout"] == "packed"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.optim.lr", "-1"], "model.optim.lr must be a positive number, found -1.0"),
        (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches must be >= 1, found 0"),
        (["--data.max_length", "4"], "data.max_length must be >= 8, found 4"),
        (["--model.name_or_path", "/no/such/model"], "path '/no/such/model' does not exist (amzft never downloads"),
        (["--data.path", "/no/such/file.json"], "/no/such/file.json: no such file"),
        (["--model.lora.target_modules", "[nope_proj]"], "model.lora.target_modules ['nope_proj'] are not modules"),
    ],
)
def test_bad_config_values_are_one_line_errors(extra, message, tiny_model_dir, tiny_data, tmp_path, capsys):
    line = one_line_error(capsys, *fit_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.max_steps", "1", *extra), code=2)
    assert message in line


def test_resume_last_without_checkpoint_is_clear(tiny_model_dir, tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(fit_args(tiny_model_dir, tiny_data, tmp_path, "--ckpt_path", "last"))
    assert "no last.ckpt under" in capsys.readouterr().err


def test_data_command_reports_the_shipped_sample(capsys):
    main(["data", "--data.tokenizer", "llama3.2", "--examples", "1"])
    out = capsys.readouterr().out
    assert "records read: 48" in out and "empty_content" in out and "example 1" in out
    assert "responses cut at max_length=2048: 0" in out  # counted with the tokens, not by the build


def test_validate_test_predict_from_last_checkpoint(tiny_model_dir, tiny_data, trained_run, tmp_path, capsys):
    copy_run(trained_run, tmp_path)  # a trained run in ./logs, for `--ckpt_path last`; the commands write beside it
    for command in ("validate", "test", "predict"):
        args = fit_args(tiny_model_dir, tiny_data, tmp_path, "--ckpt_path", "last",
                        "--data.holdout.val_fraction", "0.3", "--data.holdout.test_fraction", "0.3", "--model.max_new_tokens", "3")
        args[0] = command
        main(args)
    out = capsys.readouterr().out
    assert "val/loss" in out and "test/loss" in out
    rows = [json.loads(line) for line in (tmp_path / "logs" / "amzft" / "version_0" / "predictions.jsonl").open()]
    assert rows and set(rows[0]) == {"title", "reference", "answer", "stopped"}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
@pytest.mark.parametrize("command", ["data", "evaluate", "ask", "export", "demo"])
def test_every_command_reads_every_config(command, config, monkeypatch):
    """The non-Lightning commands accept the training YAMLs (and ignore the keys they don't use)."""
    seen = {}

    class Parsed(Exception):
        pass

    real = commands.command_parser

    def spy(*args, **kwargs):
        parser = real(*args, **kwargs)
        parse = parser.parse_args

        def parse_and_stop(argv):
            seen["cfg"] = parse(argv)
            raise Parsed

        parser.parse_args = parse_and_stop
        return parser

    home = demo if command == "demo" else commands
    monkeypatch.setattr(home, "command_parser", spy)
    extra = {"ask": ["Mug"], "export": ["--out", "x"]}.get(command, [])
    with pytest.raises(Parsed):
        getattr(home, f"{command}_command")(["--config", str(config), *extra])
    assert seen["cfg"] is not None


@pytest.mark.parametrize(("argv", "key"), [(["ask", "Mug", "--trainer.max_steps", "5"], "trainer"),
                                         (["export", "--out", "x", "--best.monitor=val/loss"], "best"),
                                         (["data", "--repetition_penalty", "1.2"], "repetition_penalty")])
def test_training_keys_on_a_command_line_that_ignores_them_are_refused(argv, key, capsys):
    """A config file's training keys are ignored by the commands that do not train; typed on their
    command line they would be silently ignored, so they are a one-line error instead."""
    assert f"amzft {argv[0]} does not use --{key}" in one_line_error(capsys, *argv)


def test_cpu_yaml_names_the_seed_recipe_on_a_cpu(tiny_model_dir, tiny_data, tmp_path):
    """cpu.yaml departs from the seed; the one-line override its header gives for the seed's own
    settings on a CPU must parse and train (with the tiny model standing in for the embedded one)."""
    header = (REPO / "configs" / "cpu.yaml").read_text().split("seed_everything")[0]
    line = next(line for line in header.splitlines() if "configs/base.yaml" in line and "amzft fit" in line)
    argv = line.split("python -m amzft ", 1)[1].split()
    argv[argv.index("configs/base.yaml")] = str(REPO / "configs" / "base.yaml")
    shrink = ["--model.name_or_path", str(tiny_model_dir), "--data.path", str(tiny_data), "--data.cache_dir",
              str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path / "logs"), "--trainer.max_steps", "1",
              "--trainer.enable_progress_bar", "false", "--data.holdout.val_fraction", "0", "--data.holdout.test_fraction", "0"]
    cli = cli_main(argv[1:] + shrink, run=False)
    assert cli.model.optim.lr == 2e-4 and cli.model.hparams.backend == "hf"
    assert cli.datamodule.batch_size == 2 and cli.trainer.accumulate_grad_batches == 4
    assert cli.datamodule.batches.layout == "plain" and cli.trainer.precision == "32-true"
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1
