"""A base folder saved already in 4-bit (config.json with a bitsandbytes quantization_config),
as the seed's ``unsloth/Llama-3.2-1B-Instruct-bnb-4bit``: with ``backend: hf`` it trains in
4-bit as saved (no second quantisation), resumes exactly, evaluates, and exports dequantised."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from amzft.cli.main import main
from amzft.inference.load import DEQUANTIZED_NOTE, load_answerer
from amzft.model.module import LoraCausalLM
from amzft.model.settings import ComputeOptions
from helpers import fit_args, one_line_error, straight_and_resumed, tiny_records

IDS = torch.tensor([[128000, 791, 8415, 7731, 389, 279, 5634]])


@pytest.fixture(scope="session")
def prequantized_dir(tiny_model_dir, tmp_path_factory, llama_tokenizer):
    """The tiny Llama quantised by bitsandbytes on CPU (NF4, double quantisation, bf16 compute:
    the seed folder's settings) and saved with save_pretrained, as Unsloth publishes its folders."""
    directory = tmp_path_factory.mktemp("tiny-llama-bnb-4bit")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quantization, dtype=torch.bfloat16,
                                                 device_map={"": "cpu"})
    model.save_pretrained(directory)
    llama_tokenizer.save_pretrained(directory)
    assert json.loads((directory / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    return directory


def _four_bit(model) -> list:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_prequantized_folder_trains_in_4bit_as_saved(prequantized_dir):
    """Default settings (quantization none) and nf4 both load the folder's own 4-bit weights:
    the packed weights and quantisation constants are the folder's, bit for bit (a second
    quantisation would change them), with LoRA on top and the CPU workaround applied."""
    saved = _four_bit(AutoModelForCausalLM.from_pretrained(prequantized_dir, device_map={"": "cpu"}))
    for quantization in ("none", "nf4"):
        module = LoraCausalLM(name_or_path=str(prequantized_dir), compute=ComputeOptions(quantization=quantization))
        module.configure_model()
        loaded = _four_bit(module.model)
        assert len(loaded) == len(saved) == 2 * 7
        for a, b in zip(loaded, saved):
            assert torch.equal(a.weight.data, b.weight.data)
            assert torch.equal(a.weight.quant_state.absmax, b.weight.quant_state.absmax)
            assert a.weight.quant_state.nested and torch.equal(a.weight.quant_state.state2.absmax, b.weight.quant_state.state2.absmax)
            assert a.support_avx512bf16_for_cpu is False
        trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)


def test_other_quantisation_methods_are_one_line(prequantized_dir, tmp_path, capsys, write_jsonl):
    folder = tmp_path / "gptq"
    folder.mkdir()
    config = json.loads((prequantized_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((prequantized_dir / name).read_bytes())
    err = one_line_error(capsys, *fit_args(folder, write_jsonl(tiny_records(4)), tmp_path, "--trainer.max_steps", "1"))
    assert "quantised with gptq" in err and "bitsandbytes 4-bit" in err


def test_prequantized_fit_resumes_exactly_evaluates_and_exports_dequantized(prequantized_dir, write_jsonl, tmp_path, capsys):
    data = write_jsonl(tiny_records(20))
    common = ("--trainer.max_steps", "3", "--data.holdout.test_fraction", "0.2")
    straight, _, resumed, _ = straight_and_resumed(prequantized_dir, data, tmp_path, 1, *common)
    assert resumed.losses == straight.losses[1:]
    ckpt = next((tmp_path / "b").rglob("last.ckpt"))

    main(["evaluate", "--ckpt_path", str(ckpt), "--samples", "2", "--gen.max_new_tokens", "3"])
    report = json.loads((ckpt.parent.parent / "report.json").read_text())
    assert set(report["splits"]) == {"train", "test"}

    # A non-trivial adapter, so that a wrong merge shows.
    loaded = load_answerer(ckpt)
    module, _ = loaded.module, loaded.prompt
    assert len(_four_bit(module.model)) == 14
    with torch.no_grad():
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
        expected = module.model(input_ids=IDS).logits
    adapter = {f"model.{k}": v for k, v in module.model.named_parameters() if v.requires_grad}
    torch.save({**torch.load(ckpt, weights_only=True), "state_dict": adapter}, ckpt)

    # The dequantised base holds exactly the weights the 4-bit layers compute with.
    full_answerer = load_answerer(str(ckpt), full_precision=True)
    full, note = full_answerer.module, full_answerer.note
    assert note == DEQUANTIZED_NOTE and not _four_bit(full.model)
    layer = _four_bit(module.model)[0]
    dequantized = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    assert torch.equal(full.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight, dequantized)

    capsys.readouterr()
    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "merged"), "--merge", "true"])
    assert DEQUANTIZED_NOTE in capsys.readouterr().out
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    assert json.loads((tmp_path / "merged" / "amzft_base.json").read_text())["note"] == DEQUANTIZED_NOTE
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain transformers, no bitsandbytes
    assert not _four_bit(merged) and merged.dtype == torch.float32
    with torch.no_grad():
        got = merged(input_ids=IDS).logits
    # The module computes the 4-bit layers in bf16, the merged model in fp32: measured max
    # difference 0.002 on logits of magnitude ~0.6 (the tiny model).
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-2)
    assert (got - expected).abs().max() > 0  # not the same computation: the bound is a real bound

    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "adapter")])
    assert not (tmp_path / "adapter" / "amzft_base.json").exists()  # the adapter goes on the 4-bit folder as trained
