"""The base model alone, for answers without an adapter (``ask`` without a checkpoint).

Building a ``LoraCausalLM`` imports Lightning and peft (with bitsandbytes) and wraps every
targeted projection in an adapter whose B matrix starts at zero: the answers are the base
model's, bit for bit, after seconds of imports a person waits for. When the model options ask
for nothing a plain transformers model lacks (the ``hf`` backend, a full-precision folder, no
4-bit, no Liger kernels), the base is loaded as such; otherwise the caller builds the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from amzft.errors import ModelError
from amzft.model.backends import prequantized
from amzft.model.sources import EMBEDDED, force_offline, load_tokenizer, resolve_model_dir


@dataclass
class PlainBase:
    """What ``amzft.inference.generate`` reads of a module: the model and its tokenizer."""

    model: Any
    tokenizer: Any


def _option(options: dict, key: str, default):
    value = options.get(key)
    return default if value is None else value


def plain_base(model_options: dict) -> PlainBase | None:
    """The base model of ``model_options`` (a config's ``model`` section) as a plain
    transformers model in fp32, or None when the options need the training module's loader."""
    compute = model_options.get("compute") or {}
    if (model_options.get("backend") or "hf") != "hf" or _option(compute, "quantization", "none") != "none" \
            or _option(compute, "kernels", "none") != "none":
        return None
    name = model_options.get("name_or_path") or EMBEDDED
    if prequantized(name) is not None:
        return None
    force_offline()
    directory = resolve_model_dir(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
    except Exception as exc:  # transformers raises many kinds here; the user needs one line
        raise ModelError(f"cannot load a causal LM from {directory}: {exc}") from exc
    return PlainBase(model.eval(), load_tokenizer(str(directory)))
