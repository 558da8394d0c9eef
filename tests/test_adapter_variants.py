"""Adapter variants: DoRA and rsLoRA (peft's switches) and NEFTune noise on the input embeddings.
Each changes training; resume is exact and exports reproduce the module's logits with them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from amzft.inference.load import load_answerer
from amzft.model.module import LoraCausalLM
from helpers import RecordSteps, exports_give_the_logits, fit_args, one_line_error, run_fit, straight_and_resumed, tiny_records

IDS = torch.tensor([[128000, 791, 8415, 7731, 389, 279, 5634]])
VARIANTS = {
    "dora": ("--model.lora.use_dora", "true"),
    "rslora": ("--model.lora.use_rslora", "true"),
    "neftune": ("--model.neftune_alpha", "5"),
}


def _adapter(cli) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in cli.model.model.named_parameters() if p.requires_grad}


def test_each_variant_changes_training(tiny_model_dir, write_jsonl, tmp_path):
    data = write_jsonl(tiny_records(12))
    runs = {}
    for name, extra in {"plain": (), **VARIANTS}.items():
        steps = RecordSteps()
        # No warm-up: the first step (lr 0 under warm-up) must already move the adapter.
        cli = run_fit(fit_args(tiny_model_dir, data, tmp_path / name, "--trainer.max_steps", "2", "--model.optim.warmup_steps", "0",
                               *extra), steps)
        runs[name] = steps.losses, _adapter(cli)
    plain_losses, plain_adapter = runs["plain"]
    for name in VARIANTS:
        losses, adapter = runs[name]
        assert losses[1] != plain_losses[1], name
        if name == "neftune":
            assert losses[0] != plain_losses[0]  # noisy embeddings from the first step
            assert adapter.keys() == plain_adapter.keys()
        elif name == "dora":
            assert any("lora_magnitude_vector" in k for k in adapter)  # DoRA's extra trainable tensors
        else:
            assert losses[0] == plain_losses[0]  # B = 0 at the start: the scale shows from step 2
        assert any(not torch.equal(adapter[k], plain_adapter[k]) for k in plain_adapter), name


def test_neftune_noise_is_for_training_only(tiny_model_dir):
    module = LoraCausalLM(name_or_path=str(tiny_model_dir), neftune_alpha=5.0)
    module.configure_model()
    embeddings = module.model.get_input_embeddings()
    clean = torch.nn.functional.embedding(IDS, embeddings.weight)
    module.eval()
    assert torch.equal(embeddings(IDS), clean)
    module.train()
    noise = embeddings(IDS) - clean
    bound = 5.0 / math.sqrt(IDS.shape[1] * clean.shape[-1])
    assert noise.abs().max() <= bound and noise.abs().max() > bound / 2
    module._neftune.reseed(step=3, micro_batch=0)
    first = embeddings(IDS)
    module._neftune.reseed(step=3, micro_batch=0)
    assert torch.equal(embeddings(IDS), first)  # the same step's noise again, as on resume


def test_variants_resume_exactly_and_export(tiny_model_dir, write_jsonl, tmp_path):
    """All three together: a run stopped after step 1 and resumed repeats the straight run's
    losses and adapter bit for bit (NEFTune's noise is seeded per step, not from the global
    RNG, which Lightning does not restore); the adapter and merged exports then give the
    module's logits."""
    data = write_jsonl(tiny_records(12))
    common = ("--trainer.max_steps", "3", *VARIANTS["dora"], *VARIANTS["rslora"], *VARIANTS["neftune"])
    straight, done, resumed, again = straight_and_resumed(tiny_model_dir, data, tmp_path, 1, *common)
    assert resumed.losses == straight.losses[1:]
    a, b = _adapter(done), _adapter(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    ckpt = next((tmp_path / "b").rglob("last.ckpt"))
    loaded = load_answerer(ckpt)
    module, _ = loaded.module, loaded.prompt
    assert module.lora.use_dora and module.lora.use_rslora and module.hparams.neftune_alpha == 5
    with torch.no_grad():  # eval mode: no noise
        expected = module.model(input_ids=IDS).logits
        straight_module = done.model.eval()
        assert torch.equal(straight_module.model(input_ids=IDS).logits, expected)

    exports_give_the_logits(ckpt, IDS, expected, tmp_path)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] and config["use_rslora"]


@pytest.mark.parametrize(("extra", "message"), [
    (("--model.neftune_alpha", "-1"), "model.neftune_alpha must be >= 0"),
    (("--model.lora.use_dora", "true", "--model.backend", "unsloth"), "model.lora.use_dora works with backend hf only"),
])
def test_bad_variant_settings_are_one_line(tiny_model_dir, tiny_data, tmp_path, capsys, extra, message):
    assert message in one_line_error(capsys, *fit_args(tiny_model_dir, tiny_data, tmp_path, *extra))
