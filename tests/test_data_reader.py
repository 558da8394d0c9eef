import bz2
import codecs
import gzip
import json
import lzma

import pytest

from amzft.data import reader
from amzft.data.build import DataSettings, prepare
from amzft.data.module import AmazonTitlesDataModule
from amzft.data.reader import read_records
from amzft.data.settings import ReadOptions
from amzft.data.stats import PipelineStats
from amzft.errors import ConfigError, DataError
from helpers import tiny_records

GOOD = {"uid": "1", "title": "Mug", "content": "A blue mug.", "target_ind": [1], "target_rel": [1.0]}


def _read(path, strict=False):
    stats = PipelineStats()
    return list(read_records(path, stats, strict)), stats


BAD_LINES = [
    (b'{"title": "x", "content": ', "malformed_json", "malformed JSON"),
    (b'["title", "content"]', "not_an_object", "expected a JSON object, found list"),
    (b'{"title": "x"}', "missing_field", "missing field 'content'"),
    (b'{"content": "x"}', "missing_field", "missing field 'title'"),
    (b'{"title": "x", "content": null}', "wrong_type", "field 'content' should be a string, found NoneType"),
    (b'{"title": 42, "content": "x"}', "wrong_type", "field 'title' should be a string, found int"),
    (b'{"title": "caf\xe9", "content": "x"}', "non_utf8", "not UTF-8"),
]


@pytest.mark.parametrize("line, reason, message", BAD_LINES)
def test_bad_line_is_a_counted_skip_with_its_line_number(write_jsonl, line, reason, message):
    path = write_jsonl([GOOD, line, GOOD])
    records, stats = _read(path)
    assert [r.line for r in records] == [1, 3]
    assert stats.records_read == 3
    assert stats.skipped == {reason: 1} and stats.skipped_lines[reason] == [2]


@pytest.mark.parametrize("line, reason, message", BAD_LINES)
def test_bad_line_in_strict_mode_is_one_line_error_naming_file_and_line(write_jsonl, line, reason, message):
    path = write_jsonl([GOOD, line])
    with pytest.raises(DataError) as err:
        _read(path, strict=True)
    text = str(err.value)
    assert text.startswith(f"{path}:2: ") and message in text and "\n" not in text


def test_file_problems_are_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        _read(tmp_path / "missing.json")
    with pytest.raises(DataError, match="is a directory"):
        _read(tmp_path)
    empty = tmp_path / "empty.json"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="file is empty"):
        _read(empty)
    empty.write_bytes(codecs.BOM_UTF8)  # what an editor saves for an empty UTF-8 file with a BOM
    with pytest.raises(DataError, match="file is empty"):
        _read(empty)


def test_gzip_and_blank_lines(tmp_path):
    path = tmp_path / "trn.json.gz"
    with gzip.open(path, "wb") as f:
        f.write(b'{"title": "Mug", "content": "A mug."}\n\n{"title": "Cup", "content": "A cup."}\n')
    records, stats = _read(path)
    assert [(r.line, r.title) for r in records] == [(1, "Mug"), (3, "Cup")]
    assert stats.records_read == 2


