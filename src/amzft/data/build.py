"""Build (once) and reopen (in seconds) the tokenised dataset as memory-mapped Arrow files.

The cache key covers the data file (path, size, mtime), every setting that changes the
examples, the tokenizer's full definition and the pipeline version, so a stale cache is never
reused. Files are written into a temporary folder and renamed into place, so an interrupted
build never leaves a cache that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from amzft.data.clean import FilterSettings, RecordFilter
from amzft.data.encode import PromptEncoder, encode_texts, join_example
from amzft.data.prompt import PromptFormat
from amzft.data.reader import check_data_file, read_records
from amzft.data.split import SPLITS, assign_split
from amzft.data.stats import PipelineStats
from amzft.errors import DataError
from amzft.paths import cache_root, staging_dir

PIPELINE_VERSION = 1  # bump when the examples a given setting produces change
CHUNK = 4096  # records tokenised per call: large enough to keep both cores busy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSettings:
    """Everything that determines the tokenised examples (and so the cache key)."""

    path: str
    max_length: int = 2048
    filters: FilterSettings = FilterSettings()
    prompt: PromptFormat = PromptFormat()
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    split_salt: str = ""
    strict: bool = False
    limit: int | None = None  # read at most this many records (quick experiments)


@dataclass
class PreparedData:
    splits: dict  # split name -> datasets.Dataset (memory-mapped)
    stats: PipelineStats
    directory: Path
    from_cache: bool


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    extra = f"{tokenizer.eos_token_id}|{tokenizer.pad_token_id}|{tokenizer.bos_token_id}"
    return hashlib.sha256((definition + extra).encode()).hexdigest()[:16]


def cache_key(settings: DataSettings, tokenizer) -> str:
    data_file = check_data_file(settings.path).resolve()
    st = data_file.stat()
    payload = {
        "version": PIPELINE_VERSION,
        "file": [str(data_file), st.st_size, st.st_mtime_ns],
        "settings": asdict(settings) | {"path": None},
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _features():
    from datasets import Features, Sequence, Value

    return Features(
        {
            "input_ids": Sequence(Value("int32")),
            "prompt_len": Value("int32"),
            "num_labels": Value("int32"),
            "title": Value("string"),
            "content": Value("string"),
            "line": Value("int64"),
        }
    )


def _load(directory: Path) -> PreparedData:
    from datasets import Dataset

    stats = PipelineStats.from_dict(json.loads((directory / "stats.json").read_text()))
    splits = {name: Dataset.from_file(str(directory / f"{name}.arrow")) for name in SPLITS}
    return PreparedData(splits, stats, directory, from_cache=True)


def prepare(settings: DataSettings, tokenizer, cache_dir: str | Path | None = None) -> PreparedData:
    """Reopen the cached examples for these settings, or build them."""
    root = Path(cache_dir) if cache_dir else cache_root() / "datasets"
    directory = root / cache_key(settings, tokenizer)
    if (directory / "stats.json").is_file():
        return _load(directory)
    tmp = staging_dir(root, ".build-")
    try:
        stats = _build(settings, tokenizer, tmp)
        (tmp / "stats.json").write_text(json.dumps(stats.to_dict(), indent=1))
        try:
            os.replace(tmp, directory)
        except OSError:  # another process finished the same build first: use theirs
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    built = _load(directory)
    built.from_cache = False
    return built


def _build(settings: DataSettings, tokenizer, out: Path) -> PipelineStats:
    from concurrent.futures import ThreadPoolExecutor

    from datasets.arrow_writer import ArrowWriter

    stats = PipelineStats()
    keep = RecordFilter(settings.filters)
    eos = tokenizer.eos_token_id
    encode_prompts = PromptEncoder(tokenizer, settings.prompt)
    features = _features()
    writers = {name: ArrowWriter(features=features, path=str(out / f"{name}.arrow")) for name in SPLITS}

    def encode_and_write(chunk: list[tuple[int, str, str]]) -> tuple[int, int, list[int]]:
        """Runs on a worker thread: the Rust tokenizer releases the GIL, so reading and
        cleaning the next chunk on the main thread overlaps with it."""
        prompts = encode_prompts([t for _, t, _ in chunk])
        responses = encode_texts(tokenizer, [c for _, _, c in chunk], False)
        rows = {name: {k: [] for k in features} for name in SPLITS}
        kept = truncated = 0
        too_long: list[int] = []
        for (line, title, content), p_ids, r_ids in zip(chunk, prompts, responses):
            encoded = join_example(p_ids, r_ids, eos, settings.max_length)
            if encoded is None:
                too_long.append(line)
                continue
            kept += 1
            truncated += encoded.truncated
            row = rows[assign_split(title, settings.val_fraction, settings.test_fraction, settings.split_salt)]
            row["input_ids"].append(encoded.input_ids)
            row["prompt_len"].append(encoded.prompt_len)
            row["num_labels"].append(len(encoded.input_ids) - encoded.prompt_len)
            row["title"].append(title)
            row["content"].append(content)
            row["line"].append(line)
        for name, batch in rows.items():
            if batch["line"]:
                writers[name].write_batch(batch)
        return kept, truncated, too_long

    def collect(future) -> None:
        kept, truncated, too_long = future.result()
        stats.kept += kept
        stats.truncated += truncated
        for line in too_long:
            stats.skip("prompt_too_long", line)

    pending = None  # at most one chunk in flight keeps memory bounded and order deterministic
    chunk: list[tuple[int, str, str]] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        for record in read_records(settings.path, stats, settings.strict):
            if settings.limit is not None and stats.records_read > settings.limit:
                stats.records_read -= 1  # that line was not ours to read
                break
            title, content, reason = keep(record.title, record.content)
            if reason is not None:
                stats.skip(reason, record.line)
                continue
            chunk.append((record.line, title, content))
            if len(chunk) >= CHUNK:
                if pending is not None:
                    collect(pending)
                pending, chunk = pool.submit(encode_and_write, chunk), []
        if pending is not None:
            collect(pending)
        if chunk:
            collect(pool.submit(encode_and_write, chunk))
    for name, writer in writers.items():
        stats.split_sizes[name] = writer.finalize()[0]
    if stats.kept == 0:
        reasons = ", ".join(f"{k}={v}" for k, v in stats.skipped.most_common()) or "none"
        raise DataError(
            f"{settings.path}: no usable records ({stats.records_read} read; skipped: {reasons})"
        )
    return stats
