"""Paired-comparison statistics: the t-test, the power effect and the multiplicity adjustments."""

import math

import numpy as np
import pytest

from fedbpt_jax import stats


def test_holm_and_benjamini_hochberg_by_hand():
    ps = [0.01, 0.04, 0.03, None, 0.20]
    # Holm: sorted 0.01, 0.03, 0.04, 0.20 times 4, 3, 2, 1, then running maximum
    assert stats.holm(ps) == pytest.approx([0.04, 0.09, 0.09, None, 0.20])
    # BH: p * m / rank, then running minimum from the largest
    assert stats.benjamini_hochberg(ps) == pytest.approx([0.04, 0.0533333, 0.0533333, None, 0.20])
    assert stats.holm([0.9, 0.8]) == [1.0, 1.0]  # capped at 1


def test_power_effect_matches_a_simulation():
    """At the stated effect, a simulated two-sided paired t-test at 0.05 rejects in about 80 % of draws."""
    from scipy import stats as sst

    n, sd = 3, 1.0
    eff = stats.power_effect(n, sd)
    assert eff / (sd / math.sqrt(n)) == pytest.approx(5.65, abs=0.01)
    rng = np.random.default_rng(0)
    d = rng.normal(eff, sd, size=(20000, n))
    rejected = sst.ttest_1samp(d, 0.0, axis=1).pvalue < 0.05
    assert rejected.mean() == pytest.approx(0.8, abs=0.015)
    # many seeds: close to the normal approximation (1.96 + 0.84) SE
    assert stats.power_effect(200, 1.0) * math.sqrt(200) == pytest.approx(2.81, abs=0.02)
    assert stats.power_effect(1, 1.0) is None and stats.power_effect(4, 0.0) == 0.0


def test_paired_rejects_an_empty_comparison():
    with pytest.raises(ValueError, match="share no seed"):
        stats.paired([])
