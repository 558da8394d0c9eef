"""Read stage: a trn.json file's numbered non-blank lines as UTF-8 bytes, whatever its compression, encoding or form."""

from __future__ import annotations

import bz2
import codecs
import contextlib
import csv
import gzip
import io
import json
import lzma
import shlex
import unicodedata
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from amzft.data.stats import PipelineStats
from amzft.errors import DataError

REQUIRED_FIELDS = ("title", "content")
ARRAY_LIMIT = 512 * 2**20  # a JSON array is parsed whole (several times its bytes in memory): above this, convert it
CHUNK = 1 << 16  # bytes per read of a file that is transcoded or has its line ends rewritten
CR_PROBE = 16 * 2**20  # no LF but a CR in this many first bytes: bare-CR line ends (generous: a 3 MB first record)
OBJECT_PROBE = 200  # lines after a first line that opens an object, read to find where it closes
LOOK_AHEAD = 4  # non-blank lines after the first one read to tell CSV / text from a bad first record
LEGACY_HINT = "lines that are not UTF-8 may be in a legacy encoding: for Windows-1252 set data.read.encoding: cp1252"
WHAT_WE_READ = 'amzft reads JSON Lines with one {"title": ..., "content": ...} object per line'


class Compression(NamedTuple):
    name: str  # also the command that decompresses it (for the JSON array conversion hint)
    magic: bytes
    open: Callable
    errors: tuple  # what reading a truncated or corrupt stream raises


COMPRESSIONS = (
    Compression("gzip", b"\x1f\x8b", gzip.open, (EOFError, gzip.BadGzipFile, zlib.error)),
    # bz2 reports a corrupt stream as a bare OSError: caught only while reading a bzip2 file
    Compression("bzip2", b"BZh", bz2.open, (EOFError, OSError)),
    Compression("xz", b"\xfd7zXZ\x00", lzma.open, (EOFError, lzma.LZMAError)),
)
# Formats the standard library cannot read (zstd arrives in Python 3.14): named, not read.
REFUSED = (
    (b"PK\x03\x04", "is a zip archive, not JSON Lines: unzip it and pass the .json / .jsonl file inside"),
    (b"\x28\xb5\x2f\xfd", "is zstd-compressed, which amzft cannot read: decompress it with  zstd -d {path}"),
)
# UTF-32 LE's mark begins with UTF-16 LE's, so it is tried first.
BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
# Without a mark, the NULs of the first 4 bytes tell the encoding, JSON's first 2 characters being ASCII (RFC 4627 §3)
NUL_PATTERNS = {"000a": "utf-32-be", "a000": "utf-32-le", "0a0a": "utf-16-be", "a0a0": "utf-16-le"}
UNDECODABLE = "amzft-undecodable"


def _undecodable(exc: UnicodeError) -> tuple[str, int]:
    # An undecodable UTF-16/32 unit becomes a lone surrogate: a counted non_utf8 skip, like a bad byte in UTF-8.
    return "\udcff", exc.end


codecs.register_error(UNDECODABLE, _undecodable)


class RawRecord(NamedTuple):
    line: int  # 1-based line number in the file (the element's number in a JSON array file)
    title: str
    content: str


class Layout(NamedTuple):
    """How a data file's bytes become UTF-8 lines (``_layout``)."""

    compression: Compression | None
    encoding: str  # "utf-8", or the codec it is transcoded from
    bare_cr: bool  # its lines end in a bare CR

    @property
    def errors(self) -> tuple:
        return self.compression.errors if self.compression else ()

    def damaged(self, exc: Exception) -> str:
        return f"the {self.compression.name} stream is truncated or corrupt ({exc})"

    def binary(self, path: Path):
        return self.compression.open(path, "rb") if self.compression else path.open("rb")


def check_data_file(path: str | Path) -> Path:
    """``path`` as a Path, or a one-line DataError where it is missing, a directory or empty."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a trn.json / .jsonl(.gz) file")
    # An editor's "empty" file may still hold its encoding's byte-order mark.
    if path.stat().st_size <= 4 and path.read_bytes() in (b"", codecs.BOM_UTF8, *(bom for bom, _ in BOMS)):
        raise DataError(f"{path}: file is empty")
    return path


def _encoding(head: bytes) -> str:
    """The codec of a file's (decompressed) text from its first 4 bytes."""
    for bom, codec in BOMS:
        if head.startswith(bom):
            return codec  # "utf-16" / "utf-32" read the mark, take its byte order and drop it
    pattern = "".join("0" if byte == 0 else "a" if byte < 0x80 else "x" for byte in head)
    return NUL_PATTERNS.get(pattern, "utf-8")


