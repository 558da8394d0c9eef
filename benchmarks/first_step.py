"""Time to the first optimizer step of ``fit`` on a big trn.json, from a cold and a warm cache.

    python benchmarks/first_step.py --seed-data trn_first400.jsonl --records 300000
    python benchmarks/first_step.py --seed-data trn_first400.jsonl      # the full 2,248,619 records

Builds a trn.json of ``--records`` records in a temporary folder (never in the repository): the
``--seed-data`` records (real ones, JSON Lines) repeated with each copy's title varied (its
words rotated, a copy number appended) so every product is distinct, and about half the
contents emptied, as in the real file; without ``--seed-data``, data_pipeline.py's synthetic
records. Then it measures, each as a subprocess of ``python -m amzft fit --config
configs/cpu.yaml --data.path FILE --trainer.max_steps 1`` with a fresh data cache folder:
  (a) cold: from process start to the end of the first optimizer step, the cache built first;
  (b) warm: the same again, reusing the finished cache;
  (c) the full build: the cache (read, clean, filter, split), records/s; with ``--count``, then
      every example's tokens counted too (what the data report and a small packed split count
      first; training on a big split no longer waits for it);
  (d) peak RSS of the fit processes (when training starts and after the first step) and of
      the build.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FULL_FILE_RECORDS = 2_248_619
MARK = "AMZFT_MARK"


def make_file(path: Path, records: int, seed_data: Path | None) -> None:
    if seed_data is None:
        sys.path.insert(0, str(HERE))
        from data_pipeline import make_file as synthetic  # noqa: PLC0415 - only without seed data

        synthetic(path, records)
        return
    seeds = [json.loads(line) for line in seed_data.read_text(encoding="utf-8").splitlines() if line.strip()]
    with path.open("w", encoding="utf-8") as f:
        for i in range(records):
            copy, rec = divmod(i, len(seeds))
            title, content = seeds[rec]["title"], seeds[rec]["content"]
            words = title.split()
            if copy and words:
                k = copy % len(words)
                title = " ".join(words[k:] + words[:k]) + f" {copy}"
            # ~half empty, as in the real file; the hash keeps it independent of copy parity
            if (i * 2654435761) % 1000 < 500:
                content = ""
            f.write(json.dumps({"uid": f"{i:010d}", "title": title, "content": content}) + "\n")


def run_fit(data: Path, cache: Path, work: Path) -> dict:
    """{stage: (seconds since start, CPU seconds, peak RSS MiB)} for setup (model loaded),
    train_start (data ready) and first_step (the first optimizer step done)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "amzft", "fit", "--config", str(REPO / "configs" / "cpu.yaml"), "--data.path", str(data),
           "--data.cache_dir", str(cache), "--trainer.max_steps", "1", "--trainer.default_root_dir", str(work / "logs"),
           "--trainer.callbacks+=first_step_probe.FirstStepProbe"]
    start = time.time()
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    stages = {}
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            stage, at, cpu, rss = line.split()[1:5]
            stages[stage] = (float(at) - start, float(cpu), float(rss))
    if "first_step" not in stages:
        raise SystemExit(f"fit did not reach a step (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return stages


def describe(stages: dict) -> str:
    return "; ".join(f"{name} at {at:.1f} s (CPU {cpu:.1f} s, peak RSS {rss:,.0f} MiB)" for name, (at, cpu, rss) in stages.items())


def full_build(data: Path, cache: Path, count: bool) -> None:
    sys.path.insert(0, str(REPO / "src"))
    from amzft.data.build import DataSettings, prepare  # noqa: PLC0415 - after the fit subprocesses
    from amzft.sources import force_offline, load_tokenizer  # noqa: PLC0415

    force_offline()
    tokenizer = load_tokenizer("embedded")
    settings = DataSettings(path=str(data), max_length=2048, val_fraction=0.1, test_fraction=0.1)  # as configs/cpu.yaml
    t = time.perf_counter()
    built = prepare(settings, tokenizer, cache)
    build_s = time.perf_counter() - t
    n = built.stats.records_read
    print(f"(c) cache build (read + clean + filter + split, {n:,} records, {built.stats.kept:,} kept): "
          f"{build_s:.1f} s = {n / build_s:,.0f} records/s -> {FULL_FILE_RECORDS / (n / build_s):.0f} s for the full file "
          f"(goal < 120 s)")
    if not count:
        return
    t = time.perf_counter()
    for name in ("train", "validation", "test"):
        built.examples(name).ensure_counts()
    count_s = time.perf_counter() - t
    total = build_s + count_s
    print(f"    every example tokenised and counted: {count_s:.1f} s ({built.stats.kept / count_s:,.0f} examples/s); "
          f"build + count: {n / total:,.0f} records/s -> {FULL_FILE_RECORDS / (n / total):.0f} s for the full file")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=FULL_FILE_RECORDS)
    parser.add_argument("--seed-data", type=Path, default=None, help="real trn.json records to multiply (JSON Lines)")
    parser.add_argument("--workdir", default=None, help="where the generated file and caches go (default: a temp dir)")
    parser.add_argument("--skip-build", action="store_true", help="only (a), (b) and (d)")
    parser.add_argument("--count", action="store_true", help="(c) also counts every example's tokens")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="amzft-first-step-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"trn_{args.records}.json"
    if not data.exists():
        t = time.perf_counter()
        make_file(data, args.records, args.seed_data)
        print(f"generated {args.records:,} records ({data.stat().st_size / 2**20:,.0f} MiB) in {time.perf_counter() - t:.0f} s")
    print(f"{cpu_name()}, {len(os.sched_getaffinity(0))} usable cores, {datetime.date.today()}; file: {data}")
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))
    cold = run_fit(data, cache, work)
    print(f"(a) cold cache: first optimizer step after {cold['first_step'][0]:.1f} s (goal < 60 s for the full file)")
    print(f"    {describe(cold)}")
    warm = run_fit(data, cache, work)
    print(f"(b) warm cache: first optimizer step after {warm['first_step'][0]:.1f} s (goal < 10 s)")
    print(f"    {describe(warm)}")
    if not args.skip_build:
        full_build(data, Path(tempfile.mkdtemp(prefix="cache-", dir=work)), args.count)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start_rss = max(run["train_start"][2] for run in (cold, warm))
    fit_rss = max(run["first_step"][2] for run in (cold, warm))
    print(f"(d) peak RSS: fit when training starts {start_rss:,.0f} MiB, after its first step {fit_rss:,.0f} MiB; "
          f"largest child process (fit or a build worker) "
          f"{children:,.0f} MiB; the full build (this process) {me:,.0f} MiB (goal <= 2048)")


if __name__ == "__main__":
    main()
