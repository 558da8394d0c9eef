"""Counting what the pipeline drops, by reason, with the first offending line numbers."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

KEEP_LINES = 5  # how many offending line numbers to remember per reason


@dataclass
class PipelineStats:
    records_read: int = 0  # non-blank lines seen in the file
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_lines: dict[str, list[int]] = field(default_factory=dict)
    split_sizes: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, line: int) -> None:
        self.skipped[reason] += 1
        lines = self.skipped_lines.setdefault(reason, [])
        if len(lines) < KEEP_LINES:
            lines.append(line)

    def add_skips(self, other: PipelineStats) -> None:
        """Add ``other``'s skips, which come after this one's in the file (the parallel build's
        workers count their own chunk's): the first lines per reason stay the file's first."""
        self.skipped.update(other.skipped)
        for reason, lines in other.skipped_lines.items():
            mine = self.skipped_lines.setdefault(reason, [])
            mine.extend(lines[: KEEP_LINES - len(mine)])

    def to_dict(self) -> dict:
        return {
            "records_read": self.records_read,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "skipped_lines": self.skipped_lines,
            "split_sizes": self.split_sizes,
        }

    @classmethod
    def from_dict(cls, data: dict) -> PipelineStats:
        return cls(
            records_read=data["records_read"],
            kept=data["kept"],
            skipped=Counter(data["skipped"]),
            skipped_lines={k: list(v) for k, v in data["skipped_lines"].items()},
            split_sizes=dict(data["split_sizes"]),
        )
