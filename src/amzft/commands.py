"""The commands that are not Lightning loops: ``data`` (report), ``ask``, ``evaluate``, ``export``, ``demo``.

Modules that import torch, Lightning or transformers are imported inside each command, after
its arguments are parsed: ``--help`` and argument errors answer at once, not after seconds of
imports.
"""

from __future__ import annotations

import json
import textwrap
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from amzft.data.prompt import prompt_format_from
from amzft.decoding import (
    DECODING_KEYS,
    DEFAULT_DECODING,
    GenerationOptions,
    add_decoding_arguments,
    decoding_from,
    describe,
)
from amzft.errors import ConfigError

# Top-level keys of a training config that a command may not use: accepted, then ignored,
# so every command reads the same YAML files.
_TRAINING_KEYS = (
    "model", "trainer", "optimizer", "lr_scheduler", "ckpt_path", "seed_everything", "checkpoint", "sample_answers",
    "validation", "best", "early_stopping",
)


def _parser(prog: str, description: str, with_data: bool = True, own: tuple[str, ...] = (), decoding: bool = True):
    # exit_on_error=False: amzft.cli prints parse errors as one line instead of the usage dump.
    parser = ArgumentParser(prog=prog, description=description, default_env=False, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML config (configs/*.yaml)")
    if decoding:  # the same options as every command that answers (amzft.decoding)
        add_decoding_arguments(parser)
    else:
        for key in DECODING_KEYS:
            parser.add_argument(f"--{key}", type=Any, default=None, help="(read by the commands that answer; ignored here)")
    if with_data:
        from amzft.data.module import AmazonTitlesDataModule

        parser.add_class_arguments(AmazonTitlesDataModule, "data", instantiate=False)
    for key in _TRAINING_KEYS:
        if key != "model" and key not in own:
            parser.add_argument(f"--{key}", type=Any, default=None, help="(read by `fit`; ignored here)")
    return parser


def _datamodule(cfg):
    from amzft.data.module import AmazonTitlesDataModule

    data = dict(cfg.data)
    model = cfg.get("model") or {}
    init_args = model.get("init_args", model) if isinstance(model, dict) else {}
    # In `fit` the tokenizer is linked from the model; here we mirror that link.
    if init_args.get("name_or_path") and data.get("tokenizer") == "embedded":
        data["tokenizer"] = init_args["name_or_path"]
    return AmazonTitlesDataModule(**data)


def data_command(argv: list[str]) -> None:
    """Build (or reopen) the cleaned dataset, count every example's tokens and print the data-quality report."""
    parser = _parser("amzft data", "Data-quality report: records read, kept, skipped by reason, lengths, examples.",
                     decoding=False)
    parser.add_argument("--model", type=Any, default=None, help="(its name_or_path picks the tokenizer)")
    parser.add_argument("--examples", type=int, default=3, help="cleaned examples to show")
    cfg = parser.parse_args(argv)
    dm = _datamodule(cfg)
    dm.setup()
    from amzft.data.report import render_report

    print(render_report(dm.prepared, dm.settings, dm.tokenizer, cfg.examples))


def _base_module(model_args: dict):
    from amzft.checkpoints import init_kwargs
    from amzft.model import LoraCausalLM

    # A training config's model section may hold keys for other tools; keep the module's own.
    module = LoraCausalLM(**init_kwargs(LoraCausalLM, model_args))
    module.configure_model()
    return module


def ask_command(argv: list[str]) -> None:
    """Answer "What is the description of product TITLE?" with the base or fine-tuned model."""
    parser = _parser("amzft ask", "Answer the seed question for one or more product titles.", with_data=False, own=("ckpt_path",))
    parser.add_argument("titles", nargs="+", help="product titles")
    parser.add_argument("--ckpt_path", default=None, help="a checkpoint (or `last`, `best`): answer with the fine-tuned adapter")
    parser.add_argument("--compare", type=bool, default=False, help="with --ckpt_path: print base and fine-tuned answers")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--model", type=Any, default=None, help="model options (name_or_path …) for the base model")
    parser.add_argument("--data", type=Any, default=None, help="(its prompt options are used)")
    parser.add_argument("--log_root", default="logs", help="where `--ckpt_path last` / `best` look")
    cfg = parser.parse_args(argv)
    options = decoding_from(cfg)
    from amzft.checkpoints import resolve_ckpt_path
    from amzft.generate import generate_answers
    from amzft.model import LoraCausalLM

    if cfg.ckpt_path:
        module, fmt = LoraCausalLM.from_checkpoint(resolve_ckpt_path(cfg.ckpt_path, cfg.log_root))
    else:
        module, fmt = _base_module(dict(cfg.model or {})), prompt_format_from(dict(cfg.data or {}))
    tuned = generate_answers(module, cfg.titles, fmt, cfg.max_new_tokens, use_adapter=bool(cfg.ckpt_path), options=options)
    base = (generate_answers(module, cfg.titles, fmt, cfg.max_new_tokens, use_adapter=False, options=options)
            if cfg.compare and cfg.ckpt_path else None)
    for i, title in enumerate(cfg.titles):
        print(f"Q: {fmt.question.replace('{title}', title)}")
        if base is not None:
            print(f"  base:       {base[i]}")
            print(f"  fine-tuned: {tuned[i]}")
        else:
            print(f"A: {tuned[i]}")
        print()


SEED_QUESTIONS = ["Girls Ballet Tutu", "The Wall: Images and Offerings from the Vietnam Veterans Memorial"]


def _wrap(text: str, width: int = 96, indent: str = "      ") -> str:
    return textwrap.fill(text or "(empty)", width=width, initial_indent=indent, subsequent_indent=indent)


def demo_command(argv: list[str]) -> None:
    """Fine-tune the embedded model on the bundled sample (stopping half-way and resuming, as a
    real run would after an interruption), then print base vs fine-tuned answers."""
    parser = _parser("amzft demo", "Fine-tune on the bundled sample, resume, compare answers.", with_data=False)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the config's)")
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--log_root", default="logs")
    parser.add_argument("--model", type=Any, default=None)
    parser.add_argument("--data", type=Any, default=None)
    cfg = parser.parse_args(argv)
    options = decoding_from(cfg, max_new_tokens=cfg.max_new_tokens)
    config = cfg.config[0].absolute if cfg.config else _default_cpu_config()
    extra = ["--trainer.default_root_dir", cfg.log_root, *_decoding_args(cfg)]  # val/rougeL decodes as the answers
    if cfg.steps:
        extra += ["--trainer.max_steps", str(cfg.steps)]
    started = time.perf_counter()
    last, datamodule, history = _demo_train(str(config), extra, cfg.log_root)
    train_minutes = (time.perf_counter() - started) / 60
    chosen, why = _demo_pick(last, history, cfg.log_root)
    also_last = " and from the last checkpoint" if chosen != last else ""
    print(f"\n== 3/3 base vs fine-tuned answers (decoding: {describe(options)}) from {why}{also_last} ==")
    _demo_answers(chosen, datamodule, options, last if chosen != last else None)
    print(f"\ndone in {(time.perf_counter() - started) / 60:.1f} min (training {train_minutes:.1f} min). "
          f"checkpoint: {chosen} ({chosen.stat().st_size / 2**20:.1f} MiB); last: {last}")
    print(f"curves: tensorboard --logdir {cfg.log_root}/amzft")
    which = "best" if chosen != last else "last"
    print(f'ask it yourself: python -m amzft ask "Girls Ballet Tutu Neon Pink" --ckpt_path {which} --compare true')


def _decoding_args(cfg) -> list[str]:
    """The parsed decoding options as command-line arguments (for the demo's ``fit``)."""
    return [arg for key in DECODING_KEYS if cfg.get(key) is not None for arg in (f"--{key}", str(cfg.get(key)))]


def _demo_pick(last: Path, history: list[tuple[int, dict[str, float]]], log_root: str) -> tuple[Path, str]:
    """The best checkpoint and why (which step, its score among all validations, and the last
    step's), or the last checkpoint when no validation kept a best one."""
    from amzft.checkpoints import MONITOR_MODES, find_best_checkpoint

    try:
        best = find_best_checkpoint(log_root)
    except ConfigError:
        return last, "the last checkpoint (no validation kept a best one)"
    scores = [(step, m[best.monitor]) for step, m in history if best.monitor in m]
    lowest = "lowest" if MONITOR_MODES.get(best.monitor, "min") == "min" else "highest"
    why = f"the best checkpoint: step {best.step} ({lowest} {best.monitor} {best.score:.4f}"
    if not scores:
        return best.path, why + ")"
    final_step, final = scores[-1]
    last_word = "it is the last step" if final_step == best.step else f"the last, step {final_step}, had {final:.4f}"
    return best.path, f"{why} of the {len(scores)} validations; {last_word})"


def _demo_train(config: str, extra: list[str], log_root: str):
    """Train to half the steps, stop (as an interruption would), resume from last.ckpt to the end.
    Returns the final checkpoint, the data module and the validations (step, metrics)."""
    from amzft.callbacks import StopAtStep
    from amzft.checkpoints import resolve_ckpt_path
    from amzft.lightning_cli import cli_main
    from amzft.selection import ValidationSchedule

    first = cli_main(["fit", "--config", config, *extra], run=False)
    total = first.trainer.max_steps
    half = max(1, total // 2)
    print(f"\n== 1/3 fine-tuning {first.model.hparams.name_or_path} on {first.datamodule.settings.path}; "
          f"interrupting at step {half} of {total} to show an exact resume ==")
    first.trainer.callbacks.append(StopAtStep(half))
    first.trainer.fit(first.model, datamodule=first.datamodule)
    print(f"\n== 2/3 resuming from {resolve_ckpt_path('last', log_root)} ==")
    second = cli_main(["fit", "--config", config, *extra, "--ckpt_path", "last"], run=False)
    second.trainer.fit(second.model, datamodule=second.datamodule, ckpt_path=second.ckpt_path)
    # Each run's validations (the first run's last one comes after its last.ckpt, so the
    # checkpoint's own record cannot give them all).
    history = [row for cli in (first, second) for c in cli.trainer.callbacks if isinstance(c, ValidationSchedule) for row in c.history]
    return Path(second.trainer.checkpoint_callback.last_model_path), second.datamodule, history


def _demo_answers(checkpoint: Path, datamodule, options, last: Path | None = None) -> None:
    """Base and fine-tuned answers for the seed's questions and one seen / one held-out product;
    with ``last``, that checkpoint's answers too. The best checkpoint by validation (held-out
    products) can come before the products trained on are recalled: on the bundled sample,
    measured, the best by val/loss recalled far less than the last (docs/performance.md), so the
    demo shows both rather than hide either."""
    from amzft.generate import generate_answers
    from amzft.model import LoraCausalLM

    module, fmt = LoraCausalLM.from_checkpoint(checkpoint)
    titles = list(SEED_QUESTIONS)
    references = {}
    for split in ("train", "test"):
        rows = datamodule.split(split)
        if len(rows):
            row = rows[0]
            titles.append(row["title"])
            references[row["title"]] = (split, row["content"])
    base = generate_answers(module, titles, fmt, options.max_new_tokens, use_adapter=False, options=options)
    tuned = generate_answers(module, titles, fmt, options.max_new_tokens, use_adapter=True, options=options)
    at_last, best_step, last_step = [None] * len(titles), module.checkpoint_step, None
    if last is not None:
        del module  # one model in memory at a time
        final, _ = LoraCausalLM.from_checkpoint(last)
        at_last = generate_answers(final, titles, fmt, options.max_new_tokens, use_adapter=True, options=options)
        last_step = final.checkpoint_step
    for title, b, t, f in zip(titles, base, tuned, at_last):
        split, reference = references.get(title, ("not in the data", None))
        print(f"\n### {title}  [{'seen in training' if split == 'train' else 'held-out product' if split == 'test' else split}]")
        if reference:
            print("  reference:")
            print(_wrap(reference))
        print("  base model:")
        print(_wrap(b))
        print("  fine-tuned:" if f is None else f"  fine-tuned, best (step {best_step}):")
        print(_wrap(t))
        if f is not None:
            print(f"  fine-tuned, last (step {last_step}):")
            print(_wrap(f))


def _default_cpu_config():
    for candidate in (Path("configs/cpu.yaml"), Path(__file__).resolve().parents[2] / "configs" / "cpu.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError("configs/cpu.yaml not found: run the demo from the amzft checkout or pass --config")


def evaluate_command(argv: list[str]) -> None:
    """Score base (and fine-tuned) answers on seen and held-out products."""
    parser = _parser("amzft evaluate", "ROUGE/BLEU/chrF and failure views, base vs fine-tuned, per split. With a "
                     "checkpoint, --data.path of another file scores its products as seen / unseen by that checkpoint. "
                     "With --predictions FILE, scores answers already written (no model loaded).",
                     own=("ckpt_path",))
    parser.add_argument("--ckpt_path", default=None, help="checkpoint (or `last`, `best`); none: the base model only")
    parser.add_argument("--predictions", default=None,
                        help="a JSON Lines file of written answers (`describe`'s, or `predict`'s predictions.jsonl): score its "
                             "rows that have a reference; no model, no generation (not with --ckpt_path)")
    parser.add_argument("--model", type=Any, default=None, help="base-model options when there is no checkpoint")
    parser.add_argument("--splits", type=list[str], default=["train", "test"], help="train = seen products, test = held-out")
    parser.add_argument("--samples", type=int | None, default=None,
                        help="products per split, a seeded sample (default 24; with --predictions every row with a reference)")
    parser.add_argument("--seed", type=int, default=3407)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--out", default=None,
                        help="report folder (default: the checkpoint's run folder; its eval_<file> subfolder for another "
                             "--data.path; <file>_eval beside a --predictions file)")
    parser.add_argument("--log_root", default="logs")
    # The rest of the decoding options; the penalty, n-gram ban and length decay are
    # --repetition_penalty / --no_repeat_ngram_size / --length_decay_*, as in every command.
    skip = {"repetition_penalty", "no_repeat_ngram_size", "length_decay_start", "length_decay_factor"}
    parser.add_class_arguments(GenerationOptions, "gen", skip=skip)
    parser.set_defaults({f"gen.{k}": v for k, v in asdict(DEFAULT_DECODING).items() if k not in skip})
    cfg = parser.parse_args(argv)
    if cfg.predictions:
        # Answers already written: scored as they are, before anything about models or decoding
        # is read or imported.
        if cfg.ckpt_path:
            raise ConfigError("evaluate: --predictions scores answers already written, --ckpt_path generates new ones: "
                              "pass one or the other")
        from amzft.evaluation import predictions_out_dir, predictions_summary, render_table, score_predictions_file, write_report

        report, _ = score_predictions_file(cfg.predictions, cfg.samples, cfg.seed)
        out = Path(cfg.out) if cfg.out else predictions_out_dir(cfg.predictions)
        md, js = write_report(report, out)
        print(render_table(report))
        print(f"\n{predictions_summary(report)}")
        print(f"report: {md} and {js} (TensorBoard: tensorboard --logdir {out})")
        return
    if cfg.samples is None:  # generating: a sample per split, 24 unless told (_evaluate_file reads cfg.samples too)
        cfg.samples = 24
    options = decoding_from(cfg, **dict(cfg.gen))
    from amzft.checkpoints import datamodule_from_checkpoint, resolve_ckpt_path
    from amzft.evaluation import render_table, run_evaluation, write_report
    from amzft.model import LoraCausalLM

    for split in cfg.splits:
        if split not in ("train", "validation", "test"):
            raise ConfigError(f"--splits takes train, validation, test; found {split!r}")
    if cfg.ckpt_path:
        ckpt = resolve_ckpt_path(cfg.ckpt_path, cfg.log_root)
        module, fmt = LoraCausalLM.from_checkpoint(ckpt)
        dm, step = datamodule_from_checkpoint(ckpt)
        out = Path(cfg.out) if cfg.out else Path(ckpt).parent.parent
        other = _other_file(cfg, ckpt, dm)
        if other is not None:
            return _evaluate_file(cfg, options, module, fmt, ckpt, step, out, other)
    else:
        ckpt, dm, step = None, _datamodule(cfg), 0
        module = _base_module(dict(cfg.model or {}) | {"max_length": dm.settings.max_length})
        fmt = dm.settings.prompt
        out = Path(cfg.out) if cfg.out else Path(cfg.log_root) / "amzft" / "base_eval"
    report = run_evaluation(module, dm, fmt, cfg.splits, cfg.samples, options, with_adapter=ckpt is not None,
                            checkpoint=ckpt, seed=cfg.seed, batch_size=cfg.batch_size)
    md, js = write_report(report, out, step)
    print(render_table(report))
    print(f"\nreport: {md} and {js} (TensorBoard: tensorboard --logdir {out})")


def _other_file(cfg, ckpt: str, dm):
    """``--data.path`` of a file other than the one the checkpoint was trained on: its data
    module and its seen / unseen products (``evaluation.other_file``); None otherwise."""
    from amzft.evaluation import other_file

    return other_file(ckpt, dm, (cfg.get("data") or {}).get("path"))


def _evaluate_file(cfg, options, module, fmt, ckpt: str, step: int, out: Path, other) -> None:
    from amzft.evaluation import render_table, run_evaluation, write_report

    datamodule, datasets = other
    if not cfg.out:  # beside the run's own report, not over it
        out = out / f"eval_{Path(datamodule.settings.path).name.split('.')[0]}"
    report = run_evaluation(module, datamodule, fmt, ["seen", "unseen"], cfg.samples, options, with_adapter=True,
                            checkpoint=ckpt, seed=cfg.seed, batch_size=cfg.batch_size, datasets=datasets)
    report["file"] = {"path": datamodule.settings.path, **{name: len(rows) for name, rows in datasets.items()}}
    md, js = write_report(report, out, step)
    print(render_table(report))
    print(f"\n{datamodule.settings.path}: {len(datasets['seen'])} products seen in training, "
          f"{len(datasets['unseen'])} unseen (scored: up to {cfg.samples} of each)")
    print(f"report: {md} and {js} (TensorBoard: tensorboard --logdir {out})")


def export_command(argv: list[str]) -> None:
    """Write the adapter as a PEFT directory, a merged transformers model, or a GGUF file + Modelfile."""
    parser = _parser("amzft export", "Export a trained adapter (PEFT), a merged model (safetensors) or a GGUF file.",
                     with_data=False, own=("ckpt_path",))
    parser.add_argument("--ckpt_path", default=None, help="checkpoint of a fine-tuned run (or `last`, `best`)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--merge", type=bool, default=False, help="merge LoRA into the base weights (= --format merged)")
    parser.add_argument("--format", default=None, help="peft (default), merged, or gguf (llama.cpp / Ollama)")
    parser.add_argument("--gguf_type", default="f16", help="with --format gguf: f16 or q8_0")
    parser.add_argument("--log_root", default="logs")
    parser.add_argument("--model", type=Any, default=None)
    parser.add_argument("--data", type=Any, default=None)
    cfg = parser.parse_args(argv)
    options = decoding_from(cfg)
    from amzft.checkpoints import resolve_ckpt_path
    from amzft.export import export

    if not cfg.ckpt_path:
        raise ConfigError("export needs --ckpt_path: a base-only run has no adapter to export")
    out = export(resolve_ckpt_path(cfg.ckpt_path, cfg.log_root), cfg.out, cfg.merge, cfg.format, cfg.gguf_type, options)
    fmt = cfg.format or ("merged" if cfg.merge else "peft")
    kind = {"peft": "PEFT adapter", "merged": "merged model", "gguf": f"GGUF ({cfg.gguf_type}) + Ollama Modelfile"}[fmt]
    print(f"{kind} written to {out}")
    if fmt != "gguf":
        print(f"decoding: {describe(options)}, in generation_config.json")
    else:
        from amzft.gguf_export import not_in_modelfile

        missing = "; ".join(f"{setting} ({why})" for setting, why in not_in_modelfile(options))
        print(f"decoding: {describe(options)}; the Modelfile sets repeat_penalty {options.repetition_penalty:g}"
              + (f" but not {missing}" if missing else ""))
        print(f"run it: cd {out} && ollama create amzft -f Modelfile && ollama run amzft "
              '"What is the description of product Girls Ballet Tutu?"')
    if (out / "amzft_base.json").is_file():  # a base folder saved in 4-bit: say what the weights are
        print(f"note: {json.loads((out / 'amzft_base.json').read_text())['note']}")