def _layout(path: Path, encoding: str | None = None) -> Layout:
    """Compression (by magic bytes), encoding (``encoding``, or told by mark / NULs) and line ends of
    ``path``; zip or zstd: a DataError."""
    with path.open("rb") as probe:
        magic = probe.read(8)
    for refused, problem in REFUSED:
        if magic.startswith(refused):
            raise DataError(f"{path}: " + problem.format(path=shlex.quote(str(path))))
    layout = Layout(next((c for c in COMPRESSIONS if magic.startswith(c.magic)), None), "utf-8", False)
    with contextlib.suppress(*layout.errors):  # reading the lines counts (or, strict, raises on) the damage
        with layout.binary(path) as binary:
            layout = layout._replace(encoding=encoding or _encoding(binary.read(4)))
        with _open(path, layout) as text:
            layout = layout._replace(bare_cr=_ends_lines_in_cr(text))
    return layout


def _ends_lines_in_cr(handle) -> bool:
    """A CR and no LF in the first ``CR_PROBE`` bytes (JSON strings hold neither raw). A file with
    an LF keeps LFs as its only breaks: a stray CR must not shift every line number after it."""
    seen, cr = 0, False
    while seen < CR_PROBE and (chunk := handle.read1(CHUNK)):
        if b"\n" in chunk:
            return False
        cr = cr or b"\r" in chunk
        seen += len(chunk)
    return cr


def _open(path: Path, layout: Layout):
    """``path`` as a binary stream of UTF-8 text with LF line ends: how this module opens a file."""
    binary = layout.binary(path)
    if layout.encoding == "utf-8" and not layout.bare_cr:
        return binary  # as it is: no Python code in the loop over the lines of a large file
    # read1: what was decompressed before a corrupt part is still yielded, as a gzip file's lines are
    chunks = iter(lambda: binary.read1(CHUNK), b"")
    if layout.encoding != "utf-8":
        chunks = _transcoded(chunks, layout.encoding)
    if layout.bare_cr:
        chunks = _cr_to_lf(chunks)
    return io.BufferedReader(_ChunkReader(chunks, binary), CHUNK)


def _transcoded(chunks: Iterator[bytes], encoding: str) -> Iterator[bytes]:
    decoder = codecs.getincrementaldecoder(encoding)(UNDECODABLE)  # keeps a character cut between chunks
    for chunk in chunks:
        yield decoder.decode(chunk).encode("utf-8", "surrogatepass")
    yield decoder.decode(b"", final=True).encode("utf-8", "surrogatepass")


