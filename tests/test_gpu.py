"""CUDA-only checks of the unsloth backend (skipped without CUDA; see gpu/run_on_device.sh).

Run this file on its own (``python -m pytest tests/test_gpu.py``) so that Unsloth is imported
before transformers, as ``python -m amzft`` does (amzft.cli.import_order); collected after other test
files it still runs, with Unsloth's "import me first" warning.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

if torch.cuda.is_available():  # before anything imports transformers / peft / lightning
    from amzft.cli.import_order import import_unsloth_if_wanted

    import_unsloth_if_wanted(["fit", "--model.backend", "unsloth"])

from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from amzft.cli.main import main  # noqa: E402
from amzft.training.callbacks import StopAtStep  # noqa: E402
from helpers import REPO, RecordSteps, fit_args, run_fit, tiny_records  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_llama_dir(tmp_path_factory, llama_tokenizer):
    """A small random Llama with the real Llama-3.2 vocabulary and head_dim 64 (the tests' CPU
    model has head_dim 8, below what Unsloth's Triton kernels are built for)."""
    directory = tmp_path_factory.mktemp("gpu-llama")
    config = LlamaConfig(
        vocab_size=len(llama_tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=llama_tokenizer.bos_token_id,
        eos_token_id=llama_tokenizer.eos_token_id, pad_token_id=llama_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    llama_tokenizer.save_pretrained(directory)
    return directory


def test_liger_kernels_give_the_plain_loss_and_lora_gradients(gpu_llama_dir, tmp_path):
    """model.compute.kernels=liger (RoPE, RMSNorm, SwiGLU kernels and the fused linear cross-entropy of
    the label-only loss) against transformers' own path: same loss and LoRA gradients on one
    batch, to fp32 rounding in fp32 and to bf16 rounding under bf16 autocast. In a fresh
    process (tests/liger_vs_plain.py): Unsloth, imported by this file, patches Llama too."""
    if importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel is not installed (pip install liger-kernel; gpu/wheelhouse.py has it)")
    out = tmp_path / "liger.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "liger_vs_plain.py"), str(gpu_llama_dir), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(out, weights_only=False)
    for bf16, loss_rtol, grad_rtol in ((False, 1e-4, 1e-3), (True, 1e-2, 5e-2)):
        plain, liger = results[("none", bf16)], results[("liger", bf16)]
        assert liger["loss"] == pytest.approx(plain["loss"], rel=loss_rtol), bf16
        assert plain["grads"].keys() == liger["grads"].keys() and all("lora_" in k for k in plain["grads"])
        assert any("lora_A" in k for k in plain["grads"]) and any("lora_B" in k for k in plain["grads"])
        for key, expected in plain["grads"].items():
            error = (liger["grads"][key] - expected).norm() / expected.norm().clamp_min(1e-12)
            assert expected.norm() > 0 and error < grad_rtol, (key, bf16, float(error))


def _adapter(ckpt) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v.float() for k, v in state.items() if "lora_" in k}


def test_unsloth_fit_resumes_exactly_then_evaluates_and_exports(gpu_llama_dir, write_jsonl, tmp_path):
    """The seed's backend through the same seams as hf: a run stopped at step 2 and resumed
    ends where the straight run ends; its checkpoint evaluates (base and fine-tuned answers)
    and exports as a PEFT adapter."""
    data = write_jsonl(tiny_records(24))
    common = ("--model.backend", "unsloth", "--trainer.accelerator", "gpu", "--trainer.precision", "bf16-mixed",
              "--trainer.max_steps", "4", "--model.optim.lr", "1e-2",  # big steps, so a wrong resume shows
              "--data.holdout.val_fraction", "0.2", "--data.holdout.test_fraction", "0.2", "--sample_answers.every_n_steps", "0")
    straight = RecordSteps()
    run_fit(fit_args(gpu_llama_dir, data, tmp_path / "a", *common), straight)
    run_fit(fit_args(gpu_llama_dir, data, tmp_path / "b", *common), RecordSteps(), StopAtStep(2))
    stopped = _adapter(next((tmp_path / "b").rglob("last.ckpt")))
    resumed = RecordSteps()
    run_fit(fit_args(gpu_llama_dir, data, tmp_path / "b", *common, "--ckpt_path", "last"), resumed,
            resumed_from_last=True)

    assert len(straight.losses) == 4 and len(resumed.losses) == 2
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(straight.losses[2:]), rtol=1e-3, atol=1e-4)
    ckpt_a = next((tmp_path / "a").rglob("last.ckpt"))
    end_a, end_b = _adapter(ckpt_a), _adapter(next((tmp_path / "b").rglob("last.ckpt")))
    assert end_a.keys() == end_b.keys() == stopped.keys() and end_a
    moved = sum((end_a[k] - stopped[k]).norm() ** 2 for k in end_a) ** 0.5  # steps 3-4 of training
    apart = sum((end_a[k] - end_b[k]).norm() ** 2 for k in end_a) ** 0.5
    assert moved > 0 and apart < 0.01 * moved, (float(apart), float(moved))

    main(["evaluate", "--ckpt_path", str(ckpt_a), "--samples", "2", "--gen.max_new_tokens", "8"])
    report = json.loads((ckpt_a.parent.parent / "report.json").read_text())
    for split in report["splits"].values():
        assert set(split["models"]) == {"base", "fine-tuned"} and split["n"] == 2

    main(["export", "--ckpt_path", str(ckpt_a), "--out", str(tmp_path / "adapter")])
    exported = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(exported) == len(end_a) and (tmp_path / "adapter" / "adapter_config.json").is_file()
