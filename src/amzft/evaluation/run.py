"""``python -m amzft evaluate``: base vs fine-tuned answers on seen and held-out products,
scored and written as report.md / report.json / TensorBoard scalars and text; or, with
``--predictions FILE``, answers already written (``describe``, ``predict``) scored the same way.
Each split also carries its per-product ROUGE-L, its product count and, with two models, the
fine-tuned ÷ base ratio of mean ROUGE-L with its paired-bootstrap interval (amzft.evaluation.bootstrap):
a ratio from 20 products is a noisy figure, and the report says how noisy.

The model side (amzft.model.generation, amzft.checkpoints) is imported by the functions that generate:
scoring a predictions file loads no model, so it does not import the model backends either.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from amzft.data.reader import check_data_file, json_object, read_objects
from amzft.data.split import product_key, seeded_sample
from amzft.data.stats import PipelineStats
from amzft.errors import ConfigError, DataError
from amzft.evaluation.bootstrap import describe as describe_interval
from amzft.evaluation.bootstrap import paired_ratio_interval
from amzft.evaluation.scoring import failure_views, overlap_scores, rouge_l_per_pair
from amzft.model.decoding import GenerationOptions, describe

if TYPE_CHECKING:
    from amzft.model.generation import Answer

PREDICTIONS_SPLIT = "predictions"
SPLIT_MEANING = {"train": "products seen in training", "validation": "held-out (validation)", "test": "held-out products",
                 "seen": "products of the checkpoint's training split", "unseen": "products it was not trained on",
                 PREDICTIONS_SPLIT: "answers read from a predictions file"}
METRICS = ("rouge1", "rouge2", "rougeL", "bleu", "chrf")
VIEWS = ("empty", "title_only", "never_stopped", "looping", "collapsed", "facts_recalled", "facts_invented", "mean_new_tokens")
# The score whose fine-tuned ÷ base ratio each split states with its bootstrap interval.
RATIO_METRIC = "rougeL"


def per_product_scores(titles: list[str], answers: dict[str, list[str]], references: list[str]) -> dict:
    """Each row's product (``product_key``, the key the product split hashes) and each model's
    ROUGE-L of that row: what the ratio's interval resamples, and what a protocol pooling
    several runs (benchmarks/quality.py) pools."""
    return {"products": [product_key(t) for t in titles],
            RATIO_METRIC: {model: rouge_l_per_pair(texts, references) for model, texts in answers.items()}}


def split_ratio(per_product: dict) -> dict | None:
    """The second model's mean ROUGE-L ÷ the first's (fine-tuned ÷ base) with its paired-bootstrap
    95 % interval over products (``bootstrap.paired_ratio_interval``, 2000 resamples, seed 0);
    None where the split has one model (nothing to compare)."""
    scores = per_product[RATIO_METRIC]
    if len(scores) != 2:
        return None
    base, tuned = scores
    interval = paired_ratio_interval(scores[base], scores[tuned], groups=per_product["products"])
    return {"metric": RATIO_METRIC, "tuned": tuned, "base": base, **interval.as_dict()}


def ratio_line(ratio: dict) -> str:
    """``rougeL fine-tuned ÷ base: 1.44× (95 % interval 1.26–1.67, 20 products, paired bootstrap)``."""
    return f"{ratio['metric']} {ratio['tuned']} ÷ {ratio['base']}: {describe_interval(ratio)}"


def add_uncertainty(result: dict, titles: list[str], answers: dict[str, list[str]], references: list[str]) -> dict:
    """A split's result with its per-product scores, its product count (rows of one product
    count once) and, with two models, the ratio and its interval (``ratio``, else None)."""
    result["per_product"] = per_product_scores(titles, answers, references)
    result["n_products"] = len(set(result["per_product"]["products"]))
    result["ratio"] = split_ratio(result["per_product"])
    return result


def sample_rows(dataset, n: int, seed: int) -> dict[str, list]:
    rows = dataset.select(sorted(seeded_sample(len(dataset), n, seed))).select_columns(["title", "content"])
    return {"title": list(rows["title"]), "content": list(rows["content"])}


def evaluate_split(module, fmt, rows: dict, options: GenerationOptions, with_adapter: bool, batch_size: int,
                   with_base: bool = True) -> dict:
    from amzft.model import generation  # noqa: PLC0415 - the model backends (module doc)

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
    texts = {name: [a.text for a in answers[name]] for name in models}
    return add_uncertainty(result, rows["title"], texts, rows["content"])


def render_markdown(report: dict, examples_per_split: int = 6) -> str:
    lines = ["# amzft evaluation", "", f"checkpoint: `{report['checkpoint']}`  ", f"decoding: {report['decoding']}  "]
    # A predictions file's report has no generation options (the file does not record them),
    # and says what of the file was scored instead.
    if report.get("generation") is not None:
        lines.append(f"generation: `{json.dumps(report['generation'])}`")
    if report.get("predictions") is not None:
        lines.append(predictions_summary(report))
    lines.append("")
    for split, result in report["splits"].items():
        # Rows of one product (a file may repeat it) count once as products.
        n_products = result.get("n_products", result["n"])
        count = f"{result['n']} products" if n_products == result["n"] else f"{result['n']} answers, {n_products} products"
        lines += [f"## {split}: {SPLIT_MEANING.get(split, split)} ({count})", ""]
        models = list(result["models"])
        lines.append("| metric | " + " | ".join(models) + " |")
        lines.append("|---|" + "---|" * len(models))
        for key in METRICS + VIEWS:
            # n/a: a view the answers cannot give (mean_new_tokens of a file without new_tokens).
            cells = (f"{result['models'][m][key]:.3f}" if key in result["models"][m] else "n/a" for m in models)
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        lines.append("")
        if result.get("ratio"):
            lines += [ratio_line(result["ratio"]), ""]
        for ex in result["examples"][:examples_per_split]:
            lines += [f"**{ex['title']}**", "", f"- reference: {ex['reference']}"]
            lines += [f"- {m}: {ex[m] or '(empty)'}" for m in models]
            lines.append("")
    return "\n".join(lines)


# The printed table's columns: report key -> heading.
TABLE = {"rouge1": "rouge1", "rouge2": "rouge2", "rougeL": "rougeL", "bleu": "bleu", "chrf": "chrf", "empty": "empty",
         "looping": "loop", "never_stopped": "nostop", "collapsed": "collap", "facts_invented": "invent"}


def render_table(report: dict) -> str:
    # Columns as wide as the longest name: a predictions file's split and model (its file name) run longer.
    sw = max([10, *map(len, report["splits"])])
    mw = max([11, *(len(m) for result in report["splits"].values() for m in result["models"])])
    header = f"{'split':<{sw}} {'model':<{mw}} " + " ".join(f"{k:>7}" for k in TABLE.values())
    lines = [f"decoding: {report['decoding']}", header]
    for split, result in report["splits"].items():
        for model, m in result["models"].items():
            values = [m[k] for k in TABLE]
            lines.append(f"{split:<{sw}} {model:<{mw}} " + " ".join(f"{v:7.3f}" for v in values))
        if result.get("ratio"):
            lines.append(f"{split:<{sw}} {ratio_line(result['ratio'])}")
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
            for key in ("value", "low", "high"):  # null where there is no ratio or no upper end
                if (result.get("ratio") or {}).get(key) is not None:
                    writer.add_scalar(f"eval/{split}/{RATIO_METRIC}_ratio/{key}", result["ratio"][key], step)
        writer.add_text("eval/report", render_markdown(report, examples_per_split=12), step)
    return md, js


def split_by_seen(dataset, trained_titles) -> dict:
    """Another file's products as ``seen`` (a title of the checkpoint's training split) and
    ``unseen`` (any other), matched by the key the product split hashes (``product_key`` of the
    cleaned title), so spacing or case differences do not make a trained product look new."""
    trained = {product_key(t) for t in trained_titles}
    seen = np.array([product_key(t) in trained for t in dataset["title"]], dtype=bool)
    return {"seen": dataset.select(np.flatnonzero(seen)), "unseen": dataset.select(np.flatnonzero(~seen))}


def other_file(answerer, dm, path) -> tuple | None:
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
    other = answerer.datamodule(path=str(path), holdout={"val_fraction": 0.0, "test_fraction": 0.0}, limit=None)
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


# ----------------------------------------------------------------- a predictions file
class WrittenAnswer(NamedTuple):
    """An answer read from a predictions file: the fields ``failure_views`` reads of a
    ``generate.Answer`` (not imported here: it imports the model backends)."""

    text: str
    new_tokens: int  # 0 where the file does not say (predict's rows)
    stopped: bool  # True where the file does not say: only a written "length" / false counts as never stopped


# describe's `stop`: "eos" ended with the end-of-answer token, "length" hit max_new_tokens.
STOPS = {"eos": True, "length": False}
# The file itself holds every answer; the report keeps the first scored ones as examples, so a
# large file's report.json does not copy the file.
PREDICTION_EXAMPLES = 100
_SUFFIXES = (".gz", ".jsonl", ".json", ".ndjson")
_EXAMPLE_KEYS = ("title", "reference", "predictions_line")


def parse_prediction(raw: bytes) -> dict | tuple[str, str]:
    """One line of a predictions file as {title, text, reference, new_tokens, stopped} (None:
    the file does not say), or (reason, message) for a bad line. ``describe`` writes
    description / new_tokens / stop, ``predict`` (callbacks.PredictionsWriter) answer / stopped."""
    obj = json_object(raw)
    if isinstance(obj, tuple):
        return obj
    text_key = "answer" if "description" not in obj and "answer" in obj else "description"
    for name in ("title", text_key):
        if name not in obj:
            return "missing_field", f"missing field {name!r}"
        if not isinstance(obj[name], str):
            return "wrong_type", f"field {name!r} should be a string"
    reference = obj.get("reference")  # absent or null: the input had no content
    new_tokens = obj.get("new_tokens")
    # type() rather than isinstance: true / false are ints to isinstance.
    if (reference is not None and not isinstance(reference, str)) or (
            new_tokens is not None and (type(new_tokens) is not int or new_tokens < 0)):
        return "wrong_type", "reference should be a string and new_tokens a count"
    stopped = None
    if obj.get("stop") is not None:
        if not isinstance(obj["stop"], str) or obj["stop"] not in STOPS:
            return "unknown_stop", f"stop should be one of {', '.join(STOPS)}"
        stopped = STOPS[obj["stop"]]
    elif obj.get("stopped") is not None:
        if not isinstance(obj["stopped"], bool):
            return "wrong_type", "stopped should be true or false"
        stopped = obj["stopped"]
    return {"title": obj["title"], "text": obj[text_key], "reference": reference or "", "new_tokens": new_tokens,
            "stopped": stopped}


def predictions_label(path: str | Path) -> str:
    """The file's name without its JSON Lines / gzip suffixes: the report's model name and the
    default report folder's ``<label>_eval``."""
    name = label = Path(path).name
    while label.lower().endswith(_SUFFIXES):
        label = label[: label.rfind(".")]
    return label if label and label not in _EXAMPLE_KEYS else name  # an example row keys answers by it


