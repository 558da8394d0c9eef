"""The real embedded SmolLM2-135M-Instruct (minutes on CPU): marked slow."""

import math

import pytest

from amzft.cli.lightning_cli import cli_main
from amzft.inference.generate import GREEDY, generate_answers
from amzft.model.module import LoraCausalLM
from amzft.model.sources import load_tokenizer
from conftest import REPO

pytestmark = pytest.mark.slow


def test_embedded_tokenizer_is_fixed_up():
    tok = load_tokenizer("embedded")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_embedded_fit_resume_and_ask(tmp_path):
    args = [
        "fit", "--config", str(REPO / "configs" / "cpu.yaml"),
        "--trainer.max_steps", "4", "--trainer.default_root_dir", str(tmp_path / "logs"),
        "--trainer.enable_progress_bar", "false", "--data.cache_dir", str(tmp_path / "cache"),
        "--checkpoint.every_n_train_steps", "2",
    ]
    cli = cli_main(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 4
    assert 0.02 < cli.model.trainable_share < 0.05  # 4.9 M of 139 M
    loss = float(cli.trainer.callback_metrics["train/loss"])
    assert math.isfinite(loss) and loss < 6
    last = cli.trainer.checkpoint_callback.last_model_path
    module, fmt = LoraCausalLM.from_checkpoint(last)
    titles = ["Girls Ballet Tutu", "The Wall: Images and Offerings from the Vietnam Veterans Memorial"]
    # Raw greedy, the decoding this test was written for.
    tuned = generate_answers(module, titles, fmt, max_new_tokens=120, options=GREEDY)
    base = generate_answers(module, titles, fmt, max_new_tokens=120, use_adapter=False, options=GREEDY)
    assert all(tuned) and all(base)
    # The instruct model ends its answers with <|im_end|>: greedy generation stops well before the cap.
    lengths = [len(module.tokenizer(b, add_special_tokens=False)["input_ids"]) for b in base]
    assert min(lengths) < 110, lengths
