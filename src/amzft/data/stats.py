"""What every stage drops, by reason, with the first offending line numbers (the skip report)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

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
        """Add the skips of a later part of the file: the first lines per reason stay the file's first."""
        self.skipped.update(other.skipped)
        for reason, lines in other.skipped_lines.items():
            mine = self.skipped_lines.setdefault(reason, [])
            mine.extend(lines[: KEEP_LINES - len(mine)])

    def to_dict(self) -> dict:
        return {**asdict(self), "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, data: dict) -> PipelineStats:
        return cls(**{**data, "skipped": Counter(data["skipped"])})
