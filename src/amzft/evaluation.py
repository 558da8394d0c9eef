"""``python -m amzft evaluate``: base vs fine-tuned answers on seen and held-out products,
scored and written as report.md / report.json / TensorBoard scalars and text."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from amzft import generate as generation
from amzft.checkpoints import datamodule_from_checkpoint
from amzft.data.reader import check_data_file
from amzft.data.split import product_key
from amzft.decoding import GenerationOptions, describe
from amzft.generate import Answer
from amzft.scoring import failure_views, overlap_scores

SPLIT_MEANING = {"train": "products seen in training", "validation": "held-out (validation)", "test": "held-out products",
                 "seen": "products of the checkpoint's training split", "unseen": "products it was not trained on"}
METRICS = ("rouge1", "rouge2", "rougeL", "bleu", "chrf")
VIEWS = ("empty", "title_only", "never_stopped", "looping", "collapsed", "facts_recalled", "facts_invented", "mean_new_tokens")


def sample_rows(dataset, n: int, seed: int) -> dict[str, list]:
    n = min(n, len(dataset))
    picks = np.sort(np.random.default_rng(seed).choice(len(dataset), size=n, replace=False)) if n else []
    rows = dataset.select([int(i) for i in picks]).select_columns(["title", "content"])
    return {"title": list(rows["title"]), "content": list(rows["content"])}


def evaluate_split(module, fmt, rows: dict, options: GenerationOptions, with_adapter: bool, batch_size: int,
                   with_base: bool = True) -> dict:
    prompts = [fmt.render(t) for t in rows["title"]]
    models = ({"base": False} if with_base or not with_adapter else {}) | ({"fine-tuned": True} if with_adapter else {})
    result = {"n": len(prompts), "models": {}, "examples": []}
    answers: dict[str, list[Answer]] = {}
    for name, adapter in models.items():
        answers[name] = generation.generate(module, prompts, options, use_adapter=adapter, batch_size=batch_size)
        texts = [a.text for a in answers[name]]
        result["models"][name] = overlap_scores(texts, rows["content"]) | failure_views(
            answers[name], rows["title"], rows["content"]
        )
    for i, (title, ref) in enumerate(zip(rows["title"], rows["content"])):
        result["examples"].append({"title": title, "reference": ref} | {m: answers[m][i].text for m in models})
    return result


def render_markdown(report: dict, examples_per_split: int = 6) -> str:
    lines = ["# amzft evaluation", "", f"checkpoint: `{report['checkpoint']}`  ",
             f"decoding: {report['decoding']}  ", f"generation: `{json.dumps(report['generation'])}`", ""]
    for split, result in report["splits"].items():
        lines += [f"## {split}: {SPLIT_MEANING.get(split, split)} ({result['n']} products)", ""]
        models = list(result["models"])
        lines.append("| metric | " + " | ".join(models) + " |")
        lines.append("|---|" + "---|" * len(models))
        for key in METRICS + VIEWS:
            lines.append(f"| {key} | " + " | ".join(f"{result['models'][m][key]:.3f}" for m in models) + " |")
        lines.append("")
        for ex in result["examples"][:examples_per_split]:
            lines += [f"**{ex['title']}**", "", f"- reference: {ex['reference']}"]
            lines += [f"- {m}: {ex[m] or '(empty)'}" for m in models]
            lines.append("")
    return "\n".join(lines)


# The printed table's columns: report key -> heading.
TABLE = {"rouge1": "rouge1", "rouge2": "rouge2", "rougeL": "rougeL", "bleu": "bleu", "chrf": "chrf", "empty": "empty",
         "looping": "loop", "never_stopped": "nostop", "collapsed": "collap", "facts_invented": "invent"}


def render_table(report: dict) -> str:
    header = f"{'split':<10} {'model':<11} " + " ".join(f"{k:>7}" for k in TABLE.values())
    lines = [f"decoding: {report['decoding']}", header]
    for split, result in report["splits"].items():
        for model, m in result["models"].items():
            values = [m[k] for k in TABLE]
            lines.append(f"{split:<10} {model:<11} " + " ".join(f"{v:7.3f}" for v in values))
    return "\n".join(lines)


def write_report(report: dict, out_dir: Path, step: int = 0) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "report.md", out_dir / "report.json"
    js.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    md.write_text(render_markdown(report))
    with SummaryWriter(str(out_dir)) as writer:
        for split, result in report["splits"].items():
            for model, metrics in result["models"].items():
                for key, value in metrics.items():
                    writer.add_scalar(f"eval/{split}/{model}/{key}", value, step)
        writer.add_text("eval/report", render_markdown(report, examples_per_split=12), step)
    return md, js


def split_by_seen(dataset, trained_titles) -> dict:
    """Another file's products as ``seen`` (a title of the checkpoint's training split) and
    ``unseen`` (any other), matched by the key the product split hashes (``product_key`` of the
    cleaned title), so spacing or case differences do not make a trained product look new."""
    trained = {product_key(t) for t in trained_titles}
    seen = np.array([product_key(t) in trained for t in dataset["title"]], dtype=bool)
    return {"seen": dataset.select(np.flatnonzero(seen)), "unseen": dataset.select(np.flatnonzero(~seen))}


def other_file(ckpt: str, dm, path) -> tuple | None:
    """``path``, a file other than the one the checkpoint was trained on: its data module (the
    checkpoint's filters, prompt and tokenizer; every product in one split, no read limit) and
    its products as ``seen`` / ``unseen`` by the checkpoint (``split_by_seen``). None when
    ``path`` is empty or the checkpoint's own file read whole; its own file read up to a
    ``data.limit`` counts as another file (the records past the limit are unseen products too,
    far more of them than the run's own test split)."""
    if not path:
        return None
    if check_data_file(path).resolve() == check_data_file(dm.settings.path).resolve() and dm.settings.limit is None:
        return None
    other, _ = datamodule_from_checkpoint(ckpt, path=str(path), val_fraction=0.0, test_fraction=0.0, limit=None)
    return other, split_by_seen(other.split("train"), dm.split("train")["title"])


def run_evaluation(module, datamodule, fmt, splits, samples, options: GenerationOptions, with_adapter: bool,
                   checkpoint: str | None, seed: int = 3407, batch_size: int = 8, datasets: dict | None = None,
                   with_base: bool = True) -> dict:
    """Scores per split: ``datamodule.split(name)``, or ``datasets[name]`` when given (another
    file's seen / unseen products). ``decoding`` says in words which decoding produced them."""
    report = {"checkpoint": checkpoint, "decoding": describe(options), "generation": asdict(options), "splits": {}}
    for split in splits:
        rows = sample_rows(datasets[split] if datasets is not None else datamodule.split(split), samples, seed)
        if rows["title"]:
            report["splits"][split] = evaluate_split(module, fmt, rows, options, with_adapter, batch_size, with_base)
    return report
