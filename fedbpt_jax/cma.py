"""pycma 3.4.0's CMA-ES pieces that FedBPT's client (:mod:`fedbpt_jax.strategy`) and server
(:mod:`fedbpt_jax.aggregation`) share: the default strategy constants, the lazy eigendecomposition (a
``lax.cond`` that stays a cond under ``vmap``) and the tell in pycma's order of operations.

Pure, jittable JAX (and, for host-side constants, numpy) functions; nothing here calls ``jax.jit``.
How each step follows pycma: ``docs/design-notes.md``, section "Client and server CMA-ES".
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# --------------------------------------------------------------------------------------------------
# pycma 3.4.0's default strategy constants, each written once. ``xp`` is numpy for the host (float64,
# the client's constants and the server's lazy-update gap) or jax.numpy inside the trace (the server's
# constants, which depend on the traced number of usable clients).
# --------------------------------------------------------------------------------------------------


def chi_n(d: int) -> float:
    """E‖N(0, I_d)‖ as pycma's ``Mh.chiN``: exact for d ≤ 6, else √d (1 − 1/(4d) + 1/(26d²))."""
    if d <= 6:
        return math.sqrt(2.0) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))
    return math.sqrt(d) * (1.0 - 1.0 / (4 * d) + 1.0 / (26 * d * d))


def num_mirrors(popsize, d: int, xp=np):
    """pycma's ``sp.lam_mirr`` for the default option ``CMA_mirrors = popsize < 6``."""
    return xp.where(popsize < 6, xp.floor(0.5 + 0.16 * xp.minimum(popsize, 2 * d + 2) + 0.29), 0)


def rank_one_rate(lam_for_c1, mueff, d: int, xp=np):
    """Rank-one learning rate c_1 = min(1, λ/6)·2/((d+1.3)² + μ_eff)."""
    return xp.minimum(1, lam_for_c1 / 6) * 2 / ((d + 1.3) ** 2 + mueff)


def rank_mu_rate(c1, mueff, d: int, xp=np):
    """Rank-μ learning rate c_μ = min(1 − c_1, 2(0.25 + μ_eff − 2 + 1/μ_eff)/((d+2)² + μ_eff))."""
    return xp.minimum(1 - c1, 2 * (0.25 + mueff - 2 + 1 / mueff) / ((d + 2) ** 2 + mueff))


def sigma_path_rate(mueff, d: int):
    """CSA learning rate c_σ = (μ_eff + 2)/(d + μ_eff + 3)."""
    return (mueff + 2) / (d + mueff + 3)


def cov_path_rate(mueff, d: int):
    """Covariance-path learning rate c_c = (4 + μ_eff/d)/(d + 4 + 2μ_eff/d)."""
    return (4 + mueff / d) / (d + 4 + 2 * mueff / d)


def sigma_damping(mueff, d: int, popsize, lam_mirr, cs, xp=np):
    """CSA damping d_σ = 0.5 + min(1, (n_mirr/(0.159 λ) − 1)²)/2 + 2 max(0, √((μ_eff−1)/(d+1)) − 1) + c_σ."""
    return (
        0.5
        + xp.minimum(1, (lam_mirr / (0.159 * popsize) - 1) ** 2) / 2
        + 2 * xp.maximum(0, xp.sqrt((mueff - 1) / (d + 1)) - 1)
        + cs
    )


def lazy_gap(c1, cmu, d: int) -> float:
    """Tells between two eigendecompositions: pycma's ``lazy_update_gap``."""
    return float(1.0 / (c1 + cmu + 1e-23) / d / 10)