def _cr_to_lf(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The text with every CRLF and bare CR made an LF (universal newlines, as bytes)."""
    after_cr = False
    for chunk in chunks:
        if after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF cut between two chunks: its CR was the line break
        after_cr = chunk.endswith(b"\r")
        yield chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


class _ChunkReader(io.RawIOBase):
    """A raw stream over byte chunks (``io.BufferedReader`` adds lines); closes the file underneath."""

    def __init__(self, chunks: Iterator[bytes], source):
        super().__init__()
        self._chunks, self._source, self._left = chunks, source, memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._left:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._left = memoryview(chunk)
        size = min(len(buffer), len(self._left))
        buffer[:size] = self._left[:size]
        self._left = self._left[size:]
        return size

    def close(self) -> None:
        self._source.close()  # closing twice does nothing
        super().close()


def json_object(raw: bytes) -> tuple[str, str] | dict:
    """One line as a JSON object, or (reason, message) when it is none (records, titles, answers)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return "non_utf8", f"bytes that are not UTF-8 at column {exc.start + 1}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        # Some exporters end every line in a comma (an array's elements without its brackets).
        if not (text := text.rstrip()).endswith(","):
            return "malformed_json", f"malformed JSON ({exc.msg} at column {exc.colno})"
        try:
            obj = json.loads(text[:-1])
        except json.JSONDecodeError:
            return "malformed_json", f"malformed JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(obj, dict):
        return "not_an_object", f"expected a JSON object, found {type(obj).__name__}"
    return obj


def parse_line(raw: bytes) -> tuple[str, str] | dict:
    """The parsed training record, or (reason, message) for a bad line."""
    obj = json_object(raw)
    if isinstance(obj, tuple):
        return obj
    for name in REQUIRED_FIELDS:
        if name not in obj:
            return "missing_field", f"missing field {name!r}"
        if not isinstance(obj[name], str):
            return "wrong_type", f"field {name!r} should be a string, found {type(obj[name]).__name__}"
    return obj


def _first_line(handle, line_no: int, limit: int = ARRAY_LIMIT + 1) -> tuple[int, bytes]:
    """(number, at most ``limit`` bytes) of the next non-blank line after ``line_no`` (b"" at the end), BOM dropped."""
    while True:
        raw = handle.readline(limit)
        line_no += 1
        if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        if not raw or raw.strip():
            return line_no, raw


def _show(text: str, width: int = 60) -> str:
    """A line's start, quoted, on one line."""
    text = (text[:width] + "…" if len(text) > width else text).replace("\t", "\\t")
    return f"'{text}'" if '"' in text else f'"{text}"'


def _fields(line: str, delimiter: str) -> list[str]:
    try:
        return next(csv.reader([line], delimiter=delimiter), [])
    except csv.Error:
        return []


def _delimited(first: str, second: str | None) -> str | None:
    """"CSV" / "TSV" for a table's header: 2+ fields, a column named title or content or a second line as wide."""
    delimiter = "\t" if "\t" in first else ","
    fields = _fields(first, delimiter)
    named = {field.strip().casefold() for field in fields} & set(REQUIRED_FIELDS)
    if len(fields) >= 2 and (named or (second is not None and len(_fields(second, delimiter)) == len(fields))):
        return "TSV" if delimiter == "\t" else "CSV"
    return None


def _refuse_other_formats(path: Path, handle, line_no: int, first: bytes, errors: tuple) -> None:
    """A one-line ``DataError`` for a file clearly not JSON: CSV, TSV or plain text. Conservative: a
    first line that starts like JSON, is a JSON value, holds control characters, or is followed
    within ``LOOK_AHEAD`` lines by one starting with '{' or '[' leaves the file to be read."""
    if not first or first.lstrip().startswith((b"{", b"[")):
        return
    # "replace": a spreadsheet's CSV is often in cp1252; control characters mean binary
    line = first.decode("utf-8", "replace").strip()
    if any(unicodedata.category(char) == "Cc" and char != "\t" for char in line):
        return
    with contextlib.suppress(ValueError):
        json.loads(line)
        return  # a JSON value, though not an object: counted not_an_object skips
    following: list[str] = []
    with contextlib.suppress(*errors):  # decide on the lines read before the damage
        while len(following) < LOOK_AHEAD:
            line_no, raw = _first_line(handle, line_no, 1 << 20)  # a line's start is enough
            if not raw:
                break
            if raw.lstrip().startswith((b"{", b"[")):
                return
            following.append(raw.decode("utf-8", "replace").strip())
    kind = _delimited(line, following[0] if following else None)
    found = f"{kind} (header {_show(line)})" if kind else f"plain text (the first line starts with {_show(line)})"
    raise DataError(f"{path}: looks like {found}, not JSON Lines: {WHAT_WE_READ}")


def _too_big(path: Path, layout: Layout) -> DataError:
    # One command to paste: decompress, iconv (jq reads UTF-8 only), jq one object per line.
    source = shlex.quote(str(path))
    steps = [f"{layout.compression.name} -dc {source}"] if layout.compression else []
    if layout.encoding != "utf-8":
        charset = layout.encoding.upper().replace("-LE", "LE").replace("-BE", "BE")
        steps.append(f"iconv -f {charset} -t UTF-8" + ("" if steps else f" {source}"))
    steps.append("jq -c '.[]'" + ("" if steps else f" {source}"))
    out = shlex.quote(str(path.parent / (path.name.split(".")[0] + ".jsonl")))
    return DataError(f"{path}: holds one JSON array larger than {ARRAY_LIMIT // 2**20} MiB; amzft reads JSON Lines "
                     f"(one object per line): convert it with  {' | '.join(steps)} > {out}")


def _form(path: Path, layout: Layout) -> tuple[str, int, bytes]:
    """How ``path`` holds its records: ("lines", ...) JSON Lines (also a whole JSON value followed by more
    lines), ("objects", ...) JSON objects written over several lines each, one after another, or ("array",
    first non-blank line's number, at most ``ARRAY_LIMIT + 1`` bytes) one JSON array."""
    with _open(path, layout) as handle:
        try:
            first_no, first = _first_line(handle, 0)
        except layout.errors:
            return "lines", 0, b""  # reading it as JSON Lines counts (or raises on) the damage
        try:
            if first.lstrip().startswith(b"{"):
                return _objects_or_lines(handle, first), first_no, b""
            if not first.lstrip().startswith(b"["):
                _refuse_other_formats(path, handle, first_no, first, layout.errors)
                return "lines", first_no, b""
            try:
                json.loads(first)
            except ValueError:  # (UnicodeDecodeError is one) not whole on its own: pretty-printed
                return "array", first_no, first + handle.read(ARRAY_LIMIT + 1 - len(first))
            return ("lines" if _first_line(handle, first_no)[1] else "array"), first_no, first
        except layout.errors as exc:
            raise DataError(f"{path}: {layout.damaged(exc)}") from None


def _objects_or_lines(handle, first: bytes) -> str:
    """"objects" when the first line opens an object that closes on a later line, else "lines" (a bad
    first line of JSON Lines is one counted skip)."""
    parsed = json_object(first)
    if not isinstance(parsed, tuple) or parsed[0] != "malformed_json":
        return "lines"  # a whole object (or a line with another problem)
    text = first
    for _ in range(OBJECT_PROBE):
        if not (raw := handle.readline(ARRAY_LIMIT)):
            break
        text += raw
        if raw.rstrip().endswith((b"}", b"},")) and isinstance(json_object(text), dict):
            return "objects"
    return "lines"


def _objects(handle) -> Iterator[tuple[int, bytes]]:
    """(first line's number, text) of each object of a file of JSON objects written over several lines,
    one after another (as ``json.dumps(indent=...)`` or ``jq .`` write them), commas between them or not.
    An object ends on the line where its text parses; one that never does (another starts at column 0, or
    a closing brace at column 0 does not close it) is handed on as it is: a counted malformed_json skip."""
    start, lines = 0, []
    for line_no, raw in enumerate(handle, start=1):
        if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        if not raw.strip():
            continue
        if lines and raw.startswith(b"{"):
            yield start, b"".join(lines)
            lines = []
        start = start if lines else line_no
        lines.append(raw)
        if raw.rstrip().endswith((b"}", b"},")) and (isinstance(json_object(b"".join(lines)), dict)
                                                     or raw.startswith(b"}")):
            yield start, b"".join(lines)
            lines = []
    if lines:
        yield start, b"".join(lines)


def _json_array(path: Path, layout: Layout, first_no: int, data: bytes) -> list:
    """The elements of a file that holds one JSON array (``_form``'s text of it)."""
    if len(data) > ARRAY_LIMIT:
        raise _too_big(path, layout)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: a JSON array with bytes that are not UTF-8 (byte {exc.start + 1})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{first_no + exc.lineno - 1}: starts with '[' but is not a valid JSON array ({exc.msg} at "
                        f"column {exc.colno}); amzft reads JSON Lines (one object per line) or one JSON array") from None


def is_plain_json_lines(path: Path, encoding: str | None = None) -> bool:
    """Whether the build may read ``path`` in blocks of bytes split at LF: uncompressed UTF-8 JSON Lines, LF or CRLF."""
    layout = _layout(path, encoding)
    plain = layout.compression is None and layout.encoding == "utf-8" and not layout.bare_cr
    return plain and _form(path, layout)[0] == "lines"


def iter_raw_lines(path: str | Path, stats: PipelineStats, strict: bool = False) -> Iterator[tuple[int, bytes]]:
    """``raw_lines`` of ``path`` once it passes ``check_data_file``."""
    return raw_lines(check_data_file(path), stats, strict)


def raw_lines(path: Path, stats: PipelineStats, strict: bool = False, encoding: str | None = None) -> Iterator[tuple[int, bytes]]:
    """(line number, raw UTF-8 bytes) of a checked data file's non-blank lines (or of its multi-line objects,
    numbered by their first line), or a JSON array's (element number, JSON); text in ``encoding`` (None: UTF-8,
    or UTF-16/32 told by mark or NULs); a truncated compressed stream: a counted ``truncated_file`` skip or,
    strict, a DataError."""
    layout = _layout(path, encoding)
    form, first_no, data = _form(path, layout)
    if form == "array":
        elements = _json_array(path, layout, first_no, data)
        yield from ((number, json.dumps(element).encode()) for number, element in enumerate(elements, start=1))
        return
    line_no = 0
    with _open(path, layout) as handle:
        try:
            if form == "objects":
                for line_no, raw in _objects(handle):
                    yield line_no, raw
                return
            for line_no, raw in enumerate(handle, start=1):
                if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]  # utf-8-sig: a BOM only counts at the start
                if raw.strip():  # blank lines (e.g. a trailing newline) are not records
                    yield line_no, raw
        except layout.errors as exc:
            if strict:
                raise DataError(f"{path}:{line_no + 1}: {layout.damaged(exc)}") from None
            stats.skip("truncated_file", line_no + 1)


def read_objects(path: str | Path, stats: PipelineStats, parse: Callable[[bytes], tuple[str, str] | dict],
                 strict: bool = False) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each line ``parse`` accepts; the others: counted skips or, strict, a DataError."""
    for line_no, raw in iter_raw_lines(path, stats, strict):
        stats.records_read += 1
        parsed = parse(raw)
        if not isinstance(parsed, tuple):
            yield line_no, parsed
        elif strict:
            raise DataError(f"{Path(path)}:{line_no}: {parsed[1]}")
        else:
            stats.skip(parsed[0], line_no)


def read_records(path: str | Path, stats: PipelineStats, strict: bool = False) -> Iterator[RawRecord]:
    """Yield the valid records of ``path``; count (or, strict, raise on) the others."""
    for line_no, parsed in read_objects(path, stats, parse_line, strict):
        yield RawRecord(line_no, parsed["title"], parsed["content"])
