"""Batched vs one-by-one greedy generation on the embedded model.

    python benchmarks/generation.py            # 32 prompts, 64 new tokens, batch 32 vs 1

Prints both wall times, the speed-up (goal >= 5x) and how many answers are identical.
"""

from __future__ import annotations

import argparse
import time

import torch

from amzft.cli.quiet import quiet_libraries
from amzft.data.clean import FilterSettings, RecordFilter
from amzft.data.prompt import PromptFormat
from amzft.data.reader import read_records
from amzft.data.stats import PipelineStats
from amzft.files import shipped_sample
from amzft.model.generation import GenerationOptions, generate
from amzft.model.module import LoraCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="embedded")
    args = parser.parse_args()
    quiet_libraries()
    keep = RecordFilter(FilterSettings())
    titles = []
    for record in read_records(shipped_sample(), PipelineStats()):
        title, _, reason = keep(record.title, record.content)
        if reason is None:
            titles.append(title)
    titles = (titles * (1 + args.prompts // len(titles)))[: args.prompts]
    prompts = [PromptFormat().render(t) for t in titles]
    module = LoraCausalLM(name_or_path=args.model)
    module.configure_model()
    options = GenerationOptions(max_new_tokens=args.max_new_tokens)
    generate(module, prompts[:2], GenerationOptions(max_new_tokens=4), use_adapter=False)  # warm-up

    t = time.perf_counter()
    batched = generate(module, prompts, options, use_adapter=False, batch_size=args.batch_size)
    batched_s = time.perf_counter() - t
    t = time.perf_counter()
    single = [generate(module, [p], options, use_adapter=False, batch_size=1)[0] for p in prompts]
    single_s = time.perf_counter() - t

    same = sum(a.text == b.text for a, b in zip(batched, single))
    tokens = sum(a.new_tokens for a in batched)
    print(f"machine: {torch.get_num_threads()} torch threads; model: {args.model}; {len(prompts)} prompts, "
          f"max_new_tokens={args.max_new_tokens}, batch {args.batch_size}")
    print(f"one-by-one: {single_s:.1f} s   batched: {batched_s:.1f} s   speed-up: {single_s / batched_s:.1f}x (goal >= 5x)")
    print(f"generated tokens: {tokens} ({tokens / batched_s:.0f} tokens/s batched)")
    print(f"identical answers: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
