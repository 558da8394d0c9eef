"""GGUF + Ollama export, and the chat template every export carries.

The GGUF is checked with a real reader: transformers' GGUF loader (``gguf_file=``), which
undoes llama.cpp's Q/K permutation and de-quantises; its logits and greedy answers are
compared with the merged export's."""

import json
import shutil

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM

from amzft.cli.main import main
from amzft.data.encode import PromptEncoder
from amzft.data.prompt import PromptFormat, adds_bos, chat_template_for
from amzft.export.gguf import modelfile
from amzft.inference.load import load_answerer
from amzft.sources import load_tokenizer
from helpers import REPO, fit_args, fit_tiny_run, one_line_error, tiny_records

# Real-looking titles: digits, punctuation, braces, quotes, non-ASCII.
TITLES = [
    "Girls Ballet Tutu Neon Pink",
    "The Wall: Images and Offerings from the Vietnam Veterans Memorial",
    "Crayola 64 Ct Crayons {Assorted} \"Classic\" – Café Edition, 3-Pack",
]
ODD_FORMAT = PromptFormat(
    question="Describe {title}, please.",
    template='{{ literal }} "quoted" {% not a tag %}\nInstruction: {instruction}\nInput: {input}\nAnswer:',
    input_text="Amazon product",
)


def template_ids(tokenizer, fmt, title):
    out = tokenizer.apply_chat_template([{"role": "user", "content": fmt.question_for(title)}],
                                        add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def assert_template_matches_training(tokenizer):
    for fmt in (PromptFormat(), ODD_FORMAT):
        tokenizer.chat_template = chat_template_for(tokenizer, fmt)
        encode = PromptEncoder(tokenizer, fmt)  # the data pipeline's prompt tokenisation
        for title in TITLES:
            assert template_ids(tokenizer, fmt, title) == encode([title])[0], (fmt, title)
            text = tokenizer.apply_chat_template([{"role": "user", "content": fmt.question_for(title)}],
                                                 add_generation_prompt=True, tokenize=False)
            assert text == (tokenizer.bos_token if adds_bos(tokenizer) else "") + fmt.render(title)


def test_chat_template_gives_the_training_prompt_ids_llama32(llama_tokenizer):
    tokenizer = llama_tokenizer.__class__.from_pretrained(llama_tokenizer.name_or_path)
    assert_template_matches_training(tokenizer)
    # A prompt + answer conversation renders as a training example's text: prompt, answer, EOS.
    fmt = PromptFormat()
    tokenizer.chat_template = chat_template_for(tokenizer, fmt)
    chat = [{"role": "user", "content": fmt.question_for("Mug")}, {"role": "assistant", "content": "A mug."}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == tokenizer.bos_token + fmt.render("Mug") + "A mug." + tokenizer.eos_token


@pytest.mark.slow
def test_chat_template_gives_the_training_prompt_ids_embedded():
    assert_template_matches_training(load_tokenizer("embedded"))


def test_modelfile_renders_the_training_prompt():
    fmt = PromptFormat()
    text = modelfile("amzft-f16.gguf", fmt, "<|im_end|>")
    assert text.startswith("FROM ./amzft-f16.gguf\n")
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    # Go's text/template with .Prompt = the question reproduces render() (BOS comes from the GGUF).
    assert template.replace("{{ .Prompt }}", fmt.question_for("Mug")).replace("{{ .Response }}", "") == fmt.render("Mug")
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0" in text
    assert "PARAMETER num_predict 128" in text
    odd = modelfile("m.gguf", ODD_FORMAT, "</s>")
    assert '{{ "{{" }} literal }}' in odd  # a literal {{ is escaped for Go


@pytest.fixture(scope="module")
def exports(tiny_model_dir, tmp_path_factory):
    """A tiny trained run with a non-trivial adapter, exported as peft, merged, GGUF f16 and q8_0."""
    tmp = tmp_path_factory.mktemp("gguf")
    ckpt = fit_tiny_run(tiny_model_dir, tmp, "--trainer.max_steps", "2")
    loaded = load_answerer(ckpt)
    module, _ = loaded.module, loaded.prompt
    with torch.no_grad():  # make the adapter non-trivial so that a wrong export shows
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    adapter = {f"model.{k}": v for k, v in module.model.named_parameters() if v.requires_grad}
    torch.save({**torch.load(ckpt, weights_only=True), "state_dict": adapter}, ckpt)
    out = {"ckpt": ckpt, "fmt": PromptFormat()}
    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp / "peft")])
    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp / "merged"), "--format", "merged"])
    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp / "f16"), "--format", "gguf"])
    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp / "q8"), "--format", "gguf", "--gguf_type", "q8_0"])
    return out | {k: tmp / k for k in ("peft", "merged", "f16", "q8")}


