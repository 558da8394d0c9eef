"""The commands that are not Lightning loops (``data``, ``ask``, ``evaluate``, ``export``, ``describe``;
``demo`` is ``amzft.cli.demo``), all with ``command_parser``. Torch, Lightning and transformers are
imported inside each command once its arguments are parsed: ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jsonargparse import SUPPRESS, ActionConfigFile, ArgumentParser

from amzft.errors import ConfigError
from amzft.model.decoding import (
    DECODING_KEYS,
    DEFAULT_DECODING,
    GenerationOptions,
    add_decoding_arguments,
    decoding_from,
    describe,
)
from amzft.settings import as_dict

# Top-level keys of a training config that a command does not use: read from a --config file
# and ignored, so every command reads the same YAML files; on the command line, refused.
_TRAINING_KEYS = (
    "model", "trainer", "optimizer", "lr_scheduler", "ckpt_path", "seed_everything", "checkpoint", "sample_answers",
    "validation", "best", "early_stopping",
)


class CommandParser(ArgumentParser):
    """The parser of every command that is not a Lightning loop."""

    def __init__(self, *args, ignored: tuple[str, ...] = (), **kwargs):
        # exit_on_error=False: amzft.cli.main prints parse errors as one line instead of the usage dump.
        super().__init__(*args, default_env=False, exit_on_error=False, **kwargs)
        self.ignored = ignored

    def parse_args(self, args=None, **kwargs):
        for arg in args or ():
            key = arg[2:].split("=", 1)[0].split(".", 1)[0] if arg.startswith("--") else None
            if key in self.ignored:
                raise ConfigError(f"{self.prog} does not use --{key}… (an option of `fit`); it is ignored only in a "
                                  "--config file: drop it from the command line")
        return super().parse_args(args, **kwargs)


def command_parser(prog: str, description: str, with_data: bool = True, own: tuple[str, ...] = (),
                   decoding: bool = True, reads_configs: bool = True) -> CommandParser:
    """A command's parser: ``--config`` (the training YAMLs, their keys this command does not
    use ignored; not with ``reads_configs=False``), the decoding options, ``--data.*``."""
    ignored = tuple(k for k in _TRAINING_KEYS if k != "model" and k not in own) if reads_configs else ()
    if reads_configs and not decoding:
        ignored += DECODING_KEYS
    parser = CommandParser(prog=prog, description=description, ignored=ignored)
    if reads_configs:
        parser.add_argument("--config", action=ActionConfigFile, help="a YAML config (configs/*.yaml)")
    if decoding:  # the same options as every command that answers (amzft.model.decoding)
        add_decoding_arguments(parser)
    if with_data:
        from amzft.data.module import AmazonTitlesDataModule

        parser.add_class_arguments(AmazonTitlesDataModule, "data", instantiate=False)
    for key in ignored:
        parser.add_argument(f"--{key}", type=Any, default=None, help=SUPPRESS)
    return parser


def _datamodule(cfg):
    from amzft.data.module import AmazonTitlesDataModule
    from amzft.settings import init_kwargs

    data = init_kwargs(AmazonTitlesDataModule, cfg.data)
    model = cfg.get("model") or {}
    init_args = model.get("init_args", model) if isinstance(model, dict) else {}
    # In `fit` the tokenizer is linked from the model; here we mirror that link.
    if init_args.get("name_or_path") and data.get("tokenizer") == "embedded":
        data["tokenizer"] = init_args["name_or_path"]
    return AmazonTitlesDataModule(**data)


def data_command(argv: list[str]) -> None:
    """Build (or reopen) the cleaned dataset, count every example's tokens and print the data-quality report."""
    parser = command_parser("amzft data", "Data-quality report: records read, kept, skipped by reason, lengths, examples.",
                     decoding=False)
    parser.add_argument("--model", type=dict[str, Any], default=None, help="(its name_or_path picks the tokenizer)")
    parser.add_argument("--examples", type=int, default=3, help="cleaned examples to show")
    cfg = parser.parse_args(argv)
    dm = _datamodule(cfg)
    dm.setup()
    from amzft.data.report import render_report

    print(render_report(dm.prepared, dm.settings, cfg.examples))


def ask_command(argv: list[str]) -> None:
    """Answer "What is the description of product TITLE?" with the base or fine-tuned model."""
    parser = command_parser("amzft ask", "Answer the notebook's question for one or more product titles.", with_data=False,
                            own=("ckpt_path",))
    parser.add_argument("titles", nargs="+", help="product titles")
    parser.add_argument("--ckpt_path", default=None, help="a checkpoint (or `last`, `best`): answer with the fine-tuned adapter")
    parser.add_argument("--compare", type=bool, default=False, help="with --ckpt_path: print base and fine-tuned answers")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--model", type=dict[str, Any], default=None, help="model options (name_or_path …) for the base model")
    parser.add_argument("--data", type=dict[str, Any], default=None, help="(its prompt options are used)")
    parser.add_argument("--log_root", default="logs", help="where `--ckpt_path last` / `best` look")
    cfg = parser.parse_args(argv)
    options = decoding_from(cfg)
    from amzft.inference.load import load_answerer
    from amzft.model.generation import generate_answers

    ckpt = None
    if cfg.ckpt_path:
        from amzft.checkpoints.locate import resolve_ckpt_path  # imports Lightning: only with a checkpoint

        ckpt = resolve_ckpt_path(cfg.ckpt_path, cfg.log_root)
    answerer = load_answerer(ckpt, as_dict(cfg.model), as_dict(cfg.data), plain=True)
    module, fmt = answerer.module, answerer.prompt
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


