import json
import math
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

import amzft.cli.commands as commands
import amzft.cli.demo as demo
from amzft.cli.lightning_cli import cli_main
from amzft.cli.main import main
from amzft.training.validation import ValidationSchedule
from conftest import REPO, SEED_SHAPED_BATCHES, fit_args, one_line_error

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys, amzft.cli.main as c; c.main(['--help']); "
            "print(sorted(m for m in ('torch','transformers','lightning','unsloth') if m in sys.modules))")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage: python -m amzft" in out and out.strip().endswith("[]")
    assert time.perf_counter() - start < 10  # generous: the figure itself lives in the README


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_starts_with_its_command_and_parses(config):
    text = config.read_text()
    assert text.startswith("# python -m amzft fit --config configs/" + config.name)
    yaml.safe_load(text)
    cli = cli_main(["--config", str(config)], run=False)
    assert cli.model.hparams.lora_r == 16 and cli.model.hparams.lora_alpha == 16
    assert cli.datamodule.settings.max_length == cli.model.hparams.max_length == 2048  # linked once
    if config.name == "base.yaml":  # the seed's; the others depart from it, each saying why in its header
        assert cli.trainer.accumulate_grad_batches == 4 and cli.datamodule.batch_size == 2
        assert cli.trainer.max_steps == 60
    if config.name.startswith("cpu"):  # packed rows, the shared preamble: the fastest CPU layout measured
        assert cli.datamodule.layout == "packed" and cli.datamodule.share_prefix
        assert cli.trainer.precision == "32-true" or "bf16" in str(cli.trainer.precision)  # auto, resolved


def test_full_yaml_is_base_yaml_scaled_to_the_whole_file():
    """configs/full.yaml: the departures its header lists, and nothing else of base.yaml's recipe."""
    base = yaml.safe_load((REPO / "configs" / "base.yaml").read_text())
    full = yaml.safe_load((REPO / "configs" / "full.yaml").read_text())
    same = ("backend", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "optimizer", "weight_decay", "loss_chunk_tokens")
    assert {k: full["model"][k] for k in same} == {k: base["model"][k] for k in same}
    assert full["seed_everything"] == base["seed_everything"] and full["trainer"]["precision"] == "bf16-mixed"
    assert full["model"]["lr"] == pytest.approx(2e-4 * math.sqrt(16 / 8), rel=0.01)  # sqrt scaling from 8 examples/step
    cli = cli_main(["--config", str(REPO / "configs" / "full.yaml")], run=False)
    assert cli.datamodule.batch_size * cli.trainer.accumulate_grad_batches == 16
    assert cli.trainer.max_steps == -1 and cli.trainer.max_epochs == 1 and cli.model.hparams.warmup_steps == 1000
    periodic = [c for c in cli.trainer.checkpoint_callbacks if type(c) is ModelCheckpoint]
    assert len(periodic) == 1 and periodic[0]._train_time_interval == timedelta(minutes=30)
    schedule = next(c for c in cli.trainer.callbacks if isinstance(c, ValidationSchedule))
    assert schedule.every_n_steps == 2000
    assert cli.datamodule.settings.val_fraction == cli.datamodule.settings.test_fraction == 0.001


def test_base_yaml_is_the_seed_recipe():
    cfg = yaml.safe_load((REPO / "configs" / "base.yaml").read_text())
    assert cfg["seed_everything"] == 3407 and cfg["model"]["backend"] == "unsloth"
    assert cfg["trainer"]["precision"] == "bf16-mixed"
    assert cfg["model"]["optimizer"] == "adamw_8bit" and cfg["model"]["lr"] == 2e-4
    assert cfg["model"]["warmup_steps"] == 5 and cfg["model"]["lora_dropout"] == 0
    assert cfg["model"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert cfg["data"]["question"] == "What is the description of product {title}?"


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
    assert printed["model"]["name_or_path"] == "embedded" and printed["data"]["batch_size"] == 1 and printed["data"]["layout"] == "packed"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.lr", "-1"], "model.lr must be a positive number, found -1.0"),
        (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches must be >= 1, found 0"),
        (["--data.max_length", "4"], "data.max_length must be >= 8, found 4"),
        (["--model.name_or_path", "/no/such/model"], "path '/no/such/model' does not exist (amzft never downloads"),
        (["--data.path", "/no/such/file.json"], "/no/such/file.json: no such file"),
        (["--model.target_modules", "[nope_proj]"], "model.target_modules ['nope_proj'] are not modules"),
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


def test_validate_test_predict_from_last_checkpoint(tiny_model_dir, tiny_data, tmp_path, capsys):
    main(fit_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.max_steps", "1"))
    for command in ("validate", "test", "predict"):
        args = fit_args(tiny_model_dir, tiny_data, tmp_path, "--ckpt_path", "last",
                        "--data.val_fraction", "0.3", "--data.test_fraction", "0.3", "--model.max_new_tokens", "3")
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


def test_cpu_yaml_names_the_seed_recipe_on_a_cpu(tiny_model_dir, tiny_data, tmp_path):
    """cpu.yaml departs from the seed; the one-line override its header gives for the seed's own
    settings on a CPU must parse and train (with the tiny model standing in for the embedded one)."""
    header = (REPO / "configs" / "cpu.yaml").read_text().split("seed_everything")[0]
    line = next(line for line in header.splitlines() if "configs/base.yaml" in line and "amzft fit" in line)
    argv = line.split("python -m amzft ", 1)[1].split()
    argv[argv.index("configs/base.yaml")] = str(REPO / "configs" / "base.yaml")
    shrink = ["--model.name_or_path", str(tiny_model_dir), "--data.path", str(tiny_data), "--data.cache_dir",
              str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path / "logs"), "--trainer.max_steps", "1",
              "--trainer.enable_progress_bar", "false", "--data.val_fraction", "0", "--data.test_fraction", "0"]
    cli = cli_main(argv[1:] + shrink, run=False)
    assert cli.model.hparams.lr == 2e-4 and cli.model.hparams.backend == "hf"
    assert cli.datamodule.batch_size == 2 and cli.trainer.accumulate_grad_batches == 4
    assert cli.datamodule.layout == "plain" and cli.trainer.precision == "32-true"
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1
