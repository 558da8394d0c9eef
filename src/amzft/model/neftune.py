"""NEFTune: uniform noise on the input embeddings in training mode, from the hook's own generator
reseeded per micro-batch (Lightning does not checkpoint the global RNG: resume stays exact)."""

from __future__ import annotations

import hashlib
import math

import torch


class NEFTune:
    """A forward hook on the input embeddings (``attach``); ``reseed`` before each training micro-batch."""

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
