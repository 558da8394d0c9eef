"""NEFTune (Jain et al. 2023): uniform noise on the input embeddings while training.

The noise is transformers' ``neftune_post_forward_hook``: uniform in ±alpha / sqrt(L x d) for a
batch of length L and hidden size d, added in training mode only, so validation, generation and
exports see clean embeddings. It is drawn from the hook's own generator, reseeded for every
micro-batch from (seed, optimizer step, micro-batch of the window, rank), not from the global
RNG as transformers' hook does: Lightning does not checkpoint the global RNG, so that noise
would differ after ``--ckpt_path last`` and resume would no longer be exact.
"""

from __future__ import annotations

import hashlib
import math

import torch


class NEFTune:
    """A forward hook on the input embeddings (``attach``); ``reseed`` before each training
    micro-batch."""

    def __init__(self, alpha: float, seed: int):
        self.alpha, self.seed = float(alpha), int(seed)
        self._generator: torch.Generator | None = None
        self._next_seed: int | None = self.seed

    @classmethod
    def attach(cls, model, alpha: float, seed: int) -> NEFTune | None:
        if alpha <= 0:
            return None
        hook = cls(alpha, seed)
        model.get_input_embeddings().register_forward_hook(hook)
        return hook

    def reseed(self, step: int, micro_batch: int, rank: int = 0) -> None:
        digest = hashlib.blake2b(f"{self.seed}/{step}/{micro_batch}/{rank}".encode(), digest_size=8).digest()
        self._next_seed = int.from_bytes(digest, "big") >> 1  # manual_seed takes a non-negative int64

    def __call__(self, module, args, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training:
            return None  # output unchanged
        if self._generator is None or self._generator.device != output.device:
            self._generator = torch.Generator(device=output.device)
            self._next_seed = self.seed if self._next_seed is None else self._next_seed
        if self._next_seed is not None:
            self._generator.manual_seed(self._next_seed)
            self._next_seed = None
        bound = self.alpha / math.sqrt(output.size(-2) * output.size(-1))
        return output + torch.empty_like(output).uniform_(-bound, bound, generator=self._generator)
