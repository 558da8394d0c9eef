"""The most of this CPU a LoRA training step can use with torch's kernels: each counted product
timed alone at the step's shapes.

    python benchmarks/step_ceiling.py                          # embedded model, a packed row of 450 positions
    python benchmarks/step_ceiling.py --positions 450 --head 320 --precision bf16 --rounds 7

train_throughput.py's utilisation divides a step's counted FLOPs (amzft.training.flops) by the
step's time and by torch.mm's rate at one shape, an MLP projection's: the best rate this CPU
reaches. A step's products come in other shapes too: k and v project to fewer features, LoRA's
rank-16 factors are thin, the head multiplies by a 49k-word embedding, attention runs L x L
squares through SDPA's fused kernel. This times each part alone, forward and backward as a
step runs it (frozen weights: the input's gradient only; LoRA factors: their weights' and the
input's), with nothing between the parts, and adds the times: the step time these kernels allow.
The counted FLOPs over that time, as a share of the MLP rate, are the ceiling of
train_throughput.py's share on this CPU: a run below it can gain by cutting what lies between the
kernels (casts, element-wise work, autograd, Python); past it, only faster kernels or less
work per token (shorter rows for attention, fewer LoRA targets) can go.

Timed per layer (every layer alike: layer 0's missing input gradients are not subtracted, so
the ceiling is a little low), times the layers, plus the head. Each part: the best of
``--rounds`` rounds of ``--reps`` calls. The loss (log-softmax and cross-entropy over the
vocabulary at the head's positions) is element-wise work the count does not credit; it is timed
too and shown beside the ceiling, not in it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from types import SimpleNamespace

from machine import cpu_flags, cpu_name, gemm_rate, has_bf16_matmul

from amzft.sources import force_offline, resolve_model_dir


def best_seconds(fn, rounds: int, reps: int) -> float:
    """The best of ``rounds`` rounds of ``reps`` calls of ``fn``, per call, after two warm-up calls."""
    fn()
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, time.perf_counter() - start)
    return best / reps


def part_timers(shape, positions: int, head: int, r: int, dtype, masked: bool) -> dict:
    """One callable per part of a layer (each projection with its LoRA factors, attention) and
    of the head: forward and backward as a LoRA step runs them, at ``positions`` positions."""
    import torch  # noqa: PLC0415 - after force_offline (main)
    import torch.nn.functional as F  # noqa: PLC0415

    def rand(*size, grad=False):
        return (torch.randn(*size) * 0.02).to(dtype).requires_grad_(grad)

    def projection(n_in: int, n_out: int):
        x, w, a, b, g = rand(positions, n_in, grad=True), rand(n_out, n_in), rand(r, n_in, grad=True), \
            rand(n_out, r, grad=True), rand(positions, n_out)
        # autograd.grad, not backward(): no gradient accumulation (an element-wise add) in the time
        return lambda: torch.autograd.grad(F.linear(x, w) + F.linear(F.linear(x, a), b), (x, a, b), g)

    parts = {name: projection(*features) for name, features in shape.projections().items()}
    q = rand(1, shape.heads, positions, shape.head_dim, grad=True)
    k, v = rand(1, shape.heads, positions, shape.head_dim, grad=True), rand(1, shape.heads, positions, shape.head_dim, grad=True)
    out_grad = rand(1, shape.heads, positions, shape.head_dim)
    mask = torch.ones(positions, positions, dtype=torch.bool).tril()[None, None] if masked else None
    parts["attention"] = lambda: torch.autograd.grad(
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not masked), (q, k, v), out_grad)
    hidden, embedding = rand(head, shape.hidden, grad=True), rand(shape.vocab, shape.hidden)
    logits_grad = rand(head, shape.vocab)
    parts["head"] = lambda: torch.autograd.grad(F.linear(hidden, embedding), hidden, logits_grad)
    logits, targets = torch.randn(head, shape.vocab, requires_grad=True), torch.randint(0, shape.vocab, (head,))
    parts["loss"] = lambda: torch.autograd.grad(F.cross_entropy(logits, targets, reduction="sum"), logits)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--positions", type=int, default=450, help="positions of a micro-batch (cpu.yaml: one packed row, ~450)")
    parser.add_argument("--head", type=int, default=320, help="label positions through the LM head")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 where the CPU multiplies bf16 in hardware (what precision: auto trains in), else fp32")
    parser.add_argument("--causal", action="store_true", help="SDPA causal without a mask (cpu.yaml's packed rows pass one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    force_offline()
    import torch  # noqa: PLC0415 - after force_offline

    from amzft.training.flops import PROJECTIONS, ModelShape, StepTokens, step_flops  # noqa: PLC0415

    config = json.loads((resolve_model_dir(args.model) / "config.json").read_text())
    shape = ModelShape.of(SimpleNamespace(**config))  # config.json as attributes, as a transformers config has them
    bf16 = args.precision == "bf16" or (args.precision == "auto" and has_bf16_matmul())
    dtype, name = (torch.bfloat16, "bfloat16") if bf16 else (torch.float32, "float32")
    work = StepTokens.of_rows([args.positions], args.head)
    flops = step_flops(shape, 16, PROJECTIONS, work)
    # The mm rate before, between and after the parts, the best kept: on a shared VM the same
    # product's rate moved by 2x between runs minutes apart, and the ceiling is a ratio to it.
    rates = [gemm_rate(args.positions, shape.hidden, shape.intermediate, dtype=name)]
    seconds = {}
    for part, fn in part_timers(shape, args.positions, args.head, 16, dtype, not args.causal).items():
        seconds[part] = best_seconds(fn, args.rounds, args.reps)
        if part in ("down_proj", "loss"):
            rates.append(gemm_rate(args.positions, shape.hidden, shape.intermediate, dtype=name))
    layer = sum(seconds[p] for p in (*PROJECTIONS, "attention"))
    ceiling_s = shape.layers * layer + seconds["head"]
    rate = max(rates)
    print(f"{cpu_name()} ({cpu_flags()}), {torch.get_num_threads()} threads, torch {torch.__version__}, {datetime.date.today()}")
    print(f"model {args.model} ({shape.layers} layers, hidden {shape.hidden}), {args.positions} positions, {args.head} through the head, "
          f"{name}, attention {'causal' if args.causal else 'masked'}; best of {args.rounds} x {args.reps}")
    print(f"{'part':<12}{'ms (fwd+bwd)':>14}{'GFLOP/s':>10}{'of mm':>8}")
    features = shape.projections()
    for part in (*PROJECTIONS, "attention", "head"):
        if part in PROJECTIONS:  # base forward + input gradient, LoRA forward + 2x for its backward (amzft.training.flops)
            n_in, n_out = features[part]
            count = (2 * 2 * n_in * n_out + 3 * 2 * 16 * (n_in + n_out)) * work.tokens
        elif part == "attention":
            count = 3 * flops.attention_forward / shape.layers
        else:
            count = flops.head_forward + flops.head_backward
        achieved = count / seconds[part] / 1e9
        print(f"{part:<12}{seconds[part] * 1e3:>14.2f}{achieved:>10.1f}{achieved / rate:>8.1%}")
    print(f"torch.mm at the MLP's shape ({args.positions} x {shape.hidden} @ {shape.hidden} x {shape.intermediate}): best {rate:.1f} "
          f"GFLOP/s (measured {', '.join(f'{r:.0f}' for r in rates)})")
    print(f"step: {flops.total / 1e9:.1f} GFLOP counted; the kernels alone take {ceiling_s * 1e3:.0f} ms "
          f"({flops.total / ceiling_s / 1e9:.1f} GFLOP/s): ceiling **{flops.total / ceiling_s / 1e9 / rate:.0%}** of the mm rate; "
          f"with the loss ({seconds['loss'] * 1e3:.1f} ms) {flops.total / (ceiling_s + seconds['loss']) / 1e9 / rate:.0%}")


if __name__ == "__main__":
    main()
