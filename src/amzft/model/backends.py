"""Where a backend builds the causal LM with its LoRA adapters: ``(LoraSettings) -> (peft model,
tokenizer)``. ``hf``: transformers + peft (full, nf4 or pre-quantised 4-bit base, optional Liger
kernels); ``unsloth``: Unsloth's 4-bit loader, CUDA only. Heavy optional imports stay lazy (``fit --help``)."""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from amzft.errors import ConfigError, ModelError
from amzft.model.settings import DEFAULT_TARGETS
from amzft.sources import force_offline, load_tokenizer, resolve_model_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSettings:
    """Everything a backend needs to build the base and its adapters (from the model's groups)."""

    name_or_path: str = "embedded"
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    gradient_checkpointing: bool = False
    seed: int = 3407  # LoRA A matrices are random: seeded so a run is reproducible
    quantization: str = "none"  # "nf4": 4-bit base (QLoRA); the unsloth backend is always 4-bit
    max_seq_length: int = 2048  # Unsloth sizes its RoPE cache from it
    device: str = "cpu"  # where a quantised base is loaded (4-bit weights are packed on load)
    use_dora: bool = False  # peft's DoRA: weight-decomposed LoRA (a trainable magnitude per output)
    use_rslora: bool = False  # peft's rank-stabilised scale alpha / sqrt(r) instead of alpha / r
    dequantize: bool = False  # a pre-quantised base is dequantised to fp32 (merged / GGUF exports)
    kernels: str = "none"  # "liger": Liger's Triton kernels (RoPE, RMSNorm, SwiGLU) on a Llama base, CUDA only


QUANTIZATIONS = ("none", "nf4")
KERNELS = ("none", "liger")


def disable_avx512bf16_repacking(model) -> int:
    """Work around a bitsandbytes 0.50 bug: on AVX512-BF16 CPUs an eval forward repacks ``Linear4bit``
    weights that later training forwards misuse (wrong LoRA gradients). Returns the layers changed."""
    import bitsandbytes as bnb  # noqa: PLC0415 - nf4 only

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def prequantized(config) -> dict | None:
    """The bitsandbytes 4-bit ``quantization_config`` a folder was saved with (from a config or a
    ``name_or_path``), or None; any other quantisation is a one-line error."""
    if isinstance(config, str):
        config = json.loads((resolve_model_dir(config) / "config.json").read_text())
    quant = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if quant is None:
        return None
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    if quant.get("quant_method") != "bitsandbytes" or not quant.get("load_in_4bit"):
        method = quant.get("quant_method"), "8-bit" if quant.get("load_in_8bit") else ""
        raise ModelError(f"the model folder is quantised with {' '.join(m for m in method if m)}: amzft trains on "
                         "full-precision folders or bitsandbytes 4-bit ones (model.compute.quantization=nf4 quantises a full one)")
    return quant


def dequantize_base(model) -> None:
    """A pre-quantised 4-bit base turned, in place, into a plain fp32 model (the weights the 4-bit
    layers compute with), so a merged export is a plain transformers model."""
    model.dequantize(dtype=torch.float32)
    model.to(torch.float32)
    # transformers 5 inverts its loading conversions on save; the 4-bit one has no inverse (and
    # nothing 4-bit is left), so drop it and keep the others (renamings).
    kept = []
    for conversion in getattr(model, "_weight_conversions", None) or []:
        try:
            conversion.reverse_transform()
        except NotImplementedError:
            continue
        kept.append(conversion)
    model._weight_conversions = kept


def check_kernels(settings: LoraSettings, model_type: str) -> None:
    """A one-line error, before any weights load, when ``model.compute.kernels`` cannot run here."""
    if settings.kernels not in KERNELS:
        raise ConfigError(f"model.compute.kernels must be one of {KERNELS}, found {settings.kernels!r}")
    if settings.kernels == "none":
        return
    why = ("no CUDA device here" if not settings.device.startswith("cuda")
           else "the liger-kernel package is not installed" if importlib.util.find_spec("liger_kernel") is None
           else None)
    if why:
        raise ConfigError(f"model.compute.kernels=liger needs a CUDA GPU and the liger-kernel package ({why}): pip install "
                          "liger-kernel (or 'amzft[gpu]') on a CUDA machine, or use model.compute.kernels=none")
    if model_type != "llama":
        raise ConfigError(f"model.compute.kernels=liger is wired for Llama models, this one is {model_type!r}: "
                          "use model.compute.kernels=none")


