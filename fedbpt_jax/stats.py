"""Statistics of paired seed comparisons, as the experiment reports state them.

A comparison of two configurations A and B that share every seed's data, partition, projection and keys is a
set of paired differences ``d_s = A_s − B_s``. :func:`paired` gives the mean, the sample std, the two-sided
one-sample t-test of ``mean(d) = 0`` (its p-value and 95 % interval) and the **80 %-power effect**: the true
mean difference that the same test (two-sided, α = 0.05) would detect with probability 0.8 if the differences'
std were the observed one (noncentral t; at n = 3 about 5.7 standard errors, not 2). Many comparisons in one
report are a family: :func:`holm` (family-wise error) and :func:`benjamini_hochberg` (false discovery rate)
adjust their p-values, and :func:`verdict` words a comparison from its adjusted p-value.
"""

from __future__ import annotations

import math

import numpy as np

ALPHA = 0.05
POWER = 0.8


def power_effect(n: int, sd: float, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """The smallest true mean difference a two-sided paired t-test at ``alpha`` detects with probability
    ``power`` when the differences' std is ``sd`` (None for n < 2; 0 when sd is 0)."""
    from scipy import integrate, optimize, stats

    if n < 2:
        return None
    if sd == 0:
        return 0.0
    df = n - 1
    crit = float(stats.t.ppf(1 - alpha / 2, df))

    def achieved(delta_se):  # power at a true mean of delta_se standard errors, minus the target
        # T = (Z + delta) / sqrt(V / df), V ~ chi2(df): average P(|T| > crit | V) over V's quantiles u (the
        # noncentral t's own tails lose precision at df = 1; integrating over u instead of V keeps the mass in
        # view at any df)
        def given(u):
            s = crit * math.sqrt(float(stats.chi2.ppf(u, df)) / df)
            return stats.norm.sf(s - delta_se) + stats.norm.cdf(-s - delta_se)

        return integrate.quad(given, 0.0, 1.0, limit=200)[0] - power

    hi = crit
    while achieved(hi) < 0:  # the power at crit is about 0.5; a few SE more reach the target
        hi += 1.0
    delta = optimize.brentq(achieved, 0.0, hi, xtol=1e-8)
    return delta * sd / math.sqrt(n)


def paired(diffs) -> dict:
    """Mean, std, SE, t, two-sided p, 95 % interval half-width and the 80 %-power effect of paired differences."""
    from scipy import stats

    d = np.asarray(diffs, float)
    n = int(d.size)
    if n == 0:
        raise ValueError("paired: no differences (the two configurations share no seed)")
    out = {
        "n": n,
        "mean": float(d.mean()),
        "std": None,
        "se": None,
        "t": None,
        "p": None,
        "ci95_halfwidth": None,
        "power80_effect": None,
    }
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    out.update(std=sd, se=se, power80_effect=power_effect(n, sd))
    out["ci95_halfwidth"] = float(stats.t.ppf(0.975, n - 1)) * se
    if se == 0:
        out["p"] = 1.0 if out["mean"] == 0 else 0.0
        out["t"] = 0.0 if out["mean"] == 0 else math.copysign(math.inf, out["mean"])
    else:
        out["t"] = out["mean"] / se
        out["p"] = float(2 * stats.t.sf(abs(out["t"]), n - 1))
    return out


def holm(ps) -> list[float | None]:
    """Holm's step-down adjusted p-values (family-wise error), None entries kept out of the family."""
    idx = [i for i, p in enumerate(ps) if p is not None]
    m = len(idx)
    out: list[float | None] = [None] * len(ps)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: ps[i])):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def benjamini_hochberg(ps) -> list[float | None]:
    """Benjamini-Hochberg adjusted p-values (false discovery rate), None entries kept out of the family."""
    idx = [i for i, p in enumerate(ps) if p is not None]
    m = len(idx)
    out: list[float | None] = [None] * len(ps)
    running = 1.0
    order = sorted(idx, key=lambda i: ps[i])
    for rank in range(m - 1, -1, -1):
        i = order[rank]
        running = min(running, ps[i] * m / (rank + 1))
        out[i] = min(1.0, running)
    return out


def verdict(rec: dict, alpha: float = ALPHA) -> str:
    """Words for a paired comparison with ``p`` and ``p_holm``: a direction only where the Holm-adjusted p is
    below ``alpha``; "unadjusted only" where only the raw p is."""
    if rec.get("p") is None:
        return "n/a (one seed)"
    side = "A > B" if rec["mean"] > 0 else "A < B"
    if rec["mean"] == 0:
        return "no difference"
    if rec.get("p_holm") is not None and rec["p_holm"] < alpha:
        return side
    if rec["p"] < alpha:
        return f"{side} unadjusted only"
    return "inconclusive"


def adjust(records: list[dict], alpha: float = ALPHA) -> None:
    """Adds ``p_holm``, ``p_bh`` and ``verdict`` to every record (dicts with ``p`` and ``mean``), one family."""
    ps = [r.get("p") for r in records]
    for r, h, b in zip(records, holm(ps), benjamini_hochberg(ps)):
        r["p_holm"], r["p_bh"] = h, b
        r["verdict"] = verdict(r, alpha)
