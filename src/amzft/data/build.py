"""Stages read → clean → split, once per data file and settings, into cached Arrow files: ``PreparedData`` for the module."""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import importlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import shutil
import threading
import weakref
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from amzft.data.clean import FilterSettings, RecordFilter, dedupe_key
from amzft.data.encode import PromptEncoder
from amzft.data.lazy import LazyExamples, default_num_proc, tokenizer_processes
from amzft.data.prompt import PromptFormat
from amzft.data.reader import LEGACY_HINT, check_data_file, is_plain_json_lines, parse_line, raw_lines
from amzft.data.split import SPLITS, assign_split
from amzft.data.stats import PipelineStats
from amzft.errors import DataError
from amzft.files import cache_root, staging_dir

PIPELINE_VERSION = 4  # part of the cache key: bump when the examples a given setting produces change
CHUNK = 4096  # records per worker task / per exact-length check
BLOCK = 1 << 21  # bytes of whole lines per worker task when a plain file is read in blocks
SLACK = 16  # tokens a prompt may have beyond its UTF-8 bytes (special tokens, word-start markers): generous
PROBE = 64  # titles the prompt encoder's prefix check runs on (fixed, so ids never depend on batch order)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSettings:
    """Everything that determines the examples (and so the cache key)."""

    path: str
    max_length: int = 2048
    filters: FilterSettings = FilterSettings()
    prompt: PromptFormat = PromptFormat()
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    split_salt: str = ""
    strict: bool = False
    limit: int | None = None  # read at most this many records (quick experiments)
    encoding: str | None = None  # the file's text encoding; None: UTF-8 (or UTF-16/32, told by mark or NULs)


class TokenisedSplits(Mapping):
    """Split name -> its ``datasets.Dataset`` tokenised as read, each made on first use (a transform costs a fingerprint)."""

    def __init__(self, prepared: PreparedData):
        self.prepared, self._made = prepared, {}

    def __getitem__(self, name: str):
        if name not in self._made:
            self._made[name] = self.prepared.raw[name].with_transform(self.prepared.examples(name).transform)
        return self._made[name]

    def __iter__(self):
        return iter(self.prepared.raw)

    def __len__(self) -> int:
        return len(self.prepared.raw)


@dataclass
class PreparedData:
    """The memory-mapped splits: ``raw[name]`` (title, content, line), ``splits[name]`` (tokenised as read), ``examples(name)``."""

    raw: dict  # split name -> datasets.Dataset (memory-mapped)
    stats: PipelineStats
    directory: Path
    from_cache: bool
    tokenizer: object = None
    settings: DataSettings | None = None
    _examples: dict = field(default_factory=dict)
    _encoder: PromptEncoder | None = None

    @cached_property
    def splits(self) -> TokenisedSplits:
        return TokenisedSplits(self)

    def examples(self, name: str) -> LazyExamples:
        """The split's ``LazyExamples`` (one per split, so its token counts accumulate)."""
        if self._encoder is None:
            self._encoder = PromptEncoder(self.tokenizer, self.settings.prompt)
            self._encoder([title for split in self.raw.values() for title in split[:PROBE]["title"]] or ["a"])
        if name not in self._examples:
            counts = self.directory / f"{name}.counts.npy"
            self._examples[name] = LazyExamples(self.raw[name], self.tokenizer, self.settings, self._encoder, counts)
        return self._examples[name]


# Per tokenizer instance (one per folder, amzft.sources): serialising Llama-3.2's takes ~0.2 s. Weak keys: forgotten with it.
_DEFINITIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer) -> str:
    if tokenizer not in _DEFINITIONS:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        definition = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
        _DEFINITIONS[tokenizer] = hashlib.sha256(definition.encode()).hexdigest()
    extra = f"{tokenizer.eos_token_id}|{tokenizer.pad_token_id}|{tokenizer.bos_token_id}"
    return hashlib.sha256((_DEFINITIONS[tokenizer] + extra).encode()).hexdigest()[:16]


