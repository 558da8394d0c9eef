"""How sure a quality ratio is: fine-tuned ÷ base mean scores with a paired-bootstrap interval over
products (both models answered the same titles, so a product's two scores are drawn together)."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from amzft.errors import ConfigError


@dataclass(frozen=True)
class Interval:
    """A ratio of two means (inf where only the base mean is 0, nan where both are) and its interval (None
    without a ratio; ``high`` inf where ``unbounded`` resamples drew only products the base scored 0 on)."""

    value: float
    low: float | None
    high: float | None
    n_products: int
    n_rows: int
    confidence: float
    resamples: int
    seed: int
    unbounded: int = 0

    def as_dict(self) -> dict:
        """The JSON form (report.json): non-finite numbers as null, with a ``note`` saying why."""
        d = asdict(self)
        d |= {key: None for key in ("value", "low", "high") if d[key] is not None and not math.isfinite(d[key])}
        if not math.isfinite(self.value):
            d["note"] = "the base's mean is 0"
        elif self.high is not None and not math.isfinite(self.high):
            d["note"] = (f"{self.unbounded} of the {self.resamples} resamples drew only products the base scored 0 on: "
                         "the interval has no upper end")
        return d


def describe(ratio: dict) -> str:
    """``1.44× (95 % interval 1.26–1.67, 20 products, paired bootstrap)`` from ``Interval.as_dict()``, or why none."""
    products = f"{ratio['n_products']} product{'s' * (ratio['n_products'] != 1)}"
    if ratio["value"] is None:
        return f"no ratio: {ratio.get('note', 'the base mean is 0')} ({products})"
    high = "∞" if ratio["high"] is None else f"{ratio['high']:.2f}"
    return f"{ratio['value']:.2f}× ({ratio['confidence'] * 100:g} % interval {ratio['low']:.2f}–{high}, {products}, paired bootstrap)"


def paired_ratio_interval(base, tuned, groups: Sequence[Hashable] | None = None, resamples: int = 2000,
                          confidence: float = 0.95, seed: int = 0) -> Interval:
    """mean(tuned) ÷ mean(base) over paired rows, and its ``confidence`` percentile interval: resample b
    draws ``rng.integers(0, k, size=k)`` of the k products (``groups[i]`` names row i's, None: each row its
    own; numbered by first appearance) from ``default_rng(seed)``, each with all its rows and both scores.
    Percentile ends follow the ratio's skew and invert with it; taken as order statistics, resamples with
    a base sum of 0 (an infinite ratio) widen the interval rather than make it nan."""
    # Not scipy.stats.bootstrap: scipy is no dependency of amzft (numpy is), and it resamples single
    # observations, where here a product's rows go together and the ends are uninterpolated order statistics.
    base, tuned = np.asarray(base, dtype=float), np.asarray(tuned, dtype=float)
    if base.ndim != 1 or base.shape != tuned.shape:
        raise ConfigError(f"paired_ratio_interval: base and tuned should be two lists of one score per row of the same "
                          f"length, found shapes {base.shape} and {tuned.shape}")
    if not base.size:
        raise ConfigError("paired_ratio_interval: no scores (base and tuned are empty)")
    if not (np.isfinite(base).all() and np.isfinite(tuned).all()) or (base < 0).any() or (tuned < 0).any():
        raise ConfigError("paired_ratio_interval: scores should be finite and >= 0 (a mean ratio of signed scores means nothing)")
    if groups is not None and len(groups) != base.size:
        raise ConfigError(f"paired_ratio_interval: groups should name the product of each of the {base.size} rows, "
                          f"found {len(groups)} names")
    if resamples < 1 or not 0 < confidence < 1:
        raise ConfigError(f"paired_ratio_interval: resamples should be >= 1 and confidence in (0, 1), "
                          f"found {resamples} and {confidence}")
    base_sums, tuned_sums = base, tuned  # both models answered the same rows: a ratio of means is one of sums
    if groups is not None:
        index: dict = {}
        codes = np.array([index.setdefault(g, len(index)) for g in groups], dtype=np.int64)
        base_sums, tuned_sums = np.bincount(codes, base, len(index)), np.bincount(codes, tuned, len(index))
    k = base_sums.size
    common = {"n_products": k, "n_rows": base.size, "confidence": confidence, "resamples": resamples, "seed": seed}
    if base_sums.sum() <= 0:  # no ratio to put an interval on
        return Interval(math.inf if tuned_sums.sum() > 0 else math.nan, None, None, **common)
    rng = np.random.default_rng(seed)
    ratios = np.empty(resamples)
    for b in range(resamples):
        drawn = rng.integers(0, k, size=k)
        denominator = base_sums[drawn].sum()
        ratios[b] = tuned_sums[drawn].sum() / denominator if denominator > 0 else math.inf
    alpha = 1 - confidence
    low = float(np.quantile(ratios, alpha / 2, method="lower"))
    high = float(np.quantile(ratios, 1 - alpha / 2, method="higher"))
    return Interval(float(tuned_sums.sum() / base_sums.sum()), low, high, **common,
                    unbounded=int(np.isinf(ratios).sum()))
