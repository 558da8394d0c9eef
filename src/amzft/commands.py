"""The commands that are not Lightning loops: ``data`` (report), ``ask``, ``demo``."""

from __future__ import annotations

from typing import Any

# Top-level keys of a training config that a command may not use: accepted, then ignored,
# so every command reads the same YAML files.
_TRAINING_KEYS = ("model", "trainer", "optimizer", "lr_scheduler", "ckpt_path", "seed_everything")


def _parser(prog: str, description: str, with_data: bool = True):
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, description=description, default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML config (configs/*.yaml)")
    if with_data:
        from amzft.data.module import AmazonTitlesDataModule

        parser.add_class_arguments(AmazonTitlesDataModule, "data", instantiate=False)
    for key in _TRAINING_KEYS:
        if key != "model":
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
    """Build (or reopen) the tokenised dataset and print the data-quality report."""
    parser = _parser("amzft data", "Data-quality report: records read, kept, skipped by reason, lengths, examples.")
    parser.add_argument("--model", type=Any, default=None, help="(its name_or_path picks the tokenizer)")
    parser.add_argument("--examples", type=int, default=3, help="cleaned examples to show")
    cfg = parser.parse_args(argv)
    dm = _datamodule(cfg)
    dm.setup()
    from amzft.data.report import render_report

    print(render_report(dm.prepared, dm.settings, dm.tokenizer, cfg.examples))


def demo_command(argv: list[str]) -> None:
    """The README's first command. Until training lands it shows the data report of the sample."""
    data_command(argv)
