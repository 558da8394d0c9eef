"""Export a checkpoint's adapter for use without amzft.

* adapter: ``adapter_config.json`` + ``adapter_model.safetensors`` (+ tokenizer), loadable
  with ``peft.PeftModel.from_pretrained(base, DIR)``;
* merged (``--merge``): LoRA folded into the base weights, a plain transformers model in
  safetensors that ``AutoModelForCausalLM.from_pretrained(DIR)`` loads without peft.

Both also get ``amzft_prompt.json``: the prompt the model was trained on, needed to ask it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from amzft.model import LoraCausalLM
from amzft.paths import staging_dir


def export(ckpt_path: str, out: str | Path, merge: bool = False) -> Path:
    # The adapter's weights do not depend on how the base was loaded, so exports always rebuild
    # it with transformers at full precision: an adapter trained on a 4-bit base (nf4 or
    # Unsloth) exports on a machine without a GPU, and a merged model is a plain model (merging
    # into 4-bit weights would round the LoRA update away and need bitsandbytes to load).
    module, fmt = LoraCausalLM.from_checkpoint(ckpt_path, backend="hf", quantization="none")
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
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
