"""Export a checkpoint for use without amzft: its PEFT adapter, a merged transformers model, or a
GGUF file with an Ollama Modelfile; each with amzft's decoding and the training prompt (chat template)."""

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
    # The tokenizer is shared in this process (amzft.sources.load_tokenizer): the template goes on a copy.
    module.tokenizer = copy.deepcopy(module.tokenizer)
    module.tokenizer.chat_template = chat_template_for(module.tokenizer, prompt)
    # generation_config.json: `model.generate(ids)` decodes as amzft does (peft, merged; GGUF: its Modelfile).
    decoding = copy.deepcopy(module.model.get_base_model().generation_config)
    decoding.update(**generation_config(options, module.tokenizer.eos_token_id, module.tokenizer.pad_token_id))
    out = Path(out)
    # Build in a temporary sibling, then move into place: no half-written export on failure.
    tmp = staging_dir(out.parent, f".{out.name}-")
    try:
        if fmt == "gguf":
            export_gguf(module.model.merge_and_unload(), module.tokenizer, prompt, tmp, gguf_type, options)
        else:
            model = module.model if fmt == "peft" else module.model.merge_and_unload()
            model.save_pretrained(tmp, safe_serialization=True)
            module.tokenizer.save_pretrained(tmp)
            decoding.save_pretrained(tmp)
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
