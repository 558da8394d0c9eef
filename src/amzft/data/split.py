"""Split stage: a hash of the normalised title picks the split, the same whatever the file order, seed or machine."""

from __future__ import annotations

import hashlib

import numpy as np

SPLITS = ("train", "validation", "test")


def product_key(title: str) -> str:
    return " ".join(title.casefold().split())


def assign_split(title: str, val_fraction: float, test_fraction: float, salt: str = "") -> str:
    digest = hashlib.blake2b((salt + product_key(title)).encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64  # uniform in [0, 1)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "validation"
    return "train"


def seeded_sample(population: int, k: int, seed: int) -> list[int]:
    """``k`` distinct indices of ``range(population)`` (all when fewer), in an order fixed by ``seed`` on every machine."""
    k = min(k, population)
    return [int(i) for i in np.random.default_rng(seed).choice(population, size=k, replace=False)] if k > 0 else []
