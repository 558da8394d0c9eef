"""Where a training step's time goes: matrix products, attention, the loss, the rest.

    python benchmarks/step_profile.py --data ../shared/data/amazontitles_trn_first400.jsonl
    python benchmarks/step_profile.py --config configs/cpu.yaml --batches 4 --data FILE

Builds the model and data of ``--config`` (default the shipped configs/cpu.yaml) as ``fit``
would, runs two warm-up micro-batches (forward + backward), then times ``--batches`` more
and profiles them with torch.profiler. Prints the tokens/s of those micro-batches, the share
of the profiled CPU time by kind of operator, and the operators taking the most time. What it
answers: how much of a step is the matrix work both amzft and HF Trainer must do for every
token (the bound on what removing padding, repeats and unused logits can gain), and how much
is the rest (attention, element-wise operations, the loss), which fusing or better kernels
could cut. The machine's own matrix-product rate, from torch.mm at a decoder layer's shapes,
is printed beside it.

torch, transformers and Lightning are imported inside main(), after ``force_offline()``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time

from machine import cpu_flags, cpu_name, gemm_rate

from amzft.cli.quiet import quiet_libraries
from amzft.sources import force_offline

KINDS = {  # operator name fragment -> kind (first match wins)
    "scaled_dot_product": "attention",
    "softmax": "loss (log-softmax, cross-entropy)",
    "nll_loss": "loss (log-softmax, cross-entropy)",
    "aten::mm": "matrix products (aten::mm / addmm / bmm)",
    "aten::addmm": "matrix products (aten::mm / addmm / bmm)",
    "aten::bmm": "matrix products (aten::mm / addmm / bmm)",
}


def kind_of(name: str) -> str:
    return next((kind for fragment, kind in KINDS.items() if fragment in name), "other (element-wise, copies, autograd)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/cpu.yaml")
    parser.add_argument("--data", default=None, help="trn.json records (default: the bundled sample)")
    parser.add_argument("--batches", type=int, default=2, help="micro-batches profiled (after 2 warm-up ones)")
    parser.add_argument("--top", type=int, default=12, help="operators listed")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true",
                        help="bf16-mixed: forward under CPU bf16 autocast, as Lightning's bf16-mixed runs it")
    args = parser.parse_args()
    force_offline()
    quiet_libraries()
    import torch  # noqa: PLC0415 - after force_offline
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    from amzft.cli.lightning_cli import cli_main  # noqa: PLC0415

    work = tempfile.mkdtemp(prefix="amzft-step-profile-")
    cli_args = ["fit", "--config", args.config, "--trainer.default_root_dir", work, "--data.cache_dir", os.path.join(work, "cache")]
    if args.data:
        cli_args += ["--data.path", args.data]
    cli = cli_main(cli_args, run=False)
    module, data = cli.model, cli.datamodule
    module.configure_model()
    data.setup("fit")
    batches = iter(data.train_dataloader())
    warmup, timed = [next(batches) for _ in range(2)], [next(batches) for _ in range(args.batches)]
    module.train()

    bf16 = args.precision == "bf16-mixed"

    def run(group) -> None:
        for batch in group:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, n = module.token_loss_sum(batch)
            (loss / n).backward()

    run(warmup)
    start = time.perf_counter()
    run(timed)
    seconds = time.perf_counter() - start
    tokens = sum(int(b["input_tokens"]) for b in timed)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(timed)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares: dict[str, float] = {}
    for e in events:
        shares[kind_of(e.key)] = shares.get(kind_of(e.key), 0.0) + e.self_cpu_time_total / total
    config = module.model.get_base_model().config
    print(f"{cpu_name()} ({cpu_flags()}), {torch.get_num_threads()} threads, {datetime.date.today()}; {args.config}, "
          f"{args.precision}")
    print(f"{args.batches} micro-batches, {tokens} input tokens (shapes {[tuple(b['input_ids'].shape) for b in timed]}): "
          f"{seconds:.2f} s = {tokens / seconds:.1f} input tokens/s (forward + backward, no optimizer step)")
    for kind, share in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {share:6.1%}  {kind}")
    rows = max(int(b["input_ids"].shape[1]) for b in timed)
    mm_dtype = "bfloat16" if bf16 else "float32"
    print(f"torch.mm at an MLP projection's shape ({rows} x {config.hidden_size} @ {config.hidden_size} x "
          f"{config.intermediate_size}): {gemm_rate(rows, config.hidden_size, config.intermediate_size, dtype=mm_dtype):.0f} "
          f"GFLOP/s ({mm_dtype})")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
