"""The one seam where a backend builds the causal LM with its LoRA adapters.

Each backend is a function ``(LoraSettings) -> (peft model, tokenizer)``; the LightningModule
never branches on the backend elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from amzft.errors import ConfigError, ModelError

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class LoraSettings:
    name_or_path: str = "embedded"
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    gradient_checkpointing: bool = False
    seed: int = 3407  # LoRA A matrices are random: seeded so a run is reproducible


def build_hf(settings: LoraSettings):
    """transformers + peft, on CPU or GPU: full-precision base model, LoRA adapters on top."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from amzft.sources import force_offline, load_tokenizer, resolve_model_dir

    force_offline()
    directory = resolve_model_dir(settings.name_or_path)
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read the model config in {directory}: {exc}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, local_files_only=True, dtype=torch.float32, trust_remote_code=False
        )
    except Exception as exc:
        raise ModelError(f"cannot load a causal LM ({config.model_type}) from {directory}: {exc}") from exc
    tokenizer = load_tokenizer(str(directory))
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in settings.target_modules if t not in present]
    if missing:
        raise ConfigError(
            f"model.target_modules {missing} are not modules of the {config.model_type} model in {directory} "
            f"(it has e.g. {sorted(n for n in present if n.endswith('proj'))[:8]})"
        )
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(settings.seed)
    lora = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        bias="none",
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    peft_model.train()  # from_pretrained leaves modules in eval mode; Lightning keeps modes as found
    return peft_model, tokenizer


BACKENDS = {"hf": build_hf}


def build(backend: str, settings: LoraSettings):
    if backend not in BACKENDS:
        raise ConfigError(f"model.backend must be one of {sorted(BACKENDS)}, found {backend!r}")
    return BACKENDS[backend](settings)
