"""The real embedded SmolLM2-135M-Instruct (minutes on CPU): marked slow."""

import math

import pytest
import torch
from lightning.pytorch import Callback

from amzft.checkpoints.io import load_checkpoint_file
from amzft.inference.load import load_answerer
from amzft.model.generation import GREEDY, generate_answers
from amzft.sources import load_tokenizer
from amzft.training.callbacks import StopAtStep
from helpers import REPO, run_fit

pytestmark = pytest.mark.slow


class AtTrainStart(Callback):
    """The optimizer step and the adapter (the LoRA tensors) a fit starts from."""

    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step
        self.adapter = {k: v.detach().clone() for k, v in pl_module.state_dict().items() if "lora_" in k}


def test_embedded_tokenizer_is_fixed_up():
    tok = load_tokenizer("embedded")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_embedded_fit_resume_and_ask(tmp_path):
    args = [
        "fit", "--config", str(REPO / "configs" / "cpu.yaml"),
        "--trainer.max_steps", "4", "--trainer.default_root_dir", str(tmp_path / "logs"),
        "--trainer.enable_progress_bar", "false", "--data.cache_dir", str(tmp_path / "cache"),
        "--checkpoint.every_n_train_steps", "2",
        # the real model's fit, resume and answers are what is tested, not cpu.yaml's batch: the
        # smallest steps that still train (one 256-token row each)
        "--trainer.accumulate_grad_batches", "1", "--data.batches.pack_length", "256",
    ]
    # Stopped after step 2 (last.ckpt written there, as the demo does), then `--ckpt_path last` to step 4.
    stopped = run_fit(args, StopAtStep(2))
    assert stopped.trainer.global_step == 2
    saved = load_checkpoint_file(stopped.trainer.checkpoint_callback.last_model_path)
    start = AtTrainStart()
    cli = run_fit([*args, "--ckpt_path", "last"], start, resumed_from_last=True)
    # The resumed fit starts at step 2 from the saved adapter (a fit that ignored the checkpoint
    # would start at step 0 from a fresh one, whose lora_B are all 0) and goes on to step 4.
    assert saved["global_step"] == start.step == 2
    assert saved["state_dict"].keys() == start.adapter.keys()
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved["state_dict"].items())
    assert all(torch.equal(start.adapter[k], v) for k, v in saved["state_dict"].items())
    assert cli.trainer.global_step == 4 and cli.trainer.logger.version == 0  # the same TensorBoard run
    assert 0.02 < cli.model.trainable_share < 0.05  # 4.9 M of 139 M
    loss = float(cli.trainer.callback_metrics["train/loss"])
    assert math.isfinite(loss) and loss < 6
    last = cli.trainer.checkpoint_callback.last_model_path
    loaded = load_answerer(last)
    module, fmt = loaded.module, loaded.prompt
    titles = ["Girls Ballet Tutu", "The Wall: Images and Offerings from the Vietnam Veterans Memorial"]
    # Raw greedy, the decoding this test was written for.
    tuned = generate_answers(module, titles, fmt, max_new_tokens=120, options=GREEDY)
    base = generate_answers(module, titles, fmt, max_new_tokens=120, use_adapter=False, options=GREEDY)
    assert all(tuned) and all(base)
    # The instruct model ends its answers with <|im_end|>: greedy generation stops well before the cap.
    lengths = [len(module.tokenizer(b, add_special_tokens=False)["input_ids"]) for b in base]
    assert min(lengths) < 110, lengths