@pytest.mark.e2e
def test_every_export_carries_the_training_chat_template(exports):
    fmt = exports["fmt"]
    for kind in ("peft", "merged"):
        tokenizer = AutoTokenizer.from_pretrained(exports[kind])
        encode = PromptEncoder(tokenizer, fmt)
        assert [template_ids(tokenizer, fmt, t) for t in TITLES] == encode(TITLES), kind
    for kind in ("f16", "q8"):
        reader = gguf.GGUFReader(next(exports[kind].glob("*.gguf")))
        assert reader.fields["tokenizer.chat_template"].contents() == fmt.chat_template(bos_token=True)
        assert (exports[kind] / "Modelfile").is_file() and (exports[kind] / "amzft_prompt.json").is_file()


@pytest.mark.e2e
def test_the_shared_tokenizer_keeps_its_template_after_exports(exports, tiny_model_dir):
    # One tokenizer per folder and process (load_tokenizer): the exports above put their chat
    # template on copies, so the shared one still has the folder's own (none for the tiny model).
    shared = load_tokenizer(str(tiny_model_dir))
    assert shared is load_tokenizer(str(tiny_model_dir))
    assert shared.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template


@pytest.mark.e2e
def test_gguf_carries_the_tokenizer(exports, llama_tokenizer):
    fields = gguf.GGUFReader(exports["f16"] / "amzft-f16.gguf").fields
    value = {k: f.contents() for k, f in fields.items() if k.startswith(("tokenizer.ggml.", "general.", "llama."))}
    assert value["general.architecture"] == "llama" and value["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert value["tokenizer.ggml.model"] == "gpt2" and value["tokenizer.ggml.pre"] == "llama-bpe"
    assert value["tokenizer.ggml.eos_token_id"] == llama_tokenizer.eos_token_id
    assert value["tokenizer.ggml.bos_token_id"] == llama_tokenizer.bos_token_id
    assert value["tokenizer.ggml.add_bos_token"] is True
    tokens = value["tokenizer.ggml.tokens"]
    assert len(tokens) == len(llama_tokenizer) and tokens[llama_tokenizer.eos_token_id] == llama_tokenizer.eos_token
    assert len(value["tokenizer.ggml.merges"]) > 200_000
    assert value["llama.block_count"] == 2 and value["llama.attention.head_count_kv"] == 2


def gguf_model(directory):
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=next(directory.glob("*.gguf")).name, dtype=torch.float32)


