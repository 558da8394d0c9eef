"""The paired-bootstrap interval of a ratio of mean scores (amzft.evaluation.bootstrap), and how
evaluate's reports state it (no model: hand-made per-product scores)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from amzft.errors import ConfigError
from amzft.evaluation.bootstrap import describe, paired_ratio_interval
from amzft.evaluation.run import add_uncertainty, render_markdown, render_table


def test_identical_ratios_collapse_the_interval_to_that_ratio():
    base = [0.1, 0.25, 0.4, 0.3, 0.05]
    got = paired_ratio_interval(base, [1.5 * b for b in base])
    assert got.value == pytest.approx(1.5) and got.low == pytest.approx(1.5) and got.high == pytest.approx(1.5)
    assert (got.n_products, got.n_rows, got.resamples, got.confidence) == (5, 5, 2000, 0.95)


def test_the_interval_is_the_percentiles_of_the_seeded_resamples():
    """The expected ends recomputed independently: an explicit loop over the same seeded product
    draws, each resample's rows expanded and their means divided, the 2.5th / 97.5th order statistics."""
    base = np.array([0.20, 0.10, 0.35, 0.05, 0.30, 0.15, 0.25, 0.40])
    tuned = np.array([0.30, 0.05, 0.50, 0.20, 0.30, 0.10, 0.45, 0.60])
    resamples, seed = 500, 7
    got = paired_ratio_interval(base, tuned, resamples=resamples, seed=seed)
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(resamples):
        rows = rng.integers(0, len(base), size=len(base))
        ratios.append(np.mean([tuned[i] for i in rows]) / np.mean([base[i] for i in rows]))
    ratios.sort()
    assert got.value == pytest.approx(tuned.mean() / base.mean())
    assert got.low == pytest.approx(ratios[math.floor(0.025 * (resamples - 1))])
    assert got.high == pytest.approx(ratios[math.ceil(0.975 * (resamples - 1))])


def test_the_interval_holds_the_true_ratio_and_has_a_width():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.1, 0.3, size=200)
    tuned = np.clip(1.4 * base + rng.normal(0, 0.05, size=200), 0, None)  # true ratio 1.4
    got = paired_ratio_interval(base, tuned)
    assert got.low < 1.4 < got.high and got.low < got.value < got.high
    assert 0.01 < got.high - got.low < 0.5


def test_rows_of_one_product_are_drawn_together():
    # Product a: two rows (base 1 + 1, tuned 0 + 2); product b: one row (base 1, tuned 3). Drawn
    # as products, a resample's ratio is 4/4, 5/3 or 9/3: never below 1. Drawn as rows, a1 alone gives 0.
    base, tuned, groups = [1.0, 1.0, 1.0], [0.0, 2.0, 3.0], ["a", "a", "b"]
    grouped = paired_ratio_interval(base, tuned, groups=groups)
    assert (grouped.low, grouped.high) == (pytest.approx(1.0), pytest.approx(3.0))
    assert (grouped.n_products, grouped.n_rows) == (2, 3)
    assert grouped.value == pytest.approx(5 / 3)
    assert paired_ratio_interval(base, tuned).low < 1.0
    # The same as one row per product holding its rows' sums (products numbered in order of first appearance).
    sums = paired_ratio_interval([2.0, 1.0], [2.0, 3.0])
    assert (sums.value, sums.low, sums.high, sums.n_products) == (grouped.value, grouped.low, grouped.high, 2)


def test_a_seed_gives_the_same_interval_and_another_seed_another():
    rng = np.random.default_rng(1)
    base, tuned = rng.uniform(0.1, 0.4, 30), rng.uniform(0.1, 0.6, 30)
    first = paired_ratio_interval(base, tuned, seed=3)
    assert first == paired_ratio_interval(list(base), list(tuned), seed=3)
    other = paired_ratio_interval(base, tuned, seed=4)
    assert other.value == first.value and (other.low, other.high) != (first.low, first.high)