def predictions_out_dir(path: str | Path) -> Path:
    return Path(path).expanduser().parent / f"{predictions_label(path)}_eval"


def _skips(stats: PipelineStats) -> str:
    return ", ".join(f"{reason} {count} (line{'s' * (len(stats.skipped_lines[reason]) > 1)} "
                     f"{', '.join(map(str, stats.skipped_lines[reason]))}{', …' * (count > len(stats.skipped_lines[reason]))})"
                     for reason, count in stats.skipped.items())


def score_predictions_file(path: str | Path, samples: int | None = None, seed: int = 3407) -> tuple[dict, PipelineStats]:
    """Score answers already written (``describe``'s JSON Lines, or ``predict``'s
    predictions.jsonl) against their references with ``evaluate``'s metrics and failure views:
    a report shaped like ``run_evaluation``'s, one split (``predictions``) and one model (the
    file's label), plus ``report["predictions"]``: what of the file was scored. The file is
    streamed; bad lines are counted skips (``stats``), rows without a reference are not scored.
    ``samples``: a seeded sample of that many rows with a reference (None: all of them). Its one
    model has per-product scores but no ratio (there is no second model to divide by)."""
    if samples is not None and samples < 1:
        raise ConfigError(f"--samples must be at least 1 (or left out: every row with a reference), found {samples}")
    path = check_data_file(path)
    stats, rng = PipelineStats(), random.Random(seed)
    picked: list[tuple[int, dict]] = []
    with_reference = 0
    for line_no, row in read_objects(path, stats, parse_prediction):
        stats.kept += 1
        if not row["reference"].strip():
            continue
        row["line"] = line_no
        # Reservoir sampling (algorithm R): a seeded uniform sample in one pass, holding only
        # `samples` rows however long the file.
        if samples is None or with_reference < samples:
            picked.append((with_reference, row))
        elif (j := rng.randrange(with_reference + 1)) < samples:
            picked[j] = (with_reference, row)
        with_reference += 1
    if not stats.kept:
        raise DataError(f"{path}: no prediction rows in its {stats.records_read} lines (skipped: {_skips(stats)}); expected "
                        "JSON Lines objects with title and description (amzft describe) or title and answer (amzft predict)")
    if not picked:
        raise DataError(f"{path}: none of its {stats.kept} rows has a reference: the input had no `content` to score "
                        "against (describe writes `reference` only for records with a non-empty content)")
    rows = [row for _, row in sorted(picked, key=lambda p: p[0])]  # file order, as sample_rows keeps
    answers = [WrittenAnswer(r["text"], r["new_tokens"] or 0, r["stopped"] is not False) for r in rows]
    titles, references = [r["title"] for r in rows], [r["reference"] for r in rows]
    metrics = overlap_scores([a.text for a in answers], references) | failure_views(answers, titles, references)
    known = [r["new_tokens"] for r in rows if r["new_tokens"] is not None]
    if known:  # over the rows that say: an unknown count is not 0 tokens
        metrics["mean_new_tokens"] = sum(known) / len(known)
    else:  # predict's rows do not say; a mean of 0 would read as empty answers
        del metrics["mean_new_tokens"]
    model = predictions_label(path)
    examples = [{"title": r["title"], "reference": r["reference"], model: r["text"], "predictions_line": r["line"]}
                for r in rows[:PREDICTION_EXAMPLES]]
    report = {
        "checkpoint": None,
        "decoding": f"as written in {path}",
        "generation": None,  # the file does not record the options that produced it
        "predictions": {
            "path": str(path), "lines_read": stats.records_read, "rows": stats.kept, "with_reference": with_reference,
            "scored": len(rows), "samples": samples, "seed": seed,
            "stop_unknown": sum(r["stopped"] is None for r in rows), "new_tokens_unknown": len(rows) - len(known),
            "skipped": dict(stats.skipped), "skipped_lines": stats.skipped_lines,
        },
        "splits": {PREDICTIONS_SPLIT: add_uncertainty({"n": len(rows), "models": {model: metrics}, "examples": examples},
                                                      titles, {model: [a.text for a in answers]}, references)},
    }
    return report, stats


def predictions_summary(report: dict) -> str:
    """One line: what of the predictions file was scored, and what was not."""
    p = report["predictions"]
    line = (f"predictions: `{p['path']}`: scored {p['scored']} of {p['with_reference']} rows with a reference"
            f"{' (a seeded sample)' if p['scored'] < p['with_reference'] else ''}; "
            f"{p['rows'] - p['with_reference']} of its {p['rows']} rows have none")
    if p["skipped"]:
        stats = PipelineStats(skipped=Counter(p["skipped"]), skipped_lines=p["skipped_lines"])
        line += f"; {sum(p['skipped'].values())} bad lines skipped: {_skips(stats)}"
    if p["stop_unknown"]:
        line += f"; {p['stop_unknown']} scored rows do not say why they stopped (counted as stopped)"
    if p["new_tokens_unknown"]:
        line += f"; {p['new_tokens_unknown']} do not give new_tokens (not in mean_new_tokens)"
    return line
