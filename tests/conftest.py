"""Shared fixtures: the real Llama-3.2 tokenizer (from its wheel), tiny in-memory models,
a private cache folder, and the path to the real records in ../shared/data.

Nothing here imports transformers or Lightning at module level (fault_helpers imports
Lightning): tests/test_gpu.py must be able to import Unsloth before them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from amzft.cli.main import main
from amzft.cli.quiet import quiet_libraries
from amzft.model.sources import force_offline, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_400 = SHARED_DATA / "amazontitles_trn_first400.jsonl"


@pytest.fixture(scope="session", autouse=True)
def _offline():
    """Every test runs with the network blocked (loopback excepted): a code path that tries to
    reach the internet fails its test (fault_helpers.block_network)."""
    from fault_helpers import block_network  # noqa: PLC0415 - imports Lightning (module doc)

    force_offline()
    quiet_libraries()
    attempts = block_network()
    yield
    assert not attempts, f"network access attempted during the tests: {attempts}"


@pytest.fixture(scope="session", autouse=True)
def _private_amzft_cache(tmp_path_factory):
    """AMZFT_CACHE (amzft.files.cache_root: data caches built without --data.cache_dir, the
    embedded model's unpacked files) points at a folder of this test run, never at the user's
    ~/.cache/amzft; the previous value comes back afterwards."""
    previous = os.environ.get("AMZFT_CACHE")
    os.environ["AMZFT_CACHE"] = str(tmp_path_factory.mktemp("amzft-cache"))
    yield
    if previous is None:
        os.environ.pop("AMZFT_CACHE", None)
    else:
        os.environ["AMZFT_CACHE"] = previous


@pytest.fixture(autouse=True)
def _no_inherited_precision():
    """``precision: auto`` leaves its choice in the environment for the processes a run starts
    (amzft.model.precision.resolve): one test's choice, often on a faked CPU, must not reach the
    subprocesses of the next. The name is amzft.model.precision.RESOLVED_ENV (not imported: module doc)."""
    os.environ.pop("AMZFT_PRECISION_AUTO", None)
    yield
    os.environ.pop("AMZFT_PRECISION_AUTO", None)


@pytest.fixture(scope="session")
def llama_tokenizer():
    return load_tokenizer("llama3.2")


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


@pytest.fixture
def write_jsonl(tmp_path):
    """Write records (dicts, or raw str/bytes lines) to a .jsonl file and return its path."""

    def write(records, name="trn.json"):
        path = tmp_path / name
        with path.open("wb") as f:
            for r in records:
                if isinstance(r, dict):
                    r = json.dumps(r)
                if isinstance(r, str):
                    r = r.encode()
                f.write(r + b"\n")
        return path

    return write


def needs_real_data():
    return pytest.mark.skipif(not REAL_400.is_file(), reason="../shared/data is not beside this checkout")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_records(n: int, words: int = 12):
    """Short synthetic products (prompt ~50 tokens, answer ~words+2 tokens)."""
    vocab = "red blue green soft warm cotton steel glass mug lamp book novel story song guitar chair".split()
    return [
        {
            "title": f"Item {i} {vocab[i % len(vocab)]}",
            "content": " ".join(vocab[(i * 7 + j) % len(vocab)] for j in range(words + i % 5)) + ".",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, llama_tokenizer):
    """A tiny random Llama with the real Llama-3.2 vocabulary, saved like a user's download."""
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415 - after Unsloth (module doc)

    directory = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=len(llama_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=llama_tokenizer.bos_token_id,
        eos_token_id=llama_tokenizer.eos_token_id,
        pad_token_id=llama_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    llama_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def tiny_data(write_jsonl):
    return write_jsonl(tiny_records(30))


def fit_args(tiny_model_dir, data_path, tmp_path, *extra):
    """configs/cpu.yaml shrunk to the tiny model (the lightning-hydra-template habit: tests
    shrink the real config rather than invent one)."""
    return [
        "fit",
        "--config", str(REPO / "configs" / "cpu.yaml"),
        "--model.name_or_path", str(tiny_model_dir),
        "--data.path", str(data_path),
        "--data.cache_dir", str(tmp_path / "cache"),
        "--data.holdout.val_fraction", "0",
        "--data.holdout.test_fraction", "0",
        # the cache is built in this process (the same code a worker pool runs, without forking one
        # per core for each of the tests' many fits); tests of the parallel build ask for num_proc 2
        # themselves (test_scale.py, test_robustness.py, test_data_pipeline.py)
        "--data.num_proc", "1",
        "--trainer.default_root_dir", str(tmp_path / "logs"),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        # cpu.yaml's `precision: auto` may train in bf16 (AMX, some AVX512-BF16 CPUs): tests compare exact
        # and fp32-tolerance results, so they pin fp32 (auto is tested in test_precision.py).
        "--trainer.precision", "32-true",
        *SEED_SHAPED_BATCHES,
        *extra,
    ]


def fit_tiny_run(tiny_model_dir, root: Path, *extra: str) -> Path:
    """A short fit of the shrunk cpu.yaml on tiny_records(30) written into ``root``: its last.ckpt
    (the trained checkpoint several test files start from)."""
    data = root / "trn.json"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny_records(30)))
    main(fit_args(tiny_model_dir, data, root, *extra))
    return next((root / "logs").rglob("last.ckpt"))


# The tests were written for plain batches of 2 x accumulate 4 (the seed's shape): they count
# steps, examples and checkpoints in it. cpu.yaml's own packed rows are run as shipped by
# test_cli.py::test_two_steps_of_fit_run_from_every_config and test_scale.py's resume tests.
SEED_SHAPED_BATCHES = (
    "--data.batches.layout", "plain", "--data.batches.share_prefix", "false", "--data.batches.pack_length", "null",
    "--data.batch_size", "2", "--trainer.accumulate_grad_batches", "4", "--model.optim.lr", "1e-3",
    "--trainer.max_steps", "60", "--checkpoint.every_n_train_steps", "20", "--validation.every_n_steps", "10",
)


def one_line_error(capsys, *args, code: int | None = None) -> str:
    """Run ``python -m amzft *args`` in-process; it must exit (with ``code`` if given) printing
    exactly one ``amzft: error: …`` line on stderr, which is returned."""
    with pytest.raises(SystemExit) as done:
        main(list(args))
    assert done.value.code == code if code is not None else done.value.code in (1, 2)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("amzft: error: "), err
    return err[0]