def pycma_weights(lam: int, d: int) -> tuple[np.ndarray, float]:
    """pycma's default ``RecombinationWeights(lam)`` after ``finalize_negative_weights`` (host, float64).

    Returns (weights [lam], mueff). Positive weights sum to 1; the negative ones are scaled so that
    their sum is −(1 + c_1/c_μ), then limited to −(1 − c_1 − c_μ)/(c_μ d) and to
    −(1 + 2 μ_eff⁻/(μ_eff + 2)), in that order.
    """
    if lam < 2:
        raise ValueError(f"population_size must be >= 2 (pycma needs two weights), got {lam}")
    i = np.arange(1, lam + 1, dtype=np.float64)
    w = np.log((lam + 1) / 2.0) - np.log(i)
    mu = int(np.sum(w > 0))
    w = w / np.sum(w[:mu])
    mueff = 1.0 / np.sum(w[:mu] ** 2)
    neg_sum = np.sum(w[mu:])
    if neg_sum != 0:
        w[mu:] = w[mu:] / -neg_sum
    c1 = rank_one_rate(lam, mueff, d)
    cmu = rank_mu_rate(c1, mueff, d)
    if w[-1] < 0 and cmu > 0:
        neg = w[mu:]

        def scale_to(value):
            s = np.sum(neg)
            return neg * abs(value / s)

        def limit(neg, value):
            s = np.sum(neg)
            if s < -abs(value):
                neg = neg * abs(value / s)
            return neg

        neg = scale_to(1.0 + c1 / cmu)
        neg = limit(neg, (1.0 - c1 - cmu) / cmu / d)
        mueff_minus = np.sum(neg) ** 2 / np.sum(neg**2)
        neg = limit(neg, 1.0 + 2.0 * mueff_minus / (mueff + 2.0))
        w[mu:] = neg
    return w, float(mueff)


def server_weights(k, m: int, dt, xp=np):
    """The server's recombination weights ``[m]`` (zero beyond rank k) and their μ_eff.

    The positive half of the log-rank weights of a population of 2k, pycma's weights for
    ``popsize = CMA_mu = k``: ``ln(k + 1/2) − ln i`` for i ≤ k, normalised to sum 1.
    """
    kf = xp.maximum(k, 1).astype(dt)
    i = xp.arange(1, m + 1, dtype=dt)
    raw = xp.where(i <= kf, xp.log(kf + 0.5) - xp.log(i), 0)
    w = raw / xp.sum(raw)
    return w, 1 / xp.sum(w**2)


# --------------------------------------------------------------------------------------------------
# Lazy eigendecomposition (lax.cond that stays a cond under vmap)
# --------------------------------------------------------------------------------------------------


