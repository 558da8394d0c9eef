"""``amzft evaluate``: base vs fine-tuned answers on sampled products, or answers already written
(``--predictions FILE``), scored into report.md / report.json / TensorBoard. Scoring a file loads
no model: the model backends are imported only by the functions that generate."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from amzft.data.reader import check_data_file, json_object, read_objects
from amzft.data.split import product_key, seeded_sample
from amzft.data.stats import PipelineStats
from amzft.errors import ConfigError, DataError
from amzft.evaluation.bootstrap import describe as describe_interval
from amzft.evaluation.bootstrap import paired_ratio_interval
from amzft.evaluation.scoring import failure_views, overlap_scores, rouge_per_pair
from amzft.model.decoding import GenerationOptions, describe

PREDICTIONS_SPLIT = "predictions"
SPLIT_MEANING = {"train": "products seen in training", "validation": "held-out (validation)", "test": "held-out products",
                 "seen": "products of the checkpoint's training split", "unseen": "products it was not trained on",
                 PREDICTIONS_SPLIT: "answers read from a predictions file"}
METRICS = ("rouge1", "rouge2", "rougeL", "bleu", "chrf")
VIEWS = ("empty", "title_only", "never_stopped", "looping", "collapsed", "facts_recalled", "facts_invented", "mean_new_tokens")
# The score whose fine-tuned ÷ base ratio each split states with its bootstrap interval.
RATIO_METRIC = "rougeL"


def score_answers(answers, titles: list[str], references: list[str]) -> tuple[dict[str, float], list[float]]:
    """One model's metrics and failure views, and each answer's ROUGE-L (computed once for both)."""
    texts = [a.text for a in answers]
    rouge = rouge_per_pair(texts, references)
    return overlap_scores(texts, references, rouge) | failure_views(answers, titles, references), rouge[RATIO_METRIC]


def add_uncertainty(result: dict, titles: list[str], answers: dict[str, list[str]], references: list[str],
                    rouge_l: dict[str, list[float]] | None = None) -> dict:
    """A split's result with each row's product and each model's ROUGE-L (``rouge_l`` if computed), its product
    count and, with two models, the second's mean ROUGE-L ÷ the first's with its bootstrap interval (``ratio``)."""
    products = [product_key(t) for t in titles]
    scores = rouge_l or {model: rouge_per_pair(texts, references)[RATIO_METRIC] for model, texts in answers.items()}
    result["per_product"] = {"products": products, RATIO_METRIC: scores}
    result["n_products"] = len(set(products))
    result["ratio"] = None
    if len(scores) == 2:
        base, tuned = scores
        interval = paired_ratio_interval(scores[base], scores[tuned], groups=products)
        result["ratio"] = {"metric": RATIO_METRIC, "tuned": tuned, "base": base, **interval.as_dict()}
    return result


def ratio_line(ratio: dict) -> str:
    """``rougeL fine-tuned ÷ base: 1.44× (95 % interval 1.26–1.67, 20 products, paired bootstrap)``."""
    return f"{ratio['metric']} {ratio['tuned']} ÷ {ratio['base']}: {describe_interval(ratio)}"


def evaluate_split(module, fmt, rows: dict, options: GenerationOptions, with_adapter: bool, batch_size: int,
                   with_base: bool = True) -> dict:
    from amzft.model import generation  # noqa: PLC0415 - the model backends (module doc)

    prompts = [fmt.render(t) for t in rows["title"]]
    models = ({"base": False} if with_base or not with_adapter else {}) | ({"fine-tuned": True} if with_adapter else {})
    titles, references = rows["title"], rows["content"]
    result, texts, rouge_l = {"n": len(prompts), "models": {}, "examples": []}, {}, {}
    for name, adapter in models.items():
        answers = generation.generate(module, prompts, options, use_adapter=adapter, batch_size=batch_size)
        result["models"][name], rouge_l[name] = score_answers(answers, titles, references)
        texts[name] = [a.text for a in answers]
    result["examples"] = [{"title": title, "reference": ref} | {m: texts[m][i] for m in models}
                          for i, (title, ref) in enumerate(zip(titles, references))]
    return add_uncertainty(result, titles, texts, references, rouge_l)


def render_markdown(report: dict, examples_per_split: int = 6) -> str:
    lines = ["# amzft evaluation", "", f"checkpoint: `{report['checkpoint']}`  ", f"decoding: {report['decoding']}  "]
    # A predictions file's report has no generation options (the file does not say): what of it was scored instead.
    if report.get("generation") is not None:
        lines.append(f"generation: `{json.dumps(report['generation'])}`")
    if report.get("predictions") is not None:
        lines.append(predictions_summary(report))
    lines.append("")
    for split, result in report["splits"].items():
        n_products = result.get("n_products", result["n"])
        count = f"{result['n']} products" if n_products == result["n"] else f"{result['n']} answers, {n_products} products"
        lines += [f"## {split}: {SPLIT_MEANING.get(split, split)} ({count})", ""]
        models = list(result["models"])
        lines += ["| metric | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
        for key in METRICS + VIEWS:
            # n/a: a view the answers cannot give (mean_new_tokens of a file without new_tokens).
            cells = (f"{result['models'][m][key]:.3f}" if key in result["models"][m] else "n/a" for m in models)
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        lines.append("")
        if result.get("ratio"):
            lines += [ratio_line(result["ratio"]), ""]
        for ex in result["examples"][:examples_per_split]:
            lines += [f"**{ex['title']}**", "", f"- reference: {ex['reference']}"]
            lines += [*(f"- {m}: {ex[m] or '(empty)'}" for m in models), ""]
    return "\n".join(lines)


# The printed table's columns: report key -> heading.
TABLE = {"rouge1": "rouge1", "rouge2": "rouge2", "rougeL": "rougeL", "bleu": "bleu", "chrf": "chrf", "empty": "empty",
         "looping": "loop", "never_stopped": "nostop", "collapsed": "collap", "facts_invented": "invent"}


def render_table(report: dict) -> str:
    # Columns as wide as the longest name: a predictions file's split and model (its file name) run longer.
    sw = max([10, *map(len, report["splits"])])
    mw = max([11, *(len(m) for result in report["splits"].values() for m in result["models"])])
    lines = [f"decoding: {report['decoding']}", f"{'split':<{sw}} {'model':<{mw}} " + " ".join(f"{k:>7}" for k in TABLE.values())]
    for split, result in report["splits"].items():
        for model, m in result["models"].items():
            lines.append(f"{split:<{sw}} {model:<{mw}} " + " ".join(f"{m[k]:7.3f}" for k in TABLE))
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
    """Another file's products as ``seen`` (in the checkpoint's training split, by ``product_key``) and ``unseen``."""
    trained = {product_key(t) for t in trained_titles}
    seen = np.array([product_key(t) in trained for t in dataset["title"]], dtype=bool)
    return {"seen": dataset.select(np.flatnonzero(seen)), "unseen": dataset.select(np.flatnonzero(~seen))}


def other_file(answerer, dm, path) -> tuple | None:
    """The data module of ``path`` (the checkpoint's filters, prompt, tokenizer; no split, no limit) and its
    ``split_by_seen``; None for no path or the checkpoint's own file read whole (not up to a ``data.limit``)."""
    if not path or (check_data_file(path).resolve() == check_data_file(dm.settings.path).resolve() and dm.settings.limit is None):
        return None
    other = answerer.datamodule(path=str(path), holdout={"val_fraction": 0.0, "test_fraction": 0.0}, limit=None)
    return other, split_by_seen(other.split("train"), dm.split("train")["title"])


def run_evaluation(module, datamodule, fmt, splits, samples, options: GenerationOptions, with_adapter: bool,
                   checkpoint: str | None, seed: int = 3407, batch_size: int = 8, datasets: dict | None = None,
                   with_base: bool = True) -> dict:
    """Scores per split: ``datamodule.split(name)``, or ``datasets[name]`` when given (``other_file``)."""
    report = {"checkpoint": checkpoint, "decoding": describe(options), "generation": asdict(options), "splits": {}}
    for split in splits:
        dataset = datasets[split] if datasets is not None else datamodule.split(split)
        picked = dataset.select(sorted(seeded_sample(len(dataset), samples, seed))).select_columns(["title", "content"])
        rows = {"title": list(picked["title"]), "content": list(picked["content"])}
        if rows["title"]:
            report["splits"][split] = evaluate_split(module, fmt, rows, options, with_adapter, batch_size, with_base)
    return report


# ----------------------------------------------------------------- a predictions file
# describe's `stop`: "eos" ended with the end-of-answer token, "length" hit max_new_tokens.
STOPS = {"eos": True, "length": False}
# The report keeps the first scored answers as examples: a large file's report.json does not copy the file.
PREDICTION_EXAMPLES = 100
_SUFFIXES = (".gz", ".jsonl", ".json", ".ndjson")
_EXAMPLE_KEYS = ("title", "reference", "predictions_line")


def parse_prediction(raw: bytes) -> dict | tuple[str, str]:
    """One line of a predictions file (``describe``'s description / new_tokens / stop, or ``predict``'s
    answer / stopped) as {title, text, reference, new_tokens, stopped} (None: not said), or (reason, message)."""
    obj = json_object(raw)
    if isinstance(obj, tuple):
        return obj
    text_key = "answer" if "description" not in obj and "answer" in obj else "description"
    for name in ("title", text_key):
        if name not in obj:
            return "missing_field", f"missing field {name!r}"
        if not isinstance(obj[name], str):
            return "wrong_type", f"field {name!r} should be a string"
    reference, new_tokens = obj.get("reference"), obj.get("new_tokens")  # reference absent or null: no content
    # type() rather than isinstance: true / false are ints to isinstance.
    if (reference is not None and not isinstance(reference, str)) or (
            new_tokens is not None and (type(new_tokens) is not int or new_tokens < 0)):
        return "wrong_type", "reference should be a string and new_tokens a count"
    stop, stopped = obj.get("stop"), obj.get("stopped")  # stop (describe's) first
    if stop is not None and (not isinstance(stop, str) or stop not in STOPS):
        return "unknown_stop", f"stop should be one of {', '.join(STOPS)}"
    if stop is None and stopped is not None and not isinstance(stopped, bool):
        return "wrong_type", "stopped should be true or false"
    stopped = STOPS[stop] if stop is not None else stopped
    return {"title": obj["title"], "text": obj[text_key], "reference": reference or "", "new_tokens": new_tokens,
            "stopped": stopped}


def predictions_label(path: str | Path) -> str:
    """The file's name without its JSON Lines / gzip suffixes: the report's model name."""
    name = label = Path(path).name
    while label.lower().endswith(_SUFFIXES):
        label = label[: label.rfind(".")]
    return label if label and label not in _EXAMPLE_KEYS else name  # an example row keys answers by it


def predictions_out_dir(path: str | Path) -> Path:
    return Path(path).expanduser().parent / f"{predictions_label(path)}_eval"


def _skips(skipped: dict[str, int], lines: dict[str, list[int]]) -> str:
    return ", ".join(f"{reason} {count} (line{'s' * (len(lines[reason]) > 1)} "
                     f"{', '.join(map(str, lines[reason]))}{', …' * (count > len(lines[reason]))})"
                     for reason, count in skipped.items())


def score_predictions_file(path: str | Path, samples: int | None = None, seed: int = 3407) -> tuple[dict, PipelineStats]:
    """A report like ``run_evaluation``'s (one split, one model) of the answers in ``describe``'s or ``predict``'s
    JSON Lines, plus what of the file was scored; ``samples``: a seeded sample of the rows with a reference."""
    if samples is not None and samples < 1:
        raise ConfigError(f"--samples must be at least 1 (or left out: every row with a reference), found {samples}")
    path = check_data_file(path)
    stats, rng = PipelineStats(), random.Random(seed)
    picked: list[dict] = []
    with_reference = 0
    for line_no, row in read_objects(path, stats, parse_prediction):
        stats.kept += 1
        if not row["reference"].strip():
            continue
        row["line"] = line_no
        # Reservoir sampling (algorithm R): a seeded sample in one pass, holding `samples` rows at most.
        if samples is None or with_reference < samples:
            picked.append(row)
        elif (j := rng.randrange(with_reference + 1)) < samples:
            picked[j] = row
        with_reference += 1
    if not stats.kept:
        raise DataError(f"{path}: no prediction rows in its {stats.records_read} lines (skipped: "
                        f"{_skips(stats.skipped, stats.skipped_lines)}); expected JSON Lines objects with title and "
                        "description (amzft describe) or title and answer (amzft predict)")
    if not picked:
        raise DataError(f"{path}: none of its {stats.kept} rows has a reference: the input had no `content` to score "
                        "against (describe writes `reference` only for records with a non-empty content)")
    rows = sorted(picked, key=lambda r: r["line"])  # file order, as evaluate's samples keep
    # What failure_views reads of an answer; unsaid: 0 tokens, and stopped (only "length" / false is never stopped).
    answers = [SimpleNamespace(text=r["text"], new_tokens=r["new_tokens"] or 0, stopped=r["stopped"] is not False) for r in rows]
    titles, references = [r["title"] for r in rows], [r["reference"] for r in rows]
    metrics, rouge_l = score_answers(answers, titles, references)
    known = [r["new_tokens"] for r in rows if r["new_tokens"] is not None]
    del metrics["mean_new_tokens"]  # over the rows that say; none (predict's): left out, 0 would read as empty answers
    if known:
        metrics["mean_new_tokens"] = sum(known) / len(known)
    model = predictions_label(path)
    examples = [{"title": r["title"], "reference": r["reference"], model: r["text"], "predictions_line": r["line"]}
                for r in rows[:PREDICTION_EXAMPLES]]
    return {
        "checkpoint": None, "decoding": f"as written in {path}", "generation": None,  # the file does not record its options
        "predictions": {
            "path": str(path), "lines_read": stats.records_read, "rows": stats.kept, "with_reference": with_reference,
            "scored": len(rows), "samples": samples, "seed": seed, "stop_unknown": sum(r["stopped"] is None for r in rows),
            "new_tokens_unknown": len(rows) - len(known), "skipped": dict(stats.skipped), "skipped_lines": stats.skipped_lines},
        "splits": {PREDICTIONS_SPLIT: add_uncertainty({"n": len(rows), "models": {model: metrics}, "examples": examples},
                                                      titles, {model: [a.text for a in answers]}, references, {model: rouge_l})},
    }, stats


def predictions_summary(report: dict) -> str:
    """One line: what of the predictions file was scored, and what was not."""
    p = report["predictions"]
    line = (f"predictions: `{p['path']}`: scored {p['scored']} of {p['with_reference']} rows with a reference"
            f"{' (a seeded sample)' if p['scored'] < p['with_reference'] else ''}; "
            f"{p['rows'] - p['with_reference']} of its {p['rows']} rows have none")
    if p["skipped"]:
        line += f"; {sum(p['skipped'].values())} bad lines skipped: {_skips(p['skipped'], p['skipped_lines'])}"
    if p["stop_unknown"]:
        line += f"; {p['stop_unknown']} scored rows do not say why they stopped (counted as stopped)"
    if p["new_tokens_unknown"]:
        line += f"; {p['new_tokens_unknown']} do not give new_tokens (not in mean_new_tokens)"
    return line
