import contextlib
import inspect
import subprocess
import sys

import pytest
import torch
from transformers.integrations import sdpa_attention

from amzft.data.prompt import PromptFormat
from amzft.errors import ModelError
from amzft.inference.load import _base_module, load_answerer, plain_base
from amzft.model.generation import _gqa_sdpa_on_cpu, generate_answers
from amzft.model.module import LoraCausalLM

TITLES = ["Mug", "A much longer product title with many words in it", "Lamp"]


@pytest.fixture
def tiny_module(tiny_model_dir):
    m = LoraCausalLM(name_or_path=str(tiny_model_dir))
    m.configure_model()
    with torch.no_grad():  # a non-zero adapter, so adapter on / off differ
        for n, p in m.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return m


def test_batched_left_padded_generation_equals_one_by_one(tiny_module):
    fmt = PromptFormat()
    batched = generate_answers(tiny_module, TITLES, fmt, max_new_tokens=6, batch_size=8)
    single = [generate_answers(tiny_module, [t], fmt, max_new_tokens=6)[0] for t in TITLES]
    assert batched == single and all(batched)


def test_adapter_switch_gives_base_answers(tiny_module, tiny_model_dir):
    fmt = PromptFormat()
    tuned = generate_answers(tiny_module, TITLES, fmt, max_new_tokens=6)
    base = generate_answers(tiny_module, TITLES, fmt, max_new_tokens=6, use_adapter=False)
    plain = LoraCausalLM(name_or_path=str(tiny_model_dir))
    plain.configure_model()  # LoRA B starts at zero: the same function as the base model
    assert base == generate_answers(plain, TITLES, fmt, max_new_tokens=6)
    assert tuned != base


def test_generation_stops_at_eos(tiny_module):
    tok = tiny_module.tokenizer
    base = tiny_module.model.get_base_model()
    with torch.no_grad():  # make EOS the argmax everywhere: logits = embedding(eos) · h
        base.model.norm.weight.zero_()
        base.model.norm.weight[0] = 1.0
        base.lm_head.weight[:, 0] = 0.0
        base.lm_head.weight[tok.eos_token_id, 0] = 1.0
    for n, p in tiny_module.model.named_parameters():
        if "lora_B" in n:
            p.data.zero_()
    out = generate_answers(tiny_module, TITLES, PromptFormat(), max_new_tokens=20)
    assert out == ["", "", ""]


def test_checkpoint_errors_are_one_line(tmp_path, tiny_model_dir):
    with pytest.raises(ModelError, match="does not exist"):
        load_answerer(tmp_path / "missing.ckpt")
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelError, match="corrupt or not a checkpoint"):
        load_answerer(corrupt)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"name_or_path": str(tiny_model_dir), "lora_r": 8}}, other)
    with pytest.raises(ModelError, match="another base model or LoRA config"):
        load_answerer(other)


def test_shared_kv_heads_on_cpu_give_transformers_own_answers_and_logits(tiny_module, monkeypatch):
    """generate._gqa_sdpa_on_cpu replaces transformers' use_gqa_in_sdpa while generating (the
    tiny model has 4 query / 2 key-value heads): the patch point exists with the arguments it
    expects, is called, and a left-padded batch gives the same logits and answers as
    transformers' own repeat_kv path."""
    original = sdpa_attention.use_gqa_in_sdpa
    assert list(inspect.signature(original).parameters) == ["attention_mask", "key", "value"]
    tok, model = tiny_module.tokenizer, tiny_module.model
    batch = tok([PromptFormat().render(t) for t in TITLES], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        theirs = model(**batch).logits
        calls = []
        with _gqa_sdpa_on_cpu():
            patched = sdpa_attention.use_gqa_in_sdpa
            monkeypatch.setattr(sdpa_attention, "use_gqa_in_sdpa", lambda *a: calls.append(1) or patched(*a))
            ours = model(**batch).logits
        monkeypatch.setattr(sdpa_attention, "use_gqa_in_sdpa", original)
    assert calls and sdpa_attention.use_gqa_in_sdpa is original
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    fmt = PromptFormat()
    with_patch = generate_answers(tiny_module, TITLES, fmt, max_new_tokens=6, batch_size=8)
    monkeypatch.setattr("amzft.model.generation._gqa_sdpa_on_cpu", contextlib.nullcontext)
    assert generate_answers(tiny_module, TITLES, fmt, max_new_tokens=6, batch_size=8) == with_patch


def test_ask_without_a_checkpoint_answers_as_the_module_without_lightning_or_peft(tiny_model_dir):
    """`ask` with no checkpoint loads the base as a plain transformers model (amzft.inference.load.plain_base):
    the same answers as the training module with its untrained adapter, and neither Lightning
    nor peft imported (seconds of a cold start)."""
    fmt = PromptFormat()
    options = {"name_or_path": str(tiny_model_dir)}
    titles = ["Item 3 book", "A longer product title, with words"]
    plain = generate_answers(plain_base(options), titles, fmt, max_new_tokens=6, use_adapter=False)
    assert plain == generate_answers(_base_module(options), titles, fmt, max_new_tokens=6, use_adapter=False)
    assert plain_base(options | {"compute": {"quantization": "nf4"}}) is None  # 4-bit: the module's loader

    code = ("import sys; from amzft.cli.main import main; "
            f"main(['ask', 'Item 3 book', '--model.name_or_path', {str(tiny_model_dir)!r}, '--max_new_tokens', '6']); "
            "print('HEAVY', sorted(m for m in ('lightning', 'peft', 'bitsandbytes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "HEAVY []"
    assert f"A: {plain[0]}" in out
