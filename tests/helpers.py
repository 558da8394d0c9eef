"""What several test files share (test files import from here, never from each other nor from
conftest.py, which holds the fixtures): where things are, the tiny records, the shrunk
cpu.yaml command line, a fit run in this process with per-step recorders (straight and
stopped-then-resumed), private copies of a shared trained run, the one-line error check, and the
exports' logits check.

The callbacks a ``python -m amzft`` subprocess loads by class path, and the network guard, live
in fault_helpers.py: a child process imports that light module before amzft, this one imports
amzft. This module imports Lightning and transformers: tests/test_gpu.py imports it only after
Unsloth (conftest.py imports it inside its fixtures, for the same reason)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from peft import PeftModel
from transformers import AutoModelForCausalLM

from amzft.cli.lightning_cli import cli_main
from amzft.cli.main import main
from amzft.training.callbacks import StopAtStep

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_400 = SHARED_DATA / "amazontitles_trn_first400.jsonl"


def needs_real_data():
    return pytest.mark.skipif(not REAL_400.is_file(), reason="../shared/data is not beside this checkout")


def tiny_records(n: int, words: int = 12):
    """Short synthetic products (prompt ~50 tokens, answer ~words+2 tokens)."""
    vocab = "red blue green soft warm cotton steel glass mug lamp book novel story song guitar chair".split()
    return [
        {
            "title": f"Item {i} {vocab[i % len(vocab)]}",
            "content": " ".join(vocab[(i * 7 + j) % len(vocab)] for j in range(words + i % 5)) + ".",
        }
        for i in range(n)
    ]


def fit_args(tiny_model_dir, data_path, tmp_path, *extra):
    """configs/cpu.yaml shrunk to the tiny model (the lightning-hydra-template habit: tests
    shrink the real config rather than invent one)."""
    return [
        "fit",
        "--config", str(REPO / "configs" / "cpu.yaml"),
        "--model.name_or_path", str(tiny_model_dir),
        "--data.path", str(data_path),
        "--data.cache_dir", str(tmp_path / "cache"),
        "--data.holdout.val_fraction", "0",
        "--data.holdout.test_fraction", "0",
        # the cache is built in this process (the same code a worker pool runs, without forking one
        # per core for each of the tests' many fits); tests of the parallel build ask for num_proc 2
        # themselves (test_scale.py, test_robustness.py, test_data_pipeline.py)
        "--data.num_proc", "1",
        "--trainer.default_root_dir", str(tmp_path / "logs"),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        # cpu.yaml's `precision: auto` may train in bf16 (AMX, some AVX512-BF16 CPUs): tests compare exact
        # and fp32-tolerance results, so they pin fp32 (auto is tested in test_precision.py).
        "--trainer.precision", "32-true",
        *SEED_SHAPED_BATCHES,
        *extra,
    ]


# The tests were written for plain batches of 2 x accumulate 4 (the seed's shape): they count
# steps, examples and checkpoints in it. cpu.yaml's own packed rows are run as shipped by
# test_cli.py::test_two_steps_of_fit_run_from_every_config and test_scale.py's resume tests.
SEED_SHAPED_BATCHES = (
    "--data.batches.layout", "plain", "--data.batches.share_prefix", "false", "--data.batches.pack_length", "null",
    "--data.batch_size", "2", "--trainer.accumulate_grad_batches", "4", "--model.optim.lr", "1e-3",
    "--trainer.max_steps", "60", "--checkpoint.every_n_train_steps", "20", "--validation.every_n_steps", "10",
)


def fit_tiny_run(tiny_model_dir, root: Path, *extra: str) -> Path:
    """A short fit of the shrunk cpu.yaml on tiny_records(30) written into ``root``: its last.ckpt
    (the trained checkpoint several test files start from)."""
    data = root / "trn.json"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny_records(30)))
    main(fit_args(tiny_model_dir, data, root, *extra))
    return next((root / "logs").rglob("last.ckpt"))


def copy_run(ckpt: Path, to: Path) -> Path:
    """A private copy of the run folder ``fit_tiny_run`` wrote ``ckpt`` in (its ``logs``, placed at
    ``to / "logs"``), for a test that writes beside the checkpoint or changes it: the copy's
    last.ckpt. (The training file and data cache stay where the checkpoint names them.)"""
    logs = next(p for p in Path(ckpt).parents if p.name == "logs")
    shutil.copytree(logs, to / "logs")
    return to / Path(ckpt).relative_to(logs.parent)


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys, *args, code: int | None = None) -> str:
    """Run ``python -m amzft *args`` in-process; it must exit (with ``code`` if given) printing
    exactly one ``amzft: error: …`` line on stderr, which is returned."""
    with pytest.raises(SystemExit) as done:
        main(list(args))
    assert done.value.code == code if code is not None else done.value.code in (1, 2)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("amzft: error: "), err
    return err[0]


class RecordSteps(Callback):
    """Per optimizer step: the logged window loss and a copy of the LoRA gradients."""

    def __init__(self):
        self.losses, self.grads = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # Callbacks run before the module's hook, which logs this same value as train/loss.
        self.losses.append(pl_module.window.loss_sum / pl_module.window.label_tokens)
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters() if p.grad is not None})


def run_fit(args, *callbacks, resumed_from_last=False):
    cli = cli_main(args, run=False)
    cli.trainer.callbacks.extend(callbacks)
    assert (cli.ckpt_path is not None) == resumed_from_last
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.ckpt_path)
    return cli


def straight_and_resumed(model_dir, data, tmp_path, stop_at: int, *extra):
    """The same fit run straight (in tmp_path/a) and stopped after ``stop_at`` optimizer steps
    then resumed with ``--ckpt_path last`` (in tmp_path/b). Returns both recorders and CLIs:
    ``straight, straight_cli, resumed, resumed_cli``."""
    straight, resumed = RecordSteps(), RecordSteps()
    straight_cli = run_fit(fit_args(model_dir, data, tmp_path / "a", *extra), straight)
    run_fit(fit_args(model_dir, data, tmp_path / "b", *extra), RecordSteps(), StopAtStep(stop_at))
    resumed_cli = run_fit(fit_args(model_dir, data, tmp_path / "b", *extra, "--ckpt_path", "last"), resumed,
                          resumed_from_last=True)
    return straight, straight_cli, resumed, resumed_cli


def exports_give_the_logits(ckpt, ids, expected, out):
    """``export`` of ``ckpt`` as a PEFT adapter (on its base) and as a merged model (no LoRA
    left) gives ``expected`` logits for ``ids`` (1e-5 and 1e-4)."""
    main(["export", "--ckpt_path", str(ckpt), "--out", str(out / "adapter")])
    main(["export", "--ckpt_path", str(ckpt), "--out", str(out / "merged"), "--merge", "true"])
    base_dir = json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, expected, atol=1e-5)
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-4)
