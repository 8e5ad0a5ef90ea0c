"""Client and server CMA-ES of FedBPT — the only module that imports evosax.

Pure, jittable JAX functions for *one* client or *one* server, meant to be ``vmap``ped over a client
axis at the call site; nothing here calls ``jax.jit`` (the caller jits at the edge).

The public API:

* **Client** (pycma 3.4.0's client step on evosax's CMA-ES types): :func:`local_params` (pycma's
  constants for λ, d), :func:`client_init` (the start state from the broadcast server state),
  :func:`ask` (λ candidates), :func:`tell` (the update with their fitness, minimised) and
  :func:`eigen_refresh_due` (whether B, D can stay the broadcast ones for a local run).
* **Server**: :func:`server_init`, :func:`server_update` (FedBPT's aggregation as one pycma tell on the
  uploaded means, with σ' in the "reference" or the "paper" variant) and :func:`fedavg_aggregate`
  (FedAvg-BBT's weighted averages).
* Client and server states name their fields alike: ``mean``, σ is ``std``, p_σ is ``p_std``, ``p_c``,
  ``C``, ``B``, ``D`` (evosax's names), so ``state.std`` is σ of either.
* :class:`LocalCMA`: the same client step behind evosax's ``CMA_ES`` interface (``init``/``ask``/``tell``
  with keys and metrics), for code written against evosax; :func:`local_strategy` caches one per shape.

How each step follows pycma, what is left out on purpose and why: ``docs/design-notes.md``, section
"Client and server CMA-ES". The equations, with the function that implements each: ``docs/algorithm.md``.

Example (one FedBPT round with a toy fitness; vmap over clients)::

    import jax, jax.numpy as jnp
    from fedbpt_jax import strategy as st

    d, m, lam, gens = 20, 4, 5, 8
    server = st.server_init(d, 1.0, m)
    params = st.local_params(lam, d)

    def client(key, target):
        local = st.client_init(server, params)
        def gen(local, k):
            sigma = local.std
            z, local = st.ask(k, local, params)
            local = st.tell(z, jnp.sum((z - target) ** 2, -1), local, params)
            return local, sigma
        local, sigmas = jax.lax.scan(gen, local, jax.random.split(key, gens))
        mean = local.mean
        return mean, jnp.sum((mean - target) ** 2), sigmas

    keys = jax.random.split(jax.random.key(0), m)
    means, fits, sigmas = jax.vmap(client)(keys, jnp.ones((m, d)))
    server, metrics = st.server_update(server, means, fits, sigmas, variant="reference",
                                       local_population=lam)
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from evosax.algorithms import CMA_ES
from evosax.algorithms.base import update_best_solution_and_fitness
from evosax.algorithms.distribution_based import cma_es as _evosax_cma
from evosax.core.fitness_shaping import identity_fitness_shaping_fn
from flax import struct

__all__ = [
    "LocalCMA",
    "LocalCMAParams",
    "LocalCMAState",
    "ServerCMAState",
    "ask",
    "client_init",
    "eigen_refresh_due",
    "fedavg_aggregate",
    "local_params",
    "local_strategy",
    "server_init",
    "server_update",
    "tell",
]

# --------------------------------------------------------------------------------------------------
# pycma 3.4.0's default strategy constants, each written once. ``xp`` is numpy for the host (float64,
# the client's constants and the server's lazy-update gap) or jax.numpy inside the trace (the server's
# constants, which depend on the traced number of usable clients).
# --------------------------------------------------------------------------------------------------


def _chi_n(d: int) -> float:
    """E‖N(0, I_d)‖ as pycma's ``Mh.chiN``: exact for d ≤ 6, else √d (1 − 1/(4d) + 1/(26d²))."""
    if d <= 6:
        return math.sqrt(2.0) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))
    return math.sqrt(d) * (1.0 - 1.0 / (4 * d) + 1.0 / (26 * d * d))


def _num_mirrors(popsize, d: int, xp=np):
    """pycma's ``sp.lam_mirr`` for the default option ``CMA_mirrors = popsize < 6``."""
    return xp.where(popsize < 6, xp.floor(0.5 + 0.16 * xp.minimum(popsize, 2 * d + 2) + 0.29), 0)


def _c1(lam_for_c1, mueff, d: int, xp=np):
    """Rank-one learning rate c_1 = min(1, λ/6)·2/((d+1.3)² + μ_eff)."""
    return xp.minimum(1, lam_for_c1 / 6) * 2 / ((d + 1.3) ** 2 + mueff)