def test_truncated_gzip_is_counted_or_strict_error(tmp_path):
    full = gzip.compress(b"".join(b'{"title": "T%d", "content": "C"}\n' % i for i in range(2000)))
    path = tmp_path / "cut.json.gz"
    path.write_bytes(full[: len(full) // 2])
    records, stats = _read(path)
    assert 0 < len(records) < 2000 and stats.skipped["truncated_file"] == 1
    with pytest.raises(DataError, match="truncated or corrupt"):
        _read(path, strict=True)


def _records(path):
    records, stats = _read(path)
    return [tuple(r) for r in records], stats.to_dict()


@pytest.mark.parametrize("gz", [False, True])
def test_a_byte_order_mark_is_not_a_lost_record(tmp_path, gz):
    """utf-8-sig semantics: the BOM some Windows tools write is dropped from line 1 only."""
    body = b"".join(json.dumps(r).encode() + b"\n" for r in [GOOD, {"title": "Cup", "content": "A cup."}])
    plain, bom = tmp_path / "plain.json", tmp_path / "bom.json"
    for path, data in ((plain, body), (bom, codecs.BOM_UTF8 + body)):
        path.write_bytes(gzip.compress(data) if gz else data)
    assert _records(bom) == _records(plain) and len(_records(bom)[0]) == 2
    assert _records(bom)[1]["skipped"] == {}


ARRAY = [GOOD, {"title": "Cup", "content": "A cup."}, {"title": "Tea"}, {"title": "Pot", "content": "A pot."}]


@pytest.mark.parametrize("layout", ["one_line", "pretty", "pretty_bom_gzip", "pretty_utf16_xz"])
def test_a_json_array_file_is_read_like_json_lines(tmp_path, write_jsonl, layout):
    """Elements are numbered 1, 2, ... where JSON Lines has line numbers; bad ones are the
    same counted skips."""
    text = json.dumps(ARRAY, indent=None if layout == "one_line" else 2).encode()
    path = tmp_path / "array.json"
    path.write_bytes(gzip.compress(codecs.BOM_UTF8 + text) if layout.endswith("gzip")
                     else lzma.compress(text.decode().encode("utf-16")) if layout.endswith("xz") else b"\n" + text + b"\n")
    records, stats = _read(path)
    assert [(r.line, r.title) for r in records] == [(1, "Mug"), (2, "Cup"), (4, "Pot")]
    assert stats.records_read == 4 and stats.skipped_lines == {"missing_field": [3]}
    assert _records(path)[0] == [(n, *r[1:]) for n, r in zip([1, 2, 4], _records(write_jsonl(ARRAY))[0])]
    with pytest.raises(DataError, match=r"array.json:3: missing field 'content'"):
        _read(path, strict=True)


def test_a_first_line_that_is_an_array_is_still_json_lines(write_jsonl):
    records, stats = _read(write_jsonl([b'["title", "content"]', GOOD]))
    assert [r.line for r in records] == [2] and stats.skipped_lines == {"not_an_object": [1]}


def test_a_broken_or_too_large_json_array_is_one_line_error(tmp_path, monkeypatch):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"title": "Mug", "content": "A mug."},\n  {"title": \n')
    with pytest.raises(DataError, match=r"broken.json:4: starts with '\[' but is not a valid JSON array") as err:
        _read(broken)
    assert "\n" not in str(err.value)
    monkeypatch.setattr(reader, "ARRAY_LIMIT", 2**20)
    big = tmp_path / "big.json"
    big.write_text(json.dumps([GOOD] * 20_000, indent=2))  # 2.6 MB
    with pytest.raises(DataError) as err:
        _read(big)
    assert str(err.value) == (f"{big}: holds one JSON array larger than 1 MiB; amzft reads JSON Lines (one object per line): "
                              f"convert it with  jq -c '.[]' {big} > {tmp_path / 'big.jsonl'}")
    big.write_bytes(gzip.compress(big.read_bytes()))
    with pytest.raises(DataError, match=r"convert it with  gzip -dc .*big.json \| jq -c '\.\[\]' > .*big.jsonl$"):
        _read(big)


# --------------------------------------------------------------- files as users hand them in
RECORDS = [GOOD, {"title": "Café 😀", "content": "A cup, with \"quotes\"."}, {"title": "Pot", "content": "A pot."}]
TEXT = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS)


@pytest.mark.parametrize("encoding, bom", [
    ("utf-16-le", codecs.BOM_UTF16_LE),  # what a Windows shell's `>` writes
    ("utf-16-be", codecs.BOM_UTF16_BE),
    ("utf-32-le", codecs.BOM_UTF32_LE),
    ("utf-32-be", codecs.BOM_UTF32_BE),
    ("utf-16-le", b""),  # no mark: told by the NUL bytes of '{"'
    ("utf-32-be", b""),
])
def test_utf16_and_utf32_files_are_transcoded_line_by_line(tmp_path, write_jsonl, encoding, bom, monkeypatch):
    monkeypatch.setattr(reader, "CHUNK", 7)  # characters and CRLFs cut between chunks
    plain = write_jsonl(RECORDS)
    path = tmp_path / "wide.json"
    path.write_bytes(bom + TEXT.replace("\n", "\r\n").encode(encoding))
    assert _records(path) == _records(plain) and len(_records(path)[0]) == 3
    assert not reader.is_plain_json_lines(path)  # the parallel build reads its lines, not its bytes


def test_a_bad_line_in_a_utf16_file_has_its_own_line_number(tmp_path):
    lines = [json.dumps(GOOD), "", '{"title": "x", "content": ', json.dumps(GOOD), "{\"title\": \"\ud800\", \"content\": \"x\"}",
             json.dumps(GOOD)]
    path = tmp_path / "wide.json"
    # a lone surrogate cannot be UTF-8: counted like a bad byte of a UTF-8 file; so is a cut last character
    path.write_bytes("\r\n".join(lines).encode("utf-16", "surrogatepass") + b"\x00")
    records, stats = _read(path)
    assert [r.line for r in records] == [1, 4] and stats.records_read == 5
    assert stats.skipped_lines == {"malformed_json": [3], "non_utf8": [5, 6]}
    with pytest.raises(DataError, match=r"wide.json:3: malformed JSON"):
        _read(path, strict=True)


@pytest.mark.parametrize("compress", [bz2.compress, lzma.compress, gzip.compress])
@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
def test_bzip2_and_xz_are_read_whatever_the_name(tmp_path, write_jsonl, compress, encoding):
    path = tmp_path / "trn.json.gz"  # the name says gzip; the magic bytes decide
    path.write_bytes(compress(TEXT.encode(encoding)))
    assert _records(path) == _records(write_jsonl(RECORDS))
    assert not reader.is_plain_json_lines(path)


# bzip2 in blocks of 100 kB (level 1), so that half a file still holds whole ones
@pytest.mark.parametrize("compress, kind", [(lambda data: bz2.compress(data, 1), "bzip2"), (lzma.compress, "xz")])
def test_a_truncated_bzip2_or_xz_stream_is_counted_or_strict_error(tmp_path, compress, kind):
    full = compress(b"".join(b'{"title": "T%d", "content": "C%d"}\n' % (i, i * 7919) for i in range(20000)))
    path = tmp_path / "cut.json"
    path.write_bytes(full[: len(full) // 2])
    records, stats = _read(path)
    assert 0 < len(records) < 20000 and stats.skipped == {"truncated_file": 1}
    assert stats.skipped_lines["truncated_file"] == [len(records) + 1]
    with pytest.raises(DataError, match=rf"cut.json:\d+: the {kind} stream is truncated or corrupt") as err:
        _read(path, strict=True)
    assert "\n" not in str(err.value)


def test_csv_and_tsv_are_one_line_errors_naming_the_file(tmp_path):
    csv_file = tmp_path / "data.csv"
    csv_file.write_text("title,content\nMug,A blue mug.\nCup,A cup.\n")
    with pytest.raises(DataError) as err:
        _read(csv_file)
    assert str(err.value) == (f'{csv_file}: looks like CSV (header "title,content"), not JSON Lines: amzft reads JSON '
                              'Lines with one {"title": ..., "content": ...} object per line')
    tsv = tmp_path / "data.tsv"
    tsv.write_bytes(codecs.BOM_UTF16_LE + "uid\ttitle\tcontent\r\n1\tMug\tA mug.\r\n".encode("utf-16-le"))
    with pytest.raises(DataError, match=r'data.tsv: looks like TSV \(header "uid\\ttitle\\tcontent"\), not JSON Lines'):
        _read(tsv)
    latin1 = tmp_path / "excel.csv"  # what a spreadsheet saves: cp1252, CRLF
    latin1.write_bytes("titre;description,prix\r\nCaf\xe9,Un caf\xe9.\r\n".encode("cp1252"))
    with pytest.raises(DataError, match=r'excel.csv: looks like CSV \(header "titre;description,prix"\)'):
        _read(latin1)
    unnamed = tmp_path / "export.txt"  # no title/content header: a second row of as many fields
    unnamed.write_text('"Mug","A blue mug"\n"Cup","A cup"\n')
    with pytest.raises(DataError, match=r"""export.txt: looks like CSV \(header '"Mug","A blue mug"'\)"""):
        _read(unnamed)


def test_a_plain_text_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\n\nThese are my products, one per line\nBlue mug\n")
    with pytest.raises(DataError) as err:
        _read(path)
    assert str(err.value) == (f'{path}: looks like plain text (the first line starts with "These are my products, one per '
                              'line"), not JSON Lines: amzft reads JSON Lines with one {"title": ..., "content": ...} object per line')


@pytest.mark.parametrize("first", [
    b'title": "Mug", "content": "cut off at the start"}',  # a file cut mid-record
    b"uid,title,content",  # a stray header line above JSON Lines
    b"# exported 2024-01-01",
    b'"just a string"',  # a JSON value: not_an_object
    b"\x01\x02\x03garbage, binary, x",  # control characters: binary, not text
])
def test_json_lines_with_a_bad_first_line_is_not_taken_for_csv(write_jsonl, first):
    records, stats = _read(write_jsonl([first, GOOD, GOOD]))
    assert [r.line for r in records] == [2, 3] and sum(stats.skipped.values()) == 1


def test_a_lone_bad_first_line_that_is_a_json_value_stays_a_counted_skip(write_jsonl):
    records, stats = _read(write_jsonl([b"42"]))
    assert records == [] and stats.skipped_lines == {"not_an_object": [1]}


@pytest.mark.parametrize("chunk", [5, 1 << 16])
def test_bare_cr_line_ends_are_lines(tmp_path, write_jsonl, chunk, monkeypatch):
    monkeypatch.setattr(reader, "CHUNK", chunk)
    lines = [json.dumps(GOOD), "", '{"title": "x"}', json.dumps(RECORDS[1], ensure_ascii=False), json.dumps(GOOD)]
    path = tmp_path / "mac.json"
    path.write_bytes(codecs.BOM_UTF8 + "\r".join(lines).encode() + b"\r")
    records, stats = _read(path)
    assert [(r.line, r.title) for r in records] == [(1, "Mug"), (4, "Café 😀"), (5, "Mug")]
    assert stats.records_read == 4 and stats.skipped_lines == {"missing_field": [3]}
    assert not reader.is_plain_json_lines(path)  # the parallel build splits blocks at LF only
    crlf = tmp_path / "dos.json"
    crlf.write_bytes("\r\n".join(lines).encode() + b"\r\n")
    assert _records(crlf) == _records(path) and reader.is_plain_json_lines(crlf)


def test_a_stray_cr_in_a_file_with_lf_does_not_shift_line_numbers(write_jsonl):
    records, stats = _read(write_jsonl([GOOD, b'{"title": "a\rb", "content": "x"}', GOOD]))
    assert [r.line for r in records] == [1, 3] and stats.skipped_lines == {"malformed_json": [2]}


@pytest.mark.parametrize("bom", [codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE])
def test_a_file_holding_only_a_utf16_or_utf32_mark_is_empty(tmp_path, bom):
    path = tmp_path / "empty.json"
    path.write_bytes(bom)
    with pytest.raises(DataError, match="file is empty"):
        _read(path)


@pytest.mark.parametrize("magic, message", [
    (b"PK\x03\x04", "is a zip archive, not JSON Lines: unzip it"),
    (b"\x28\xb5\x2f\xfd", "is zstd-compressed, which amzft cannot read: decompress it with  zstd -d "),
])
def test_zip_and_zstd_files_are_named(tmp_path, magic, message):
    path = tmp_path / "trn.json"
    path.write_bytes(magic + b"\x00" * 40)
    with pytest.raises(DataError, match=f"^{path}: {message}"):
        _read(path)


def test_the_conversion_hint_for_a_large_array_decompresses_and_transcodes(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "ARRAY_LIMIT", 2**20)
    path = tmp_path / "big.json"
    path.write_bytes(bz2.compress(json.dumps([GOOD] * 20_000, indent=2).encode("utf-16")))
    with pytest.raises(DataError, match=r"convert it with  bzip2 -dc .*big.json \| iconv -f UTF-16 -t UTF-8 \| "
                                        r"jq -c '\.\[\]' > .*big.jsonl$"):
        _read(path)


def _kept(prepared):
    return {name: list(zip(split["line"], split["title"], split["content"])) for name, split in prepared.raw.items()}


def test_the_build_keeps_the_same_records_from_a_utf16_bzip2_or_cr_copy(write_jsonl, llama_tokenizer, tmp_path):
    """Serial and parallel builds (a non-plain file goes to the workers as numbered lines, never
    as raw blocks split at LF) keep what the plain UTF-8 original gives, line for line."""
    lines = [json.dumps(r) for r in tiny_records(24)]
    lines[5:5] = ["", '{"title": "broken"', lines[2]]  # a blank line, a bad line, a duplicate
    original = write_jsonl(lines)
    text = original.read_text()
    copies = {"wide.json": codecs.BOM_UTF16_LE + text.replace("\n", "\r\n").encode("utf-16-le"),
              "packed.json.gz": bz2.compress(text.encode()), "mac.json": text.replace("\n", "\r").encode()}
    settings = {"val_fraction": 0.2, "test_fraction": 0.2}
    want = prepare(DataSettings(path=str(original), **settings), llama_tokenizer, tmp_path / "want", num_proc=1)
    assert want.stats.skipped == {"malformed_json": 1, "duplicate": 1} and want.stats.kept == 24
    for name, data in copies.items():
        (tmp_path / name).write_bytes(data)
        for num_proc in (1, 2):
            got = prepare(DataSettings(path=str(tmp_path / name), **settings), llama_tokenizer,
                          tmp_path / f"{name}{num_proc}", num_proc=num_proc)
            assert _kept(got) == _kept(want) and got.stats.to_dict() == want.stats.to_dict(), (name, num_proc)
    (tmp_path / "data.csv").write_text("title,content\nMug,A mug.\n")
    with pytest.raises(DataError, match="data.csv: looks like CSV"):
        prepare(DataSettings(path=str(tmp_path / "data.csv")), llama_tokenizer, tmp_path / "csv", num_proc=2)


def _pretty(records, separator="\n"):
    return separator.join(json.dumps(r, indent=2) for r in records) + "\n"


@pytest.mark.parametrize("separator", ["\n", ",\n", "\n\n"])
def test_pretty_printed_objects_one_after_another_are_read(tmp_path, separator):
    """A file of JSON objects written over several lines each (json.dumps(indent=2), jq .), with
    or without commas between them: every record read, each numbered by its first line, a nested
    object and a brace inside a string included; a broken object in the middle is one counted
    malformed_json skip (strict: a one-line error at its first line) and the next is still read."""
    records = [dict(r, extra={"a": [1, {"b": "}"}]}) for r in tiny_records(5)]
    path = tmp_path / "pretty.json"
    path.write_text(_pretty(records, separator))
    got, stats = _read(path)
    assert [(r.title, r.content) for r in got] == [(r["title"], r["content"]) for r in records]
    assert stats.skipped == {} and stats.records_read == 5
    text = path.read_text().splitlines()
    assert [r.line for r in got] == [i + 1 for i, line in enumerate(text) if line.startswith("{")]
    broken = json.dumps(records[1], indent=2).replace('"content"', '"content" "oops"', 1)
    path.write_text(_pretty(records[:1]) + broken + "\n" + _pretty(records[2:]))
    got, stats = _read(path)
    assert [r.title for r in got] == [records[i]["title"] for i in (0, 2, 3, 4)]
    broken_line = path.read_text().splitlines().index("{", 1) + 1
    assert stats.skipped == {"malformed_json": 1} and stats.skipped_lines["malformed_json"] == [broken_line]
    with pytest.raises(DataError, match=rf"^{path}:{broken_line}: malformed JSON"):
        _read(path, strict=True)


def test_json_lines_with_a_trailing_comma_on_every_line_lose_nothing(write_jsonl, llama_tokenizer, tmp_path):
    """One object per line, each followed by a comma (an array without its brackets): every record
    read, by the reader and by the build's workers (which parse raw blocks of a plain file)."""
    records = tiny_records(20)
    path = write_jsonl([json.dumps(r) + ", " for r in records])
    got, stats = _read(path)
    assert len(got) == 20 and stats.skipped == {}
    prepared = prepare(DataSettings(path=str(path), val_fraction=0.0, test_fraction=0.0), llama_tokenizer,
                       tmp_path / "cache", num_proc=2)
    assert prepared.stats.kept == 20 and prepared.stats.skipped == {}
    assert _read(write_jsonl([b'{"title": "x", "content": "y"},,']))[1].skipped == {"malformed_json": 1}


def test_a_windows_1252_file_is_named_and_read_with_data_encoding(tmp_path, llama_tokenizer):
    """Curly quotes and é in Windows-1252: without data.read.encoding no record is lost silently: the
    build's error names the setting that reads it; with data.read.encoding: cp1252 every record is
    read, and decoded as the text it was."""
    records = [{"title": f"Caf\u00e9 \u201cNo. {i}\u201d", "content": f"The \u2018best\u2019 mug, number {i} \u2013 blue."}
               for i in range(20)]
    path = tmp_path / "legacy.json"
    path.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode("cp1252") + b"\r\n" for r in records))
    with pytest.raises(DataError) as err:
        prepare(DataSettings(path=str(path)), llama_tokenizer, tmp_path / "auto", num_proc=1)
    assert "non_utf8=20" in str(err.value) and "set data.read.encoding: cp1252" in str(err.value)
    settings = DataSettings(path=str(path), val_fraction=0.0, test_fraction=0.0, encoding="cp1252")
    for num_proc in (1, 2):
        prepared = prepare(settings, llama_tokenizer, tmp_path / f"cp1252-{num_proc}", num_proc=num_proc)
        assert list(prepared.raw["train"]["title"]) == [r["title"] for r in records]
        assert prepared.stats.skipped == {}


def test_data_encoding_is_checked_when_the_module_is_made():
    with pytest.raises(ConfigError, match="data.read.encoding: unknown encoding 'klingon'; use a codec name such as cp1252"):
        AmazonTitlesDataModule(read=ReadOptions(encoding="klingon"))
    assert AmazonTitlesDataModule(read=ReadOptions(encoding="Windows-1252")).settings.encoding == "cp1252"
