"""Build (once) and reopen (in a fraction of a second) the cleaned dataset as memory-mapped Arrow
files; examples are tokenised on demand from it (data.lazy).

The build is one pass that reads, cleans, filters, dedupes and splits the records and writes the
kept ones' cleaned text: no tokenising, so training on the 2.2 M-record file starts in seconds,
not minutes. The skip report stays exact: a record can only be too long for ``max_length`` (its
prompt alone: skipped; its response: cut, counted) when its text has nearly ``max_length``
bytes (a token covers at least one byte), so only those few are tokenised during the build.

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
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from amzft.data.clean import FilterSettings, RecordFilter, dedupe_key
from amzft.data.encode import PromptEncoder, encode_texts, join_example
from amzft.data.lazy import PROBE, LazyExamples, default_num_proc, settled_encoder
from amzft.data.prompt import PromptFormat
from amzft.data.reader import check_data_file, iter_raw_lines, parse_line, read_records
from amzft.data.split import SPLITS, assign_split
from amzft.data.stats import PipelineStats
from amzft.errors import DataError
from amzft.paths import cache_root, staging_dir

# bump when the examples a given setting produces change (2: HTML tags and control characters
# removed; 3: the cache holds cleaned text, tokenised on demand)
PIPELINE_VERSION = 3
CHUNK = 4096  # records per worker task / per exact-length check
# Tokens a prompt + response can have beyond their UTF-8 bytes: special tokens (BOS, EOS), a
# SentencePiece word-start marker per separately tokenised piece. Generous on purpose.
SLACK = 16

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


class TokenisedSplits(Mapping):
    """Split name -> its ``datasets.Dataset`` whose rows come with their tokens (``input_ids``,
    ``prompt_len``, ``num_labels``; a format transform tokenises the rows read). Made on first
    use: setting a transform costs ~0.2 s (datasets fingerprints it) that training never needs."""

    def __init__(self, prepared: PreparedData):
        self.prepared = prepared
        self._made: dict = {}

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
    """The memory-mapped cleaned splits: ``raw[name]`` (title, content, line), ``splits[name]``
    (rows tokenised as read) and ``examples(name)`` (what loaders use)."""

    raw: dict  # split name -> datasets.Dataset (memory-mapped)
    stats: PipelineStats
    directory: Path
    from_cache: bool
    tokenizer: object = None
    settings: DataSettings | None = None
    _examples: dict = field(default_factory=dict)
    _splits: TokenisedSplits | None = None
    _encoder: PromptEncoder | None = None

    @property
    def splits(self) -> TokenisedSplits:
        if self._splits is None:
            self._splits = TokenisedSplits(self)
        return self._splits

    def examples(self, name: str) -> LazyExamples:
        """The split's ``LazyExamples`` (one per split, so its token counts accumulate)."""
        if self._encoder is None:  # settled on a fixed sample: the first titles of each split
            probe = [title for split in self.raw.values() for title in split[:PROBE]["title"]]
            self._encoder = settled_encoder(self.tokenizer, self.settings.prompt, probe)
        if name not in self._examples:
            counts = self.directory / f"{name}.counts.npy"
            self._examples[name] = LazyExamples(self.raw[name], self.tokenizer, self.settings, self._encoder, counts)
        return self._examples[name]


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
    from datasets import Features, Value  # noqa: PLC0415 - start-up time (see above)

    return Features({"title": Value("string"), "content": Value("string"), "line": Value("int64")})


def _load(directory: Path, settings: DataSettings, tokenizer) -> PreparedData:
    from datasets import Dataset  # noqa: PLC0415 - start-up time

    stats = PipelineStats.from_dict(json.loads((directory / "stats.json").read_text()))
    splits = {name: Dataset.from_file(str(directory / f"{name}.arrow")) for name in SPLITS}
    return PreparedData(splits, stats, directory, True, tokenizer, settings)


def prepare(
    settings: DataSettings, tokenizer, cache_dir: str | Path | None = None, num_proc: int | None = None
) -> PreparedData:
    """Reopen the cached records for these settings, or build them with ``num_proc`` worker
    processes (None: one per available core; 1: in this process). The result does not depend
    on ``num_proc``, so it is not part of the cache key."""
    root = Path(cache_dir) if cache_dir else cache_root() / "datasets"
    directory = root / cache_key(settings, tokenizer)
    if (directory / "stats.json").is_file():
        return _load(directory, settings, tokenizer)
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
    built = _load(directory, settings, tokenizer)
    built.from_cache = False
    return built


