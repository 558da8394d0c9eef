"""Export a checkpoint's adapter for use without amzft.

* adapter: ``adapter_config.json`` + ``adapter_model.safetensors`` (+ tokenizer), loadable
  with ``peft.PeftModel.from_pretrained(base, DIR)``;
* merged (``--merge``): LoRA folded into the base weights, a plain transformers model in
  safetensors that ``AutoModelForCausalLM.from_pretrained(DIR)`` loads without peft.

Both also get ``amzft_prompt.json``: the prompt the model was trained on, needed to ask it.
A base folder saved in 4-bit (bitsandbytes, e.g. the seed's ``…-bnb-4bit``) is dequantised
for exports (``full_precision_module``): the merged weights are the 4-bit base's, dequantised,
not the original full-precision model's, and ``amzft_base.json`` says so.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from amzft.backends import prequantized
from amzft.checkpoints import load_checkpoint_file
from amzft.data.prompt import PromptFormat
from amzft.model import LoraCausalLM
from amzft.paths import staging_dir

DEQUANTIZED_NOTE = "weights are the 4-bit base's, dequantized (not the original full-precision model's)"


def full_precision_module(ckpt_path: str) -> tuple[LoraCausalLM, PromptFormat, str | None]:
    """The checkpoint's module on a full-precision base, built with transformers: what merged
    (and GGUF) exports fold LoRA into. The adapter's weights do not depend on how the base was
    loaded, so an adapter trained on a 4-bit base (nf4 or Unsloth) exports on a machine without
    a GPU, and a merged model is a plain model (merging into 4-bit weights would round the LoRA
    update away and need bitsandbytes to load). A base folder saved in 4-bit has no
    full-precision weights to offer: it is dequantised, and the third value is a note saying so
    (None otherwise)."""
    hparams = load_checkpoint_file(ckpt_path)["hyper_parameters"]
    saved_4bit = prequantized(str(hparams.get("name_or_path", "embedded"))) is not None
    module, fmt = LoraCausalLM.from_checkpoint(ckpt_path, backend="hf", quantization="none", dequantize_base=saved_4bit)
    return module, fmt, DEQUANTIZED_NOTE if saved_4bit else None


def export(ckpt_path: str, out: str | Path, merge: bool = False) -> Path:
    module, fmt, note = full_precision_module(ckpt_path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary sibling, then move into place: no half-written export on failure.
    tmp = staging_dir(out.parent, f".{out.name}-")
    try:
        if merge:
            merged = module.model.merge_and_unload()
            merged.save_pretrained(tmp, safe_serialization=True)
        else:
            module.model.save_pretrained(tmp, safe_serialization=True)
        module.tokenizer.save_pretrained(tmp)
        (tmp / "amzft_prompt.json").write_text(json.dumps(asdict(fmt), indent=1))
        if note and merge:
            base = {"base": module.hparams.name_or_path, "dequantized_from": "bitsandbytes 4-bit", "note": note}
            (tmp / "amzft_base.json").write_text(json.dumps(base, indent=1))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
