"""Build (once) and reopen (in a fraction of a second) the cleaned dataset as memory-mapped Arrow
files; examples are tokenised on demand from it (data.lazy).

The build is one pass that reads, cleans, filters, dedupes and splits the records and writes the
kept ones' cleaned text: no tokenising, so training on the 2.2 M-record file starts in seconds,
not minutes. The skip report stays exact: a record is skipped when its prompt alone does not
fit ``max_length``, which only a title of nearly ``max_length`` bytes can cause (a token covers
at least one byte), so only those few prompts are tokenised during the build. Whether a long
response is cut is known when its example is tokenised (``LazyExamples.truncated``; the data
report counts them): tokenising every long description here would be a large part of the
build's work (docs/performance.md, "Time to the first step").

The cache key covers the data file (path, size, mtime), every setting that changes the
examples, the tokenizer's full definition and the pipeline version, so a stale cache is never
reused. Files are written into a temporary folder and renamed into place, so an interrupted
build never leaves a cache that looks complete.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import threading
import weakref
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from amzft.data.clean import FilterSettings, RecordFilter, dedupe_key
from amzft.data.encode import PromptEncoder
from amzft.data.lazy import PROBE, LazyExamples, default_num_proc, settled_encoder
from amzft.data.prompt import PromptFormat
from amzft.data.reader import check_data_file, is_plain_json_lines, iter_raw_lines, parse_line
from amzft.data.split import SPLITS, assign_split
from amzft.data.stats import PipelineStats
from amzft.errors import DataError
from amzft.files import cache_root, staging_dir

# bump when the examples a given setting produces change (2: HTML tags and control characters
# removed; 3: the cache holds cleaned text, tokenised on demand; 4: cut responses are counted with
# the tokens, not by the build)
PIPELINE_VERSION = 4
CHUNK = 4096  # records per worker task / per exact-length check
BLOCK = 1 << 21  # bytes of whole lines per worker task when a plain file is read in blocks
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
    use: setting a transform costs time (datasets fingerprints it) that training never needs."""

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


# A tokenizer's definition hash, per instance: one process shares one tokenizer per folder
# (amzft.sources.load_tokenizer), and serialising Llama-3.2's takes ~0.2 s a call. Weak
# keys: a tokenizer no one holds any more is forgotten with it.
_DEFINITIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer) -> str:
    if tokenizer not in _DEFINITIONS:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        definition = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
        _DEFINITIONS[tokenizer] = hashlib.sha256(definition.encode()).hexdigest()
    extra = f"{tokenizer.eos_token_id}|{tokenizer.pad_token_id}|{tokenizer.bos_token_id}"
    return hashlib.sha256((_DEFINITIONS[tokenizer] + extra).encode()).hexdigest()[:16]


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


# `datasets` (slow to import) is imported where it is used: `fit --help` imports this module,
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
        stats = _build(settings, tokenizer, tmp, procs)
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


class PromptCheck:
    """Which cleaned records' prompts do not fit ``max_length`` (a ``prompt_too_long`` skip,
    exactly as the tokenised example would be refused), tokenising only the prompts whose UTF-8
    size says they might not: those of titles of nearly ``max_length`` bytes."""

    def __init__(self, settings: DataSettings, tokenizer):
        self.settings, self.tokenizer = settings, tokenizer
        fmt = settings.prompt
        self.prompt_bytes = len(fmt.render("").encode())  # the prompt without its title
        self.per_title = fmt.question.count("{title}")
        self.encode_prompts: PromptEncoder | None = None  # made on first need

    def __call__(self, chunk: list[tuple[int, str, str]]) -> list[int]:
        """For cleaned (line, title, content) records: the lines of those whose prompt does not fit."""
        limit = self.settings.max_length - SLACK
        unsure = [record for record in chunk if self.prompt_bytes + self.per_title * len(record[1].encode()) > limit]
        if not unsure:
            return []
        if self.encode_prompts is None:
            self.encode_prompts = PromptEncoder(self.tokenizer, self.settings.prompt)
        prompts = self.encode_prompts([title for _, title, _ in unsure])
        # join_example's own test: at least one response token must fit after the prompt
        return [line for (line, _, _), ids in zip(unsure, prompts) if len(ids) >= self.settings.max_length]


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