def evaluate_command(argv: list[str]) -> None:
    """Score base (and fine-tuned) answers on seen and held-out products."""
    parser = command_parser("amzft evaluate", "ROUGE/BLEU/chrF and failure views, base vs fine-tuned, per split. With a "
                     "checkpoint, --data.path of another file scores its products as seen / unseen by that checkpoint. "
                     "With --predictions FILE, scores answers already written (no model loaded).",
                     own=("ckpt_path",))
    parser.add_argument("--ckpt_path", default=None, help="checkpoint (or `last`, `best`); none: the base model only")
    parser.add_argument("--predictions", default=None,
                        help="a JSON Lines file of written answers (`describe`'s, or `predict`'s predictions.jsonl): score its "
                             "rows that have a reference; no model, no generation (not with --ckpt_path)")
    parser.add_argument("--model", type=dict[str, Any], default=None, help="base-model options when there is no checkpoint")
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
    if cfg.predictions:  # answers already written: scored before anything about models or decoding is read
        if cfg.ckpt_path:
            raise ConfigError("evaluate: --predictions scores answers already written, --ckpt_path generates new ones: "
                              "pass one or the other")
        from amzft.evaluation.run import predictions_out_dir, predictions_summary, score_predictions_file

        report, _ = score_predictions_file(cfg.predictions, cfg.samples, cfg.seed)
        return _write_and_show(report, Path(cfg.out) if cfg.out else predictions_out_dir(cfg.predictions), 0,
                               predictions_summary(report))
    if cfg.samples is None:  # generating: a sample per split, 24 unless told (_evaluate_file reads cfg.samples too)
        cfg.samples = 24
    options = decoding_from(cfg, **dict(cfg.gen))
    from amzft.checkpoints.locate import resolve_ckpt_path
    from amzft.evaluation.run import other_file, run_evaluation
    from amzft.inference.load import load_answerer

    if bad := [split for split in cfg.splits if split not in ("train", "validation", "test")]:
        raise ConfigError(f"--splits takes train, validation, test; found {bad[0]!r}")
    if cfg.ckpt_path:
        ckpt = resolve_ckpt_path(cfg.ckpt_path, cfg.log_root)
        answerer = load_answerer(ckpt)
        module, fmt, dm, step = answerer.module, answerer.prompt, answerer.datamodule(), answerer.step
        out = Path(cfg.out) if cfg.out else Path(ckpt).parent.parent
        # --data.path of a file other than the checkpoint's: its products as seen / unseen
        if (other := other_file(answerer, dm, (cfg.get("data") or {}).get("path"))) is not None:
            return _evaluate_file(cfg, options, module, fmt, ckpt, step, out, other)
    else:
        ckpt, dm, step = None, _datamodule(cfg), 0
        module = load_answerer(None, as_dict(cfg.model) | {"max_length": dm.settings.max_length}).module
        fmt = dm.settings.prompt
        out = Path(cfg.out) if cfg.out else Path(cfg.log_root) / "amzft" / "base_eval"
    report = run_evaluation(module, dm, fmt, cfg.splits, cfg.samples, options, with_adapter=ckpt is not None,
                            checkpoint=ckpt, seed=cfg.seed, batch_size=cfg.batch_size)
    report["step"] = step if ckpt else None  # which step scored (`best` picks one): a report alone says it
    _write_and_show(report, out, step)


def _write_and_show(report: dict, out: Path, step: int, summary: str | None = None) -> None:
    from amzft.evaluation.run import render_table, write_report

    md, js = write_report(report, out, step)
    print(render_table(report))
    print(f"\n{summary}" if summary else "")
    print(f"report: {md} and {js} (TensorBoard: tensorboard --logdir {out})")


def _evaluate_file(cfg, options, module, fmt, ckpt: str, step: int, out: Path, other) -> None:
    from amzft.evaluation.run import run_evaluation

    datamodule, datasets = other
    if not cfg.out:  # beside the run's own report, not over it
        out = out / f"eval_{Path(datamodule.settings.path).name.split('.')[0]}"
    report = run_evaluation(module, datamodule, fmt, ["seen", "unseen"], cfg.samples, options, with_adapter=True,
                            checkpoint=ckpt, seed=cfg.seed, batch_size=cfg.batch_size, datasets=datasets)
    report["file"] = {"path": datamodule.settings.path, **{name: len(rows) for name, rows in datasets.items()}}
    report["step"] = step
    _write_and_show(report, out, step, f"{datamodule.settings.path}: {len(datasets['seen'])} products seen in training, "
                    f"{len(datasets['unseen'])} unseen (scored: up to {cfg.samples} of each)")


