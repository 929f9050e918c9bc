"""Paired differences with confidence intervals (metattt.stats): cases with a known answer."""

from __future__ import annotations

import math
import random

import pytest

from metattt.stats import distinct_n, fmt_difference, mean_and_stderr, paired_difference


def test_identical_conditions_give_zero_with_a_ci_containing_zero():
    a = [1.2, 3.4, 2.2, 5.0, 1.0, 2.5]
    d = paired_difference(a, list(a))
    assert d.mean == 0.0 and d.ci_low <= 0.0 <= d.ci_high and not d.significant


def test_a_constant_shift_is_recovered_exactly():
    a = [random.Random(i).uniform(1, 6) for i in range(50)]
    d = paired_difference([x + 0.5 for x in a], a)
    assert d.mean == pytest.approx(0.5) and d.ci_low == pytest.approx(0.5) and d.ci_high == pytest.approx(0.5)
    assert d.significant and d.n == 50


def test_pairing_removes_between_prompt_variance():
    rng = random.Random(0)
    base = [rng.uniform(1, 8) for _ in range(48)]  # prompts differ a lot
    a = [b + 0.2 + rng.gauss(0, 0.05) for b in base]  # a small, consistent gain on each
    d = paired_difference(a, base)
    assert d.significant and 0.15 < d.ci_low < 0.2 < d.ci_high < 0.25


def test_noise_without_an_effect_is_not_significant_and_the_ci_covers_the_mean():
    rng = random.Random(1)
    a = [rng.gauss(3, 1) for _ in range(48)]
    b = [rng.gauss(3, 1) for _ in range(48)]
    d = paired_difference(a, b)
    assert d.ci_low < d.mean < d.ci_high and not d.significant
    assert paired_difference(a, b).as_dict() == d.as_dict()  # seeded: reproducible


def test_nan_pairs_are_dropped_and_bad_input_refused():
    d = paired_difference([1.0, float("nan"), 3.0], [0.0, 1.0, 1.0])
    assert d.n == 2 and d.mean == pytest.approx(1.5)
    assert math.isnan(paired_difference([1.0], [0.0]).ci_low)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0], [1.0, 2.0])


def test_formatting_and_helpers():
    assert fmt_difference(paired_difference([2.0, 3.0], [1.0, 2.0])) == "**+1.00 [+1.00, +1.00]**"
    assert fmt_difference(None) == "—"
    assert mean_and_stderr([1.0, 3.0]) == (2.0, 1.0)
    assert distinct_n([1, 2, 3, 4], 2) == 1.0 and distinct_n([7] * 10, 2) == pytest.approx(1 / 9)
    assert math.isnan(distinct_n([1], 2))
