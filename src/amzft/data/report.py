"""The data-quality report: what was read, kept, dropped (and where), lengths, examples."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from amzft.data.build import DataSettings, PreparedData

PERCENTILES = (50, 90, 99, 100)


def _percentiles(values) -> str:
    if len(values) == 0:
        return "-"
    q = np.percentile(np.asarray(values), PERCENTILES)
    return "  ".join(f"p{p}={v:,.0f}" if p < 100 else f"max={v:,.0f}" for p, v in zip(PERCENTILES, q))


def render_report(prepared: PreparedData, settings: DataSettings, examples: int = 3) -> str:
    s = prepared.stats
    names = ("train", "validation", "test")
    counted = [prepared.examples(name) for name in names]
    for split in counted:  # the report is about all examples: count the tokens of those not counted yet
        split.ensure_counts()
    cut = sum(int(e.truncated.sum()) for e in counted)  # known once the examples are tokenised
    share, sizes = s.kept / s.records_read if s.records_read else 0.0, s.split_sizes
    lines = [f"data report: {settings.path}", f"  cache: {prepared.directory} ({'reopened' if prepared.from_cache else 'built'})",
             f"  records read: {s.records_read:,}",
             f"  kept:         {s.kept:,} ({share:.1%})  responses cut at max_length={settings.max_length}: {cut:,}",
             f"  splits by product: train {sizes['train']:,} / validation {sizes['validation']:,} / test {sizes['test']:,}",
             f"  skipped: {sum(s.skipped.values()):,}"]
    for reason, count in s.skipped.most_common():
        where = ", ".join(map(str, s.skipped_lines.get(reason, [])))
        lines.append(f"    {reason:<22} {count:>9,}   first lines: {where}")
    table = pa.concat_tables([prepared.raw[name].data.table for name in names])
    lengths = np.concatenate([e.lengths for e in counted])
    labels = np.concatenate([e.num_labels for e in counted])
    lines += ["  lengths (kept examples):",
              f"    title chars     {_percentiles(pc.utf8_length(table['title']).to_numpy())}",
              f"    content chars   {_percentiles(pc.utf8_length(table['content']).to_numpy())}",
              f"    prompt tokens   {_percentiles(lengths - labels)}",
              f"    response tokens {_percentiles(labels)}",
              f"    total tokens    {_percentiles(lengths)}"]
    train = prepared.splits["train"]
    picks = np.linspace(0, len(train) - 1, num=min(examples, len(train))).astype(int) if len(train) else []
    for n, i in enumerate(picks, 1):
        row = train[int(i)]
        lines.append(f"  example {n} (line {row['line']}, {len(row['input_ids'])} tokens, {row['num_labels']} labelled):")
        lines.append("    prompt: " + settings.prompt.render(row["title"]).replace("\n", "\n            "))
        lines.append(f"    response: {row['content']}")
    return "\n".join(lines)
