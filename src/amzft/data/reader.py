"""Stream records from a trn.json file (JSON Lines, plain or gzip) without loading it whole.

Bad lines are a counted skip (reason + line number) by default, or a one-line ``DataError``
naming file, line and problem with ``strict=True``. Problems with the file itself (missing,
a directory, empty, an unreadable JSON array) are always errors.

Files users have that are not quite JSON Lines: a UTF-8 byte-order mark (Windows tools write
one) is dropped from the first line, as ``utf-8-sig`` does; a file holding one JSON array of
records (``[{...}, {...}]``, one line or pretty-printed) is read whole up to ``ARRAY_LIMIT``
bytes, its elements numbered 1, 2, ... in place of line numbers; a larger one is a one-line
error saying how to convert it.
"""

from __future__ import annotations

import codecs
import gzip
import json
import shlex
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from amzft.data.stats import PipelineStats
from amzft.errors import DataError

REQUIRED_FIELDS = ("title", "content")
# A JSON array is parsed whole (Python objects take several times the file's bytes): above this
# size converting it to JSON Lines, which streams, is the better answer.
ARRAY_LIMIT = 512 * 2**20
GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


class RawRecord(NamedTuple):
    line: int  # 1-based line number in the file (the element's number in a JSON array file)
    title: str
    content: str


def check_data_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a trn.json / .jsonl(.gz) file")
    if path.stat().st_size <= len(codecs.BOM_UTF8) and path.read_bytes() in (b"", codecs.BOM_UTF8):
        raise DataError(f"{path}: file is empty")
    return path


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as probe:
        return probe.read(2) == b"\x1f\x8b"


def _open(path: Path):
    # Trust the bytes, not the name: a gzip file called trn.json still works.
    return gzip.open(path, "rb") if _is_gzip(path) else path.open("rb")


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


def _first_line(handle, line_no: int) -> tuple[int, bytes]:
    """The next non-blank line after ``line_no`` and its number, at most ``ARRAY_LIMIT + 1``
    bytes of it (b"" at the end); the byte-order mark is dropped from line 1."""
    while True:
        raw = handle.readline(ARRAY_LIMIT + 1)
        line_no += 1
        if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        if not raw or raw.strip():
            return line_no, raw


def _too_big(path: Path) -> DataError:
    # One command the user can paste: jq streams the array out as one object per line.
    out = shlex.quote(str(path.parent / (path.name.split(".")[0] + ".jsonl")))
    source = f"gzip -dc {shlex.quote(str(path))} | jq -c '.[]'" if _is_gzip(path) else f"jq -c '.[]' {shlex.quote(str(path))}"
    return DataError(
        f"{path}: holds one JSON array larger than {ARRAY_LIMIT // 2**20} MiB; amzft reads JSON Lines "
        f"(one object per line): convert it with  {source} > {out}"
    )


def _read_array_text(path: Path) -> tuple[int, bytes] | None:
    """(number of its first non-blank line, at most ``ARRAY_LIMIT + 1`` bytes) of a file that
    holds one JSON array, or None for JSON Lines. A first line that is a whole JSON value
    followed by more lines is JSON Lines (whose first line is a bad record)."""
    with _open(path) as handle:
        try:
            first_no, first = _first_line(handle, 0)
        except GZIP_ERRORS:
            return None  # reading it as JSON Lines counts (or raises on) the damage
        if not first.lstrip().startswith(b"["):
            return None
        try:
            try:
                json.loads(first)
            except ValueError:  # (UnicodeDecodeError is one) not whole on its own: pretty-printed
                return first_no, first + handle.read(ARRAY_LIMIT + 1 - len(first))
            return None if _first_line(handle, first_no)[1] else (first_no, first)
        except GZIP_ERRORS as exc:
            raise DataError(f"{path}: the gzip stream is truncated or corrupt ({exc})") from None


def _json_array(path: Path) -> list | None:
    """The elements of a file that holds one JSON array, or None for JSON Lines."""
    found = _read_array_text(path)
    if found is None:
        return None
    first_no, data = found
    if len(data) > ARRAY_LIMIT:
        raise _too_big(path)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: a JSON array with bytes that are not UTF-8 (byte {exc.start + 1})") from None
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{first_no + exc.lineno - 1}: starts with '[' but is not a valid JSON array "
            f"({exc.msg} at column {exc.colno}); amzft reads JSON Lines (one object per line) or one JSON array"
        ) from None


def is_plain_json_lines(path: Path) -> bool:
    """A JSON Lines file that is not gzip-compressed: one the build may read in blocks of bytes."""
    return not _is_gzip(path) and _read_array_text(path) is None


def iter_raw_lines(path: str | Path, stats: PipelineStats, strict: bool = False) -> Iterator[tuple[int, bytes]]:
    """Yield (line number, raw bytes) of the non-blank lines of ``path`` (plain or gzip); a
    truncated gzip stream is counted (or, strict, raised) as in ``read_records``. For a JSON
    array file: (element number, the element as JSON), so every path that reads a file (the
    serial and parallel builds, ``data``, ``evaluate --data``) parses it the same way."""
    path = check_data_file(path)
    array = _json_array(path)
    if array is not None:
        for number, element in enumerate(array, start=1):
            yield number, json.dumps(element).encode()
        return
    line_no = 0
    with _open(path) as handle:
        try:
            for line_no, raw in enumerate(handle, start=1):
                if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]  # utf-8-sig: a BOM only counts at the start
                if raw.strip():  # blank lines (e.g. a trailing newline) are not records
                    yield line_no, raw
        except GZIP_ERRORS as exc:
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