def greedy(model, tokenizer, fmt, titles, n=12):
    """Raw greedy tokens: explicit, since the merged export's generation_config.json carries
    amzft's default decoding (penalty, n-gram ban) and a GGUF read by transformers does not."""
    answers = []
    for title in titles:
        ids = torch.tensor([PromptEncoder(tokenizer, fmt)([title])[0]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        answers.append(out[0, ids.shape[1]:].tolist())
    return answers


@pytest.mark.e2e
def test_gguf_f16_and_q8_0_match_the_merged_export(exports):
    fmt = exports["fmt"]
    merged = AutoModelForCausalLM.from_pretrained(exports["merged"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(exports["merged"])
    ids = torch.tensor([PromptEncoder(tokenizer, fmt)([TITLES[1]])[0]])
    f16, q8 = gguf_model(exports["f16"]), gguf_model(exports["q8"])
    with torch.no_grad():
        expected = merged(input_ids=ids).logits
        scale = expected.abs().max()
        # Measured on this tiny model (largest logit error / largest logit): f16 1.7e-3, Q8_0 2.1e-2.
        assert (f16(input_ids=ids).logits - expected).abs().max() / scale < 5e-3
        assert (q8(input_ids=ids).logits - expected).abs().max() / scale < 5e-2
    want = greedy(merged, tokenizer, fmt, TITLES)
    # Q8_0 gave the same 12 greedy tokens on all three titles here; allow a late divergence.
    for got, ref in zip(greedy(q8, tokenizer, fmt, TITLES), want):
        assert got[:6] == ref[:6]
    assert greedy(f16, tokenizer, fmt, TITLES) == want


def test_gguf_export_of_another_architecture_is_one_line(llama_tokenizer, tmp_path, capsys):
    directory = tmp_path / "tiny-mistral"
    config = MistralConfig(vocab_size=len(llama_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, eos_token_id=llama_tokenizer.eos_token_id,
                           pad_token_id=llama_tokenizer.pad_token_id, bos_token_id=llama_tokenizer.bos_token_id)
    MistralForCausalLM(config).save_pretrained(directory)
    llama_tokenizer.save_pretrained(directory)
    data = tmp_path / "trn.json"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny_records(12)))
    main(fit_args(directory, data, tmp_path, "--trainer.max_steps", "1"))
    ckpt = next((tmp_path / "logs").rglob("last.ckpt"))
    err = one_line_error(capsys, "export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "g"), "--format", "gguf")
    assert "Llama-family" in err and "'mistral'" in err
    assert not (tmp_path / "g").exists()


@pytest.mark.e2e
def test_bad_format_and_gguf_type_are_one_line(exports, capsys, tmp_path):
    err = one_line_error(capsys, "export", "--ckpt_path", str(exports["ckpt"]), "--out", str(tmp_path / "x"), "--format", "onnx")
    assert "--format takes peft, merged, gguf" in err
    err = one_line_error(capsys, "export", "--ckpt_path", str(exports["ckpt"]), "--out", str(tmp_path / "x"),
                         "--format", "gguf", "--gguf_type", "q4_k")
    assert "--gguf_type takes f16, q8_0" in err
    shutil.rmtree(tmp_path / "x", ignore_errors=True)


@pytest.mark.slow
def test_embedded_gguf_answers_equal_the_merged_export(tmp_path):
    """The real SmolLM2: GGUF f16 read back by transformers answers as the merged export does."""
    data = tmp_path / "trn.json"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny_records(16)))
    main(["fit", "--config", str(REPO / "configs" / "cpu.yaml"), "--data.path", str(data),
          "--data.cache_dir", str(tmp_path / "cache"), "--data.holdout.val_fraction", "0", "--data.holdout.test_fraction", "0",
          "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path / "logs"),
          "--trainer.enable_progress_bar", "false"])
    ckpt = str(next((tmp_path / "logs").rglob("last.ckpt")))
    main(["export", "--ckpt_path", ckpt, "--out", str(tmp_path / "merged"), "--format", "merged"])
    main(["export", "--ckpt_path", ckpt, "--out", str(tmp_path / "f16"), "--format", "gguf"])
    fmt = PromptFormat()
    fields = gguf.GGUFReader(tmp_path / "f16" / "amzft-f16.gguf").fields
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 2  # <|im_end|>, not the source GGUF's <|im_start|>
    assert fields["tokenizer.ggml.pre"].contents() == "smollm" and fields["tokenizer.ggml.add_bos_token"].contents() is False
    merged_tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    gguf_tok = AutoTokenizer.from_pretrained(tmp_path / "f16", gguf_file="amzft-f16.gguf")
    # The GGUF's own tokenizer and chat template give the training prompt's ids.
    assert [template_ids(gguf_tok, fmt, t) for t in TITLES] == PromptEncoder(merged_tok, fmt)(TITLES)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert greedy(gguf_model(tmp_path / "f16"), merged_tok, fmt, TITLES, n=24) == greedy(merged, merged_tok, fmt, TITLES, n=24)
