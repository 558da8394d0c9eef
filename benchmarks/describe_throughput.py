"""``python -m amzft describe`` against a naive loop, its memory as the file grows, and a kill.

    python benchmarks/describe_throughput.py --data first400.jsonl [--ckpt_path CKPT] \
        [--titles 400] [--naive 32] [--memory 2000,20000] [--kill 96]

* throughput: the command over ``--titles`` real titles vs one title at a time through
  transformers' ``generate`` (the same loaded model, prompt and decoding) over the first
  ``--naive`` of them: products/s of each, the ratio, and how many of the naive loop's answers
  the command's file holds word for word. Model loading is outside both timings.
* memory (``--memory``): the command in a fresh process over each count of titles (the real
  titles repeated with a number), on a tiny random Llama with the Llama-3.2 tokenizer and 2 new
  tokens, so the pipeline's own memory (reader, plan, writer, Lightning's loop) is what grows or
  not: peak RSS per count.
* kill (``--kill N``): the command over N titles, killed (SIGKILL) once half of them are on
  disk, then run again: titles answered twice (in flight at the kill) against one batch.

Prints the CPU model and flags beside every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from machine import cpu_flags, cpu_name
from transformers import LlamaConfig, LlamaForCausalLM

from amzft.catalogue.command import _load
from amzft.cli.main import main as amzft
from amzft.cli.quiet import quiet_libraries
from amzft.data.clean import clean_text
from amzft.model.decoding import DEFAULT_DECODING
from amzft.sources import load_tokenizer


def _titles(path: Path, n: int) -> list[dict]:
    rows = []
    with path.open() as f:
        for line in f:
            record = json.loads(line)
            rows.append({"title": record["title"], "content": record.get("content", "")})
            if len(rows) == n:
                break
    return rows


def _write(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def throughput(args, tmp: Path) -> None:
    quiet_libraries()
    rows = _titles(args.data, args.titles)
    data = _write(rows, tmp / "titles.jsonl")
    out = tmp / "descriptions.jsonl"
    extra = ["--ckpt_path", args.ckpt_path] if args.ckpt_path else []
    started = time.perf_counter()
    amzft(["describe", "--data.path", str(data), "--out", str(out), "--max_new_tokens", str(args.max_new_tokens),
           "--token_budget", str(args.token_budget), *extra])
    wall = time.perf_counter() - started
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    command_s = meta["seconds_last_run"]
    answers = {r["line"]: r["description"] for r in map(json.loads, out.read_text().splitlines())}

    module, fmt, _ = _load(args.ckpt_path, {})
    model, tokenizer = module.model, module.tokenizer
    options = replace(DEFAULT_DECODING, max_new_tokens=args.max_new_tokens)
    same = 0
    t = time.perf_counter()
    with torch.no_grad():
        for line, row in enumerate(rows[: args.naive], start=1):
            inputs = tokenizer(fmt.render(clean_text(row["title"])), return_tensors="pt")
            ids = model.generate(**inputs, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 **options.generate_kwargs())
            text = tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            same += text == answers.get(line)
    naive_s = time.perf_counter() - t
    n = len(answers)
    print(f"CPU: {cpu_name()} ({cpu_flags()}); {torch.get_num_threads()} torch threads; "
          f"model: {args.ckpt_path or 'embedded (base)'}; max_new_tokens {args.max_new_tokens}, token_budget {args.token_budget}")
    print(f"describe: {n} titles in {command_s:.1f} s = {n / command_s:.3f} products/s (wall with imports and model load "
          f"{wall:.1f} s)")
    print(f"naive loop: {args.naive} titles in {naive_s:.1f} s = {args.naive / naive_s:.3f} products/s")
    print(f"ratio: {(n / command_s) / (args.naive / naive_s):.2f}x (goal >= 5x); identical answers {same}/{args.naive}")


def _tiny_model(tmp: Path) -> Path:
    tokenizer = load_tokenizer("llama3.2")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    directory = tmp / "tiny"
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def memory(args, tmp: Path) -> None:
    model = _tiny_model(tmp)
    base = _titles(args.data, 400)
    for count in args.memory:
        rows = [{"title": f"{base[i % len(base)]['title']} #{i}"} for i in range(count)]
        data = _write(rows, tmp / f"titles{count}.jsonl")
        out = tmp / f"out{count}.jsonl"
        started = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", _MEASURED, "describe", "--data.path", str(data), "--out", str(out),
                              "--model", json.dumps({"name_or_path": str(model)}), "--max_new_tokens", "2",
                              "--progress_every", "1e9"], capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(run.stderr[-3000:])
        peak = json.loads(run.stdout.strip().splitlines()[-1])["peak_rss_mib"]
        lines = sum(1 for _ in out.open())
        print(f"memory: {count} titles -> {lines} rows in {time.perf_counter() - started:.1f} s; peak RSS {peak:.0f} MiB "
              f"(CPU: {cpu_name()}, {cpu_flags()})")


# Runs the command in a fresh process and prints its peak RSS last (ru_maxrss is KiB on Linux).
_MEASURED = """
import json, resource, sys
from amzft.cli.main import main
main(sys.argv[1:])
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def kill(args, tmp: Path) -> None:
    rows = _titles(args.data, args.kill)
    data = _write(rows, tmp / "kill.jsonl")
    out = tmp / "kill-out.jsonl"
    command = [sys.executable, "-m", "amzft", "describe", "--data.path", str(data), "--out", str(out),
               "--max_new_tokens", str(args.max_new_tokens), "--token_budget", str(args.token_budget),
               "--progress_every", "1e9", *(["--ckpt_path", args.ckpt_path] if args.ckpt_path else [])]
    part = Path(str(out) + ".partial") / "rank0.jsonl"
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    while process.poll() is None:
        if part.exists() and sum(1 for _ in part.open("rb")) >= args.kill // 2:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    process.wait()
    on_disk = sum(1 for _ in part.open("rb"))
    resumed = subprocess.run(command, capture_output=True, text=True)
    last = [line for line in resumed.stdout.splitlines() if "descriptions written" in line][-1]
    found = re.search(r"\((\d+) on this process this run, (\d+) from before\)", last)
    again, before = int(found.group(1)), int(found.group(2))
    print(f"kill: {on_disk} of {len(rows)} rows on disk at the kill; the resume answered {again} "
          f"({again + before - len(rows)} of them a second time); CPU: {cpu_name()} ({cpu_flags()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="real trn.json records (JSON Lines)")
    parser.add_argument("--ckpt_path", default=None, help="a checkpoint; none: the embedded base model")
    parser.add_argument("--titles", type=int, default=400)
    parser.add_argument("--naive", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--token_budget", type=int, default=16384)
    parser.add_argument("--memory", type=lambda s: [int(x) for x in s.split(",")], default=[])
    parser.add_argument("--kill", type=int, default=0)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_throughput:
            throughput(args, Path(tmp))
        if args.memory:
            memory(args, Path(tmp))
        if args.kill:
            kill(args, Path(tmp))
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; "
          f"{os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