def test_a_base_mean_of_zero_gives_no_ratio_not_a_crash():
    got = paired_ratio_interval([0.0, 0.0, 0.0], [0.2, 0.0, 0.1])
    assert got.value == math.inf and got.low is None and got.high is None
    d = got.as_dict()
    assert d["value"] is None and "base's mean is 0" in d["note"]
    assert describe(d) == "no ratio: the base's mean is 0 (3 products)"
    assert math.isnan(paired_ratio_interval([0.0, 0.0], [0.0, 0.0]).value)
    # A base of 0 on some products: the resamples that draw only those have no finite ratio, and
    # the interval then has no upper end (stated), rather than nan ends.
    some = paired_ratio_interval([0.0, 0.5], [0.2, 0.5])
    assert some.value == pytest.approx(1.4) and some.high == math.inf and some.unbounded > 0
    assert some.as_dict()["high"] is None and "no upper end" in some.as_dict()["note"]
    assert describe(some.as_dict()).endswith("–∞, 2 products, paired bootstrap)")


@pytest.mark.parametrize("bad", [
    {"base": [0.1, 0.2], "tuned": [0.1]},
    {"base": [], "tuned": []},
    {"base": [0.1, float("nan")], "tuned": [0.1, 0.2]},
    {"base": [0.1, -0.2], "tuned": [0.1, 0.2]},
    {"base": [0.1, 0.2], "tuned": [0.1, 0.2], "groups": ["a"]},
    {"base": [0.1, 0.2], "tuned": [0.1, 0.2], "resamples": 0},
    {"base": [0.1, 0.2], "tuned": [0.1, 0.2], "confidence": 95},
])
def test_bad_input_is_a_one_line_error(bad):
    with pytest.raises(ConfigError, match="paired_ratio_interval") as error:
        paired_ratio_interval(**bad)
    assert "\n" not in str(error.value)


def test_reports_state_the_ratio_its_interval_and_the_product_count():
    titles = ["Girls Ballet Tutu", "girls  ballet TUTU", "Coffee Mug", "Desk Lamp"]  # rows 1 and 2: one product
    references = ["A pink tutu for ballet.", "A pink tutu for ballet.", "A white mug.", "A lamp for a desk."]
    answers = {"base": ["A dress.", "A skirt.", "A cup.", "A light."],
               "fine-tuned": ["A pink tutu.", "A tutu for ballet.", "A white cup.", "A lamp for a desk."]}
    result = add_uncertainty({"n": 4, "models": {m: {} for m in answers}, "examples": []}, titles, answers, references)
    assert result["n_products"] == 3 and result["per_product"]["products"][:2] == ["girls ballet tutu"] * 2
    ratio = result["ratio"]
    base, tuned = result["per_product"]["rougeL"]["base"], result["per_product"]["rougeL"]["fine-tuned"]
    assert ratio == {"metric": "rougeL", "tuned": "fine-tuned", "base": "base",
                     **paired_ratio_interval(base, tuned, groups=result["per_product"]["products"]).as_dict()}
    assert ratio["value"] == pytest.approx(sum(tuned) / sum(base)) and ratio["low"] <= ratio["value"] <= ratio["high"]
    line = (f"rougeL fine-tuned ÷ base: {ratio['value']:.2f}× (95 % interval {ratio['low']:.2f}–{ratio['high']:.2f}, "
            "3 products, paired bootstrap)")
    metrics = dict.fromkeys(("rouge1", "rouge2", "rougeL", "bleu", "chrf", "empty", "title_only", "never_stopped",
                             "looping", "collapsed", "facts_recalled", "facts_invented", "mean_new_tokens"), 0.0)
    result["models"] = {m: metrics for m in answers}
    report = {"checkpoint": None, "decoding": "greedy", "splits": {"test": result}}
    md = render_markdown(report)
    assert f"\n{line}\n" in md and "(4 answers, 3 products)" in md
    assert render_table(report).splitlines()[-1] == f"test       {line}"
    one_model = add_uncertainty({"n": 1, "models": {}, "examples": []}, ["Mug"], {"base": ["A cup."]}, ["A mug."])
    assert one_model["ratio"] is None and "÷" not in render_markdown({"checkpoint": None, "decoding": "x", "splits": {}})
