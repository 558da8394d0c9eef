"""Data pipeline throughput: the cache build (read + clean + filter + split + write; examples are
tokenised later, on demand) on a synthetic trn.json.

    python benchmarks/data_pipeline.py --records 300000      # extrapolates to the full file
    python benchmarks/data_pipeline.py                       # the full 2,248,619 records

The synthetic file is shaped like the real trn.json (measured on it): about half the records have
empty content; titles and contents follow log-normal lengths fitted to the real medians and
p99s (title 33 / 134 chars, content 451 / 2,575, max 4,173); some carry HTML entities, double
spaces and Amazon's "--This text refers to …" boilerplate. It prints records/s, the
extrapolated time for the whole 2,248,619-record file, the cached reopen time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from amzft.data.build import DataSettings, default_num_proc, prepare
from amzft.sources import force_offline, load_tokenizer

FULL_FILE_RECORDS = 2_248_619
WORDS = (
    "the a of and to in for with is on this by book story new guide edition life world love "
    "author novel history series children family classic music album songs live recorded "
    "collection volume illustrated complete kitchen stainless steel set cotton dress girls "
    "comfortable perfect quality design easy use great gift years readers bestselling award "
    "winning &quot;masterpiece&quot; caf&#xE9; author&#8217;s &amp; first time ever"
).split()
BOILERPLATE = [
    "--This text refers to thePaperbackedition.",
    "--This text refers to an out of print or unavailable edition of this title.",
    "--This text refers to theHardcoveredition.",
]


def text_of(rng, n_chars: int) -> str:
    words = rng.choice(WORDS, size=max(1, n_chars // 6))
    return " ".join(words)[:n_chars]


def make_file(path: Path, records: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    title_len = np.clip(rng.lognormal(np.log(33), 0.602, records), 4, 183).astype(int)
    content_len = np.clip(rng.lognormal(np.log(451), 0.749, records), 7, 4173).astype(int)
    empty = rng.random(records) < 0.5
    with path.open("w") as f:
        for i in range(records):
            content = "" if empty[i] else text_of(rng, int(content_len[i]))
            if content and i % 5 == 0:
                content += BOILERPLATE[i % 3]
            if content and i % 7 == 0:
                content = content.replace(" ", "  ", 3)
            rec = {"uid": f"{i:010d}", "title": text_of(rng, int(title_len[i])) + f" {i}",
                   "content": content, "target_ind": [i % 1000], "target_rel": [1.0]}
            f.write(json.dumps(rec) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=FULL_FILE_RECORDS)
    parser.add_argument("--tokenizer", default="llama3.2", help="llama3.2 (the seed's) or embedded")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--num-proc", default="1,auto",
                        help="comma-separated process counts to build with, the first is the baseline (auto: one per core)")
    args = parser.parse_args()

    force_offline()
    tokenizer = load_tokenizer(args.tokenizer)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="amzft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data_file = work / f"synthetic_{args.records}.json"
    if not data_file.exists():
        t = time.perf_counter()
        make_file(data_file, args.records)
        print(f"generated {args.records:,} records ({data_file.stat().st_size / 2**20:,.0f} MiB) in {time.perf_counter() - t:.0f} s")
    settings = DataSettings(path=str(data_file), max_length=args.max_length)
    print(f"machine: {sys.platform}, {default_num_proc()} usable cores; tokenizer: {args.tokenizer}")
    rates = {}
    for spec in args.num_proc.split(","):
        procs = default_num_proc() if spec == "auto" else int(spec)
        cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))  # always a cold build
        t = time.perf_counter()
        built = prepare(settings, tokenizer, cache, num_proc=procs)
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        reopened = prepare(settings, tokenizer, cache, num_proc=procs)
        reopen_s = time.perf_counter() - t
        assert reopened.from_cache and len(reopened.splits["train"]) == len(built.splits["train"])
        rate = rates[procs] = built.stats.records_read / build_s
        base = next(iter(rates.values()))
        print(f"\n--- num_proc={procs}")
        print(f"records read: {built.stats.records_read:,}  kept: {built.stats.kept:,}  skipped: {dict(built.stats.skipped)}")
        print(f"build (read+clean+filter+split+write): {build_s:.1f} s = {rate:,.0f} records/s ({rate / base:.2f}x the first)")
        print(f"extrapolated for the full {FULL_FILE_RECORDS:,}-record file: {FULL_FILE_RECORDS / rate:.0f} s (goal < 120 s)")
        print(f"cached reopen: {reopen_s:.2f} s (goal < 2 s)")
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"\npeak RSS: parent {parent:,.0f} MiB, largest worker {child:,.0f} MiB")


if __name__ == "__main__":
    main()