def cache_key(settings: DataSettings, tokenizer, data_file: Path) -> str:
    """A hash of the data file (path, size, mtime), every setting, the tokenizer and the pipeline version."""
    data_file = data_file.resolve()
    st = data_file.stat()
    payload = {"version": PIPELINE_VERSION, "file": [str(data_file), st.st_size, st.st_mtime_ns],
               "settings": asdict(settings) | {"path": None}, "tokenizer": tokenizer_fingerprint(tokenizer)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


# `datasets` (slow to import) is imported where used: `fit --help` and a spawn-started build's workers import this module.


def _load(directory: Path, settings: DataSettings, tokenizer, from_cache: bool) -> PreparedData:
    from datasets import Dataset  # noqa: PLC0415 - start-up time
    stats = PipelineStats.from_dict(json.loads((directory / "stats.json").read_text()))
    splits = {name: Dataset.from_file(str(directory / f"{name}.arrow")) for name in SPLITS}
    return PreparedData(splits, stats, directory, from_cache, tokenizer, settings)


def prepare(settings: DataSettings, tokenizer, cache_dir: str | Path | None = None, num_proc: int | None = None) -> PreparedData:
    """Reopen the cached records for these settings, or build them with ``num_proc`` processes (None: one per core;
    1: this one; the result is the same for any)."""
    data_file = check_data_file(settings.path)  # the one check of the path: read stages trust it
    root = Path(cache_dir) if cache_dir else cache_root() / "datasets"
    directory = root / cache_key(settings, tokenizer, data_file)
    if (directory / "stats.json").is_file():
        return _load(directory, settings, tokenizer, True)
    # Built in a temporary folder renamed into place: an interrupted build never looks complete.
    tmp = staging_dir(root, ".build-")
    try:
        procs = default_num_proc() if num_proc is None else max(1, num_proc)
        stats = _build(settings, data_file, tokenizer, tmp, procs)
        (tmp / "stats.json").write_text(json.dumps(stats.to_dict(), indent=1))
        with contextlib.suppress(OSError):  # another process finished the same build first: use theirs
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load(directory, settings, tokenizer, False)


def _too_long(records: list[tuple[int, str, str]]) -> list[int]:
    """The lines of the cleaned (line, title, content) records whose prompt alone does not fit ``max_length``
    (``prompt_too_long``). Only prompts that may not (long titles) are tokenised: the build tokenises nothing else."""
    settings: DataSettings = _WORKER["settings"]
    fmt, limit = settings.prompt, settings.max_length - SLACK
    prompt_bytes, per_title = len(fmt.render("").encode()), fmt.question.count("{title}")
    unsure = [record for record in records if prompt_bytes + per_title * len(record[1].encode()) > limit]
    if not unsure:
        return []
    if "encode_prompts" not in _WORKER:  # made on first need
        _WORKER["encode_prompts"] = PromptEncoder(_WORKER["tokenizer"], fmt)
    prompts = _WORKER["encode_prompts"]([title for _, title, _ in unsure])
    # join_example's own test: at least one response token must fit after the prompt
    return [line for (line, _, _), ids in zip(unsure, prompts) if len(ids) >= settings.max_length]


def _columns(rows: list[tuple[int, str, str]]) -> dict:
    """(line, title, content) records as typed Arrow columns (datasets' type inference would slow the parent)."""
    import pyarrow as pa  # noqa: PLC0415 - start-up time (datasets imports it anyway)
    lines, titles, contents = zip(*rows)
    return {"title": pa.array(titles, pa.string()), "content": pa.array(contents, pa.string()), "line": pa.array(lines, pa.int64())}


def _writers(out: Path) -> dict:
    from datasets import Features, Value  # noqa: PLC0415 - start-up time
    from datasets.arrow_writer import ArrowWriter  # noqa: PLC0415 - start-up time
    features = Features({"title": Value("string"), "content": Value("string"), "line": Value("int64")})
    return {name: ArrowWriter(features=features, path=str(out / f"{name}.arrow")) for name in SPLITS}


# ------------------------------------------------------------------ the workers
_WORKER: dict = {}  # a worker's filter, settings and tokenizer (this process's, with one worker)


def _worker_init(settings: DataSettings, tokenizer) -> None:
    # Dedupe needs every record seen so far: the parent does it, in file order.
    _WORKER.update(keep=RecordFilter(replace(settings.filters, dedupe=False)), settings=settings, tokenizer=tokenizer)


def _worker_chunk(lines: list[tuple[int, bytes]] | tuple[int, bytes]):
    """Parse, clean, filter, prompt-check and split raw (line, bytes) pairs, or a (first line, block of whole
    lines) of a plain file. Returns the records read, the skips, the first bad line's error (``strict`` raises it)
    and per split the kept records' Arrow columns (unpickled faster than strings) and dedupe keys (or None)."""
    settings: DataSettings = _WORKER["settings"]
    if isinstance(lines, tuple):  # blank lines left out, numbered all the same
        first, block = lines
        lines = [(first + k, raw) for k, raw in enumerate(block.split(b"\n")) if raw.strip()]
    skips, error, records = PipelineStats(), None, []
    for line, raw in lines:
        parsed = parse_line(raw)
        if isinstance(parsed, tuple):
            skips.skip(parsed[0], line)
            error = error or f"{settings.path}:{line}: {parsed[1]}"
            continue
        title, content, reason = _WORKER["keep"](parsed["title"], parsed["content"])
        if reason is not None:
            skips.skip(reason, line)
        else:
            records.append((line, title, content))
    too_long = _too_long(records)
    for line in too_long:
        skips.skip("prompt_too_long", line)
    refused, kept = set(too_long), {name: [] for name in SPLITS}
    for line, title, content in records:
        if line not in refused:
            kept[assign_split(title, settings.val_fraction, settings.test_fraction, settings.split_salt)].append((line, title, content))
    dedupe = settings.filters.dedupe
    parts = {name: (_columns(rows), [dedupe_key(title, content) for _, title, content in rows] if dedupe else None)
             for name, rows in kept.items() if rows}
    return len(lines), skips, error, parts


def _deduped(parts: dict, seen: set[bytes], stats: PipelineStats) -> dict[str, dict]:
    """Each split's columns without the records whose dedupe key is in ``seen`` or earlier (``duplicate`` skips,
    in line order); the new keys join ``seen``. Identical records share a title, so a split: the file's order."""
    import pyarrow as pa  # noqa: PLC0415 - start-up time (imported by the workers' results anyway)
    duplicates: list[int] = []
    out = {}
    for name, (columns, keys) in parts.items():
        fresh = []
        for key in keys or ():
            fresh.append(key not in seen)
            seen.add(key)
        if not all(fresh):
            duplicates.extend(line for line, new in zip(columns["line"].to_pylist(), fresh) if not new)
            mask = pa.array(fresh, pa.bool_())
            columns = {column: array.filter(mask) for column, array in columns.items()}
        out[name] = columns  # the writers ignore an empty batch
    for line in sorted(duplicates):
        stats.skip("duplicate", line)
    return out


def _raw_blocks(path: Path) -> Iterator[tuple[int, bytes]]:
    """(first line number, ~``BLOCK`` bytes of whole lines) of a plain file, BOM dropped: the workers split the lines."""
    line = 1
    with path.open("rb") as handle:
        while block := handle.read(BLOCK):
            if not block.endswith(b"\n"):
                block += handle.readline()
            if line == 1 and block.startswith(codecs.BOM_UTF8):
                block = block[len(codecs.BOM_UTF8):]
            yield line, block
            line += int(np.count_nonzero(np.frombuffer(block, np.uint8) == 10))  # faster than bytes.count


class _InProcess(contextlib.AbstractContextManager):
    """The pool's interface in this process: ``num_proc`` 1 runs the workers' very code, unforked."""

    def __init__(self, settings: DataSettings, tokenizer):
        _worker_init(settings, tokenizer)

    def apply_async(self, function, args):
        value = function(*args)
        return SimpleNamespace(get=lambda: value)

    def __exit__(self, *exc) -> None:
        _WORKER.clear()


def _build(settings: DataSettings, data_file: Path, tokenizer, out: Path, num_proc: int) -> PipelineStats:
    """Read, clean, filter, prompt-check and split the records into the Arrow files over ``num_proc`` worker
    processes (1: in this process, by the same code). The parent reads, dedupes and writes in file order, so the
    output does not depend on ``num_proc``; at most 2 x num_proc chunks (16 x while datasets is imported) are in flight."""
    stats = PipelineStats()
    writers: dict = {}
    seen: set[bytes] = set()
    # Plain JSON Lines go to the workers in blocks of bytes; gzip, UTF-16, a JSON array or a limit in numbered lines.
    blocks = settings.limit is None and is_plain_json_lines(data_file, settings.encoding)

    def collect(result) -> None:
        read, skips, error, parts = result.get()
        if error is not None and settings.strict:
            raise DataError(error)
        stats.records_read += read
        stats.add_skips(skips)
        if not writers:
            importer.join()
            writers.update(_writers(out))
        for name, split_columns in _deduped(parts, seen, stats).items():
            writers[name].write_batch(split_columns)
            stats.kept += len(split_columns["line"])

    # fork: workers inherit the loaded tokenizer instantly (spawn would re-import everything).
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    if blocks:
        chunks = _raw_blocks(data_file)
    else:  # lists of CHUNK (line, raw bytes) pairs, at most ``limit`` in all
        lines = itertools.islice(raw_lines(data_file, stats, settings.strict, settings.encoding), settings.limit)
        chunks = iter(lambda: list(itertools.islice(lines, CHUNK)), [])
    with tokenizer_processes():
        pool = (context.Pool(num_proc, initializer=_worker_init, initargs=(settings, tokenizer)) if num_proc > 1
                else _InProcess(settings, tokenizer))
        with pool:
            # datasets (for the writers) is imported in a thread while the workers start (and may run further
            # ahead until it is done); after the fork, which could leave the workers a half-imported module.
            importer = threading.Thread(target=importlib.import_module, args=("datasets.arrow_writer",), daemon=True)
            importer.start()
            pending: deque = deque()
            for chunk in chunks:
                pending.append(pool.apply_async(_worker_chunk, (chunk,)))
                if len(pending) >= (2 if writers or not importer.is_alive() else 16) * num_proc:
                    collect(pending.popleft())
            while pending:
                collect(pending.popleft())
            importer.join()
    for name, writer in (writers or _writers(out)).items():  # no chunk came: empty splits
        stats.split_sizes[name] = writer.finalize()[0]
    if stats.kept == 0:
        reasons = ", ".join(f"{k}={v}" for k, v in stats.skipped.most_common()) or "none"
        hint = f"; {LEGACY_HINT}" if stats.skipped["non_utf8"] and settings.encoding is None else ""
        raise DataError(f"{settings.path}: no usable records ({stats.records_read} read; skipped: {reasons}){hint}")
    return stats
