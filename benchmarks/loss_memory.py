"""Peak memory and time of the LM head + cross-entropy (forward and backward) with and without
``model.compute.loss_chunk_tokens``, in Llama-3.2-1B's shape (hidden 2048, vocabulary 128,256).

    python benchmarks/loss_memory.py                    # 1,469 label tokens, chunks 0 (one pass), 1024, 256
    python benchmarks/loss_memory.py --tokens 940 --chunks 0,256

1,469 is the label-token count of the two longest answers in the first 400 real trn.json
records (801 + 668 with the Llama-3.2 tokenizer): a micro-batch of 2 can hold them. Each
setting runs in a fresh process; on CPU it reports the growth of peak RSS over the process's
footprint once the inputs exist, on CUDA the peak of allocated memory over the same point.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from amzft.model.loss import head_loss_sum


def measure(tokens: int, chunk: int, hidden: int, vocab: int, device: str) -> dict:
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False, device=device, dtype=torch.bfloat16).requires_grad_(False)
    states = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,), device=device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    loss = head_loss_sum(head, states, targets, chunk)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"chunk": chunk, "peak_mib": peak / 2**20, "seconds": time.perf_counter() - start,
            "loss": float(loss.detach()), "grad_norm": float(states.grad.float().norm())}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        tokens, chunk, hidden, vocab = map(int, sys.argv[2:6])
        print(json.dumps(measure(tokens, chunk, hidden, vocab, sys.argv[6])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1469)
    parser.add_argument("--chunks", default="0,1024,256")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    what = "peak allocated" if device.startswith("cuda") else "peak RSS growth"
    print(f"LM head {args.hidden} x {args.vocab} (bf16), {args.tokens} label tokens, forward + backward on {device}")
    print(f"{'loss_chunk_tokens':>17} {what:>16} {'seconds':>8} {'loss':>12} {'grad norm':>10}")
    rows = []
    for chunk in (int(c) for c in args.chunks.split(",")):
        done = subprocess.run([sys.executable, __file__, "--one", str(args.tokens), str(chunk), str(args.hidden),
                               str(args.vocab), device], capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{r['chunk']:>17} {r['peak_mib']:>12.0f} MiB {r['seconds']:>8.2f} {r['loss']:>12.2f} {r['grad_norm']:>10.4f}")
    one_pass = next((r for r in rows if r["chunk"] == 0), None)
    if one_pass:
        for r in rows:
            if r["chunk"]:
                print(f"chunk {r['chunk']}: {r['peak_mib'] / one_pass['peak_mib']:.2f}x the one-pass peak, "
                      f"{r['seconds'] / one_pass['seconds']:.2f}x its time")


if __name__ == "__main__":
    main()
