import codecs
import gzip
import json

import pytest

from amzft.data import reader
from amzft.data.reader import read_records
from amzft.data.stats import PipelineStats
from amzft.errors import DataError

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


@pytest.mark.parametrize("layout", ["one_line", "pretty", "pretty_bom_gzip"])
def test_a_json_array_file_is_read_like_json_lines(tmp_path, write_jsonl, layout):
    """Elements are numbered 1, 2, ... where JSON Lines has line numbers; bad ones are the
    same counted skips."""
    text = json.dumps(ARRAY, indent=None if layout == "one_line" else 2).encode()
    path = tmp_path / "array.json"
    path.write_bytes(gzip.compress(codecs.BOM_UTF8 + text) if layout.endswith("gzip") else b"\n" + text + b"\n")
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
