"""A merged model as one llama.cpp GGUF file, and an Ollama ``Modelfile`` beside it.

Written with the ``gguf`` package (llama.cpp's gguf-py: writer, constants, tensor-name map,
Q8_0 quantiser), following what llama.cpp's ``convert_hf_to_gguf.py`` does for a Llama model
with a byte-level BPE ("gpt2") vocabulary:

* Q and K projections are permuted into the rotary layout llama.cpp uses (transformers'
  GGUF reader undoes it);
* 1-D tensors (norms) stay F32, the matrices become F16 or Q8_0 (a matrix whose rows do not
  split into Q8_0 blocks of 32 stays F16);
* a tied ``lm_head`` is not written: llama.cpp (and transformers) fall back to ``token_embd``;
* the tokenizer goes in whole (tokens, types, merges, BOS / EOS / pad ids, whether BOS is
  added, the pre-tokenizer's name) with the chat template that renders the training prompt.
"""

from __future__ import annotations

import json
import math
from hashlib import sha256
from pathlib import Path

import gguf
import torch

from amzft.data.prompt import PromptFormat, adds_bos
from amzft.errors import ConfigError, ModelError
from amzft.model.decoding import DEFAULT_DECODING, GenerationOptions

SUPPORTED_MODEL_TYPES = ("llama",)  # config.model_type: SmolLM2 and Llama-3.x are "llama"
GGUF_TYPES = {
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# llama.cpp picks its pre-tokenizer (the regex that splits text before BPE) by name. Its
# converter names it from a hash of the ids the tokenizer gives for this text; these are the
# converter's hashes for the tokenizers amzft trains with (a tokenizer not listed here could
# be split differently by llama.cpp than in training, so it is refused).
_PRE_TOKENIZER_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama-3.x
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def check_supported(config) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"GGUF export supports Llama-family models (model_type {', '.join(SUPPORTED_MODEL_TYPES)}); "
            f"this model is {config.model_type!r}: export --format merged instead"
        )


def pre_tokenizer_name(tokenizer) -> str:
    digest = sha256(str(tokenizer.encode(_PRE_TOKENIZER_PROBE)).encode()).hexdigest()
    if digest not in _PRE_TOKENIZERS:
        raise ModelError(
            f"GGUF export: this tokenizer's pre-tokenizer is not one llama.cpp is known to reproduce "
            f"(hash {digest[:12]}…; known: {', '.join(sorted(set(_PRE_TOKENIZERS.values())))})"
        )
    return _PRE_TOKENIZERS[digest]


def _rope(config) -> tuple[float, dict]:
    # transformers 5 keeps theta and scaling in rope_parameters; 4.x in rope_theta / rope_scaling.
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))), rope


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_hparams(writer: gguf.GGUFWriter, config, file_type: gguf.LlamaFileType) -> None:
    head_dim = _head_dim(config)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta, rope = _rope(config)
    writer.add_rope_freq_base(theta)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind not in ("default", "llama3"):  # llama3: a rope_freqs tensor (_llama3_rope_factors)
        raise ModelError(f"GGUF export: rope scaling {kind!r} is not supported (default, linear, llama3 are)")
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _llama3_rope_factors(config) -> torch.Tensor | None:
    """Llama-3.1+ scales the rotary frequencies; llama.cpp reads the per-frequency factors from a
    ``rope_freqs`` tensor (the same formula as transformers' llama3 rope)."""
    theta, rope = _rope(config)
    if rope.get("rope_type") != "llama3":
        return None
    dim = _head_dim(config)
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _token_list(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id with llama.cpp's types: special added tokens are CONTROL (never produced by
    splitting text), other added tokens USER_DEFINED, ids the tokenizer lacks UNUSED."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ModelError(f"GGUF export: the tokenizer has id {max(by_id)}, beyond the model's vocab_size {vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _merges(tokenizer) -> list[str]:
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise ModelError(f"GGUF export supports byte-level BPE tokenizers; this one is {model.get('type')!r}")
    # tokenizers >= 0.20 stores a merge as a pair, older ones as "a b"; GGUF wants "a b".
    return [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, prompt_format: PromptFormat) -> None:
    tokens, types = _token_list(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tokenizer))
    bos = adds_bos(tokenizer)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    # The EOS the model was trained to end answers with (for SmolLM2 <|im_end|>, which amzft
    # sets: the GGUF the embedded model comes from names another one).
    writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(bos)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(prompt_format.chat_template(bos_token=bos))


