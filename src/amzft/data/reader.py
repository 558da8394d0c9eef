"""Stream records from a trn.json file without loading it whole.

What is read (the bytes decide, never the file's name):

- JSON Lines, plain or compressed with gzip, bzip2 or xz (the standard library's ``gzip``,
  ``bz2``, ``lzma``);
- in UTF-8, a leading byte-order mark (Windows tools write one) dropped from line 1 as
  ``utf-8-sig`` does; or in UTF-16 / UTF-32, little- or big-endian, told by the byte-order mark
  (what a Windows shell's ``>`` writes) or, without one, by the NUL bytes of the first two
  characters, and transcoded to UTF-8 as it is read, a block at a time;
- lines ending in LF, CRLF or, in a file that has no LF at all, a bare CR (old Mac style), each
  counting as one line;
- a file holding one JSON array of records (``[{...}, {...}]``, one line or pretty-printed) is
  read whole up to ``ARRAY_LIMIT`` bytes, its elements numbered 1, 2, ... in place of line
  numbers; a larger one is a one-line error saying how to convert it.

Bad lines are a counted skip (reason + line number) by default, or a one-line ``DataError``
naming file, line and problem with ``strict=True``; so is a truncated or corrupt compressed
stream (``truncated_file``). Problems with the file itself are always one-line errors: missing,
a directory, empty, an unreadable JSON array, or clearly not JSON Lines (CSV, TSV, plain text, a
zip archive, zstd).
"""

from __future__ import annotations

import bz2
import codecs
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
# A JSON array is parsed whole (Python objects take several times the file's bytes): above this
# size converting it to JSON Lines, which streams, is the better answer.
ARRAY_LIMIT = 512 * 2**20
CHUNK = 1 << 16  # bytes per read of a file that is transcoded or has its line ends rewritten
# A file with no LF in its first CR_PROBE bytes but a CR ends its lines in bare CRs: generous, so
# that one long record at the start (a 3 MB description) does not hide the line ends after it.
CR_PROBE = 16 * 2**20
LOOK_AHEAD = 4  # non-blank lines after the first one read to tell CSV / text from a bad first record
WHAT_WE_READ = 'amzft reads JSON Lines with one {"title": ..., "content": ...} object per line'


class Compression(NamedTuple):
    name: str
    magic: bytes
    open: Callable
    errors: tuple  # what reading a truncated or corrupt stream raises
    tool: str  # the command that decompresses it (for the JSON array conversion hint)


COMPRESSIONS = (
    Compression("gzip", b"\x1f\x8b", gzip.open, (EOFError, gzip.BadGzipFile, zlib.error), "gzip"),
    # bz2 reports a corrupt stream as a bare OSError: caught only while reading a bzip2 file
    Compression("bzip2", b"BZh", bz2.open, (EOFError, OSError), "bzip2"),
    Compression("xz", b"\xfd7zXZ\x00", lzma.open, (EOFError, lzma.LZMAError), "xz"),
)
# Formats the standard library cannot read (zstd arrives in Python 3.14): named, not read as
# lines of bytes that are not UTF-8.
REFUSED = (
    (b"PK\x03\x04", "is a zip archive, not JSON Lines: unzip it and pass the .json / .jsonl file inside"),
    (b"\x28\xb5\x2f\xfd", "is zstd-compressed, which amzft cannot read: decompress it with  zstd -d {path}"),
)
# UTF-32 LE's mark begins with UTF-16 LE's, so it is tried first.
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)
# Without a mark: JSON's first two characters are ASCII ('{"', '[{', whitespace), so where the
# NUL bytes of the first 4 bytes fall tells the encoding (RFC 4627, section 3). "a" is an ASCII
# byte other than NUL; a UTF-8 file never starts with a NUL.
NUL_PATTERNS = {"000a": "utf-32-be", "a000": "utf-32-le", "0a0a": "utf-16-be", "a0a0": "utf-16-le"}
UNDECODABLE = "amzft-undecodable"


