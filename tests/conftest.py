"""Shared fixtures: the real Llama-3.2 tokenizer (from its wheel), tiny in-memory models, a
private cache folder (AMZFT_CACHE) for the whole run, the network blocked. The helpers the test
files share (fit_args, tiny_records, run_fit, ...) are in helpers.py: import them from there,
not from this file.

Nothing here imports transformers or Lightning at module level (helpers and fault_helpers
import Lightning): tests/test_gpu.py must be able to import Unsloth before them."""

from __future__ import annotations

import json
import os

import pytest
import torch

from amzft.cli.quiet import quiet_libraries
from amzft.sources import force_offline, load_tokenizer


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs ``-n auto``) the workers share the cores: each
    worker, and every process it starts (subprocess and DDP tests read OMP_NUM_THREADS), gets
    its share of threads, instead of each oversubscribing them all (threads waiting on each
    other cost more than a tiny model's steps gain from them)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


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
    (amzft.training.precision.resolve): one test's choice, often on a faked CPU, must not reach the
    subprocesses of the next. The name is amzft.training.precision.RESOLVED_ENV (not imported: module doc)."""
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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture(scope="session")
def trained_run(tiny_model_dir, tmp_path_factory):
    """One short fit shared by the tests that only need a trained checkpoint: 2 steps of the shrunk
    cpu.yaml on tiny_records(30) with validation and test splits (0.2 each); its last.ckpt. Read
    only: a test that writes into the run's folder (evaluate's report) or changes the checkpoint
    works on a copy (helpers.copy_run), and the session checks at its end that nobody wrote there."""
    from helpers import fit_tiny_run, tree_digest  # noqa: PLC0415 - helpers imports Lightning (module doc)

    ckpt = fit_tiny_run(tiny_model_dir, tmp_path_factory.mktemp("trained-run"), "--trainer.max_steps", "2",
                        "--data.holdout.val_fraction", "0.2", "--data.holdout.test_fraction", "0.2")
    run = ckpt.parents[2]  # logs/amzft/version_0
    before = tree_digest(run)
    yield ckpt
    assert tree_digest(run) == before, f"a test wrote into the shared run {run}: copy it first (helpers.copy_run)"


@pytest.fixture
def tiny_data(write_jsonl):
    from helpers import tiny_records  # noqa: PLC0415 - helpers imports Lightning (module doc)

    return write_jsonl(tiny_records(30))