def _cmu(c1, mueff, d: int, xp=np):
    """Rank-μ learning rate c_μ = min(1 − c_1, 2(0.25 + μ_eff − 2 + 1/μ_eff)/((d+2)² + μ_eff))."""
    return xp.minimum(1 - c1, 2 * (0.25 + mueff - 2 + 1 / mueff) / ((d + 2) ** 2 + mueff))


def _cs(mueff, d: int):
    """CSA learning rate c_σ = (μ_eff + 2)/(d + μ_eff + 3)."""
    return (mueff + 2) / (d + mueff + 3)


def _cc(mueff, d: int):
    """Covariance-path learning rate c_c = (4 + μ_eff/d)/(d + 4 + 2μ_eff/d)."""
    return (4 + mueff / d) / (d + 4 + 2 * mueff / d)


def _damps(mueff, d: int, popsize, lam_mirr, cs, xp=np):
    """CSA damping d_σ = 0.5 + min(1, (n_mirr/(0.159 λ) − 1)²)/2 + 2 max(0, √((μ_eff−1)/(d+1)) − 1) + c_σ."""
    return (
        0.5
        + xp.minimum(1, (lam_mirr / (0.159 * popsize) - 1) ** 2) / 2
        + 2 * xp.maximum(0, xp.sqrt((mueff - 1) / (d + 1)) - 1)
        + cs
    )


def _lazy_gap(c1, cmu, d: int) -> float:
    """Tells between two eigendecompositions: pycma's ``lazy_update_gap``."""
    return float(1.0 / (c1 + cmu + 1e-23) / d / 10)


def _pycma_weights(lam: int, d: int) -> tuple[np.ndarray, float]:
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
    c1 = _c1(lam, mueff, d)
    cmu = _cmu(c1, mueff, d)
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


def _server_weights(k, m: int, dt, xp=np):
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


