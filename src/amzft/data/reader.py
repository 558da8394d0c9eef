"""Stream records from a trn.json file (JSON Lines, plain or gzip) without loading it whole.

Bad lines are a counted skip (reason + line number) by default, or a one-line ``DataError``
naming file, line and problem with ``strict=True``. Problems with the file itself (missing,
a directory, empty) are always errors.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from amzft.data.stats import PipelineStats
from amzft.errors import DataError

REQUIRED_FIELDS = ("title", "content")


class RawRecord(NamedTuple):
    line: int  # 1-based line number in the file
    title: str
    content: str


def check_data_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a trn.json / .jsonl(.gz) file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    return path


def _open(path: Path):
    with path.open("rb") as probe:
        magic = probe.read(2)
    # Trust the bytes, not the name: a gzip file called trn.json still works.
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else path.open("rb")


def _problem(raw: bytes) -> tuple[str, str] | dict:
    """The parsed object, or (reason, human message) for a bad line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return "non_utf8", f"bytes that are not UTF-8 at column {exc.start + 1}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return "malformed_json", f"malformed JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(obj, dict):
        return "not_an_object", f"expected a JSON object, found {type(obj).__name__}"
    for name in REQUIRED_FIELDS:
        if name not in obj:
            return "missing_field", f"missing field {name!r}"
        if not isinstance(obj[name], str):
            return "wrong_type", f"field {name!r} should be a string, found {type(obj[name]).__name__}"
    return obj


parse_line = _problem  # the name worker processes use (data.build)


def iter_raw_lines(path: str | Path, stats: PipelineStats, strict: bool = False) -> Iterator[tuple[int, bytes]]:
    """Yield (line number, raw bytes) of the non-blank lines of ``path`` (plain or gzip); a
    truncated gzip stream is counted (or, strict, raised) as in ``read_records``."""
    path = check_data_file(path)
    line_no = 0
    with _open(path) as handle:
        try:
            for line_no, raw in enumerate(handle, start=1):
                if raw.strip():  # blank lines (e.g. a trailing newline) are not records
                    yield line_no, raw
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            message = f"{path}:{line_no + 1}: the gzip stream is truncated or corrupt ({exc})"
            if strict:
                raise DataError(message) from None
            stats.skip("truncated_file", line_no + 1)


def read_records(path: str | Path, stats: PipelineStats, strict: bool = False) -> Iterator[RawRecord]:
    """Yield the valid records of ``path``; count (or, strict, raise on) the others."""
    for line_no, raw in iter_raw_lines(path, stats, strict):
        stats.records_read += 1
        parsed = _problem(raw)
        if isinstance(parsed, tuple):
            reason, message = parsed
            if strict:
                raise DataError(f"{Path(path)}:{line_no}: {message}")
            stats.skip(reason, line_no)
            continue
        yield RawRecord(line_no, parsed["title"], parsed["content"])
