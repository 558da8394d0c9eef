"""Decoding settings compared on one checkpoint: evaluate's scores and failure views per setting.

    python benchmarks/decoding.py --ckpt_path best --data ../data/trn.json --samples 24 \
        --grid "1.0:0,1.1:0,1.15:4,1.2:3,1.3:0,1.0:4"

Each grid entry is ``repetition_penalty:no_repeat_ngram_size`` on greedy decoding, optionally
followed by ``:length_decay_start:length_decay_factor`` (e.g. ``1.15:4:96:1.1``). The model is
loaded once; every setting scores the same seeded sample of products with
``amzft.evaluation.run.run_evaluation`` (what ``python -m amzft evaluate`` runs): the checkpoint's
seen (train) and held-out (test) products, or, with ``--data`` another file, its products the
checkpoint was trained on (seen) and the others (unseen). Prints one table (setting, split,
ROUGE-L, looping, never stopped, collapsed, names/numbers invented) with the CPU and the date;
``--out`` writes the rows as JSON too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from machine import cpu_name

from amzft.checkpoints.locate import resolve_ckpt_path
from amzft.cli.quiet import quiet_libraries
from amzft.evaluation.run import other_file, run_evaluation
from amzft.inference.load import load_answerer
from amzft.model.decoding import DEFAULT_DECODING, resolve_decoding

COLUMNS = {"rougeL": "ROUGE-L", "looping": "looping", "never_stopped": "no-stop", "collapsed": "collapsed",
           "facts_invented": "invented"}


def parse_grid(text: str) -> list[tuple[float, int, int, float]]:
    """``"1.0:0,1.15:4:96:1.1"`` -> [(1.0, 0, 0, 1.0), (1.15, 4, 96, 1.1)]."""
    grid = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        parts = item.split(":")
        try:
            if len(parts) not in (1, 2, 4):
                raise ValueError
            penalty, ngram = float(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1] else 0
            start, factor = (int(parts[2]), float(parts[3])) if len(parts) == 4 else (0, 1.0)
            grid.append((penalty, ngram, start, factor))
        except ValueError:
            raise argparse.ArgumentTypeError(f"grid entry {item!r} is not repetition_penalty:no_repeat_ngram_size"
                                             "[:length_decay_start:length_decay_factor]") from None
    if not grid:
        raise argparse.ArgumentTypeError("the grid is empty")
    return grid


def grid_entry(options) -> str:
    """The grid entry of ``options`` (``parse_grid``'s inverse)."""
    entry = f"{options.repetition_penalty:g}:{options.no_repeat_ngram_size}"
    return entry + (f":{options.length_decay_start}:{options.length_decay_factor:g}" if options.length_decay else "")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint, or last / best (under --log_root)")
    parser.add_argument("--data", default=None, help="a trn.json: its products, seen / unseen by the checkpoint "
                        "(default: the checkpoint's own file, train / test)")
    parser.add_argument("--samples", type=int, default=24, help="products per split (a seeded sample)")
    parser.add_argument("--grid", type=parse_grid, default=parse_grid("1.0:0,1.1:0,1.15:4,1.2:3,1.3:0,1.0:4"))
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULT_DECODING.max_new_tokens)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=3407)
    parser.add_argument("--base", action="store_true", help="score the base model too (doubles the time)")
    parser.add_argument("--log_root", default="logs")
    parser.add_argument("--out", default=None, help="also write the rows here as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = _arguments(argv)
    quiet_libraries()
    ckpt = resolve_ckpt_path(args.ckpt_path, args.log_root)
    loaded = load_answerer(ckpt)  # once, for every setting
    module, fmt = loaded.module, loaded.prompt
    dm, step = loaded.datamodule(), loaded.step
    other = other_file(loaded, dm, args.data)
    datamodule, datasets = other if other is not None else (dm, None)
    splits = ["seen", "unseen"] if other is not None else ["train", "test"]
    rows = []
    for penalty, ngram, start, factor in args.grid:
        options = resolve_decoding("greedy", penalty, ngram, max_new_tokens=args.max_new_tokens,
                                   length_decay_start=start, length_decay_factor=factor)
        default = replace(options, max_new_tokens=DEFAULT_DECODING.max_new_tokens) == DEFAULT_DECODING
        setting = grid_entry(options) + (" (default)" if default else "")
        started = time.perf_counter()
        report = run_evaluation(module, datamodule, fmt, splits, args.samples, options, with_adapter=True,
                                checkpoint=ckpt, seed=args.seed, batch_size=args.batch_size, datasets=datasets,
                                with_base=args.base)
        seconds = time.perf_counter() - started
        for split, result in report["splits"].items():
            for model, metrics in result["models"].items():
                rows.append({"setting": setting, "split": split, "model": model, "n": result["n"], "seconds": seconds,
                             **{key: metrics[key] for key in COLUMNS}})
    print(render(rows, ckpt, step, args, datamodule.settings.path))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


def render(rows: list[dict], ckpt: str, step: int, args, data_path) -> str:
    lines = [f"checkpoint: {ckpt} (step {step}); data: {data_path or 'the bundled sample'}; "
             f"{args.samples} products per split; greedy, max_new_tokens {args.max_new_tokens}",
             f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads; date: {datetime.date.today()}",
             f"{'setting':<22} {'split':<7} {'model':<11} {'n':>3} " + " ".join(f"{h:>9}" for h in COLUMNS.values())
             + f" {'seconds':>8}"]
    for row in rows:
        lines.append(f"{row['setting']:<22} {row['split']:<7} {row['model']:<11} {row['n']:>3} "
                     + " ".join(f"{row[key]:9.3f}" for key in COLUMNS) + f" {row['seconds']:8.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