def eigendecompose(C: jax.Array, D_old: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """pycma's ``GaussFullSampler._decompose_C`` on ``[..., d, d]``: returns (C symmetrised, B, D)."""
    d = C.shape[-1]
    C = 0.5 * (C + jnp.swapaxes(C, -1, -2))
    evals, B = jnp.linalg.eigh(C)  # ascending, as pycma's _sortBD leaves them
    bad = evals[..., 0] <= 0

    def retry(args):
        C, evals, B = args
        load = jnp.min(D_old, axis=-1) ** 2
        C2 = jnp.where(bad[..., None, None], C + load[..., None, None] * jnp.eye(d, dtype=C.dtype), C)
        ev2, B2 = jnp.linalg.eigh(C2)
        return C2, jnp.where(bad[..., None], ev2, evals), jnp.where(bad[..., None, None], B2, B)

    C, evals, B = jax.lax.cond(jnp.any(bad), retry, lambda a: a, (C, evals, B))
    tiny = jnp.finfo(C.dtype).tiny
    return C, B, jnp.sqrt(jnp.maximum(evals, tiny))


@jax.custom_batching.custom_vmap
def _masked_eigen(flag, due, C, B, D):
    """If ``flag``: (C, B, D) ← eigendecomposition where ``due`` (``due`` has C's leading shape)."""

    def run(C, B, D):
        Cn, Bn, Dn = eigendecompose(C, D)
        return (
            jnp.where(due[..., None, None], Cn, C),
            jnp.where(due[..., None, None], Bn, B),
            jnp.where(due[..., None], Dn, D),
        )

    return jax.lax.cond(flag, run, lambda C, B, D: (C, B, D), C, B, D)


@_masked_eigen.def_vmap
def _masked_eigen_vmap(axis_size, in_batched, flag, due, C, B, D):
    # Fold the vmapped axis into the arrays and reduce the predicate with `any`, so the cond keeps a
    # scalar predicate (a batched one would turn into a select that always runs eigh). Recursing
    # handles nested vmaps one level at a time.
    def bcast(x, batched):
        return x if batched else jnp.broadcast_to(x, (axis_size,) + jnp.shape(x))

    flag, due, C, B, D = (bcast(x, b) for x, b in zip((flag, due, C, B, D), in_batched))
    due = due & flag.reshape(flag.shape + (1,) * (due.ndim - 1))
    return _masked_eigen(jnp.any(flag), due, C, B, D), (True, True, True)


def lazy_eigen_step(C, B, D, count, last, gap):
    """pycma's ``update_now``: decompose iff ``count − last ≥ gap`` and at least one tell happened."""
    elapsed = count - last
    due = (elapsed > 0) & (elapsed.astype(C.dtype) >= gap.astype(C.dtype))
    C, B, D = _masked_eigen(due, due, C, B, D)
    return C, B, D, jnp.where(due, count, last), due


def _inv_sqrt_C(B, D, v):
    """C^{-1/2} v with C = B diag(D²) Bᵀ (pycma's ``transform_inverse``); v is [d] or [n, d]."""
    return ((v @ B) / D) @ B.T


def mahalanobis(B, D, v):
    """‖C^{-1/2} v‖ per row (pycma's ``sm.norm``)."""
    return jnp.sqrt(jnp.sum(((v @ B) / D) ** 2, axis=-1))


# --------------------------------------------------------------------------------------------------
# The CMA-ES tell shared by client and server (pycma's order of operations)
# --------------------------------------------------------------------------------------------------


class Consts(NamedTuple):
    mueff: jax.Array
    cs: jax.Array
    damps: jax.Array
    cc: jax.Array
    c1: jax.Array
    cmu: jax.Array
    chi_n: jax.Array


class Update(NamedTuple):
    mean: jax.Array
    p_sigma: jax.Array
    p_c: jax.Array
    C: jax.Array
    csa_factor: jax.Array
    hsig: jax.Array


def update(mean, sigma, p_sigma, p_c, C, B, D, iteration, x, w, c: Consts, *, update_covariance: bool = True) -> Update:
    """One CMA-ES tell, as pycma 3.4.0 does it (c_mean = 1, sigma_vec = 1).

    ``x`` [n, d] are the (repaired) solutions, ``w`` [n] their recombination weights in row order
    (positive for the mean, negative ones only in C); ``iteration`` counts tells including this one.
    ``update_covariance=False`` (static) returns C unchanged (for callers that never read it again).
    """
    dt = mean.dtype
    d = mean.shape[-1]
    y = (x - mean) / sigma  # ~ N(0, C)
    dm = sigma * (jnp.maximum(w, 0) @ y)  # m_new − m_old
    # CSA path with the B, D used for sampling (pycma CMAAdaptSigmaCSA._update_ps).
    z = _inv_sqrt_C(B, D, dm) * (jnp.sqrt(c.mueff) / sigma)
    p_sigma = (1 - c.cs) * p_sigma + jnp.sqrt(c.cs * (2 - c.cs)) * z
    t = iteration.astype(dt)
    hsig = jnp.sum(p_sigma**2) / (1 - (1 - c.cs) ** (2 * t)) / d - 1 < 1 + 4.0 / (d + 1)
    h = hsig.astype(dt)
    c1a = c.c1 * (1 - (1 - h) * c.cc * (2 - c.cc))  # variance lost to hsig = 0
    p_c = (1 - c.cc) * p_c + h * jnp.sqrt(c.cc * (2 - c.cc) * c.mueff) / sigma * dm
    # Rank-one + rank-μ (active): decay with the unscaled weights, then rescale negative ones.
    if update_covariance:
        wc = c.cmu * w
        decay = 1 - c1a - jnp.sum(wc)
        wc = jnp.where(wc < 0, wc * d / (mahalanobis(B, D, y) + 1e-9) ** 2, wc)
        C = decay * C + c.c1 * jnp.outer(p_c, p_c) + (y.T * wc) @ y
    log_factor = jnp.clip(c.cs / c.damps * (jnp.linalg.norm(p_sigma) / c.chi_n - 1), -1.0, 1.0)
    return Update(mean + dm, p_sigma, p_c, C, jnp.exp(log_factor), hsig)


def ranks(key: jax.Array) -> jax.Array:
    """0-based rank of each entry (stable: ties keep index order)."""
    order = jnp.argsort(key, stable=True)
    return jnp.zeros(key.shape, jnp.int32).at[order].set(jnp.arange(key.shape[0], dtype=jnp.int32))


def where_tree(cond, a, b):
    return jax.tree_util.tree_map(lambda x, y: jnp.where(cond, x, y), a, b)