def export_command(argv: list[str]) -> None:
    """Write the adapter as a PEFT directory, a merged transformers model, or a GGUF file + Modelfile."""
    parser = command_parser("amzft export", "Export a trained adapter (PEFT), a merged model (safetensors) or a GGUF file.",
                     with_data=False, own=("ckpt_path",))
    parser.add_argument("--ckpt_path", default=None, help="checkpoint of a fine-tuned run (or `last`, `best`)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--merge", type=bool, default=False, help="merge LoRA into the base weights (= --format merged)")
    parser.add_argument("--format", default=None, help="peft (default), merged, or gguf (llama.cpp / Ollama)")
    parser.add_argument("--gguf_type", default="f16", help="with --format gguf: f16 or q8_0")
    parser.add_argument("--log_root", default="logs")
    parser.add_argument("--model", type=dict[str, Any], default=None)
    parser.add_argument("--data", type=dict[str, Any], default=None)
    cfg = parser.parse_args(argv)
    options = decoding_from(cfg)
    from amzft.checkpoints.locate import resolve_ckpt_path
    from amzft.export.formats import export

    if not cfg.ckpt_path:
        raise ConfigError("export needs --ckpt_path: a base-only run has no adapter to export")
    out = export(resolve_ckpt_path(cfg.ckpt_path, cfg.log_root), cfg.out, cfg.merge, cfg.format, cfg.gguf_type, options)
    fmt = cfg.format or ("merged" if cfg.merge else "peft")
    kind = {"peft": "PEFT adapter", "merged": "merged model", "gguf": f"GGUF ({cfg.gguf_type}) + Ollama Modelfile"}[fmt]
    print(f"{kind} written to {out}")
    if fmt != "gguf":
        print(f"decoding: {describe(options)}, in generation_config.json")
    else:
        from amzft.export.gguf import not_in_modelfile

        missing = "; ".join(f"{setting} ({why})" for setting, why in not_in_modelfile(options))
        print(f"decoding: {describe(options)}; the Modelfile sets repeat_penalty {options.repetition_penalty:g}"
              + (f" but not {missing}" if missing else ""))
        print(f"run it: cd {out} && ollama create amzft -f Modelfile && ollama run amzft "
              '"What is the description of product Girls Ballet Tutu?"')
    if (out / "amzft_base.json").is_file():  # a base folder saved in 4-bit: say what the weights are
        print(f"note: {json.loads((out / 'amzft_base.json').read_text())['note']}")


def describe_command(argv: list[str]) -> None:
    """A description for every title of a catalogue file (``amzft.catalogue``)."""
    parser = command_parser("amzft describe", (
        "Write a description for every title of a JSON Lines file (title required; uid, content optional), "
        "appended as batches finish; the same command resumes an interrupted run."),
        with_data=False, reads_configs=False)
    parser.add_argument("--data.path", required=True, help="titles: JSON Lines (plain, gzip, bz2, xz), one object a line")
    parser.add_argument("--data.strict", type=bool, default=False, help="stop at the first bad line instead of counting it")
    parser.add_argument("--out", required=True, help="output JSON Lines (resumed if it was interrupted)")
    parser.add_argument("--ckpt_path", default=None, help="a checkpoint (or `last`, `best`); none: the base model")
    parser.add_argument("--use_adapter", type=bool, default=True, help="false: answer with the base model of the checkpoint")
    parser.add_argument("--model", type=Any, default=None, help="base-model options (name_or_path …) without --ckpt_path")
    parser.add_argument("--log_root", default="logs", help="where `--ckpt_path last` / `best` look")
    parser.add_argument("--max_new_tokens", type=int | None, default=None, help="answer length cap (default: the checkpoint's)")
    parser.add_argument("--token_budget", type=int, default=16384,
                        help="rows x (longest prompt + max_new_tokens) per batch: the batch's KV-cache bound")
    parser.add_argument("--max_batch", type=int, default=64, help="rows per batch at most")
    parser.add_argument("--trainer.accelerator", default="auto", help="cpu, gpu or auto")
    parser.add_argument("--trainer.devices", type=int | str, default=1, help="processes (CPU) or GPUs")
    parser.add_argument("--trainer.strategy", default="auto", help="ddp for several processes or GPUs")
    parser.add_argument("--trainer.precision", default=None, help="default: 32-true on CPU, bf16-mixed on a GPU that has it")
    parser.add_argument("--progress_every", type=float, default=10.0, help="seconds between progress lines")
    cfg = parser.parse_args(argv)
    from amzft.catalogue.command import describe_catalogue

    describe_catalogue(cfg)
