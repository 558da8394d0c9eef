"""The quality protocol as one command: a recipe fitted on K disjoint slices of a file, each fit's
kept (best) and last checkpoint scored on the products it was trained on and on products it never
saw, per slice and pooled, each fine-tuned ÷ base ROUGE-L ratio with its paired-bootstrap 95 % interval.

    python benchmarks/quality.py --config configs/cpu-real.yaml --data trn.json --slices 3 \\
        [--slice_size 120] [--override "model.optim.lr=1e-4" ...] [--samples 24] [--out logs/quality] [--dry_run]

Slices: records 1–120, 121–240, 241–360 (non-blank lines, as ``data.limit`` counts them). Slice k's
file holds slice k first, then every record after the last slice; records of the other slices are
left out, so every slice is scored against the same pool of unseen products. ``fit`` reads only the
file's head (``--data.limit`` = ``--slice_size``); ``evaluate --data.path <slice file>`` then scores
its products as ``seen`` (the products of the checkpoint's training split) and ``unseen`` (the rest:
the slice's held-out products and the records after the slices), matched by ``product_key``, so a
trained product that the file repeats later, even with other case or spacing, counts as seen, never
as unseen (the dry run says how many records that is per slice).

Each ``--override`` line ("model.optim.lr=1e-4", several ``key=value`` separated by spaces) is one
recipe variant, fitted on every slice (a grid); without one, the config as it is. Overrides go to
``fit``; ``evaluate`` reads the config's decoding.

Pooled: the per-product ROUGE-L of every slice in one sample, bootstrapped by product (a product
scored in several slices, as the unseen ones are, is drawn with all its rows); the failure views as
shares of all answers. Writes ``summary.json`` and ``summary.md`` into ``--out``; ``--dry_run``
writes the slice files and prints the commands only; ``--report_only`` runs nothing and summarises
the reports an earlier run left in ``--out``.

Whether ``val/rougeL`` can rank a fit's checkpoints: per slice, its value at each validation (from
the fit's TensorBoard events) beside the spread of a mean over 6 and 24 products re-drawn from the
last checkpoint's per-product ROUGE-L on unseen products (``monitor`` in the summary). A real run takes hours on a CPU (one fit per
slice and variant).
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name

from amzft.data.clean import clean_text
from amzft.data.reader import iter_raw_lines, json_object
from amzft.data.split import product_key
from amzft.data.stats import PipelineStats
from amzft.errors import AmzftError, ConfigError
from amzft.evaluation.bootstrap import describe, paired_ratio_interval

CHECKPOINTS = ("best", "last")
SPLITS = ("seen", "unseen")
METRIC = "rougeL"
VIEWS = ("looping", "never_stopped", "collapsed", "facts_recalled", "facts_invented")
# Set by the protocol itself: an override of one would break the slicing or mix the runs' folders.
RESERVED = ("data.path", "data.limit", "trainer.default_root_dir")


# ----------------------------------------------------------------- slicing (pure)
def slice_files(records: list[bytes], slices: int, slice_size: int) -> list[list[bytes]]:
    """The lines of each slice's file: slice k (records ``k * slice_size`` up to the next slice)
    first, then every record after the last slice. The slices are disjoint and no file holds
    another slice's records."""
    if slices < 1 or slice_size < 1:
        raise ConfigError(f"--slices and --slice_size should be >= 1, found {slices} and {slice_size}")
    end = slices * slice_size
    if len(records) <= end:
        raise ConfigError(f"--data holds {len(records)} records: --slices {slices} x --slice_size {slice_size} = {end} "
                          "leave no record after the slices to score as unseen")
    rest = records[end:]
    return [records[k * slice_size:(k + 1) * slice_size] + rest for k in range(slices)]


