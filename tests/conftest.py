"""Shared fixtures: the real Llama-3.2 tokenizer (from its wheel), tiny in-memory models,
a private cache folder, and the path to the real records in ../shared/data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_400 = SHARED_DATA / "amazontitles_trn_first400.jsonl"


@pytest.fixture(scope="session", autouse=True)
def _offline():
    from amzft.sources import force_offline

    force_offline()


@pytest.fixture(scope="session")
def llama_tokenizer():
    from amzft.sources import load_tokenizer

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
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
