"""Export a checkpoint's adapter for use without amzft.

* ``peft`` (default): ``adapter_config.json`` + ``adapter_model.safetensors`` (+ tokenizer),
  loadable with ``peft.PeftModel.from_pretrained(base, DIR)``;
* ``merged`` (``--merge true`` too): LoRA folded into the base weights, a plain transformers
  model in safetensors that ``AutoModelForCausalLM.from_pretrained(DIR)`` loads without peft;
* ``gguf``: the merged model as one llama.cpp GGUF file (f16 or q8_0) and an Ollama
  ``Modelfile`` (amzft.export.gguf).

Every export decodes as amzft does (``amzft.model.decoding``, ``DEFAULT_DECODING`` unless
``--decoding`` says otherwise): ``generation_config.json`` (peft, merged) holds the
transformers settings, so ``model.generate(ids)`` needs no arguments; the Modelfile holds the
repetition penalty (llama.cpp and Ollama have no ``no_repeat_ngram_size``).

Every export carries the prompt the model was trained on, needed to ask it: as the
tokenizer's chat template (``apply_chat_template`` on the question gives exactly the training
prompt's ids) and as ``amzft_prompt.json``. A base folder saved in 4-bit (bitsandbytes, e.g. the
Unsloth + TRL notebook's ``…-bnb-4bit``) is dequantised for exports (``load_answerer(..., full_precision=True)``):
merged and GGUF weights are the 4-bit base's, dequantised, not the original full-precision
model's, and ``amzft_base.json`` says so.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from amzft.data.prompt import chat_template_for
from amzft.errors import ConfigError
from amzft.export.gguf import GGUF_TYPES, check_supported, export_gguf
from amzft.files import staging_dir
from amzft.inference.load import load_answerer
from amzft.model.decoding import DEFAULT_DECODING, GenerationOptions, generation_config

FORMATS = ("peft", "merged", "gguf")


def _generation_config(module, options: GenerationOptions):
    """The base model's generation config with amzft's decoding on top (its EOS and pad ids)."""
    config = copy.deepcopy(module.model.get_base_model().generation_config)
    config.update(**generation_config(options, module.tokenizer.eos_token_id, module.tokenizer.pad_token_id))
    return config


def export(ckpt_path: str, out: str | Path, merge: bool = False, fmt: str | None = None, gguf_type: str = "f16",
           options: GenerationOptions = DEFAULT_DECODING) -> Path:
    fmt = fmt or ("merged" if merge else "peft")
    if fmt not in FORMATS:
        raise ConfigError(f"--format takes {', '.join(FORMATS)}; found {fmt!r}")
    if merge and fmt == "peft":
        raise ConfigError("--merge true contradicts --format peft: pass one of them")
    if fmt == "gguf" and gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--gguf_type takes {', '.join(GGUF_TYPES)}; found {gguf_type!r}")
    answerer = load_answerer(ckpt_path, full_precision=True)
    module, prompt, note = answerer.module, answerer.prompt, answerer.note
    if fmt == "gguf":
        check_supported(module.model.config)  # before minutes of work, not after
    # The tokenizer is shared in this process (amzft.sources.load_tokenizer): the export's
    # chat template goes on a copy.
    module.tokenizer = copy.deepcopy(module.tokenizer)
    module.tokenizer.chat_template = chat_template_for(module.tokenizer, prompt)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary sibling, then move into place: no half-written export on failure.
    tmp = staging_dir(out.parent, f".{out.name}-")
    try:
        if fmt == "peft":
            module.model.save_pretrained(tmp, safe_serialization=True)
            module.tokenizer.save_pretrained(tmp)
            _generation_config(module, options).save_pretrained(tmp)
        elif fmt == "merged":
            decoding = _generation_config(module, options)
            merged = module.model.merge_and_unload()
            merged.generation_config = decoding
            merged.save_pretrained(tmp, safe_serialization=True)
            module.tokenizer.save_pretrained(tmp)
        else:
            export_gguf(module.model.merge_and_unload(), module.tokenizer, prompt, tmp, gguf_type, options)
        (tmp / "amzft_prompt.json").write_text(json.dumps(asdict(prompt), indent=1))
        if note and fmt != "peft":  # an adapter holds no base weights: nothing was dequantised in it
            base = {"base": module.hparams.name_or_path, "dequantized_from": "bitsandbytes 4-bit", "note": note}
            (tmp / "amzft_base.json").write_text(json.dumps(base, indent=1))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