def _eigendecompose(C: jax.Array, D_old: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
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
        Cn, Bn, Dn = _eigendecompose(C, D)
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


def _lazy_eigen_step(C, B, D, count, last, gap):
    """pycma's ``update_now``: decompose iff ``count − last ≥ gap`` and at least one tell happened."""
    elapsed = count - last
    due = (elapsed > 0) & (elapsed.astype(C.dtype) >= gap.astype(C.dtype))
    C, B, D = _masked_eigen(due, due, C, B, D)
    return C, B, D, jnp.where(due, count, last), due


def _inv_sqrt_C(B, D, v):
    """C^{-1/2} v with C = B diag(D²) Bᵀ (pycma's ``transform_inverse``); v is [d] or [n, d]."""
    return ((v @ B) / D) @ B.T


def _mahalanobis(B, D, v):
    """‖C^{-1/2} v‖ per row (pycma's ``sm.norm``)."""
    return jnp.sqrt(jnp.sum(((v @ B) / D) ** 2, axis=-1))


# --------------------------------------------------------------------------------------------------
# The CMA-ES tell shared by client and server (pycma's order of operations)
# --------------------------------------------------------------------------------------------------


class _Consts(NamedTuple):
    mueff: jax.Array
    cs: jax.Array
    damps: jax.Array
    cc: jax.Array
    c1: jax.Array
    cmu: jax.Array
    chi_n: jax.Array


class _Update(NamedTuple):
    mean: jax.Array
    p_sigma: jax.Array
    p_c: jax.Array
    C: jax.Array
    csa_factor: jax.Array
    hsig: jax.Array


def _cma_update(
    mean, sigma, p_sigma, p_c, C, B, D, iteration, x, w, c: _Consts, *, update_covariance: bool = True
) -> _Update:
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
        wc = jnp.where(wc < 0, wc * d / (_mahalanobis(B, D, y) + 1e-9) ** 2, wc)
        C = decay * C + c.c1 * jnp.outer(p_c, p_c) + (y.T * wc) @ y
    log_factor = jnp.clip(c.cs / c.damps * (jnp.linalg.norm(p_sigma) / c.chi_n - 1), -1.0, 1.0)
    return _Update(mean + dm, p_sigma, p_c, C, jnp.exp(log_factor), hsig)


def _ranks(key: jax.Array) -> jax.Array:
    """0-based rank of each entry (stable: ties keep index order)."""
    order = jnp.argsort(key, stable=True)
    return jnp.zeros(key.shape, jnp.int32).at[order].set(jnp.arange(key.shape[0], dtype=jnp.int32))


def _where_tree(cond, a, b):
    return jax.tree_util.tree_map(lambda x, y: jnp.where(cond, x, y), a, b)


# --------------------------------------------------------------------------------------------------
# Client: pycma's client step on evosax's CMA-ES state and params
# --------------------------------------------------------------------------------------------------


@struct.dataclass
class LocalCMAState(_evosax_cma.State):
    """evosax's CMA-ES state plus the lazy-eigen counter and the selective-mirror memory.

    Inherited: ``mean`` [d], ``std`` σ (scalar), ``p_std`` p_σ [d], ``p_c`` [d], ``C`` [d, d],
    ``B`` [d, d] (columns: eigenvectors of C), ``D`` [d] (√eigenvalues, ascending),
    ``best_solution`` [d], ``best_fitness``, ``generation_counter`` (tells since ``client_init``).

    Attributes:
      last_eigen_update: int32, ``generation_counter`` at which B, D were last computed from C.
      mirror_direction: [d], m_old − x_worst of the last tell (used by the next ask).
      mirror_valid: bool, whether the next ask injects the mirror in row 0.
      mirror_in_row0: bool, whether row 0 of the population just asked is an injected mirror.
    """

    last_eigen_update: jax.Array
    mirror_direction: jax.Array
    mirror_valid: jax.Array
    mirror_in_row0: jax.Array


@struct.dataclass
class LocalCMAParams(_evosax_cma.Params):
    """evosax's CMA-ES params with pycma's values, plus the lazy-eigen gap and the mirror count.

    ``weights`` [λ] are pycma's (active) recombination weights by rank; ``c_mean`` = 1;
    ``std_min``/``std_max`` are 0/inf (pycma does not clip σ; ``std_init`` is used only by evosax's
    ``init``; FedBPT clients take σ from the server).

    Attributes:
      eigen_gap: tells between two eigendecompositions, 1/(10 d (c_1 + c_μ)).
      num_mirrors: static, 0 or 1 selectively mirrored candidates per generation.
    """

    eigen_gap: jax.Array
    num_mirrors: int = struct.field(pytree_node=False, default=0)


def _local_rates(lam: int, d: int) -> tuple[np.ndarray, float, float, float]:
    """pycma's client weights, μ_eff, c_1 and c_μ for (λ, d), on the host (float64)."""
    w, mueff = _pycma_weights(lam, d)
    c1 = _c1(lam, mueff, d)
    return w, mueff, c1, _cmu(c1, mueff, d)


def local_params(
    population_size: int, num_dims: int, *, num_mirrors: int | None = None, sigma0: float = 1.0
) -> LocalCMAParams:
    """pycma's default strategy constants for a client with population λ in dimension d.

    Args:
      population_size: λ (≥ 2).
      num_dims: d.
      num_mirrors: selectively mirrored candidates per generation; ``None`` = pycma's default
        (1 for λ < 6, else 0). Only 0 and 1 are supported (pycma's default never exceeds 1).
      sigma0: ``std_init`` for evosax's ``init`` (unused by :func:`client_init`).

    Returns:
      LocalCMAParams (a pytree of scalars and the [λ] weights; ``num_mirrors`` is static).
    """
    lam, d = int(population_size), int(num_dims)
    if d < 1:
        raise ValueError(f"num_dims must be >= 1, got {d}")
    mirrors = int(_num_mirrors(lam, d)) if num_mirrors is None else int(num_mirrors)
    if mirrors not in (0, 1) or mirrors > lam // 2:
        raise ValueError(f"num_mirrors must be 0 or 1 and at most population_size // 2, got {mirrors}")
    w, mueff, c1, cmu = _local_rates(lam, d)
    cs = _cs(mueff, d)
    return LocalCMAParams(
        std_init=jnp.asarray(sigma0, dtype=float),
        std_min=0.0,
        std_max=float("inf"),
        weights=jnp.asarray(w, dtype=float),
        mu_eff=jnp.asarray(mueff, dtype=float),
        c_mean=1.0,
        c_std=jnp.asarray(cs, dtype=float),
        d_std=jnp.asarray(_damps(mueff, d, lam, mirrors, cs), dtype=float),
        c_c=jnp.asarray(_cc(mueff, d), dtype=float),
        c_1=jnp.asarray(c1, dtype=float),
        c_mu=jnp.asarray(cmu, dtype=float),
        chi_n=jnp.asarray(_chi_n(d), dtype=float),
        eigen_gap=jnp.asarray(_lazy_gap(c1, cmu, d), dtype=float),
        num_mirrors=mirrors,
    )


def _consts_of(params: LocalCMAParams, dt) -> _Consts:
    f = lambda a: jnp.asarray(a).astype(dt)  # noqa: E731
    return _Consts(
        f(params.mu_eff),
        f(params.c_std),
        f(params.d_std),
        f(params.c_c),
        f(params.c_1),
        f(params.c_mu),
        f(params.chi_n),
    )


def client_init(
    server_state: "ServerCMAState", params: LocalCMAParams | None = None, *, refresh_eigen: bool = False
) -> LocalCMAState:
    """A client's start state from the broadcast server state (pycma ``_copy_light``).

    Copies mean, σ, C and the server's eigendecomposition (B, D); resets p_σ, p_c, the counters, the
    best-so-far and the mirror memory. ``params`` is accepted for symmetry and not needed.

    Args:
      server_state: the broadcast :class:`ServerCMAState`.
      params: unused.
      refresh_eigen: recompute B, D from C as pycma's ``_copy_light`` does (O(d³); under ``vmap``
        with the server state unbatched it is computed once, not per client). By default the
        server's (lazily updated) B, D are reused.
    """
    del params
    s = server_state
    dt = s.mean.dtype
    d = s.mean.shape[-1]
    C, B, D = s.C, s.B, s.D
    if refresh_eigen:
        C, B, D = _eigendecompose(C, D)
    zero = jnp.zeros((), jnp.int32)
    return LocalCMAState(
        mean=s.mean,
        std=s.std,
        p_std=jnp.zeros((d,), dt),
        p_c=jnp.zeros((d,), dt),
        C=C,
        B=B,
        D=D,
        best_solution=jnp.full((d,), jnp.nan, dt),
        best_fitness=jnp.asarray(jnp.inf, dt),
        generation_counter=zero,
        last_eigen_update=zero,
        mirror_direction=jnp.zeros((d,), dt),
        mirror_valid=jnp.zeros((), bool),
        mirror_in_row0=jnp.zeros((), bool),
    )


def eigen_refresh_due(population_size: int, num_dims: int, generations: int) -> bool:
    """Whether a client starting from a fresh decomposition re-decomposes C within ``generations`` asks.

    The lazy rule decomposes at an ask once ``tells since the last decomposition ≥ gap``; the asks of
    ``generations`` generations see at most ``generations − 1`` tells. False (the FedBPT default: gap
    ≈ 18.8 at d = 500, λ = 5, against I = 8) means B and D stay the broadcast ones for the whole local
    run, so :func:`ask`/:func:`tell` may run with ``frozen_eigen=True``. Host-side (static) arithmetic
    on the constants :func:`local_params` uses for ``eigen_gap``.
    """
    d = int(num_dims)
    _, _, c1, cmu = _local_rates(int(population_size), d)
    return generations - 1 >= _lazy_gap(c1, cmu, d)


def ask(
    key: jax.Array, state: LocalCMAState, params: LocalCMAParams, *, frozen_eigen: bool = False
) -> tuple[jax.Array, LocalCMAState]:
    """λ candidates ``[λ, d]`` for one client (lazy eigen update first, then mirror + samples).

    Record ``state.std`` *before* calling this to build the σ history the server needs.

    ``frozen_eigen=True`` (static) skips the lazy-update check and samples with the state's B, D as
    they are, leaving C, B, D untouched. Correct only while no decomposition is due (see
    :func:`eigen_refresh_due`); then it gives the same numbers, and under ``vmap`` with the clients'
    B, D coming from one broadcast server state they stay unbatched: every client's sampling and
    Mahalanobis norms become one matrix product over the client axis instead of K mat-vecs against
    K copies of B.
    """
    lam, d = params.weights.shape[-1], state.mean.shape[-1]
    dt = state.mean.dtype
    if frozen_eigen:  # the caller guarantees no decomposition is due: B, D stay as they are
        C, B, D, last = state.C, state.B, state.D, state.last_eigen_update
    else:
        C, B, D, last, _ = _lazy_eigen_step(
            state.C, state.B, state.D, state.generation_counter, state.last_eigen_update, params.eigen_gap
        )
    key_z, key_len = jax.random.split(key)
    z = jax.random.normal(key_z, (lam, d), dt)
    population = state.mean + state.std * ((z * D) @ B.T)  # x = m + σ B D z
    in_row0 = jnp.zeros((), bool)
    if params.num_mirrors:
        direction = state.mirror_direction
        maha = _mahalanobis(B, D, direction) / state.std
        length = jnp.linalg.norm(jax.random.normal(key_len, (d,), dt))
        long = maha > math.sqrt(d)
        factor = jnp.where(long, length / jnp.where(long, maha, 1), 1)
        in_row0 = state.mirror_valid
        population = population.at[0].set(jnp.where(in_row0, state.mean + factor * direction, population[0]))
    if not frozen_eigen:
        state = state.replace(C=C, B=B, D=D, last_eigen_update=last)
    state = state.replace(mirror_in_row0=in_row0, mirror_valid=jnp.zeros((), bool))
    return population, state


def _update(
    population, fitness, state: LocalCMAState, params: LocalCMAParams, track_covariance: bool = True
) -> LocalCMAState:
    """The distribution update of :func:`tell` (evosax's ``_tell``: no best-so-far, no counter)."""
    dt = state.mean.dtype
    finite = jnp.isfinite(fitness)
    ranks = _ranks(jnp.where(finite, fitness, jnp.inf))
    w = params.weights.astype(dt)[ranks]
    w = jnp.where(~finite & (w > 0), 0, w)  # a failed evaluation never pulls the mean
    if params.num_mirrors:
        w = w.at[0].set(jnp.where(state.mirror_in_row0 & (w[0] < 0), 0, w[0]))
    upd = _cma_update(
        state.mean,
        state.std,
        state.p_std,
        state.p_c,
        state.C,
        state.B,
        state.D,
        state.generation_counter + 1,
        population,
        w,
        _consts_of(params, dt),
        update_covariance=track_covariance,
    )
    # Only the leaves the update changes are selected (a `where` over an unchanged, unbatched C/B/D
    # would broadcast it to every client under vmap).
    ok = jnp.any(finite)
    keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
    changed = dict(
        mean=keep(upd.mean, state.mean),
        p_std=keep(upd.p_sigma, state.p_std),
        p_c=keep(upd.p_c, state.p_c),
        std=keep(jnp.clip(state.std * upd.csa_factor, params.std_min, params.std_max), state.std),
    )
    if track_covariance:
        changed["C"] = keep(upd.C, state.C)
    new = state.replace(**changed)
    if params.num_mirrors:
        worst = jnp.argmax(ranks)
        new = new.replace(
            mirror_direction=state.mean - population[worst], mirror_valid=~(state.mirror_in_row0 & (worst == 0)) & ok
        )
    return new


def tell(
    population: jax.Array,
    fitness: jax.Array,
    state: LocalCMAState,
    params: LocalCMAParams,
    *,
    track_covariance: bool = True,
) -> LocalCMAState:
    """Updates one client's state with the fitness ``[λ]`` of ``population`` ``[λ, d]`` (minimised).

    NaN/±inf fitness ranks worst and never gets a positive weight; if all are non-finite, mean, σ,
    paths and C stay as they were.

    ``track_covariance=False`` (static) leaves C as it was: for a client whose C is never read again
    (a FedBPT client uploads only its mean, fitness and σ history, and with ``frozen_eigen`` never
    decomposes C), the O(λ d²) rank-μ update per generation is dead work.
    """
    best_solution, best_fitness = update_best_solution_and_fitness(
        population, jnp.where(jnp.isfinite(fitness), fitness, jnp.nan), state.best_solution, state.best_fitness
    )
    state = state.replace(best_solution=best_solution, best_fitness=best_fitness.astype(state.best_fitness.dtype))
    state = _update(population, fitness, state, params, track_covariance)
    return state.replace(generation_counter=state.generation_counter + 1)


# --------------------------------------------------------------------------------------------------
# The same client step behind evosax's CMA_ES interface
# --------------------------------------------------------------------------------------------------


class LocalCMA(CMA_ES):
    """evosax ``CMA_ES`` with pycma's client behaviour (lazy eigen, active weights, mirrors).

    evosax's interface works as usual: ``init(key, mean, params)``, ``ask(key, state, params)`` and
    ``tell(key, population, fitness, state, params)`` returning ``(state, metrics)``, with
    :class:`LocalCMAParams`/:class:`LocalCMAState` (subclasses of evosax's CMA-ES params and state).
    Its hooks ``_ask``/``_tell`` are :func:`ask` and the update of :func:`tell`, so both interfaces run
    the same code. Fitness is minimised. ``self`` is a static argument of evosax's jitted methods:
    build one per (λ, d, mirrors), e.g. with :func:`local_strategy`.
    """

    def __init__(self, population_size: int, num_dims: int, num_mirrors: int | None = None):
        with jax.ensure_compile_time_eval():  # may first be built inside a trace: keep it concrete
            super().__init__(population_size, jnp.zeros(num_dims), fitness_shaping_fn=identity_fitness_shaping_fn)
        self.num_mirrors = int(_num_mirrors(population_size, num_dims)) if num_mirrors is None else num_mirrors

    @property
    def _default_params(self) -> LocalCMAParams:
        return local_params(self.population_size, self.num_dims, num_mirrors=self.num_mirrors)

    def _init(self, key: jax.Array, params: LocalCMAParams) -> LocalCMAState:
        d = self.num_dims
        server = server_init(d, params.std_init, 2)
        return client_init(server, params).replace(mean=jnp.full((d,), jnp.nan, server.mean.dtype))

    def _ask(self, key, state: LocalCMAState, params: LocalCMAParams):
        return ask(key, state, params)

    def _tell(self, key, population, fitness, state: LocalCMAState, params: LocalCMAParams):
        return _update(population, fitness, state, params)


@functools.lru_cache(maxsize=None)
def local_strategy(population_size: int, num_dims: int, num_mirrors: int | None = None) -> LocalCMA:
    """A cached :class:`LocalCMA` for (λ, d, mirrors) — one static object per shape."""
    return LocalCMA(int(population_size), int(num_dims), num_mirrors)


# --------------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------------


@struct.dataclass
class ServerCMAState:
    """Server-level CMA-ES state (what FedBPT broadcasts: mean, σ, C with its eigendecomposition).

    Fields are named as in the client's :class:`LocalCMAState` (evosax's names: σ is ``std``, p_σ is
    ``p_std``). Checkpoints written when they were ``sigma`` and ``p_sigma`` still restore
    (:data:`fedbpt_jax.checkpoint.RENAMED_FIELDS`).

    Attributes:
      mean: [d] global mean z_t.
      std: scalar broadcast σ_t (the clients' starting σ).
      C: [d, d] covariance.
      B: [d, d] eigenvectors of C (columns) at ``last_eigen_update``.
      D: [d] square roots of C's eigenvalues (ascending) at ``last_eigen_update``.
      p_std: [d] CSA evolution path p_σ.
      p_c: [d] covariance evolution path.
      iteration: int32, server tells done (pycma's ``countiter``).
      last_eigen_update: int32, ``iteration`` of the last eigendecomposition.
      eigen_gap: scalar constant, tells between two eigendecompositions (pycma's lazy gap for m).
    """

    mean: jax.Array
    std: jax.Array
    C: jax.Array
    B: jax.Array
    D: jax.Array
    p_std: jax.Array
    p_c: jax.Array
    iteration: jax.Array
    last_eigen_update: jax.Array
    eigen_gap: jax.Array


def server_init(num_dims: int, sigma0: Any, num_clients_per_round: int, *, dtype=None) -> ServerCMAState:
    """Server state of ``CMAEvolutionStrategy(zeros(d), σ₀, {popsize: m, CMA_mu: m})``.

    C starts as pycma's diag(exp(10⁻⁴ i / d)), i = 0..d−1 (its guard against equal eigenvalues), with
    B = I and D = √diag(C); the lazy eigendecomposition gap is pycma's for popsize m.

    Args:
      num_dims: d.
      sigma0: initial σ (may be a traced scalar).
      num_clients_per_round: m, the server population (clients per round).
      dtype: float dtype of the state (default: JAX's default float).
    """
    d, m = int(num_dims), int(num_clients_per_round)
    if d < 1 or m < 1:
        raise ValueError(f"num_dims and num_clients_per_round must be >= 1, got {d}, {m}")
    dt = jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)
    _, mueff = _server_weights(m, m, np.float64)
    sp_c1 = _c1(m, mueff, d)  # pycma's ``sp.c1``: λ = m
    gap = _lazy_gap(sp_c1, _cmu(sp_c1, mueff, d), d)
    var = np.exp((1e-4 / d) * np.arange(d))
    return ServerCMAState(
        mean=jnp.zeros((d,), dt),
        std=jnp.asarray(sigma0).astype(dt),
        C=jnp.diag(jnp.asarray(var, dt)),
        B=jnp.eye(d, dtype=dt),
        D=jnp.asarray(np.sqrt(var), dt),
        p_std=jnp.zeros((d,), dt),
        p_c=jnp.zeros((d,), dt),
        iteration=jnp.zeros((), jnp.int32),
        last_eigen_update=jnp.zeros((), jnp.int32),
        eigen_gap=jnp.asarray(gap, dt),
    )


