"""``model.lora.*``, ``model.optim.*`` and ``model.compute.*`` as dataclasses: LightningCLI reads
their fields and docstrings as options and help; each checks its own values (``problems``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

# q, k, v, o, gate, up, down: every linear layer of a Llama block, as in the notebook.
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class LoraOptions:
    """The adapters: where they go, their shape and their initialisation.

    Args:
        r: LoRA rank.
        alpha: scaling numerator (scale = alpha / r; alpha / sqrt(r) with ``use_rslora``).
        dropout: dropout on the LoRA input (0 in the notebook; 0 keeps resume bit-exact).
        target_modules: module names that get adapters.
        use_dora: DoRA (peft's weight-decomposed LoRA). ``hf`` backend only.
        use_rslora: rank-stabilised LoRA (peft / Unsloth): scale alpha / sqrt(r).
        seed: RNG seed of the adapters' random initialisation, so a run is reproducible.
    """

    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    use_dora: bool = False
    use_rslora: bool = False
    seed: int = 3407

    def problems(self) -> list[str]:
        problems = []
        if self.r < 1 or self.alpha <= 0:
            problems.append(f"model.lora.r must be >= 1 and alpha > 0, found {self.r}, {self.alpha}")
        if not 0 <= self.dropout < 1:
            problems.append(f"model.lora.dropout must be in [0, 1), found {self.dropout}")
        if not self.target_modules:
            problems.append("model.lora.target_modules must name at least one module")
        return problems


@dataclass(frozen=True)
class OptimOptions:
    """The optimizer and its learning-rate schedule (linear warm-up, then linear decay to 0 at
    ``trainer.max_steps``).

    Args:
        optimizer: ``adamw_8bit`` (bitsandbytes, as the notebook) or ``adamw`` (torch).
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: optimizer steps of linear warm-up.
    """

    optimizer: Literal["adamw_8bit", "adamw"] = "adamw_8bit"
    lr: float = 2e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 5

    def problems(self) -> list[str]:
        problems = []
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"model.optim.lr must be a positive number, found {self.lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            problems.append(f"model.optim.warmup_steps and weight_decay must be >= 0, found {self.warmup_steps}, {self.weight_decay}")
        return problems


@dataclass(frozen=True)
class ComputeOptions:
    """How the frozen base is held and the step computed: memory and speed, not what is learnt.

    Args:
        quantization: ``none`` (full-precision base) or ``nf4`` (4-bit base, QLoRA; backend
            ``hf``). The ``unsloth`` backend always loads 4-bit.
        dequantize_base: dequantise a base folder saved in 4-bit to fp32 before the adapters go
            on; without it such a folder trains in 4-bit as saved.
        gradient_checkpointing: recompute activations in backward to save memory.
        compile: ``torch.compile`` each decoder layer for training (``hf`` only); ``auto``: when the
            fit is long enough to pay it back, the decision logged.
        kernels: ``liger``: Liger's Triton kernels for a Llama base (``hf`` on CUDA, liger-kernel
            package); ``none``: transformers' own.
        loss_chunk_tokens: LM head and cross-entropy over this many label tokens at a time, each
            chunk recomputed in backward, so only one chunk's fp32 logits are held; 0: one pass.
    """

    quantization: Literal["none", "nf4"] = "none"
    dequantize_base: bool = False
    gradient_checkpointing: bool = False
    compile: bool | Literal["auto"] = False
    kernels: Literal["none", "liger"] = "none"
    loss_chunk_tokens: int = 0

    def problems(self, backend: str) -> list[str]:
        problems = []
        if self.loss_chunk_tokens < 0:
            problems.append(f"model.compute.loss_chunk_tokens must be >= 0 (0: no chunking), found {self.loss_chunk_tokens}")
        if self.kernels != "none" and backend != "hf":
            problems.append(f"model.compute.kernels={self.kernels} works with backend hf only (Unsloth brings its own Triton kernels)")
        if self.compile is True and backend != "hf":
            problems.append("model.compute.compile works with backend hf only (Unsloth compiles its own kernels)")
        return problems


GROUPS = {"lora": LoraOptions, "optim": OptimOptions, "compute": ComputeOptions}
