"""What answers: a checkpoint's fine-tuned model or a base model, loaded the one way every command
(``ask``, ``evaluate``, ``export``, ``describe``, ``demo``) loads it.

``load_answerer`` reads a checkpoint once: the module (adapter loaded and checked, in eval mode), its
prompt format, optimizer step and saved data settings (``Answerer.datamodule`` rebuilds its data module).
Without a checkpoint: the base model of a config's ``model`` options.

``plain=True`` (``ask`` without a checkpoint): a ``LoraCausalLM`` would cost seconds of Lightning and
peft imports for adapters whose B matrices are zero (the base's answers, bit for bit); when the options
need nothing a plain transformers model lacks (``hf`` backend, full precision, no Liger kernels), the
base is loaded as such, and the plain path imports neither Lightning nor peft.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from amzft.data.prompt import PromptFormat, prompt_format_from
from amzft.errors import ModelError
from amzft.settings import init_kwargs, with_overrides
from amzft.sources import EMBEDDED, force_offline, load_tokenizer, resolve_model_dir

DEQUANTIZED_NOTE = "weights are the 4-bit base's, dequantized (not the original full-precision model's)"


@dataclass
class PlainBase:
    """What ``amzft.model.generation`` reads of a module: the model and its tokenizer."""

    model: Any
    tokenizer: Any


@dataclass
class Answerer:
    """A model ready to answer, and what it was trained with."""

    module: Any  # LoraCausalLM, or PlainBase (``plain=True`` without a checkpoint)
    prompt: PromptFormat
    checkpoint: str | None = None
    step: int = 0  # the optimizer step the checkpoint was saved at (0: a base model)
    data_settings: dict = field(default_factory=dict)  # the checkpoint's saved data-module arguments
    note: str | None = None  # what a full-precision load had to do (a 4-bit folder dequantised)

    def datamodule(self, **overrides):
        """The data module the checkpoint was trained with, ``overrides`` replacing some of its
        options (another file, no hold-out, …)."""
        from amzft.data.module import AmazonTitlesDataModule  # noqa: PLC0415 - Lightning, datasets

        return AmazonTitlesDataModule(**with_overrides(AmazonTitlesDataModule, self.data_settings, overrides))


def load_answerer(ckpt_path: str | os.PathLike | None = None, model: dict | None = None, data: dict | None = None, *,
                  plain: bool = False, full_precision: bool = False) -> Answerer:
    """The checkpoint's model (``model`` / ``data`` unused) or, without one, the base of ``model`` (a
    config's model options) with ``data``'s prompt format. ``full_precision``: the adapter on a
    full-precision transformers base (what merged and GGUF exports fold LoRA into; one trained on a
    4-bit base loads without a GPU); a base folder saved in 4-bit is dequantised, and ``note`` says so."""
    if ckpt_path is None:
        model = dict(model or {})
        module = (plain_base(model) if plain else None) or _base_module(model)
        return Answerer(module, prompt_format_from(data or {}))
    from amzft.checkpoints.io import load_checkpoint_file  # noqa: PLC0415 - torch / Lightning
    from amzft.model.backends import prequantized  # noqa: PLC0415
    from amzft.model.module import LoraCausalLM  # noqa: PLC0415

    checkpoint = load_checkpoint_file(ckpt_path)
    saved, overrides, note = checkpoint["hyper_parameters"], {}, None
    if full_precision:
        saved_4bit = prequantized(str(saved.get("name_or_path", EMBEDDED))) is not None
        overrides = {"backend": "hf", "compute": {"quantization": "none", "dequantize_base": saved_4bit, "kernels": "none"}}
        note = DEQUANTIZED_NOTE if saved_4bit else None
    module = LoraCausalLM(**with_overrides(LoraCausalLM, saved, overrides))
    module.configure_model()
    module.check_adapter_state(checkpoint["state_dict"])
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    module.eval()
    data_settings = checkpoint.get("datamodule_hyper_parameters") or {}
    return Answerer(module, prompt_format_from(data_settings), str(ckpt_path), int(checkpoint.get("global_step", 0)),
                    data_settings, note)


def _base_module(model_options: dict):
    from amzft.model.module import LoraCausalLM  # noqa: PLC0415 - Lightning, peft

    # A training config's model section may hold keys for other tools; keep the module's own.
    module = LoraCausalLM(**init_kwargs(LoraCausalLM, model_options))
    module.configure_model()
    module.eval()
    return module


def plain_base(model_options: dict) -> PlainBase | None:
    """The base model of ``model_options`` (a config's ``model`` section) as a plain
    transformers model in fp32, or None when the options need the training module's loader."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 - after force_offline

    from amzft.model.backends import prequantized  # noqa: PLC0415

    compute = model_options.get("compute") or {}
    if (model_options.get("backend") or "hf") != "hf" or any(compute.get(k) not in (None, "none") for k in ("quantization", "kernels")):
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
