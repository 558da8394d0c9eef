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
import multiprocessing as mp
import os
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from amzft.data.clean import FilterSettings, RecordFilter, dedupe_key
from amzft.data.encode import PromptEncoder, encode_texts, join_example
from amzft.data.prompt import PromptFormat
from amzft.data.reader import check_data_file, iter_raw_lines, parse_line, read_records
from amzft.data.split import SPLITS, assign_split
from amzft.data.stats import PipelineStats
from amzft.errors import DataError
from amzft.paths import cache_root, staging_dir

PIPELINE_VERSION = 2  # bump when the examples a given setting produces change (2: HTML tags and control characters removed)
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


# `datasets` (~2 s to import) is imported where it is used: `fit --help` imports this module,
# and so does each worker process of a spawn-started build, which never needs it.


def _features():
    from datasets import Features, Sequence, Value  # noqa: PLC0415 - start-up time (see above)

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
    from datasets import Dataset  # noqa: PLC0415 - start-up time

    stats = PipelineStats.from_dict(json.loads((directory / "stats.json").read_text()))
    splits = {name: Dataset.from_file(str(directory / f"{name}.arrow")) for name in SPLITS}
    return PreparedData(splits, stats, directory, from_cache=True)


def default_num_proc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def prepare(
    settings: DataSettings, tokenizer, cache_dir: str | Path | None = None, num_proc: int | None = None
) -> PreparedData:
    """Reopen the cached examples for these settings, or build them with ``num_proc`` worker
    processes (None: one per available core; 1: one process plus a tokenizer thread). The
    result does not depend on ``num_proc``, so it is not part of the cache key."""
    root = Path(cache_dir) if cache_dir else cache_root() / "datasets"
    directory = root / cache_key(settings, tokenizer)
    if (directory / "stats.json").is_file():
        return _load(directory)
    tmp = staging_dir(root, ".build-")
    try:
        procs = default_num_proc() if num_proc is None else max(1, num_proc)
        stats = _build_parallel(settings, tokenizer, tmp, procs) if procs > 1 else _build(settings, tokenizer, tmp)
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
    from datasets.arrow_writer import ArrowWriter  # noqa: PLC0415 - start-up time

    stats = PipelineStats()
    keep = RecordFilter(settings.filters)
    encode_prompts = PromptEncoder(tokenizer, settings.prompt)
    features = _features()
    writers = {name: ArrowWriter(features=features, path=str(out / f"{name}.arrow")) for name in SPLITS}

    def encode_and_write(chunk: list[tuple[int, str, str]]) -> tuple[int, int, list[int]]:
        """Runs on a worker thread: the Rust tokenizer releases the GIL, so reading and
        cleaning the next chunk on the main thread overlaps with it."""
        encoded, too_long = _encode_chunk(chunk, tokenizer, encode_prompts, settings)
        _write_rows(writers, features, encoded)
        return len(encoded), sum(e[-1] for e in encoded), too_long

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
    return _finish(settings, writers, stats)


def _finish(settings: DataSettings, writers: dict, stats: PipelineStats) -> PipelineStats:
    for name, writer in writers.items():
        stats.split_sizes[name] = writer.finalize()[0]
    if stats.kept == 0:
        reasons = ", ".join(f"{k}={v}" for k, v in stats.skipped.most_common()) or "none"
        raise DataError(
            f"{settings.path}: no usable records ({stats.records_read} read; skipped: {reasons})"
        )
    return stats


# An encoded example: (line, split, input_ids, prompt_len, title, content, truncated).
Encoded = tuple


def _encode_chunk(chunk, tokenizer, encode_prompts, settings: DataSettings) -> tuple[list[Encoded], list[int]]:
    """Tokenise cleaned (line, title, content) records; returns the examples and the lines
    whose prompt alone does not fit ``max_length``."""
    prompts = encode_prompts([t for _, t, _ in chunk])
    responses = encode_texts(tokenizer, [c for _, _, c in chunk], False)
    eos = tokenizer.eos_token_id
    encoded, too_long = [], []
    for (line, title, content), p_ids, r_ids in zip(chunk, prompts, responses):
        example = join_example(p_ids, r_ids, eos, settings.max_length)
        if example is None:
            too_long.append(line)
            continue
        split = assign_split(title, settings.val_fraction, settings.test_fraction, settings.split_salt)
        encoded.append((line, split, example.input_ids, example.prompt_len, title, content, example.truncated))
    return encoded, too_long