class LengthCheck:
    """Which cleaned records are too long for ``max_length``, tokenising only those whose UTF-8
    size says they might be: a prompt that does not fit is a skip (``prompt_too_long``), a
    response that does not is cut (``truncated``), exactly as the tokenised example will be."""

    def __init__(self, settings: DataSettings, tokenizer):
        self.settings, self.tokenizer = settings, tokenizer
        fmt = settings.prompt
        self.prompt_bytes = len(fmt.render("").encode())  # the prompt without its title
        self.per_title = fmt.question.count("{title}")
        self.encode_prompts: PromptEncoder | None = None  # made on first need

    def __call__(self, chunk: list[tuple[int, str, str]]) -> tuple[list[bool], list[int]]:
        """For cleaned (line, title, content) records: whether each is cut, and the lines of those
        that do not fit at all (their ``cut`` entry is None)."""
        limit = self.settings.max_length - SLACK
        unsure = [i for i, (_, title, content) in enumerate(chunk)
                  if self.prompt_bytes + self.per_title * len(title.encode()) + len(content.encode()) > limit]
        cut: list = [False] * len(chunk)
        too_long = []
        if unsure:
            if self.encode_prompts is None:
                self.encode_prompts = PromptEncoder(self.tokenizer, self.settings.prompt)
            prompts = self.encode_prompts([chunk[i][1] for i in unsure])
            responses = encode_texts(self.tokenizer, [chunk[i][2] for i in unsure], False)
            for i, p_ids, r_ids in zip(unsure, prompts, responses):
                example = join_example(p_ids, r_ids, self.tokenizer.eos_token_id, self.settings.max_length)
                if example is None:
                    cut[i] = None
                    too_long.append(chunk[i][0])
                else:
                    cut[i] = example.truncated
        return cut, too_long


def _build(settings: DataSettings, tokenizer, out: Path) -> PipelineStats:
    from datasets.arrow_writer import ArrowWriter  # noqa: PLC0415 - start-up time

    stats = PipelineStats()
    keep = RecordFilter(settings.filters)
    check = LengthCheck(settings, tokenizer)
    features = _features()
    writers = {name: ArrowWriter(features=features, path=str(out / f"{name}.arrow")) for name in SPLITS}

    def flush(chunk: list[tuple[int, str, str]]) -> None:
        cut, too_long = check(chunk)
        rows = [(*record, c, _split_of(record[1], settings)) for record, c in zip(chunk, cut) if c is not None]
        for line in too_long:
            stats.skip("prompt_too_long", line)
        _write_rows(writers, rows)
        stats.kept += len(rows)
        stats.truncated += sum(r[3] for r in rows)  # (line, title, content, cut, split)

    chunk: list[tuple[int, str, str]] = []
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
            flush(chunk)
            chunk = []
    if chunk:
        flush(chunk)
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


def _split_of(title: str, settings: DataSettings) -> str:
    return assign_split(title, settings.val_fraction, settings.test_fraction, settings.split_salt)


def _write_rows(writers: dict, rows: list[tuple]) -> None:
    """Write kept (line, title, content, cut, split, ...) records, each to its product's split."""
    batches = {name: {"title": [], "content": [], "line": []} for name in SPLITS}
    for line, title, content, _, split, *_ in rows:
        batch = batches[split]
        batch["title"].append(title)
        batch["content"].append(content)
        batch["line"].append(line)
    for name, batch in batches.items():
        if batch["line"]:
            writers[name].write_batch(batch)


# ------------------------------------------------------------------ several processes
_WORKER: dict = {}


def _worker_init(settings: DataSettings, tokenizer) -> None:
    # Dedupe needs every record seen so far: the parent does it, in file order.
    filters = FilterSettings(**{**asdict(settings.filters), "dedupe": False})
    _WORKER.update(keep=RecordFilter(filters), check=LengthCheck(settings, tokenizer), settings=settings)


def _worker_chunk(lines: list[tuple[int, bytes]]):
    """Parse, validate, clean, filter, length-check and split raw lines. Returns the skips as
    (reason, line, message) in line order, the kept (line, title, content, cut, split, dedupe
    key) records, and the lines whose prompt does not fit."""
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
    cut, too_long = w["check"](records) if records else ([], [])
    settings = w["settings"]
    kept = [(line, title, content, c, _split_of(title, settings),
             dedupe_key(title, content) if settings.filters.dedupe else None)
            for (line, title, content), c in zip(records, cut) if c is not None]
    return skips, kept, too_long


def _build_parallel(settings: DataSettings, tokenizer, out: Path, num_proc: int) -> PipelineStats:
    """The same records as ``_build``, with parsing, cleaning and length checks spread over
    ``num_proc`` processes. The parent only reads raw lines, dedupes and writes, consuming
    results in file order, so the output (and the first lines listed per skip reason) do not
    depend on the number of processes. At most 2 x num_proc chunks are in flight: memory
    stays bounded whatever the file size."""
    from datasets.arrow_writer import ArrowWriter  # noqa: PLC0415 - start-up time

    stats = PipelineStats()
    writers = {name: ArrowWriter(features=_features(), path=str(out / f"{name}.arrow")) for name in SPLITS}
    seen: set[bytes] = set()

    def collect(result) -> None:
        skips, kept, too_long = result.get()
        for reason, line, message in skips:
            if message is not None and settings.strict:
                raise DataError(f"{settings.path}:{line}: {message}")
            stats.skip(reason, line)
        rows = []
        for record in kept:
            key = record[-1]
            if key is not None:
                if key in seen:
                    stats.skip("duplicate", record[0])
                    continue
                seen.add(key)
            rows.append(record)
        for line in too_long:  # already in line order
            stats.skip("prompt_too_long", line)
        _write_rows(writers, rows)
        stats.kept += len(rows)
        stats.truncated += sum(r[3] for r in rows)

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
