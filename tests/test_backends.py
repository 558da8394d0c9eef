"""Backends on CPU: hf + nf4 (QLoRA through bitsandbytes, with the AVX512-BF16 workaround),
and the unsloth backend's guards (never imported without CUDA, one-line error)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.backends.cpu.ops import has_avx512bf16
from transformers import AutoModelForCausalLM

import amzft.model.backends
from amzft.cli.import_order import import_unsloth_if_wanted, wants_unsloth
from amzft.cli.main import main
from amzft.data.collate import Collator
from amzft.export.formats import export
from amzft.files import shipped_sample
from amzft.model.loss import token_loss_sum
from amzft.model.module import LoraCausalLM
from amzft.model.settings import ComputeOptions
from helpers import REPO, fit_args, one_line_error, straight_and_resumed, tiny_records


def _nf4(tiny_model_dir) -> LoraCausalLM:
    module = LoraCausalLM(name_or_path=str(tiny_model_dir), compute=ComputeOptions(quantization="nf4"))
    module.configure_model()
    return module


def _lora_grads(module, batch) -> dict[str, torch.Tensor]:
    module.model.train()
    module.model.zero_grad(set_to_none=True)
    loss_sum, n = module.token_loss_sum(batch)
    (loss_sum / n).backward()
    return {k: p.grad.detach().clone() for k, p in module.model.named_parameters() if p.grad is not None}


@pytest.fixture
def batch(llama_tokenizer):
    ids = [[llama_tokenizer.bos_token_id, *range(1000, 1000 + n)] for n in (20, 33)]
    return Collator(llama_tokenizer.pad_token_id)({"input_ids": ids, "prompt_len": [8, 12]})


def test_nf4_base_is_4bit_with_lora_on_top(tiny_model_dir):
    module = _nf4(tiny_model_dir)
    four_bit = [m for m in module.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    assert all(m.weight.quant_type == "nf4" for m in four_bit)
    assert all(m.support_avx512bf16_for_cpu is False for m in four_bit)  # the workaround
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_nf4_lora_gradients_are_the_same_after_an_eval_forward(tiny_model_dir, batch):
    """A bitsandbytes 0.50 bug: on AVX512-BF16 CPUs an eval forward repacks the 4-bit weights and later
    LoRA gradients come out wrong, unless the repacking is turned off (amzft does)."""
    module = _nf4(tiny_model_dir)
    before = _lora_grads(module, batch)
    module.model.eval()
    with torch.no_grad():
        module.token_loss_sum(batch)
    after = _lora_grads(module, batch)
    assert before.keys() == after.keys() and before
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=1e-4, atol=1e-6)


def test_without_the_workaround_the_bug_shows_on_this_cpu(tiny_model_dir, batch, monkeypatch):
    """Proves the test above can fail: load the 4-bit base as bitsandbytes leaves it, and
    training after an eval forward goes wrong: wrong gradients or (with shapes as small as the
    tiny model's) a crash inside bitsandbytes. Only on CPUs with AVX512-BF16, where the bug lives."""
    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: the bitsandbytes bug cannot show here")
    monkeypatch.setattr(amzft.model.backends, "disable_avx512bf16_repacking", lambda model: 0)
    module = _nf4(tiny_model_dir)
    before = _lora_grads(module, batch)
    try:
        module.model.eval()
        with torch.no_grad():
            module.token_loss_sum(batch)
        after = _lora_grads(module, batch)
        wrong = any(not torch.allclose(after[k], before[k], rtol=1e-3, atol=1e-5) for k in before)
    except RuntimeError:  # e.g. "shape '[32, 0]' is invalid": the repacked weight read as the original
        wrong = True
    assert wrong


def test_nf4_fit_resumes_exactly_and_exports(tiny_model_dir, write_jsonl, tmp_path):
    data = write_jsonl(tiny_records(20))
    common = ("--trainer.max_steps", "4", "--model.compute.quantization", "nf4")
    straight, _, resumed, _ = straight_and_resumed(tiny_model_dir, data, tmp_path, 2, *common)
    assert resumed.losses == straight.losses[2:]
    ckpt = next((tmp_path / "b").rglob("last.ckpt"))
    merged = export(str(ckpt), tmp_path / "merged", merge=True)
    model = AutoModelForCausalLM.from_pretrained(merged)  # plain weights: no bitsandbytes needed
    assert not any("Linear4bit" in type(m).__name__ for m in model.modules())


def test_unsloth_backend_without_cuda_is_one_line(tiny_model_dir, tiny_data, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(SystemExit):
        main(fit_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.max_steps", "1", "--model.backend", "unsloth"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.backend=unsloth needs a CUDA GPU" in err[0] and "model.backend=hf" in err[0]


def test_packed_rows_are_refused_with_unsloth(tiny_model_dir, tiny_data, tmp_path, capsys):
    """Unsloth's attention does not see amzft's per-example position ids in multi-row batches:
    packing there would silently mix examples, so the combination is a one-line config error
    (raised before any model is built, on CPU as on GPU)."""
    err = one_line_error(capsys, *fit_args(tiny_model_dir, tiny_data, tmp_path, "--model.backend", "unsloth",
                                          "--data.batches.layout", "packed"))
    assert "data.batches.layout=packed" in err and "model.backend=unsloth" in err


def test_unsloth_is_never_imported_without_cuda_or_when_not_asked():
    base, cpu = str(REPO / "configs" / "base.yaml"), str(REPO / "configs" / "cpu.yaml")
    assert wants_unsloth(["fit", "--config", base]) and not wants_unsloth(["fit", "--config", cpu])
    assert wants_unsloth(["fit", "--model.backend", "unsloth"]) and wants_unsloth(["fit", "--model.backend=unsloth"])
    assert not wants_unsloth(["fit", "--config", base, "--model.backend", "hf"])  # the command line wins
    assert not wants_unsloth(["evaluate", "--ckpt_path", "/nowhere/version_0/checkpoints/last.ckpt"])
    code = (
        "import sys; from amzft.cli.import_order import import_unsloth_if_wanted as f; "
        f"r = f(['fit', '--config', {cpu!r}]); u = 'unsloth' in sys.modules; "
        f"r2 = f(['fit', '--config', {base!r}]); import amzft, amzft.cli.main; "
        "print(r, u, r2, 'unsloth' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    # Not asked (cpu.yaml): never imported. Asked (base.yaml): imported exactly where CUDA and the
    # package are there (with CUDA, on an install without the gpu extra, not either).
    imported = str(torch.cuda.is_available() and importlib.util.find_spec("unsloth") is not None)
    assert out == ["False", "False", imported, imported], out
    assert import_unsloth_if_wanted(["--help"]) is False


def test_evaluate_and_export_of_an_unsloth_run_import_unsloth_first(tmp_path):
    """A checkpoint's backend is read from its run's hparams.yaml, so ``evaluate`` / ``export``
    of an Unsloth-trained run import Unsloth before transformers, as ``fit`` does."""
    for backend in ("unsloth", "hf"):
        run = tmp_path / backend / "amzft" / "version_0"
        (run / "checkpoints").mkdir(parents=True)
        (run / "hparams.yaml").write_text(f"backend: {backend}\nlora_r: 16\n")
        ckpt = str(run / "checkpoints" / "last.ckpt")
        for command in ("evaluate", "export", "ask"):
            assert wants_unsloth([command, "--ckpt_path", ckpt]) is (backend == "unsloth")
        assert not wants_unsloth(["evaluate", "--ckpt_path", ckpt, "--model.backend", "hf"])


@pytest.mark.e2e
def test_gpu_check_command_lines_are_valid_on_cpu(tiny_model_dir, tmp_path):
    """gpu/check.py cannot run here, but its amzft command lines (a config + the run's options +
    the measuring callback) can: hf+nf4 and configs/full.yaml's large-batch run go through on the
    tiny model on CPU; the Liger and Unsloth runs stop at their one-line CUDA errors."""
    sys.path.insert(0, str(REPO / "gpu"))
    import check  # noqa: PLC0415 - gpu/ is put on sys.path just above

    cpu = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true"]

    def run(name: str, steps: int, *more: str) -> dict:
        _, config, options = check.RUNS[name]
        return check.run_amzft(name, tiny_model_dir, str(shipped_sample()), tmp_path, steps, [*options, *cpu, *more],
                               config=config)

    # Each run is its own process: two at a time (the cores a CPU test machine has).
    runs = [("hf-plain", 3), ("large-batch", 4, "--model.backend", "hf")]  # large: 4 steps of 16 rows, past the sample's first epoch
    if not torch.cuda.is_available():
        runs += [("hf", 1), ("base.yaml", 1)]
    with ThreadPoolExecutor(2) as pool:
        result, large, *errors = pool.map(lambda args: run(*args), runs)
    assert "error" not in result, result.get("error")
    assert result["steps"] == 3 and result["tokens_per_s"] > 0
    assert "error" not in large, large.get("error")
    assert large["steps"] == 4 and large["tokens"] > result["tokens"]
    if not torch.cuda.is_available():
        assert "model.compute.kernels=liger needs a CUDA GPU" in errors[0]["error"]
        assert "needs a CUDA GPU" in errors[1]["error"]


def test_liger_kernels_on_cpu_are_one_line(tiny_model_dir, tiny_data, tmp_path, capsys):
    """model.compute.kernels=liger needs CUDA and the optional liger-kernel package: on this CPU a
    one-line error that names the option and the fix, before any weights load."""
    err = one_line_error(capsys, *fit_args(tiny_model_dir, tiny_data, tmp_path, "--trainer.max_steps", "1",
                                          "--model.compute.kernels", "liger"))
    assert "model.compute.kernels=liger needs a CUDA GPU" in err and "pip install liger-kernel" in err
    err = one_line_error(capsys, *fit_args(tiny_model_dir, tiny_data, tmp_path, "--model.backend", "unsloth",
                                          "--model.compute.kernels", "liger"))
    assert "model.compute.kernels=liger works with backend hf only" in err


def _fake_liger(monkeypatch) -> dict:
    """liger_kernel stand-ins with Liger's call signatures and plain-torch maths: what amzft
    hands Liger can be checked on CPU (the kernels themselves: tests/test_gpu.py)."""
    calls = {}

    def apply_liger_kernel_to_llama(**kwargs):
        calls["apply"] = kwargs

    def liger_fused_linear_cross_entropy(input, weight, target, bias=None, reduction="mean"):
        calls["fused"] = (input.shape, weight, reduction)
        logits = torch.nn.functional.linear(input, weight, bias).float()
        return torch.nn.functional.cross_entropy(logits, target, reduction=reduction)

    names = {"liger_kernel": {}, "liger_kernel.transformers": {"apply_liger_kernel_to_llama": apply_liger_kernel_to_llama},
             "liger_kernel.transformers.functional": {"liger_fused_linear_cross_entropy": liger_fused_linear_cross_entropy}}
    for name, attrs in names.items():
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def test_liger_is_applied_to_the_base_and_its_fused_loss_gets_the_label_rows(tiny_model_dir, batch, monkeypatch):
    calls = _fake_liger(monkeypatch)
    settings = amzft.model.backends.LoraSettings(name_or_path=str(tiny_model_dir), kernels="liger", device="cuda:0")
    model, _ = amzft.model.backends.build_hf(settings)
    assert calls["apply"]["model"] is model.get_base_model()  # the base, before the adapters went on
    assert {k: v for k, v in calls["apply"].items() if k != "model"} == dict(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    fused, n = token_loss_sum(model, batch, plain_head=True, chunk=4, fused=True)
    shape, weight, reduction = calls["fused"]
    assert shape[0] == n and weight is model.get_base_model().get_output_embeddings().weight and reduction == "sum"
    plain, _ = token_loss_sum(model, batch, plain_head=True, chunk=4)
    torch.testing.assert_close(fused, plain)
    with pytest.raises(amzft.model.backends.ConfigError, match=r"needs a CUDA GPU and the liger-kernel package \(no CUDA device here\)"):
        amzft.model.backends.build_hf(amzft.model.backends.LoraSettings(name_or_path=str(tiny_model_dir), kernels="liger"))