def title_key(raw: bytes) -> str | None:
    """A record's product as the evaluation matches it (``product_key`` of the cleaned title);
    None for a line that is no record with a title (the data module skips it)."""
    obj = json_object(raw)
    if isinstance(obj, tuple) or not isinstance(obj.get("title"), str):
        return None
    return product_key(clean_text(obj["title"]))


def repeated_later(lines: list[bytes], slice_size: int) -> int:
    """How many records after a slice file's head repeat a product of the head: ``evaluate``
    scores them as seen where the product was in the training split (the rest of the head is
    held out), never as unseen."""
    head = {title_key(raw) for raw in lines[:slice_size]} - {None}
    return sum(title_key(raw) in head for raw in lines[slice_size:])


def read_records(path: str | Path) -> list[bytes]:
    """The file's records as ``data.limit`` counts them (non-blank lines; a JSON array's elements;
    plain or compressed), each one JSON line."""
    return [raw.rstrip(b"\r\n") + b"\n" for _, raw in iter_raw_lines(path, PipelineStats())]


def write_slices(data: str | Path, out: Path, slices: int, slice_size: int) -> list[Path]:
    lines = slice_files(read_records(data), slices, slice_size)
    (out / "slices").mkdir(parents=True, exist_ok=True)
    paths = [out / "slices" / f"slice_{k + 1}.jsonl" for k in range(slices)]
    for path, content in zip(paths, lines):
        path.write_bytes(b"".join(content))
    return paths


# ----------------------------------------------------------------- the runs
def override_args(line: str | None) -> list[str]:
    """``"model.optim.lr=1e-4 trainer.max_steps=40"`` -> ``--model.optim.lr 1e-4 --trainer.max_steps 40``."""
    args = []
    for item in shlex.split(line or ""):
        key, sep, value = item.partition("=")
        if not sep or not key or key.startswith("-"):
            raise ConfigError(f"--override {line!r}: {item!r} is not key=value (e.g. model.optim.lr=1e-4)")
        if key in RESERVED:
            raise ConfigError(f"--override {line!r}: {key} is set by the protocol (--data, --slice_size, --out)")
        args += [f"--{key}", value]
    return args


def variant_dir(index: int, line: str | None) -> str:
    return f"v{index}_" + (re.sub(r"[^A-Za-z0-9.=_-]+", "_", line)[:60] if line else "config")


def commands(args, slice_path: Path, root: Path, line: str | None) -> dict[str, list[str]]:
    """The fit on the slice and the two evaluations (best, last) of its checkpoints on the slice's file."""
    amzft = [sys.executable, "-m", "amzft"]
    cmds = {"fit": [*amzft, "fit", "--config", args.config, "--data.path", str(slice_path), "--data.limit",
                    str(args.slice_size), "--trainer.default_root_dir", str(root), *override_args(line)]}
    for ckpt in CHECKPOINTS:
        cmds[ckpt] = [*amzft, "evaluate", "--config", args.config, "--ckpt_path", ckpt, "--log_root", str(root),
                      "--data.path", str(slice_path), "--samples", str(args.samples), "--out", str(root / f"eval_{ckpt}")]
    return cmds


