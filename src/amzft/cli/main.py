"""Command line: ``python -m amzft COMMAND …``. The Lightning subcommands go to amzft.cli.lightning_cli, the
others to small jsonargparse parsers reading the same ``--config`` files. Heavy imports wait until the command
is known (``--help`` is instant; a Lightning command's is cached: amzft.cli.help_cache). Errors a user can act
on (``AmzftError``, bad arguments) print as one line; ``--debug`` shows the full traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from amzft.cli.help_cache import asks_for_help, cached_help, render_and_keep
from amzft.cli.quiet import quiet_libraries
from amzft.errors import AmzftError

USAGE = """usage: python -m amzft COMMAND [--config FILE] [options] [--debug]

Fine-tune a small instruction LLM with LoRA to describe Amazon products (AmazonTitles-1.3MM).

commands:
  fit       train (LightningCLI): python -m amzft fit --config configs/cpu.yaml
  validate  validation loss of a model / checkpoint
  test      loss on held-out products
  predict   (LightningCLI predict loop) answers of a split of the training file
  describe  a description for every title of a catalogue file, streamed and resumable:
            python -m amzft describe --ckpt_path best --data.path titles.jsonl --out descriptions.jsonl
  data      data-quality report: python -m amzft data --data.path trn.json
  ask       answer one question: python -m amzft ask "Girls Ballet Tutu" [--ckpt_path CKPT]
  evaluate  ROUGE/BLEU/chrF + failure views, base vs fine-tuned, seen vs held-out products
  export    adapter (PEFT) or merged model: python -m amzft export --ckpt_path last --out DIR [--merge true]
  demo      fine-tune on the bundled sample, then print base vs fine-tuned answers

Each command takes --help. Add --debug to see full tracebacks.
"""

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _run(command: str, args: list[str]) -> None:
    if command in LIGHTNING_COMMANDS and asks_for_help(args) and (text := cached_help(command, args)) is not None:
        print(text, end="")  # before quiet_libraries: it imports transformers
        return
    quiet_libraries()
    if command in LIGHTNING_COMMANDS:
        from amzft.cli.lightning_cli import cli_main  # noqa: PLC0415 - start-up time (module doc)

        if asks_for_help(args):
            render_and_keep(command, args, lambda: cli_main([command, *args]))
        else:
            cli_main([command, *args])
    elif command in ("data", "ask", "evaluate", "export", "describe"):
        from amzft.cli import commands  # noqa: PLC0415

        getattr(commands, f"{command}_command")(args)
    elif command == "demo":
        from amzft.cli.demo import demo_command  # noqa: PLC0415

        demo_command(args)
    else:
        print(f"amzft: error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    try:
        _run(argv[0], argv[1:])
    except KeyboardInterrupt:
        print("amzft: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except (AmzftError, argparse.ArgumentError) as exc:
        if debug:
            raise
        message = _one_line(str(exc), 1000)  # amzft's own messages name files: room for two paths
        if isinstance(exc, argparse.ArgumentError):
            # YAML errors name "<unicode string>": name the config file instead.
            configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
            if configs and "<unicode string>" in message:
                message = message.replace("<unicode string>", " / ".join(configs))
            message += f" (see: python -m amzft {argv[0]} --help)"
        print(f"amzft: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as exc:
        # Anything else is unexpected (or a library's own check, e.g. Lightning's
        # MisconfigurationException): one line saying what and where, the traceback on --debug.
        if debug:
            raise
        print(f"amzft: error: {type(exc).__name__}: {_one_line(str(exc))} [{_where(exc)}; "
              f"rerun with --debug for the traceback]", file=sys.stderr)
        raise SystemExit(1) from None


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame, so a bug report can name it without --debug."""
    if not (frames := traceback.extract_tb(exc.__traceback__)):
        return "no traceback"
    return f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}"