def _undecodable(exc: UnicodeError) -> tuple[str, int]:
    # A unit the file's UTF-16 / UTF-32 cannot decode (a lone surrogate, a cut last character)
    # becomes a lone surrogate, which UTF-8 cannot encode either (written with "surrogatepass"):
    # that line is then a counted non_utf8 skip with its column, like a bad byte in a UTF-8 file.
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
    def plain(self) -> bool:
        return self.compression is None and self.encoding == "utf-8" and not self.bare_cr

    @property
    def errors(self) -> tuple:
        return self.compression.errors if self.compression else ()

    def damaged(self, exc: Exception) -> str:
        return f"the {self.compression.name} stream is truncated or corrupt ({exc})"


def check_data_file(path: str | Path) -> Path:
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


def _decompressed(path: Path, compression: Compression | None):
    return compression.open(path, "rb") if compression else path.open("rb")


def _layout(path: Path) -> Layout:
    """Compression (by magic bytes, not the name), encoding and line ends of ``path``; a zip or
    zstd file is a one-line error."""
    with path.open("rb") as probe:
        magic = probe.read(8)
    for refused, problem in REFUSED:
        if magic.startswith(refused):
            raise DataError(f"{path}: " + problem.format(path=shlex.quote(str(path))))
    layout = Layout(next((c for c in COMPRESSIONS if magic.startswith(c.magic)), None), "utf-8", False)
    try:
        with _decompressed(path, layout.compression) as binary:
            layout = layout._replace(encoding=_encoding(binary.read(4)))
        with _open(path, layout) as text:
            layout = layout._replace(bare_cr=_ends_lines_in_cr(text))
    except layout.errors:
        pass  # reading the lines counts (or, strict, raises on) the damage where it is
    return layout


def _ends_lines_in_cr(handle) -> bool:
    """Whether the lines end in a bare CR: a CR and no LF in the first ``CR_PROBE`` bytes. (A
    JSON string holds no raw CR or LF, so either is a line break.) A file with an LF keeps LFs as
    its only line breaks: a stray CR in one bad line must not shift every line number after it."""
    seen, cr = 0, False
    while seen < CR_PROBE and (chunk := handle.read1(CHUNK)):
        if b"\n" in chunk:
            return False
        cr = cr or b"\r" in chunk
        seen += len(chunk)
    return cr


def _open(path: Path, layout: Layout | None = None):
    """``path`` as a binary stream of UTF-8 text split into lines at LF, whatever its compression,
    encoding and line ends: the one way this module opens a data file."""
    layout = _layout(path) if layout is None else layout
    binary = _decompressed(path, layout.compression)
    if layout.encoding == "utf-8" and not layout.bare_cr:
        return binary  # as it is: no Python code in the loop over the lines of a large file
    chunks = _chunks(binary)
    if layout.encoding != "utf-8":
        chunks = _transcoded(chunks, layout.encoding)
    if layout.bare_cr:
        chunks = _cr_to_lf(chunks)
    return io.BufferedReader(_ChunkReader(chunks, binary), CHUNK)


def _chunks(binary) -> Iterator[bytes]:
    # read1: what was decompressed before a truncated or corrupt part is still yielded, so the
    # lines before the damage are read, as iterating a gzip file's lines reads them
    while chunk := binary.read1(CHUNK):
        yield chunk


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
    """A raw stream over an iterator of byte chunks (``io.BufferedReader`` adds readline and
    line iteration); closing it closes the file underneath."""

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
        if not self.closed:
            self._source.close()
        super().close()


def json_object(raw: bytes) -> tuple[str, str] | dict:
    """One line as a JSON object, or (reason, human message) when it is none: the first checks
    of every kind of line amzft reads (training records, catalogue titles, written answers)."""
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
    return obj