def _split_columns(rows: list[tuple]) -> dict[str, dict]:
    """Kept (line, title, content, split, ...) records as each split's typed Arrow columns
    (title, content, line), in their order; splits without rows are left out."""
    import pyarrow as pa  # noqa: PLC0415 - start-up time (datasets imports it anyway)

    lists = {name: ([], [], []) for name in SPLITS}
    for line, title, content, split, *_ in rows:
        titles, contents, lines = lists[split]
        titles.append(title)
        contents.append(content)
        lines.append(line)
    # typed Arrow arrays: datasets' own type inference from Python lists is a large part of the
    # parallel build's parent process, its bottleneck (docs/performance.md, "Time to the first step")
    return {name: {"title": pa.array(titles, pa.string()), "content": pa.array(contents, pa.string()),
                   "line": pa.array(lines, pa.int64())}
            for name, (titles, contents, lines) in lists.items() if lines}


def _writers(out: Path) -> dict:
    from datasets.arrow_writer import ArrowWriter  # noqa: PLC0415 - start-up time (slow to import)

    return {name: ArrowWriter(features=_features(), path=str(out / f"{name}.arrow")) for name in SPLITS}


# ------------------------------------------------------------------ the workers
_WORKER: dict = {}  # a worker's filter, prompt check and settings (this process's, with one worker)


def _worker_init(settings: DataSettings, tokenizer) -> None:
    # Dedupe needs every record seen so far: the parent does it, in file order.
    filters = FilterSettings(**{**asdict(settings.filters), "dedupe": False})
    _WORKER.update(keep=RecordFilter(filters), check=PromptCheck(settings, tokenizer), settings=settings)


def _block_lines(first: int, block: bytes) -> list[tuple[int, bytes]]:
    """(line number, raw bytes) of a block of whole lines whose first line is ``first``, blank
    lines left out (numbered all the same), as ``iter_raw_lines`` yields them."""
    return [(first + k, raw) for k, raw in enumerate(block.split(b"\n")) if raw.strip()]


def _worker_chunk(lines: list[tuple[int, bytes]] | tuple[int, bytes]):
    """Parse, validate, clean, filter, prompt-check and split raw lines (or a (first line,
    bytes) block of them). Returns the number of records read, the chunk's skips (a
    ``PipelineStats``), the first unreadable line's one-line error (``strict`` raises it) and,
    per split, the kept records' Arrow columns (``_split_columns``) with their dedupe keys
    (None without dedupe). Arrow columns, not Python tuples, go back to the parent: unpickling
    records' strings one by one is costly work for the parent, the build's bottleneck
    (docs/performance.md, "Time to the first step")."""
    w = _WORKER
    settings: DataSettings = w["settings"]
    if isinstance(lines, tuple):
        lines = _block_lines(*lines)
    skips, error, records = PipelineStats(), None, []
    for line, raw in lines:
        parsed = parse_line(raw)
        if isinstance(parsed, tuple):
            skips.skip(parsed[0], line)
            if error is None:
                error = f"{settings.path}:{line}: {parsed[1]}"
            continue
        title, content, reason = w["keep"](parsed["title"], parsed["content"])
        if reason is not None:
            skips.skip(reason, line)
            continue
        records.append((line, title, content))
    too_long = w["check"](records) if records else []
    for line in too_long:
        skips.skip("prompt_too_long", line)
    refused = set(too_long)
    kept = [(line, title, content, _split_of(title, settings)) for line, title, content in records if line not in refused]
    keys = {name: [] for name in SPLITS}
    if settings.filters.dedupe:
        for _, title, content, split in kept:
            keys[split].append(dedupe_key(title, content))
    parts = {name: (columns, keys[name] if settings.filters.dedupe else None)
             for name, columns in _split_columns(kept).items()}
    return len(lines), skips, error, parts


def _deduped(parts: dict, seen: set[bytes], stats: PipelineStats) -> dict[str, dict]:
    """Each split's columns without the records whose dedupe key is in ``seen`` (or earlier in
    the chunk), counted as ``duplicate`` skips in line order; the new keys join ``seen``.
    Identical records share a title and so a split: each split's order is the file's."""
    import pyarrow as pa  # noqa: PLC0415 - start-up time (imported by the workers' results anyway)

    duplicates: list[int] = []
    out = {}
    for name, (columns, keys) in parts.items():
        if keys is not None:
            fresh = []
            for key in keys:
                fresh.append(key not in seen)
                seen.add(key)
            if not all(fresh):
                lines = columns["line"].to_pylist()
                duplicates.extend(line for line, new in zip(lines, fresh) if not new)
                mask = pa.array(fresh, pa.bool_())
                columns = {column: array.filter(mask) for column, array in columns.items()}
        if len(columns["line"]):
            out[name] = columns
    for line in sorted(duplicates):
        stats.skip("duplicate", line)
    return out