def _load_kwargs(settings: LoraSettings, config, directory) -> tuple[dict, bool, bool]:
    """``from_pretrained`` arguments, whether the base will be 4-bit, and whether it was saved so."""
    if settings.quantization not in QUANTIZATIONS:
        raise ConfigError(f"model.compute.quantization must be one of {QUANTIZATIONS}, found {settings.quantization!r}")
    saved_4bit = prequantized(config) is not None
    if saved_4bit:
        if not settings.dequantize and settings.quantization == "none":
            log.info("%s is saved in 4-bit (bitsandbytes): training on it as saved, as with model.compute.quantization=nf4", directory)
        # The folder's own quantization_config applies; non-4-bit weights load in fp32 for training.
        return {"dtype": torch.float32, "device_map": {"": settings.device}}, not settings.dequantize, True
    if settings.quantization == "nf4":
        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        return {"quantization_config": nf4, "dtype": torch.bfloat16, "device_map": {"": settings.device}}, True, False
    return {"dtype": torch.float32}, False, False


def build_hf(settings: LoraSettings):
    """transformers + peft: a full-precision, 4-bit or pre-quantised base with LoRA / DoRA / rsLoRA adapters."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415 - seconds to import

    force_offline()
    directory = resolve_model_dir(settings.name_or_path)
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read the model config in {directory}: {exc}") from exc
    if settings.dequantize and settings.quantization == "nf4":
        raise ConfigError("a dequantised base cannot also be quantised: use model.compute.quantization=none with dequantize")
    check_kernels(settings, config.model_type)
    load, quantized, saved_4bit = _load_kwargs(settings, config, directory)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, trust_remote_code=False, **load)
    except Exception as exc:
        raise ModelError(f"cannot load a causal LM ({config.model_type}) from {directory}: {exc}") from exc
    if saved_4bit and settings.dequantize:
        dequantize_base(model)
    if settings.kernels == "liger":  # its cross-entropy patches stay off: amzft.model.loss calls the fused one itself
        from liger_kernel.transformers import apply_liger_kernel_to_llama  # noqa: PLC0415 - optional, CUDA only

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False, model=model)
    if quantized:
        from peft import prepare_model_for_kbit_training  # noqa: PLC0415 - seconds to import

        disable_avx512bf16_repacking(model)
        # Freezes the base and casts its non-4-bit weights to fp32, as QLoRA does.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    tokenizer = load_tokenizer(str(directory))
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in settings.target_modules if t not in present]
    if missing:
        raise ConfigError(f"model.lora.target_modules {missing} are not modules of the {config.model_type} model in {directory} "
                          f"(it has e.g. {sorted(n for n in present if n.endswith('proj'))[:8]})")
    if settings.gradient_checkpointing and not quantized:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(settings.seed)
    lora = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
                      target_modules=list(settings.target_modules), task_type="CAUSAL_LM", use_dora=settings.use_dora,
                      use_rslora=settings.use_rslora)
    peft_model = get_peft_model(model, lora)
    peft_model.train()  # from_pretrained leaves modules in eval mode; Lightning keeps modes as found
    return peft_model, tokenizer


def build_unsloth(settings: LoraSettings):
    """The notebook's Unsloth loader, 4-bit, CUDA only (``amzft.cli.import_order`` imported unsloth first)."""
    if not torch.cuda.is_available():
        raise ConfigError("model.backend=unsloth needs a CUDA GPU and none is visible; use model.backend=hf "
                          "(add model.compute.quantization=nf4 for the same 4-bit QLoRA without Unsloth)")
    if importlib.util.find_spec("unsloth") is None:
        raise ConfigError("model.backend=unsloth needs the unsloth package: pip install 'amzft[gpu]' (see docs/gpu.md)")
    from unsloth import FastLanguageModel  # noqa: PLC0415 - CUDA only

    directory = resolve_model_dir(settings.name_or_path)
    try:
        model, _ = FastLanguageModel.from_pretrained(model_name=str(directory), max_seq_length=settings.max_seq_length,
                                                     load_in_4bit=True, dtype=None, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"unsloth cannot load {directory}: {exc}") from exc
    model = FastLanguageModel.get_peft_model(  # Unsloth lacks DoRA: the module refuses it
        model, r=settings.r, target_modules=list(settings.target_modules), lora_alpha=settings.alpha,
        lora_dropout=settings.dropout, bias="none", random_state=settings.seed, use_rslora=settings.use_rslora,
        use_gradient_checkpointing="unsloth" if settings.gradient_checkpointing else False)
    torch.manual_seed(settings.seed)  # get_peft_model calls set_seed: leave the global RNG as ours
    FastLanguageModel.for_training(model)
    return model, load_tokenizer(str(directory))


BACKENDS = {"hf": build_hf, "unsloth": build_unsloth}


def build(backend: str, settings: LoraSettings):
    if backend not in BACKENDS:
        raise ConfigError(f"model.backend must be one of {sorted(BACKENDS)}, found {backend!r}")
    return BACKENDS[backend](settings)


def set_mode(backend: str, model, training: bool) -> None:
    """Unsloth's own training / inference switch, which Lightning's train()/eval() does not reach."""
    if backend == "unsloth":
        from unsloth import FastLanguageModel  # noqa: PLC0415 - CUDA only

        (FastLanguageModel.for_training if training else FastLanguageModel.for_inference)(model)
