"""A merged model as one llama.cpp GGUF file (with the ``gguf`` package, as llama.cpp's
``convert_hf_to_gguf.py`` does for a Llama with a byte-level BPE vocabulary) and an Ollama ``Modelfile``."""

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
GGUF_TYPES = {"f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
              "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}

# llama.cpp picks its pre-tokenizer (the regex splitting text before BPE) by a name its converter
# derives from the hash of this text's ids; a tokenizer not listed could be split unlike in training.
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
        raise ModelError(f"GGUF export supports Llama-family models (model_type {', '.join(SUPPORTED_MODEL_TYPES)}); "
                         f"this model is {config.model_type!r}: export --format merged instead")


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
    """Llama-3.1+'s rotary frequency factors (transformers' llama3 rope) as llama.cpp's ``rope_freqs`` tensor."""
    theta, rope = _rope(config)
    if rope.get("rope_type") != "llama3":
        return None
    dim = _head_dim(config)
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / freqs.double()
    smooth = (old_context / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_context / low, factor, 1 / ((1 - smooth) / factor + smooth))
    return torch.where(wavelen < old_context / high, 1.0, scaled).float()


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, prompt_format: PromptFormat) -> None:
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ModelError(f"GGUF export: the tokenizer has id {max(by_id)}, beyond the model's vocab_size {vocab_size}")
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise ModelError(f"GGUF export supports byte-level BPE tokenizers; this one is {model.get('type')!r}")
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    digest = sha256(str(tokenizer.encode(_PRE_TOKENIZER_PROBE)).encode()).hexdigest()
    if digest not in _PRE_TOKENIZERS:
        raise ModelError(f"GGUF export: this tokenizer's pre-tokenizer is not one llama.cpp is known to reproduce "
                         f"(hash {digest[:12]}…; known: {', '.join(sorted(set(_PRE_TOKENIZERS.values())))})")
    writer.add_tokenizer_pre(_PRE_TOKENIZERS[digest])
    writer.add_token_list([by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    # Special added tokens are CONTROL (never produced by splitting text), other added ones USER_DEFINED.
    added, kind = tokenizer.added_tokens_decoder, gguf.TokenType
    writer.add_token_types([kind.UNUSED if i not in by_id else kind.NORMAL if i not in added
                            else kind.CONTROL if added[i].special else kind.USER_DEFINED for i in range(vocab_size)])
    # tokenizers >= 0.20 stores a merge as a pair, older ones as "a b"; GGUF wants "a b".
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    bos = adds_bos(tokenizer)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    # The EOS the model was trained to end answers with (SmolLM2: amzft's <|im_end|>, not its GGUF's own).
    writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(bos)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(prompt_format.chat_template(bos_token=bos))


def _permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    # Each head's rotary halves [first | second] (transformers) interleaved pairwise (llama.cpp's LlamaModel.permute).
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensors(model, config):
    """(GGUF name, float32 tensor) for every weight, in llama.cpp's layout."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    if (factors := _llama3_rope_factors(config)) is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors
    for name, tensor in model.state_dict().items():
        # A tied lm_head is left out: llama.cpp (and transformers) fall back to token_embd.
        if (name == "lm_head.weight" and config.tie_word_embeddings) or name.endswith("rotary_emb.inv_freq"):
            continue
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ModelError(f"GGUF export: no llama.cpp name for the tensor {name!r}")
        tensor = tensor.detach().to(torch.float32).cpu()
        if name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            tensor = _permute(tensor, n_head if ".q_proj." in name else n_kv)
        yield new_name, tensor


def _add_tensors(writer: gguf.GGUFWriter, model, config, qtype: gguf.GGMLQuantizationType) -> None:
    for name, tensor in _tensors(model, config):
        data = tensor.numpy()  # norms (1-D) stay F32, matrices become qtype
        dtype = gguf.GGMLQuantizationType.F32 if data.ndim <= 1 or name.endswith("_norm.weight") else qtype
        try:
            data = gguf.quants.quantize(data, dtype)
        except gguf.QuantError:  # rows not a multiple of the Q8_0 block: F16, as the converter does
            dtype = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(data, dtype)
        writer.add_tensor(name, data, raw_dtype=dtype)


def modelfile(gguf_name: str, prompt_format: PromptFormat, eos_token: str, options: GenerationOptions = DEFAULT_DECODING) -> str:
    """An Ollama Modelfile: the GGUF beside it, the training prompt, amzft's greedy decoding, stop at EOS."""
    template = prompt_format.ollama_template()
    if '"""' in template:
        raise ConfigError('the prompt template contains """, which an Ollama Modelfile cannot quote')
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""', f"PARAMETER stop {json.dumps(eos_token)}",
             "PARAMETER temperature 0", f"PARAMETER num_predict {options.max_new_tokens}",
             # Even at 1.0 (Ollama's default is 1.1), and over the whole context as transformers applies it.
             f"PARAMETER repeat_penalty {options.repetition_penalty:g}", "PARAMETER repeat_last_n -1"]
    lines += [f"# {setting} (amzft's decoding) is not applied here: {why}" for setting, why in not_in_modelfile(options)]
    return "\n".join([*lines, ""])


def not_in_modelfile(options: GenerationOptions) -> list[tuple[str, str]]:
    """The settings of ``options`` a Modelfile cannot carry, with why (said in it and by ``export``, not dropped)."""
    missing = []
    if options.no_repeat_ngram_size:
        missing.append((f"no_repeat_ngram_size {options.no_repeat_ngram_size}", "llama.cpp and Ollama have no n-gram ban"))
    if options.length_decay:
        missing.append((f"length_decay_start {options.length_decay_start} / factor {options.length_decay_factor:g}",
                        "Ollama has no length decay; num_predict caps the answer"))
    return missing


def export_gguf(model, tokenizer, prompt_format: PromptFormat, out_dir: Path, gguf_type: str,
                options: GenerationOptions = DEFAULT_DECODING) -> Path:
    """A merged Llama (``check_supported``) as ``out_dir/amzft-<type>.gguf``, beside its ``Modelfile``."""
    gguf_name, config = f"amzft-{gguf_type}.gguf", model.config
    qtype, file_type = GGUF_TYPES[gguf_type]
    writer = gguf.GGUFWriter(out_dir / gguf_name, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name("amzft")
        _add_hparams(writer, config, file_type)
        _add_tokenizer(writer, tokenizer, config.vocab_size, prompt_format)
        _add_tensors(writer, model, config, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    (out_dir / "Modelfile").write_text(modelfile(gguf_name, prompt_format, tokenizer.eos_token, options))
    return out_dir / gguf_name