def _problem(raw: bytes) -> tuple[str, str] | dict:
    """The parsed training record, or (reason, human message) for a bad line."""
    obj = json_object(raw)
    if isinstance(obj, tuple):
        return obj
    for name in REQUIRED_FIELDS:
        if name not in obj:
            return "missing_field", f"missing field {name!r}"
        if not isinstance(obj[name], str):
            return "wrong_type", f"field {name!r} should be a string, found {type(obj[name]).__name__}"
    return obj


parse_line = _problem  # the name worker processes use (data.build)


def _first_line(handle, line_no: int, limit: int = ARRAY_LIMIT + 1) -> tuple[int, bytes]:
    """The next non-blank line after ``line_no`` and its number, at most ``limit`` bytes of it
    (b"" at the end); the byte-order mark is dropped from line 1."""
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
    """"CSV" / "TSV" when ``first`` reads as the header of a table: two or more fields, and a
    column named title or content or a second line with as many fields; else None."""
    delimiter = "\t" if "\t" in first else "," if "," in first else None
    if delimiter is None:
        return None
    fields = _fields(first, delimiter)
    if len(fields) < 2:
        return None
    named = {field.strip().casefold() for field in fields} & set(REQUIRED_FIELDS)
    if named or (second is not None and len(_fields(second, delimiter)) == len(fields)):
        return "TSV" if delimiter == "\t" else "CSV"
    return None


def _refuse_other_formats(path: Path, handle, first_no: int, first: bytes, errors: tuple) -> None:
    """A one-line ``DataError`` for a file that as a whole is clearly not JSON: CSV, TSV or plain
    text. Conservative: a first line that starts like JSON, is a JSON value, holds control
    characters (binary: its lines are counted skips), or is followed within ``LOOK_AHEAD`` non-blank lines by one
    starting with '{' or '[' (JSON Lines with a bad first record) leaves the file to be read."""
    if not first or first.lstrip().startswith((b"{", b"[")):
        return
    # "replace": a spreadsheet's CSV is often in cp1252; control characters mean binary
    line = first.decode("utf-8", "replace").strip()
    if any(unicodedata.category(char) == "Cc" and char != "\t" for char in line):
        return
    try:
        json.loads(line)
        return  # a JSON value, though not an object: counted not_an_object skips
    except ValueError:
        pass
    following: list[str] = []
    line_no = first_no
    try:
        while len(following) < LOOK_AHEAD:
            line_no, raw = _first_line(handle, line_no, 1 << 20)  # a line's start is enough
            if not raw:
                break
            if raw.lstrip().startswith((b"{", b"[")):
                return
            following.append(raw.decode("utf-8", "replace").strip())
    except errors:
        pass  # decide on the lines read before the damage
    kind = _delimited(line, following[0] if following else None)
    if kind is not None:
        raise DataError(f"{path}: looks like {kind} (header {_show(line)}), not JSON Lines: {WHAT_WE_READ}")
    raise DataError(f"{path}: looks like plain text (the first line starts with {_show(line)}), not JSON Lines: "
                    f"{WHAT_WE_READ}")


def _too_big(path: Path, layout: Layout) -> DataError:
    # One command the user can paste: jq streams the array out as one object per line (after
    # decompressing and, for UTF-16 / UTF-32, iconv, as jq reads UTF-8 only).
    source = shlex.quote(str(path))
    steps = []
    if layout.compression:
        steps.append(f"{layout.compression.tool} -dc {source}")
    if layout.encoding != "utf-8":
        charset = layout.encoding.upper().replace("-LE", "LE").replace("-BE", "BE")
        steps.append(f"iconv -f {charset} -t UTF-8" + ("" if steps else f" {source}"))
    steps.append("jq -c '.[]'" + ("" if steps else f" {source}"))
    out = shlex.quote(str(path.parent / (path.name.split(".")[0] + ".jsonl")))
    return DataError(
        f"{path}: holds one JSON array larger than {ARRAY_LIMIT // 2**20} MiB; amzft reads JSON Lines "
        f"(one object per line): convert it with  {' | '.join(steps)} > {out}"
    )


