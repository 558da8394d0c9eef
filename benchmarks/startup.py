"""Start-up a person waits for: ``--help``, ``fit --help`` and one ``ask`` answer, each a fresh process.

    python benchmarks/startup.py                 # 3 runs of each
    python benchmarks/startup.py --runs 5 --title "Girls Ballet Tutu Neon Pink"

Measures, as subprocesses of ``python -m amzft``, the wall time from process start to exit:
  * ``--help`` (the command list);
  * ``fit --help`` with an empty help cache (LightningCLI renders it: torch, Lightning,
    transformers imported) and then with the kept text (amzft.cli.help_cache);
  * ``ask TITLE`` on the embedded model with ``--max_new_tokens`` new tokens (the embedded
    model's unpacked copy made once beforehand, as after any first use), and the slowest imports
    of one ``ask`` (``-X importtime``).
The cache folder is a temporary one (AMZFT_CACHE), never the user's. Prints the CPU model and
flags: start-up figures are only comparable on one machine.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_flags, cpu_name

REPO = Path(__file__).resolve().parent.parent


def timed(args: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return seconds, done.stderr


def import_seconds(stderr: str, top: int = 8) -> list[tuple[str, float]]:
    """The slowest top-level imports of a ``-X importtime`` log (cumulative seconds)."""
    found = []
    for line in stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if match and len(match.group(2)) == 1:  # one space: imported by the program itself
            found.append((match.group(3), int(match.group(1)) / 1e6))
    return sorted(found, key=lambda item: -item[1])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--title", default="Girls Ballet Tutu Neon Pink")
    parser.add_argument("--max_new_tokens", type=int, default=40)
    args = parser.parse_args()
    print(f"CPU: {cpu_name()} ({cpu_flags()}); {os.cpu_count()} cores; python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "AMZFT_CACHE": cache, "COLUMNS": "100"}
        ask = ["-m", "amzft", "ask", args.title, "--max_new_tokens", str(args.max_new_tokens)]
        timed(ask, env)  # unpacks the embedded model once, as any first use does
        figures = {"--help": [], "fit --help, rendered": [], "fit --help, kept": [], "ask, one answer": []}
        for _ in range(args.runs):
            figures["--help"].append(timed(["-m", "amzft", "--help"], env)[0])
            for kept in Path(cache, "help").glob("*.txt"):
                kept.unlink()
            figures["fit --help, rendered"].append(timed(["-m", "amzft", "fit", "--help"], env)[0])
            figures["fit --help, kept"].append(timed(["-m", "amzft", "fit", "--help"], env)[0])
            figures["ask, one answer"].append(timed(ask, env)[0])
        for name, values in figures.items():
            print(f"{name:<22} median {statistics.median(values):6.2f} s  (runs: {', '.join(f'{v:.2f}' for v in values)})")
        _, log = timed(["-X", "importtime", *ask], env)
        print("ask's slowest imports (cumulative s): " + ", ".join(f"{m} {s:.2f}" for m, s in import_seconds(log)))


if __name__ == "__main__":
    main()
