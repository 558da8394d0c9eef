"""Where ``describe`` writes, so that a kill loses at most the batches in flight.

While a run goes, ``OUT.partial/`` holds ``manifest.json`` (what the answers depend on: input file,
checkpoint, decoding, prompt, batch plan, precision) and one ``rank<R>.jsonl`` per process, to which each
batch's rows are appended as it finishes. Each row starts with its input line number (``{"line": 12, ...}``),
so resume can tell what is done without parsing whole rows. At the end the parts are merged in input order
into ``OUT`` (atomically), the manifest and counts go to ``OUT.meta.json``, and ``OUT.partial/`` is removed.

The same command again resumes an unfinished ``OUT.partial/`` with the same manifest, says a finished ``OUT``
with it is complete, and refuses anything else: other settings never add to, nor replace, answers they did not write.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from amzft.errors import ConfigError
from amzft.files import atomic_write

_LINE = re.compile(rb'\{"line": (\d+),')


def row_bytes(row: dict) -> bytes:
    """One output row; ``line`` first (see the module doc)."""
    return (json.dumps({"line": row["line"], **row}, ensure_ascii=False) + "\n").encode()


def _complete_rows(path: Path):
    """(line number, byte offset, byte length) of each whole row of a part file. A last row
    without its newline (a kill mid-write) or a row that is not one of ours is not counted."""
    offset = 0
    with path.open("rb") as handle:
        for raw in handle:
            found = _LINE.match(raw)
            if found and raw.endswith(b"}\n"):
                yield int(found.group(1)), offset, len(raw)
            offset += len(raw)


class OutputStore:
    def __init__(self, out: str | os.PathLike):
        self.out = Path(out).expanduser()
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.meta = self.out.with_name(self.out.name + ".meta.json")
        self.manifest = self.partial / "manifest.json"

    def start(self, identity: dict, create: bool = True) -> str:
        """``fresh``, ``resume`` or ``complete`` for a run of ``identity``; raises ConfigError when
        the output holds answers of another run. ``create``: write the manifest of a fresh run
        (the first process does; the others find it)."""
        if self.manifest.is_file():
            self._check_same(_read_json(self.manifest), identity, self.partial)
            return "resume"
        if self.out.exists():
            if not self.meta.is_file():
                raise ConfigError(f"{self.out} exists and was not written by amzft describe: delete it or choose another --out")
            self._check_same(_read_json(self.meta).get("identity", {}), identity, self.out)
            return "complete"
        if create:
            self.partial.mkdir(parents=True, exist_ok=True)
            atomic_write(self.manifest, lambda f: f.write(json.dumps(identity, indent=1).encode()))
        return "fresh"

    @staticmethod
    def _check_same(saved: dict, identity: dict, where: Path) -> None:
        if differ := [key for key in identity if saved.get(key) != identity[key]]:
            details = "; ".join(f"{key}: {_short(saved.get(key))} there, {_short(identity[key])} now" for key in differ)
            raise ConfigError(f"{where} holds answers of another run ({details}): run with those settings to finish it, "
                              f"or choose another --out")

    def parts(self) -> list[Path]:
        return sorted(self.partial.glob("rank*.jsonl")) if self.partial.is_dir() else []

    def done_lines(self) -> np.ndarray:
        """Line numbers already answered (any part, from runs with any number of processes)."""
        lines = [line for part in self.parts() for line, _, _ in _complete_rows(part)]
        return np.unique(np.asarray(lines, dtype=np.int64))

    def open_part(self, rank: int):
        """This process's part file for appending, a row cut short by a kill removed first."""
        path = self.partial / f"rank{rank}.jsonl"
        if path.exists():
            with path.open("rb+") as handle:
                handle.truncate(max((offset + length for _, offset, length in _complete_rows(path)), default=0))
        return path.open("ab")

    def merge(self, summary: dict) -> int:
        """Every part's rows, one per input line, in input order, into ``out`` (atomically), and
        ``meta``; the partial folder is removed. Rows are copied by offset: only an index of
        (line, part, offset, length) per product is held in memory, never the text."""
        parts = self.parts()
        index = [(line, p, offset, length) for p, part in enumerate(parts) for line, offset, length in _complete_rows(part)]
        table = np.asarray(index, dtype=np.int64).reshape(-1, 4)
        order = np.lexsort((np.arange(len(table)), table[:, 0]))  # by line; the first copy of a line wins
        table = table[order]
        if len(table):
            table = table[np.concatenate(([True], table[1:, 0] != table[:-1, 0]))]

        def write(out):
            with ExitStack() as stack:
                handles = [stack.enter_context(part.open("rb")) for part in parts]
                for _, p, offset, length in table.tolist():
                    handles[p].seek(offset)
                    out.write(handles[p].read(length))

        atomic_write(self.out, write)
        meta = {"identity": _read_json(self.manifest), **summary, "written": len(table)}
        atomic_write(self.meta, lambda f: f.write(json.dumps(meta, indent=1).encode()))
        shutil.rmtree(self.partial)
        return len(table)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); delete it to start over") from None


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:79] + "…"