def run_command(cmd: list[str], log: Path) -> None:
    """One step in its own process, its output in ``log``; a failure is one line naming the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        done = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        lines = log.read_text(errors="replace").strip().splitlines()
        raise AmzftError(f"{shlex.join(cmd[2:4])} failed (exit {done.returncode}): {lines[-1] if lines else ''} (log: {log})")


# ----------------------------------------------------------------- scores per slice and pooled
def split_summary(result: dict) -> dict:
    """One split of one report: answers, products, mean ROUGE-L of each model, the ratio with its
    interval, and the failure views of each model."""
    models = result["models"]
    return {"n": result["n"], "n_products": result["n_products"], "ratio": result["ratio"],
            **{who: {METRIC: models[name][METRIC], **{v: models[name][v] for v in VIEWS}}
               for who, name in (("base", "base"), ("tuned", "fine-tuned"))}}


def pool(results: list[dict]) -> dict:
    """One split pooled over slices (``results``: that split of each slice's report): the
    per-product scores of every slice in one sample, bootstrapped by product key, so a product
    scored in several slices is drawn with all its rows; mean ROUGE-L over all answers; the
    failure views as shares of all answers (each slice's share weighted by its answer count)."""
    products, base, tuned = [], [], []
    for result in results:
        per = result["per_product"]
        products += per["products"]
        base += per[METRIC]["base"]
        tuned += per[METRIC]["fine-tuned"]
    interval = paired_ratio_interval(base, tuned, groups=products)
    n = sum(r["n"] for r in results)
    out = {"n": n, "n_products": interval.n_products,
           "ratio": {"metric": METRIC, "tuned": "fine-tuned", "base": "base", **interval.as_dict()}}
    for who, name in (("base", "base"), ("tuned", "fine-tuned")):
        scores = base if who == "base" else tuned
        out[who] = {METRIC: sum(scores) / n,
                    **{v: sum(r["models"][name][v] * r["n"] for r in results) / n for v in VIEWS}}
    return out


def monitor_history(root: Path, tag: str = "val/rougeL") -> list[tuple[int, float]]:
    """(step, value) of the fit's monitor, from its TensorBoard events (every version of the run)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: PLC0415 - only here

    history = {}
    for version in sorted(Path(root, "amzft").glob("version_*")):
        events = EventAccumulator(str(version))
        events.Reload()
        if tag in events.Tags().get("scalars", []):
            history.update({e.step: e.value for e in events.Scalars(tag)})
    return sorted(history.items())


def redraw_spread(scores: list[float], k: int, draws: int = 2000, seed: int = 0) -> float:
    """Standard deviation of the mean of ``k`` products drawn (with replacement) from ``scores``:
    how far a validation of ``k`` products moves between re-draws of its products."""
    rng = random.Random(seed)
    means = [sum(rng.choices(scores, k=k)) / k for _ in range(draws)]
    return statistics.pstdev(means)


def monitor_noise(root: Path, last_report: dict, sizes=(6, 24)) -> dict:
    """Can the monitor rank this fit's checkpoints? Its val/rougeL at each validation, the gaps
    between them, and the spread of a mean over ``sizes`` products re-drawn from the last
    checkpoint's per-product ROUGE-L on unseen products (what validation products are)."""
    history = monitor_history(root)
    unseen = last_report["splits"].get("unseen", {}).get("per_product", {}).get(METRIC, {}).get("fine-tuned", [])
    values = [v for _, v in history]
    return {"val_rougeL": history,
            "range": max(values) - min(values) if values else None,
            "spread": {str(k): redraw_spread(unseen, k) for k in sizes} if len(unseen) > 1 else {}}


def variant_summary(reports: list[dict[str, dict]], roots: list[Path] | None = None) -> dict:
    """``reports``: per slice, its best and last report.json. Each slice's splits and steps, and the pool."""
    runs = [{"slice": k + 1, "checkpoint": ckpt, "step": by_ckpt[ckpt].get("step"),
             "is_last": scored_last(by_ckpt[ckpt]),
             "splits": {s: split_summary(by_ckpt[ckpt]["splits"][s]) for s in SPLITS if s in by_ckpt[ckpt]["splits"]}}
            for k, by_ckpt in enumerate(reports) for ckpt in CHECKPOINTS]
    pooled = [{"checkpoint": ckpt, "splits": {s: pool([r[ckpt]["splits"][s] for r in reports])
                                              for s in SPLITS if all(s in r[ckpt]["splits"] for r in reports)}}
              for ckpt in CHECKPOINTS]
    monitor = [monitor_noise(root, by_ckpt["last"]) for root, by_ckpt in zip(roots or [], reports)]
    return {"runs": runs, "pooled": pooled, "monitor": monitor}


HEADER = ("| slice | checkpoint | split | answers (products) | ROUGE-L base → tuned | tuned ÷ base (95 % interval) | "
          "looping | never stopped | collapsed | facts recalled | facts invented |")


def table_row(where: str, ckpt: str, split: str, s: dict) -> str:
    views = " | ".join(f"{s['tuned'][v]:.2f} ({s['base'][v]:.2f})" for v in VIEWS)
    return (f"| {where} | {ckpt} | {split} | {s['n']} ({s['n_products']}) | {s['base'][METRIC]:.3f} → "
            f"{s['tuned'][METRIC]:.3f} | {describe(s['ratio'])} | {views} |")


def render(summary: dict) -> str:
    lines = ["# Quality protocol", "",
             f"config `{summary['config']}`, data `{summary['data']}`: {summary['slices']} slices of {summary['slice_size']} "
             f"records, {summary['samples']} products per split scored; {summary['machine']}, {summary['date']}", "",
             "Failure views: fine-tuned (base). Pooled: every slice's per-product scores in one paired bootstrap "
             "by product.", ""]
    for variant in summary["variants"]:
        lines += [f"## {variant['override'] or 'the config as it is'}", "", HEADER, "|---" * HEADER.count(" | ") + "|---|"]
        # A slice whose kept checkpoint is its last one: one row, "best = last".
        kept_is_last = {run["slice"] for run in variant["runs"] if run["checkpoint"] == "best" and run.get("is_last")}
        for run in variant["runs"]:
            if run["checkpoint"] == "last" and run["slice"] in kept_is_last:
                continue
            name = "best = last" if run["slice"] in kept_is_last else run["checkpoint"]
            for split, s in run["splits"].items():
                lines.append(table_row(str(run["slice"]), f"{name} (step {run['step']})", split, s))
        every = len(kept_is_last) == len({run["slice"] for run in variant["runs"]})
        for pooled in variant["pooled"]:
            if every and pooled["checkpoint"] == "last":
                continue
            for split, s in pooled["splits"].items():
                lines.append(table_row("pooled", "best = last" if every else pooled["checkpoint"], split, s))
        lines.append("")
        for k, m in enumerate(variant.get("monitor", [])):
            curve = ", ".join(f"{step}: {value:.3f}" for step, value in m["val_rougeL"]) or "none logged"
            spread = "; ".join(f"SD of a {n}-product mean {sd:.3f}" for n, sd in m["spread"].items())
            lines.append(f"- slice {k + 1} monitor, val/rougeL at each validation (TensorBoard step: value): {curve} "
                         f"(range {m['range'] or 0:.3f}); re-drawn from the last checkpoint's unseen products: {spread}")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------- the command
def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the recipe (e.g. configs/cpu-real.yaml)")
    parser.add_argument("--data", required=True, help="a trn.json (JSON Lines, plain or compressed)")
    parser.add_argument("--slices", type=int, default=3, help="disjoint slices, one fit each")
    parser.add_argument("--slice_size", type=int, default=120, help="records per slice (fit's data.limit)")
    parser.add_argument("--override", action="append", default=None,
                        help="one recipe variant: key=value ... (repeat for a grid; each runs on every slice)")
    parser.add_argument("--samples", type=int, default=24, help="products scored per split (evaluate --samples)")
    parser.add_argument("--out", default="logs/quality", help="slice files, runs, summary.json and summary.md")
    parser.add_argument("--dry_run", action="store_true", help="write the slice files and print the commands only")
    parser.add_argument("--report_only", action="store_true",
                        help="run nothing: summarise the reports an earlier run left in --out")
    args = parser.parse_args(argv)
    if not Path(args.config).is_file():
        raise ConfigError(f"--config {args.config}: no such file")
    if args.samples < 1:
        raise ConfigError(f"--samples should be >= 1, found {args.samples}")
    return args


def plan(args) -> list[tuple[str | None, list[tuple[Path, Path, dict]]]]:
    """Per variant: its override and, per slice, (slice file, run folder, commands). Writes the slice files."""
    out = Path(args.out).resolve()
    slice_paths = write_slices(args.data, out, args.slices, args.slice_size)
    steps = []
    for i, line in enumerate(args.override or [None]):
        roots = [out / variant_dir(i, line) / path.stem for path in slice_paths]
        steps.append((line, [(path, root, commands(args, path, root, line)) for path, root in zip(slice_paths, roots)]))
    return steps


def dry_run(args, steps) -> None:
    for k, (path, _, _) in enumerate(steps[0][1]):
        lines = path.read_bytes().splitlines()
        print(f"slice {k + 1}: {path} holds records {k * args.slice_size + 1}-{(k + 1) * args.slice_size} then the "
              f"{len(lines) - args.slice_size} after the slices; {repeated_later(lines, args.slice_size)} of those repeat "
              "a product of the slice (seen where the slice trained on it, never unseen)")
    for line, runs in steps:
        print(f"\n# {line or 'the config as it is'}")
        for _, _, cmds in runs:
            print("\n".join(shlex.join(cmd) for cmd in cmds.values()))


def read_report(path: Path) -> dict:
    if not path.is_file():
        raise AmzftError(f"no {path}: its evaluation has not run (run without --report_only)")
    return json.loads(path.read_text())


def scored_last(report: dict) -> bool:
    """The report scored a run's last.ckpt (a run too small to rank keeps no best file, and
    ``--ckpt_path best`` is its last checkpoint)."""
    return Path(report.get("checkpoint") or "").name == "last.ckpt"


def same_as_best(root: Path) -> bool:
    """The best checkpoint's evaluation scored the run's last.ckpt: evaluating it again would
    repeat the same answers."""
    return scored_last(read_report(root / "eval_best" / "report.json"))


def run_all(args, steps) -> dict:
    variants = []
    for i, (line, runs) in enumerate(steps):
        reports = []
        for k, (_, root, cmds) in enumerate(runs):
            for name, cmd in ({} if args.report_only else cmds).items():
                if name == "last" and same_as_best(root):
                    print(f"[{line or 'config'}] slice {k + 1}/{len(runs)}: last is the kept checkpoint: its report reused")
                    shutil.copytree(root / "eval_best", root / "eval_last", dirs_exist_ok=True)
                    continue
                started = time.perf_counter()
                print(f"[{line or 'config'}] slice {k + 1}/{len(runs)}: {name} ...", flush=True)
                run_command(cmd, root / f"{name}.log")
                print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
            reports.append({ckpt: read_report(root / f"eval_{ckpt}" / "report.json") for ckpt in CHECKPOINTS})
            for ckpt, report in reports[-1].items():
                for split in SPLITS:
                    if report["splits"].get(split, {}).get("ratio"):
                        print(f"  {ckpt} (step {report.get('step')}), {split}: {METRIC} fine-tuned ÷ base "
                              f"{describe(report['splits'][split]['ratio'])}", flush=True)
        variants.append({"override": line, "dir": variant_dir(i, line),
                         **variant_summary(reports, [root for _, root, _ in runs])})
    return {"config": args.config, "data": str(args.data), "slices": args.slices, "slice_size": args.slice_size,
            "samples": args.samples, "machine": cpu_name(), "date": str(datetime.date.today()), "variants": variants}


def main(argv: list[str] | None = None) -> dict | None:
    try:
        args = _arguments(argv)
        steps = plan(args)
        if args.dry_run:
            dry_run(args, steps)
            return None
        summary = run_all(args, steps)
    except AmzftError as error:
        raise SystemExit(f"quality.py: error: {error}") from None
    out = Path(args.out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    (out / "summary.md").write_text(render(summary))
    print(render(summary))
    print(f"\nsummary: {out / 'summary.md'} and {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
