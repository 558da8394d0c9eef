"""``python -m amzft demo``: fine-tune the embedded model on the shipped sample (stopping half-way
and resuming, as a user would), then print base vs fine-tuned answers. Heavy imports stay lazy."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any

from amzft.cli.commands import command_parser
from amzft.errors import ConfigError
from amzft.model.decoding import DECODING_KEYS, decoding_from, describe

# The titles the notebook (configs/base.yaml's recipe) asks about after training.
NOTEBOOK_TITLES = ["Girls Ballet Tutu", "The Wall: Images and Offerings from the Vietnam Veterans Memorial"]


def _wrap(text: str, width: int = 96, indent: str = "      ") -> str:
    return textwrap.fill(text or "(empty)", width=width, initial_indent=indent, subsequent_indent=indent)


def demo_command(argv: list[str]) -> None:
    parser = command_parser("amzft demo", "Fine-tune on the bundled sample, resume, compare answers.", with_data=False)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the config's)")
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--log_root", default="logs")
    parser.add_argument("--model", type=dict[str, Any], default=None)
    parser.add_argument("--data", type=dict[str, Any], default=None)
    cfg = parser.parse_args(argv)
    options = decoding_from(cfg, max_new_tokens=cfg.max_new_tokens)
    config = cfg.config[0].absolute if cfg.config else _default_cpu_config()
    # The parsed decoding options, for the demo's `fit`: val/rougeL decodes as the answers.
    decoding = [arg for key in DECODING_KEYS if cfg.get(key) is not None for arg in (f"--{key}", str(cfg.get(key)))]
    extra = ["--trainer.default_root_dir", cfg.log_root, *decoding]
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


def _demo_pick(last: Path, history: list[tuple[int, dict[str, float]]], log_root: str) -> tuple[Path, str]:
    """The best checkpoint and why (which step, its score among all validations, and the last
    step's), or the last checkpoint when no validation kept a best one."""
    from amzft.checkpoints.locate import MONITOR_MODES, find_best_checkpoint

    try:
        best = find_best_checkpoint(log_root)
    except ConfigError:
        return last, "the last checkpoint (no validation kept a best one)"
    if best.unranked:
        return best.path, f"the last checkpoint ({best.unranked})"
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
    from amzft.checkpoints.locate import resolve_ckpt_path
    from amzft.cli.lightning_cli import cli_main
    from amzft.training.callbacks import StopAtStep
    from amzft.training.validation import ValidationSchedule

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
    # Both runs' validations: the first run's last one comes after its last.ckpt.
    history = [row for cli in (first, second) for c in cli.trainer.callbacks if isinstance(c, ValidationSchedule) for row in c.history]
    return Path(second.trainer.checkpoint_callback.last_model_path), second.datamodule, history


def _demo_answers(checkpoint: Path, datamodule, options, last: Path | None = None) -> None:
    """Base and fine-tuned answers for the notebook's titles and one seen / one held-out product; with
    ``last``, that checkpoint's too (the best by validation can recall the training products less)."""
    from amzft.inference.load import load_answerer
    from amzft.model.generation import generate_answers

    best = load_answerer(checkpoint)
    module, fmt = best.module, best.prompt
    titles = list(NOTEBOOK_TITLES)
    references = {}
    for split in ("train", "test"):
        rows = datamodule.split(split)
        if len(rows):
            titles.append(rows[0]["title"])
            references[rows[0]["title"]] = (split, rows[0]["content"])
    base = generate_answers(module, titles, fmt, options.max_new_tokens, use_adapter=False, options=options)
    tuned = generate_answers(module, titles, fmt, options.max_new_tokens, use_adapter=True, options=options)
    at_last, best_step, last_step = [None] * len(titles), best.step, None
    if last is not None:
        del module, best  # one model in memory at a time
        final = load_answerer(last)
        at_last = generate_answers(final.module, titles, fmt, options.max_new_tokens, use_adapter=True, options=options)
        last_step = final.step
    for title, b, t, f in zip(titles, base, tuned, at_last):
        split, reference = references.get(title, ("not in the data", None))
        print(f"\n### {title}  [{'seen in training' if split == 'train' else 'held-out product' if split == 'test' else split}]")
        if reference:
            print("  reference:\n" + _wrap(reference))
        print("  base model:\n" + _wrap(b))
        print(("  fine-tuned:" if f is None else f"  fine-tuned, best (step {best_step}):") + "\n" + _wrap(t))
        if f is not None:
            print(f"  fine-tuned, last (step {last_step}):\n" + _wrap(f))


def _default_cpu_config():
    for candidate in (Path("configs/cpu.yaml"), Path(__file__).resolve().parents[2] / "configs" / "cpu.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError("configs/cpu.yaml not found: run the demo from the amzft checkout or pass --config")
