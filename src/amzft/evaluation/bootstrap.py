"""How sure a quality ratio is: the paired-bootstrap interval of fine-tuned ÷ base mean scores.

A split of 20 products gives a ROUGE-L ratio of, say, 1.4×; another seeded sample of 20 products
could give 1.2× or 1.7×. ``paired_ratio_interval`` says how far: it resamples *products* with
replacement, each product carrying its base and its fine-tuned score together (the pair: both
models answered the same title, so a product that is easy for one is easy for the other, and
resampling the pairs keeps that correlation instead of treating the two means as independent),
and all rows of one product together (a file may hold a product twice; its rows are not
independent draws). numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from amzft.errors import ConfigError


@dataclass(frozen=True)
class Interval:
    """A ratio of two means and its bootstrap interval. ``value`` is the full sample's ratio
    (inf where the base mean is 0 and the tuned one is not, nan where both are 0); ``low`` /
    ``high`` are None where there is no ratio, and ``high`` is inf where some resamples drew
    only products the base scored 0 on (``unbounded`` of them)."""

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
        for key in ("value", "low", "high"):
            if d[key] is not None and not math.isfinite(d[key]):
                d[key] = None
        if not math.isfinite(self.value):
            d["note"] = "the base's mean is 0"
        elif self.high is not None and not math.isfinite(self.high):
            d["note"] = (f"{self.unbounded} of the {self.resamples} resamples drew only products the base scored 0 on: "
                         "the interval has no upper end")
        return d


def describe(ratio: dict) -> str:
    """``1.44× (95 % interval 1.26–1.67, 20 products, paired bootstrap)`` from ``Interval.as_dict()``
    (what report.json holds), or what stands in for it where there is no ratio."""
    products = f"{ratio['n_products']} product{'s' * (ratio['n_products'] != 1)}"
    if ratio["value"] is None:
        return f"no ratio: {ratio.get('note', 'the base mean is 0')} ({products})"
    level = f"{ratio['confidence'] * 100:g} %"
    high = "∞" if ratio["high"] is None else f"{ratio['high']:.2f}"
    return f"{ratio['value']:.2f}× ({level} interval {ratio['low']:.2f}–{high}, {products}, paired bootstrap)"


def _check(base: np.ndarray, tuned: np.ndarray, groups, resamples: int, confidence: float) -> None:
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


def group_sums(base, tuned, groups: Sequence[Hashable] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per product (in order of first appearance; every row its own product when ``groups`` is
    None): the sums of its base and of its tuned scores."""
    base, tuned = np.asarray(base, dtype=float), np.asarray(tuned, dtype=float)
    if groups is None:
        return base, tuned
    index: dict = {}
    codes = np.array([index.setdefault(g, len(index)) for g in groups], dtype=np.int64)
    return np.bincount(codes, base, len(index)), np.bincount(codes, tuned, len(index))


def paired_ratio_interval(base, tuned, groups: Sequence[Hashable] | None = None, resamples: int = 2000,
                          confidence: float = 0.95, seed: int = 0) -> Interval:
    """mean(tuned) ÷ mean(base) over paired rows, and its ``confidence`` interval by a paired
    bootstrap over products.

    What is resampled: products (``groups[i]`` names row i's product; None: every row is its
    own), with replacement, as many as there are, each drawn with all its rows and with its base
    and tuned scores together. Resample b draws ``rng.integers(0, k, size=k)`` from
    ``numpy.random.default_rng(seed)`` (k products, numbered in order of first appearance), so
    a seed gives the same interval on every machine. Both models answered the same rows, so the
    ratio of means is the ratio of sums, which a resample reads from per-product sums.

    Why a percentile interval: a ratio's sampling distribution is skewed (it is bounded below
    by 0, not above), and the percentile interval follows that skew with no normal
    approximation, is unchanged by reading the ratio the other way up (base ÷ tuned gives the
    reciprocal interval), and needs no second-level resampling (studentized) or jackknife
    (BCa) that a 20-product split cannot support well. Its ends are order statistics of the
    resampled ratios (numpy's ``lower`` / ``higher`` quantiles: rounded outward, never
    interpolated), so a resample whose products all scored 0 with the base, an infinite ratio
    (counted as such also when the tuned sum is 0 too), widens the interval rather than making
    it nan.
    """
    base_arr, tuned_arr = np.asarray(base, dtype=float), np.asarray(tuned, dtype=float)
    _check(base_arr, tuned_arr, groups, resamples, confidence)
    base_sums, tuned_sums = group_sums(base_arr, tuned_arr, groups)
    k = base_sums.size
    common = {"n_products": k, "n_rows": base_arr.size, "confidence": confidence, "resamples": resamples, "seed": seed}
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
