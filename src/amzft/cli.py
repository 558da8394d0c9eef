"""Command line: ``python -m amzft {fit,validate,test,predict,data,ask} …``.

The Lightning subcommands go to a ``LightningCLI`` subclass (amzft.lightning_cli); the others
are small jsonargparse parsers that accept the same ``--config`` files. Heavy imports happen
only after the subcommand is known, so ``--help`` is instant. Errors a user can act on
(``AmzftError``, bad arguments) print as one line; ``--debug`` shows the full traceback.
"""

from __future__ import annotations

import sys

USAGE = """usage: python -m amzft COMMAND [--config FILE] [options] [--debug]

Fine-tune a small instruction LLM with LoRA to describe Amazon products (AmazonTitles-1.3MM).

commands:
  fit       train (LightningCLI): python -m amzft fit --config configs/cpu.yaml
  validate  validation loss of a model / checkpoint
  test      loss on held-out products
  predict   (LightningCLI predict loop)
  data      data-quality report: python -m amzft data --data.path trn.json
  ask       answer one question: python -m amzft ask "Girls Ballet Tutu" [--ckpt_path CKPT]
  evaluate  ROUGE/BLEU/chrF + failure views, base vs fine-tuned, seen vs held-out products
  export    adapter (PEFT) or merged model: python -m amzft export --ckpt_path last --out DIR [--merge true]
  demo      fine-tune on the bundled sample, then print base vs fine-tuned answers

Each command takes --help. Add --debug to see full tracebacks.
"""

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _run(command: str, args: list[str]) -> None:
    if command in LIGHTNING_COMMANDS:
        from amzft.lightning_cli import cli_main

        cli_main([command, *args])
    elif command == "data":
        from amzft.commands import data_command

        data_command(args)
    elif command == "ask":
        from amzft.commands import ask_command

        ask_command(args)
    elif command == "evaluate":
        from amzft.commands import evaluate_command

        evaluate_command(args)
    elif command == "export":
        from amzft.commands import export_command

        export_command(args)
    elif command == "demo":
        from amzft.commands import demo_command

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
    from amzft.errors import AmzftError
    from amzft.quiet import quiet_libraries

    try:
        quiet_libraries()
        _run(argv[0], argv[1:])
    except AmzftError as exc:
        if debug:
            raise
        print(f"amzft: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("amzft: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
