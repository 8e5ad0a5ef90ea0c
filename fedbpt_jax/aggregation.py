"""The server side of FedBPT and FedAvg-BBT: the server CMA-ES state, FedBPT's aggregation (one pycma tell
on the uploaded client means, with σ' in the "reference" or the "paper" variant) and FedAvg-BBT's weighted
averages of the client states.

Pure, jittable JAX functions; nothing here calls ``jax.jit``. The client step is :mod:`fedbpt_jax.strategy`,
the CMA-ES pieces both share :mod:`fedbpt_jax.cma`. Equations: ``docs/algorithm.md``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import cma

__all__ = ["ServerCMAState", "fedavg_aggregate", "server_init", "server_update"]


# --------------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------------


@struct.dataclass
class ServerCMAState:
    """Server-level CMA-ES state (what FedBPT broadcasts: mean, σ, C with its eigendecomposition).

    Fields are named as in the client's :class:`fedbpt_jax.strategy.LocalCMAState` (evosax's names: σ is ``std``, p_σ is
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
    _, mueff = cma.server_weights(m, m, np.float64)
    sp_c1 = cma.rank_one_rate(m, mueff, d)  # pycma's ``sp.c1``: λ = m
    gap = cma.lazy_gap(sp_c1, cma.rank_mu_rate(sp_c1, mueff, d), d)
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


def _server_consts(k: jax.Array, m: int, d: int, dt) -> tuple[jax.Array, cma.Consts]:
    """Weights [m] (zero beyond rank k) and pycma's server constants for popsize = CMA_mu = k."""
    kf = jnp.maximum(k, 1).astype(dt)
    w, mueff = cma.server_weights(k, m, dt, jnp)
    cs = cma.sigma_path_rate(mueff, d)
    damps = cma.sigma_damping(mueff, d, kf, cma.num_mirrors(kf, d, jnp), cs, jnp)
    c1 = cma.rank_one_rate(2 * kf, mueff, d, jnp)  # the sampler's c_1: λ = 2k weights
    cmu = cma.rank_mu_rate(c1, mueff, d, jnp)
    return w, cma.Consts(mueff, cs, damps, cma.cov_path_rate(mueff, d), c1, cmu, jnp.asarray(cma.chi_n(d), dt))


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
    ranks = cma.ranks(jnp.where(usable, order, jnp.inf))  # usable first, by fitness (or at random)

    # σ' (reference code, or eq. 6 of the paper).
    sq = jnp.where(usable, jnp.sum(sigmas**2, axis=-1), 0)
    if variant == "reference":
        sigma_prime = jnp.sqrt(jnp.sum(sq) / (kf * mu_loc))
    else:
        best_half = usable & (ranks < (k + 1) // 2)
        sigma_prime = 2 * jnp.sqrt(jnp.sum(jnp.where(best_half, sq, 0)) / (kf * lam))

    # pycma's ask (its samples are discarded): only the lazy eigendecomposition matters.
    C, B, D, last, eigen_updated = cma.lazy_eigen_step(
        state.C, state.B, state.D, state.iteration, state.last_eigen_update, state.eigen_gap
    )
    # tell: repair the injected means, then the CMA-ES update with step length σ'.
    mold = state.mean
    x = jnp.where(usable[:, None], client_means.astype(dt), mold)
    dx = x - mold
    upper = math.sqrt(d) + 2 * d / (d + 2)
    fac = cma.mahalanobis(B, D, dx) / sigma_prime / upper
    repaired = usable & (fac > 1)
    x = jnp.where(repaired[:, None], dx / jnp.where(repaired, fac, 1)[:, None] + mold, x)
    w_rank, consts = _server_consts(k, m, d, dt)
    w = jnp.where(usable, w_rank[jnp.minimum(ranks, m - 1)], 0)
    upd = cma.update(mold, sigma_prime, state.p_std, state.p_c, C, B, D, state.iteration + 1, x, w, consts)
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
    new = cma.where_tree(ok, new, state)
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
        (e.g. a vmapped :class:`fedbpt_jax.strategy.LocalCMAState`).
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
    C, B, D, last, _ = cma.lazy_eigen_step(C, state.B, state.D, state.iteration + 1, state.iteration, jnp.zeros((), dt))
    new = state.replace(
        mean=wn @ clean(means),
        std=wn @ clean(stds),
        C=C,
        B=B,
        D=D,
        iteration=state.iteration + 1,
        last_eigen_update=last,
    )
    new = cma.where_tree(ok, new, state)
    metrics = {
        "num_active": jnp.sum(usable.astype(jnp.int32)),
        "num_nonfinite": jnp.sum((mask & (weights > 0) & ~usable).astype(jnp.int32)),
        "weight_total": total,
        "client_weight": jnp.where(ok, wn, 0),
        "client_usable": usable,
    }
    return new, metrics