def _raw_blocks(path: Path, size: int = BLOCK) -> Iterator[tuple[int, bytes]]:
    """(first line number, bytes) blocks of about ``size`` bytes of whole lines of a plain JSON
    Lines file: the parent process only reads and counts newlines (memchr speed), the workers
    split the lines, so the parent does not become the build's bottleneck. A leading UTF-8 BOM is
    dropped, as ``iter_raw_lines`` does."""
    line = 1
    with path.open("rb") as handle:
        while block := handle.read(size):
            if not block.endswith(b"\n"):
                block += handle.readline()
            if line == 1 and block.startswith(codecs.BOM_UTF8):
                block = block[len(codecs.BOM_UTF8):]
            yield line, block
            line += int(np.count_nonzero(np.frombuffer(block, np.uint8) == 10))  # faster than bytes.count


def _reads_blocks(settings: DataSettings) -> bool:
    """Whether the parallel build hands the workers blocks of bytes (a plain JSON Lines file
    read whole; the workers then count ``records_read``) rather than numbered lines (gzip, a
    JSON array, a ``limit``: ``_raw_lines`` counts them)."""
    return settings.limit is None and is_plain_json_lines(check_data_file(settings.path))


def _raw_lines(settings: DataSettings, stats: PipelineStats) -> Iterator[list[tuple[int, bytes]]]:
    """Lists of ``CHUNK`` (line number, raw bytes) pairs from ``iter_raw_lines``, counting
    ``records_read`` (and stopping at ``limit``) as it goes."""
    chunk: list[tuple[int, bytes]] = []
    for line, raw in iter_raw_lines(settings.path, stats, settings.strict):
        if settings.limit is not None and stats.records_read >= settings.limit:
            break
        stats.records_read += 1
        chunk.append((line, raw))
        if len(chunk) >= CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Done:
    """A result already computed, read as a pool's ``AsyncResult`` is."""

    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


class _InProcess:
    """The pool's interface run in this process: ``num_proc`` 1 takes the very path several
    workers do (one build path), without forking."""

    def __init__(self, settings: DataSettings, tokenizer):
        _worker_init(settings, tokenizer)

    def apply_async(self, function, args):
        return _Done(function(*args))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        _WORKER.clear()


def _build(settings: DataSettings, tokenizer, out: Path, num_proc: int) -> PipelineStats:
    """Parse, clean, filter, prompt-check and split the records into the Arrow files, the work
    spread over ``num_proc`` worker processes (1: in this process, by the same code). The parent
    only reads blocks of lines, dedupes and writes, consuming results in file order, so the
    output (and the first lines listed per skip reason) do not depend on the number of
    processes. At most 2 x num_proc chunks are in flight (16 x while datasets is being
    imported): memory stays bounded whatever the file size."""
    stats = PipelineStats()
    writers: dict = {}
    seen: set[bytes] = set()
    blocks = _reads_blocks(settings)

    def collect(result) -> None:
        read, skips, error, parts = result.get()
        if error is not None and settings.strict:
            raise DataError(error)
        if blocks:  # the workers counted the records they split off
            stats.records_read += read
        stats.add_skips(skips)
        columns = _deduped(parts, seen, stats)
        if not writers:
            importer.join()
            writers.update(_writers(out))
        for name, split_columns in columns.items():
            writers[name].write_batch(split_columns)
            stats.kept += len(split_columns["line"])

    # fork: workers inherit the loaded tokenizer instantly (spawn would re-import everything).
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # processes, not Rust threads; no fork warning
    chunks = _raw_blocks(check_data_file(settings.path)) if blocks else _raw_lines(settings, stats)
    pool = (context.Pool(num_proc, initializer=_worker_init, initargs=(settings, tokenizer)) if num_proc > 1
            else _InProcess(settings, tokenizer))
    try:
        with pool:
            # datasets (slow to import, needed for the writers) is imported in a thread while the
            # workers start on the first blocks, which may run further ahead until it is done.
            # Started after the workers are forked: a fork during an import could leave them
            # a half-imported module.
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
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    if not writers:
        writers.update(_writers(out))
    return _finish(settings, writers, stats)