def _write_rows(writers: dict, features, encoded: list[Encoded]) -> None:
    rows = {name: {k: [] for k in features} for name in SPLITS}
    for line, split, input_ids, prompt_len, title, content, _ in encoded:
        row = rows[split]
        row["input_ids"].append(input_ids)
        row["prompt_len"].append(prompt_len)
        row["num_labels"].append(len(input_ids) - prompt_len)
        row["title"].append(title)
        row["content"].append(content)
        row["line"].append(line)
    for name, batch in rows.items():
        if batch["line"]:
            writers[name].write_batch(batch)


# ------------------------------------------------------------------ several processes
_WORKER: dict = {}


def _worker_init(settings: DataSettings, tokenizer) -> None:
    # Dedupe needs every record seen so far: the parent does it, in file order.
    filters = FilterSettings(**{**asdict(settings.filters), "dedupe": False})
    _WORKER.update(settings=settings, tokenizer=tokenizer, keep=RecordFilter(filters),
                   encode_prompts=PromptEncoder(tokenizer, settings.prompt))


def _worker_chunk(lines: list[tuple[int, bytes]]):
    """Parse, validate, clean, filter and tokenise raw lines. Returns the skips as
    (reason, line, message) in line order, the encoded examples, and the too-long lines."""
    w = _WORKER
    skips, records = [], []
    for line, raw in lines:
        parsed = parse_line(raw)
        if isinstance(parsed, tuple):
            skips.append((parsed[0], line, parsed[1]))
            continue
        title, content, reason = w["keep"](parsed["title"], parsed["content"])
        if reason is not None:
            skips.append((reason, line, None))
            continue
        records.append((line, title, content))
    encoded, too_long = _encode_chunk(records, w["tokenizer"], w["encode_prompts"], w["settings"]) if records else ([], [])
    return skips, encoded, too_long


def _build_parallel(settings: DataSettings, tokenizer, out: Path, num_proc: int) -> PipelineStats:
    """The same examples as ``_build``, with parsing, cleaning and tokenising spread over
    ``num_proc`` processes. The parent only reads raw lines, dedupes and writes, consuming
    results in file order, so the output (and the first lines listed per skip reason) do not
    depend on the number of processes. At most 2 x num_proc chunks are in flight: memory
    stays bounded whatever the file size."""
    from datasets.arrow_writer import ArrowWriter  # noqa: PLC0415 - start-up time

    stats = PipelineStats()
    features = _features()
    writers = {name: ArrowWriter(features=features, path=str(out / f"{name}.arrow")) for name in SPLITS}
    seen: set[bytes] = set()
    dedupe = settings.filters.dedupe

    def collect(result) -> None:
        skips, encoded, too_long = result.get()
        for reason, line, message in skips:
            if message is not None and settings.strict:
                raise DataError(f"{settings.path}:{line}: {message}")
            stats.skip(reason, line)
        kept = []
        for example in encoded:
            if dedupe:
                key = dedupe_key(example[4], example[5])
                if key in seen:
                    stats.skip("duplicate", example[0])
                    continue
                seen.add(key)
            kept.append(example)
        for line in too_long:  # already in line order
            stats.skip("prompt_too_long", line)
        _write_rows(writers, features, kept)
        stats.kept += len(kept)
        stats.truncated += sum(e[-1] for e in kept)

    # fork: workers inherit the loaded tokenizer instantly (spawn would re-import everything).
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # processes, not Rust threads; no fork warning
    try:
        with context.Pool(num_proc, initializer=_worker_init, initargs=(settings, tokenizer)) as pool:
            pending: deque = deque()
            chunk: list[tuple[int, bytes]] = []
            for line, raw in iter_raw_lines(settings.path, stats, settings.strict):
                if settings.limit is not None and stats.records_read >= settings.limit:
                    break
                stats.records_read += 1
                chunk.append((line, raw))
                if len(chunk) >= CHUNK:
                    pending.append(pool.apply_async(_worker_chunk, (chunk,)))
                    chunk = []
                    if len(pending) >= 2 * num_proc:
                        collect(pending.popleft())
            if chunk:
                pending.append(pool.apply_async(_worker_chunk, (chunk,)))
            while pending:
                collect(pending.popleft())
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    return _finish(settings, writers, stats)