def _server_consts(k: jax.Array, m: int, d: int, dt) -> tuple[jax.Array, _Consts]:
    """Weights [m] (zero beyond rank k) and pycma's server constants for popsize = CMA_mu = k."""
    kf = jnp.maximum(k, 1).astype(dt)
    w, mueff = _server_weights(k, m, dt, jnp)
    cs = _cs(mueff, d)
    damps = _damps(mueff, d, kf, _num_mirrors(kf, d, jnp), cs, jnp)
    c1 = _c1(2 * kf, mueff, d, jnp)  # the sampler's c_1: λ = 2k weights
    cmu = _cmu(c1, mueff, d, jnp)
    return w, _Consts(mueff, cs, damps, _cc(mueff, d), c1, cmu, jnp.asarray(_chi_n(d), dt))


def _usable(mask, fitness, *arrays):
    ok = mask & jnp.isfinite(fitness)
    for a in arrays:
        ok = ok & jnp.all(jnp.isfinite(a.reshape(a.shape[0], -1)), axis=-1)
    return ok


def server_update(
    state: ServerCMAState,
    client_means: jax.Array,
    client_fitness: jax.Array,
    client_sigmas: jax.Array,
    mask: jax.Array | None = None,
    *,
    variant: str = "reference",
    local_population: int = 5,
    local_mu: int | None = None,
    ranking_key: jax.Array | None = None,
) -> tuple[ServerCMAState, dict]:
    """One FedBPT server aggregation: σ', a server CMA-ES tell on the client means, broadcast σ.

    Args:
      state: server state of the round (what was broadcast).
      client_means: [m, d] uploaded final local means.
      client_fitness: [m] their fitness (minimised).
      client_sigmas: [m, I] each client's σ before each local ask.
      mask: [m] bool, clients that reported (None: all). Unusable clients (masked, or with a
        non-finite fitness, mean or σ) get weight 0 and are left out of σ'.
      variant: "reference" (the NVFlare code) or "paper" (eq. 6); see docs/algorithm.md, "Server step".
      local_population: λ of the clients (the "paper" σ' divides by it).
      local_mu: μ_loc for the "reference" σ' (default ⌊λ/2⌋, pycma's μ for λ).
      ranking_key: None (the reference: the usable clients ranked by fitness) or a key from which the
        usable clients' ranking is drawn uniformly at random instead (a mechanism study: whatever the
        fitness ranking does to the mean, σ' and the recombination weights stay the same, only the order
        in which the weights are given out loses its meaning); ``best_fitness`` stays the true minimum.

    Returns:
      (new_state, metrics) with scalar metrics: ``num_active`` (usable clients), ``num_nonfinite``
      (reported clients dropped for non-finite values), ``sigma_prime``, ``csa_factor``
      (σ_{t+1}/σ_t), ``hsig``, ``eigen_updated``, ``num_repaired`` (means clipped in Mahalanobis
      length), ``best_fitness`` (min over usable clients, inf if none); and per client ``[m]``:
      ``client_rank`` (0 = best fitness among the usable clients, −1 unusable), ``client_weight`` (its
      recombination weight in the new mean; 0 if unusable), ``client_repaired`` (its mean was clipped
      by the Mahalanobis repair) and ``client_usable``.
    """
    if variant not in ("reference", "paper"):
        raise ValueError(f"variant must be 'reference' or 'paper', got {variant!r}")
    m, d = client_means.shape
    dt = state.mean.dtype
    lam = int(local_population)
    mu_loc = lam // 2 if local_mu is None else int(local_mu)
    mask = jnp.ones((m,), bool) if mask is None else jnp.asarray(mask).astype(bool)
    fitness = client_fitness.astype(dt)
    sigmas = client_sigmas.astype(dt).reshape(m, -1)
    usable = _usable(mask, fitness, client_means, sigmas) & jnp.all(sigmas > 0, axis=-1)
    k = jnp.sum(usable.astype(jnp.int32))
    kf = jnp.maximum(k, 1).astype(dt)
    order = fitness if ranking_key is None else jax.random.uniform(ranking_key, (m,), dt)
    ranks = _ranks(jnp.where(usable, order, jnp.inf))  # usable first, by fitness (or at random)

    # σ' (reference code, or eq. 6 of the paper).
    sq = jnp.where(usable, jnp.sum(sigmas**2, axis=-1), 0)
    if variant == "reference":
        sigma_prime = jnp.sqrt(jnp.sum(sq) / (kf * mu_loc))
    else:
        best_half = usable & (ranks < (k + 1) // 2)
        sigma_prime = 2 * jnp.sqrt(jnp.sum(jnp.where(best_half, sq, 0)) / (kf * lam))

    # pycma's ask (its samples are discarded): only the lazy eigendecomposition matters.
    C, B, D, last, eigen_updated = _lazy_eigen_step(
        state.C, state.B, state.D, state.iteration, state.last_eigen_update, state.eigen_gap
    )
    # tell: repair the injected means, then the CMA-ES update with step length σ'.
    mold = state.mean
    x = jnp.where(usable[:, None], client_means.astype(dt), mold)
    dx = x - mold
    upper = math.sqrt(d) + 2 * d / (d + 2)
    fac = _mahalanobis(B, D, dx) / sigma_prime / upper
    repaired = usable & (fac > 1)
    x = jnp.where(repaired[:, None], dx / jnp.where(repaired, fac, 1)[:, None] + mold, x)
    w_rank, consts = _server_consts(k, m, d, dt)
    w = jnp.where(usable, w_rank[jnp.minimum(ranks, m - 1)], 0)
    upd = _cma_update(mold, sigma_prime, state.p_std, state.p_c, C, B, D, state.iteration + 1, x, w, consts)
    new = state.replace(
        mean=upd.mean,
        std=state.std * upd.csa_factor,
        C=upd.C,
        B=B,
        D=D,
        p_std=upd.p_sigma,
        p_c=upd.p_c,
        iteration=state.iteration + 1,
        last_eigen_update=last,
    )
    ok = k > 0
    new = _where_tree(ok, new, state)
    metrics = {
        "num_active": k,
        "num_nonfinite": jnp.sum((mask & ~usable).astype(jnp.int32)),
        "sigma_prime": sigma_prime,
        "csa_factor": jnp.where(ok, upd.csa_factor, 1).astype(dt),
        "hsig": upd.hsig & ok,
        "eigen_updated": eigen_updated & ok,
        "num_repaired": jnp.sum(repaired.astype(jnp.int32)),
        "best_fitness": jnp.min(jnp.where(usable, fitness, jnp.inf)),
        "client_rank": jnp.where(usable, ranks, -1).astype(jnp.int32),
        "client_weight": jnp.where(ok, w, 0).astype(dt),
        "client_repaired": repaired,
        "client_usable": usable,
    }
    return new, metrics


def fedavg_aggregate(
    state: ServerCMAState, client_states: Any, weights: jax.Array, mask: jax.Array | None = None
) -> tuple[ServerCMAState, dict]:
    """FedAvg-BBT: example-count-weighted averages of the clients' final mean, σ and C.

    Args:
      state: server state (mean, σ, C are replaced; paths are kept as they are unused by FedAvg).
      client_states: batched client states with ``mean`` [m, d], ``std`` [m] and ``C`` [m, d, d]
        (e.g. a vmapped :class:`LocalCMAState`).
      weights: [m] client example counts (zero for inactive clients is fine).
      mask: [m] bool, clients that reported (None: all). Clients with non-finite values are dropped.

    Returns:
      (new_state, metrics). B, D are recomputed from the averaged C (one ``eigh`` per round on the
      server, not per client). With zero total weight the state is unchanged. Per client ``[m]``:
      ``client_weight`` (normalised weight in the average) and ``client_usable``.
    """
    means, stds, covs = client_states.mean, client_states.std, client_states.C
    m = means.shape[0]
    dt = state.mean.dtype
    mask = jnp.ones((m,), bool) if mask is None else jnp.asarray(mask).astype(bool)
    weights = weights.astype(dt)
    usable = _usable(mask & (weights > 0), weights, means, stds.reshape(m, 1), covs)
    w = jnp.where(usable, weights, 0)
    total = jnp.sum(w)
    ok = total > 0
    wn = w / jnp.where(ok, total, 1)
    clean = lambda a: jnp.where(usable.reshape((m,) + (1,) * (a.ndim - 1)), a.astype(dt), 0)  # noqa: E731
    C = jnp.einsum("k,kij->ij", wn, clean(covs))
    C, B, D, last, _ = _lazy_eigen_step(C, state.B, state.D, state.iteration + 1, state.iteration, jnp.zeros((), dt))
    new = state.replace(
        mean=wn @ clean(means),
        std=wn @ clean(stds),
        C=C,
        B=B,
        D=D,
        iteration=state.iteration + 1,
        last_eigen_update=last,
    )
    new = _where_tree(ok, new, state)
    metrics = {
        "num_active": jnp.sum(usable.astype(jnp.int32)),
        "num_nonfinite": jnp.sum((mask & (weights > 0) & ~usable).astype(jnp.int32)),
        "weight_total": total,
        "client_weight": jnp.where(ok, wn, 0),
        "client_usable": usable,
    }
    return new, metrics
