import gzip

import pytest

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