def _permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    # transformers stores each head's rotary halves as [first half | second half]; llama.cpp
    # wants them interleaved pairwise (the converter's LlamaModel.permute).
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensors(model, config):
    """(GGUF name, float32 tensor) for every weight, in llama.cpp's layout."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    if (factors := _llama3_rope_factors(config)) is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ModelError(f"GGUF export: no llama.cpp name for the tensor {name!r}")
        tensor = tensor.detach().to(torch.float32).cpu()
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = _permute(tensor, n_head)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = _permute(tensor, n_kv)
        yield new_name, tensor


def _add_tensors(writer: gguf.GGUFWriter, model, config, qtype: gguf.GGMLQuantizationType) -> None:
    for name, tensor in _tensors(model, config):
        data = tensor.numpy()
        dtype = gguf.GGMLQuantizationType.F32 if data.ndim <= 1 or name.endswith("_norm.weight") else qtype
        try:
            data = gguf.quants.quantize(data, dtype)
        except gguf.QuantError:  # rows not a multiple of the Q8_0 block: F16, as the converter does
            dtype = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(data, dtype)
        writer.add_tensor(name, data, raw_dtype=dtype)


def write_gguf(model, tokenizer, prompt_format: PromptFormat, path: Path, gguf_type: str = "f16", name: str = "amzft") -> Path:
    """Write ``model`` (a merged transformers Llama) and its tokenizer as one GGUF file."""
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--gguf_type takes {', '.join(GGUF_TYPES)}; found {gguf_type!r}")
    config = model.config
    check_supported(config)
    qtype, file_type = GGUF_TYPES[gguf_type]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        _add_hparams(writer, config, file_type)
        _add_tokenizer(writer, tokenizer, config.vocab_size, prompt_format)
        _add_tensors(writer, model, config, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def modelfile(gguf_name: str, prompt_format: PromptFormat, eos_token: str, options: GenerationOptions = DEFAULT_DECODING) -> str:
    """An Ollama Modelfile: the GGUF beside it, the training prompt, amzft's decoding (greedy,
    its repetition penalty), stop at EOS."""
    template = prompt_format.ollama_template()
    if '"""' in template:
        raise ConfigError('the prompt template contains """, which an Ollama Modelfile cannot quote')
    lines = [
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template}"""',
        f"PARAMETER stop {json.dumps(eos_token)}",
        "PARAMETER temperature 0",
        f"PARAMETER num_predict {options.max_new_tokens}",
        # Written even at 1.0: Ollama's own default is 1.1. Over the whole context (-1), as
        # transformers applies it, not llama.cpp's default last 64 tokens.
        f"PARAMETER repeat_penalty {options.repetition_penalty:g}",
        "PARAMETER repeat_last_n -1",
    ]
    lines += [f"# {setting} (amzft's decoding) is not applied here: {why}" for setting, why in not_in_modelfile(options)]
    return "\n".join([*lines, ""])


def not_in_modelfile(options: GenerationOptions) -> list[tuple[str, str]]:
    """The settings of ``options`` an Ollama Modelfile cannot carry, each with why: the
    Modelfile says them in comments and ``export`` prints them, rather than dropping them silently."""
    missing = []
    if options.no_repeat_ngram_size:
        missing.append((f"no_repeat_ngram_size {options.no_repeat_ngram_size}", "llama.cpp and Ollama have no n-gram ban"))
    if options.length_decay:
        missing.append((f"length_decay_start {options.length_decay_start} / factor {options.length_decay_factor:g}",
                        "Ollama has no length decay; num_predict caps the answer"))
    return missing


def export_gguf(model, tokenizer, prompt_format: PromptFormat, out_dir: Path, gguf_type: str,
                options: GenerationOptions = DEFAULT_DECODING) -> Path:
    """``amzft-<type>.gguf`` and ``Modelfile`` (decoding with ``options``) in ``out_dir``; returns the GGUF's path."""
    gguf_name = f"amzft-{gguf_type}.gguf"
    path = write_gguf(model, tokenizer, prompt_format, out_dir / gguf_name, gguf_type)
    (out_dir / "Modelfile").write_text(modelfile(gguf_name, prompt_format, tokenizer.eos_token, options))
    return path