def _read_array_text(path: Path, layout: Layout) -> tuple[int, bytes] | None:
    """(number of its first non-blank line, at most ``ARRAY_LIMIT + 1`` bytes) of a file that
    holds one JSON array, or None for JSON Lines. A first line that is a whole JSON value
    followed by more lines is JSON Lines (whose first line is a bad record). A file that is
    clearly not JSON (CSV, text) is a one-line error."""
    with _open(path, layout) as handle:
        try:
            first_no, first = _first_line(handle, 0)
        except layout.errors:
            return None  # reading it as JSON Lines counts (or raises on) the damage
        if not first.lstrip().startswith(b"["):
            _refuse_other_formats(path, handle, first_no, first, layout.errors)
            return None
        try:
            try:
                json.loads(first)
            except ValueError:  # (UnicodeDecodeError is one) not whole on its own: pretty-printed
                return first_no, first + handle.read(ARRAY_LIMIT + 1 - len(first))
            return None if _first_line(handle, first_no)[1] else (first_no, first)
        except layout.errors as exc:
            raise DataError(f"{path}: {layout.damaged(exc)}") from None


def _json_array(path: Path, layout: Layout) -> list | None:
    """The elements of a file that holds one JSON array, or None for JSON Lines."""
    found = _read_array_text(path, layout)
    if found is None:
        return None
    first_no, data = found
    if len(data) > ARRAY_LIMIT:
        raise _too_big(path, layout)
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
    """Whether the build may read ``path`` in blocks of raw bytes split at LF: UTF-8 JSON Lines
    with LF or CRLF line ends, uncompressed. A compressed, UTF-16 / UTF-32, bare-CR or JSON array
    file is read through ``iter_raw_lines``; CSV, text, zip and zstd are one-line errors here."""
    layout = _layout(path)
    return layout.plain and _read_array_text(path, layout) is None


def iter_raw_lines(path: str | Path, stats: PipelineStats, strict: bool = False) -> Iterator[tuple[int, bytes]]:
    """Yield (line number, raw UTF-8 bytes) of the non-blank lines of ``path`` (any file the
    module reads, see its docstring); a truncated compressed stream is counted (or, strict,
    raised) as in ``read_records``. For a JSON array file: (element number, the element as
    JSON), so every path that reads a file (the serial and parallel builds, ``data``,
    ``evaluate --data``) parses it the same way."""
    path = check_data_file(path)
    layout = _layout(path)
    array = _json_array(path, layout)
    if array is not None:
        for number, element in enumerate(array, start=1):
            yield number, json.dumps(element).encode()
        return
    line_no = 0
    with _open(path, layout) as handle:
        try:
            for line_no, raw in enumerate(handle, start=1):
                if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]  # utf-8-sig: a BOM only counts at the start
                if raw.strip():  # blank lines (e.g. a trailing newline) are not records
                    yield line_no, raw
        except layout.errors as exc:
            message = f"{path}:{line_no + 1}: {layout.damaged(exc)}"
            if strict:
                raise DataError(message) from None
            stats.skip("truncated_file", line_no + 1)


def read_objects(path: str | Path, stats: PipelineStats, parse: Callable[[bytes], tuple[str, str] | dict],
                 strict: bool = False) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each line of ``path`` that ``parse`` accepts; the lines it
    answers (reason, message) for are counted skips or, strict, a one-line DataError."""
    for line_no, raw in iter_raw_lines(path, stats, strict):
        stats.records_read += 1
        parsed = parse(raw)
        if isinstance(parsed, tuple):
            reason, message = parsed
            if strict:
                raise DataError(f"{Path(path)}:{line_no}: {message}")
            stats.skip(reason, line_no)
            continue
        yield line_no, parsed


def read_records(path: str | Path, stats: PipelineStats, strict: bool = False) -> Iterator[RawRecord]:
    """Yield the valid records of ``path``; count (or, strict, raise on) the others."""
    for line_no, parsed in read_objects(path, stats, _problem, strict):
        yield RawRecord(line_no, parsed["title"], parsed["content"])
