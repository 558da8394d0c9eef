"""The catalogue's records: ``title`` required, ``uid`` and ``content`` optional. Read with the training
reader (plain, compressed, BOM-marked and JSON-array files alike) and cleaned as training cleaned titles,
so the prompt is the one the model learnt; bad lines are counted skips, or a ``DataError`` with ``strict``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from amzft.data.clean import clean_text
from amzft.data.reader import json_object, read_objects
from amzft.data.stats import PipelineStats
from amzft.errors import DataError


class TitleRecord(NamedTuple):
    line: int  # 1-based line number in the input (the output's key for order and resume)
    title: str  # cleaned
    uid: str | None
    reference: str | None  # the cleaned ``content``, when the input has a non-empty one


def _problem(raw: bytes) -> tuple[str, str] | dict:
    """The parsed object, or (reason, message) for a line that is no usable record."""
    obj = json_object(raw)
    if isinstance(obj, tuple):
        return obj
    if "title" not in obj:
        return "missing_field", "missing field 'title'"
    if not isinstance(obj["title"], str):
        return "wrong_type", f"field 'title' should be a string, found {type(obj['title']).__name__}"
    if obj.get("content") is not None and not isinstance(obj["content"], str):
        return "wrong_type", f"field 'content' should be a string, found {type(obj['content']).__name__}"
    uid = obj.get("uid")
    if uid is not None and (isinstance(uid, bool) or not isinstance(uid, str | int)):
        return "wrong_type", f"field 'uid' should be a string or an integer, found {type(uid).__name__}"
    return obj


def read_titles(path: str | Path, stats: PipelineStats, strict: bool = False,
                strip_boilerplate: bool = True) -> Iterator[TitleRecord]:
    """Yield the usable records of ``path``; count (or, strict, raise on) the others. A title
    that is empty once cleaned is skipped as ``empty_title``."""
    for line_no, parsed in read_objects(path, stats, _problem, strict):
        title = clean_text(parsed["title"], strip_boilerplate)
        if not title:
            if strict:
                raise DataError(f"{Path(path)}:{line_no}: the title is empty")
            stats.skip("empty_title", line_no)
            continue
        uid = parsed.get("uid")
        reference = clean_text(parsed.get("content") or "", strip_boilerplate) or None
        yield TitleRecord(line_no, title, None if uid is None else str(uid), reference)
