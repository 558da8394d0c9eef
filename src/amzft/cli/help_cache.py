"""``fit --help`` (and validate / test / predict) without importing torch: the first call renders
LightningCLI's help and keeps it in the cache folder, keyed by everything the text depends on
(command line and its config files, amzft's sources, library versions, Python, terminal width)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
from contextlib import redirect_stdout, suppress
from importlib import metadata
from pathlib import Path

from amzft.files import atomic_write, cache_root

# Libraries whose signatures or help formatting the rendered text comes from.
_LIBRARIES = ("lightning", "jsonargparse", "torch", "transformers", "peft", "docstring-parser", "typeshed-client")
_PACKAGE = Path(__file__).resolve().parents[1]
# Each command line keeps its own text (~70 KB); the oldest go beyond this many.
KEEP = 32


def asks_for_help(args: list[str]) -> bool:
    return "-h" in args or "--help" in args


def _library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _sources_fingerprint() -> list:
    stats = {str(path.relative_to(_PACKAGE)): path.stat() for path in sorted(_PACKAGE.rglob("*.py"))}
    return [(name, stat.st_size, stat.st_mtime_ns) for name, stat in stats.items()]


def _argument_files(args: list[str]) -> dict[str, str]:
    """Content hashes of the arguments that name files: the help shows a config's values as defaults."""
    values = [arg.split("=", 1)[-1] for arg in args]
    return {value: hashlib.sha256(Path(value).read_bytes()).hexdigest() for value in values if value and Path(value).is_file()}


def help_key(command: str, args: list[str]) -> str:
    parts = {"command": command, "args": args, "files": _argument_files(args), "sources": _sources_fingerprint(),
             "libraries": _library_versions(), "python": sys.version, "columns": shutil.get_terminal_size().columns}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _cache_file(key: str) -> Path:
    return cache_root() / "help" / f"{key}.txt"


def cached_help(command: str, args: list[str]) -> str | None:
    try:
        return _cache_file(help_key(command, args)).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def render_and_keep(command: str, args: list[str], render) -> None:
    """Run ``render()`` (which prints the help and exits, as argparse does), keep what it printed
    when it exited cleanly, print it, and exit the same way."""
    path = _cache_file(help_key(command, args))  # before rendering: the key is what the text was rendered from
    captured = io.StringIO()
    try:
        with redirect_stdout(captured):
            render()
    except SystemExit as exc:
        text = captured.getvalue()
        sys.stdout.write(text)
        if exc.code in (0, None) and text:
            with suppress(OSError):  # a read-only cache folder: the next call renders again, nothing is lost
                atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
                for old in sorted(path.parent.glob("*.txt"), key=lambda p: p.stat().st_mtime_ns, reverse=True)[KEEP:]:
                    old.unlink(missing_ok=True)
        raise
    sys.stdout.write(captured.getvalue())
