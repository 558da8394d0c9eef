"""One batch's loss and LoRA gradients on a small random Llama, with transformers' kernels and
with Liger's (``model.compute.kernels: liger``), in fp32 and under bf16 autocast.

Run by tests/test_gpu.py in a fresh process: no Unsloth imported there (it patches the Llama
classes when loaded), and Liger's RoPE patch, which is process-wide, reaches nothing else. The
plain runs come first for the same reason.

    python tests/liger_vs_plain.py MODEL_DIR OUT.pt      # OUT.pt: {(kernels, bf16): {"loss", "grads"}}
"""

from __future__ import annotations

import sys

import torch

from amzft.data.collate import Collator
from amzft.model.module import LoraCausalLM
from amzft.model.settings import ComputeOptions, OptimOptions
from amzft.sources import load_tokenizer


def measure(model_dir: str, kernels: str, bf16: bool, batch: dict) -> dict:
    module = LoraCausalLM(name_or_path=model_dir, backend="hf", compute=ComputeOptions(kernels=kernels),
                          optim=OptimOptions(optimizer="adamw"))
    module.configure_model()
    module.cuda().train()
    torch.manual_seed(1)  # LoRA B starts at zero (A would get no gradient): the same random B for both
    for name, param in sorted(module.model.named_parameters()):
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss_sum, n = module.token_loss_sum(batch)
    (loss_sum / n).backward()
    grads = {k: p.grad.float().cpu() for k, p in module.model.named_parameters() if p.grad is not None}
    return {"loss": float(loss_sum.detach() / n), "grads": grads}


def main(model_dir: str, out: str) -> None:
    tokenizer = load_tokenizer(model_dir)
    lengths = (150, 333, 97)  # unequal rows: padding and the attention mask are part of the check
    ids = [[tokenizer.bos_token_id, *range(1000 + 7 * n, 1000 + 8 * n)] for n in lengths]
    batch = Collator(tokenizer.pad_token_id)({"input_ids": ids, "prompt_len": [12, 40, 9]})
    results = {}
    for kernels in ("none", "liger"):
        for bf16 in (False, True):
            results[(kernels, bf16)] = measure(model_dir, kernels, bf16, batch)
    torch.save(results, out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
