"""The client CMA-ES of FedBPT — the only module that imports evosax.

Pure, jittable JAX functions for *one* client or *one* server, meant to be ``vmap``ped over a client
axis at the call site; nothing here calls ``jax.jit`` (the caller jits at the edge).

The public API:

* **Client** (pycma 3.4.0's client step on evosax's CMA-ES types): :func:`local_params` (pycma's
  constants for λ, d), :func:`client_init` (the start state from the broadcast server state),
  :func:`ask` (λ candidates), :func:`tell` (the update with their fitness, minimised) and
  :func:`eigen_refresh_due` (whether B, D can stay the broadcast ones for a local run).
* **Server**: in :mod:`fedbpt_jax.aggregation` (``server_init``, ``server_update``: FedBPT's aggregation as
  one pycma tell on the uploaded means; ``fedavg_aggregate``: FedAvg-BBT's weighted averages). pycma's
  constants, the lazy eigendecomposition and the tell both sides share are :mod:`fedbpt_jax.cma`.
* Client and server states name their fields alike: ``mean``, σ is ``std``, p_σ is ``p_std``, ``p_c``,
  ``C``, ``B``, ``D`` (evosax's names), so ``state.std`` is σ of either.
* :class:`LocalCMA`: the same client step behind evosax's ``CMA_ES`` interface (``init``/``ask``/``tell``
  with keys and metrics), for code written against evosax; :func:`local_strategy` caches one per shape.

How each step follows pycma, what is left out on purpose and why: ``docs/design-notes.md``, section
"Client and server CMA-ES". The equations, with the function that implements each: ``docs/algorithm.md``.

Example (one FedBPT round with a toy fitness; vmap over clients)::

    import jax, jax.numpy as jnp
    from fedbpt_jax import aggregation as agg, strategy as st

    d, m, lam, gens = 20, 4, 5, 8
    server = agg.server_init(d, 1.0, m)
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
    server, metrics = agg.server_update(server, means, fits, sigmas, variant="reference",
                                        local_population=lam)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from evosax.algorithms import CMA_ES
from evosax.algorithms.base import update_best_solution_and_fitness
from evosax.algorithms.distribution_based import cma_es as _evosax_cma
from evosax.core.fitness_shaping import identity_fitness_shaping_fn
from flax import struct

from . import aggregation, cma

# The server side lives in :mod:`fedbpt_jax.aggregation`; its names stay importable as ``strategy.*`` (the
# public API before the split, still used by fedbpt_jax.bbt).
from .aggregation import ServerCMAState, fedavg_aggregate, server_init, server_update

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
    w, mueff = cma.pycma_weights(lam, d)
    c1 = cma.rank_one_rate(lam, mueff, d)
    return w, mueff, c1, cma.rank_mu_rate(c1, mueff, d)


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
    mirrors = int(cma.num_mirrors(lam, d)) if num_mirrors is None else int(num_mirrors)
    if mirrors not in (0, 1) or mirrors > lam // 2:
        raise ValueError(f"num_mirrors must be 0 or 1 and at most population_size // 2, got {mirrors}")
    w, mueff, c1, cmu = _local_rates(lam, d)
    cs = cma.sigma_path_rate(mueff, d)
    return LocalCMAParams(
        std_init=jnp.asarray(sigma0, dtype=float),
        std_min=0.0,
        std_max=float("inf"),
        weights=jnp.asarray(w, dtype=float),
        mu_eff=jnp.asarray(mueff, dtype=float),
        c_mean=1.0,
        c_std=jnp.asarray(cs, dtype=float),
        d_std=jnp.asarray(cma.sigma_damping(mueff, d, lam, mirrors, cs), dtype=float),
        c_c=jnp.asarray(cma.cov_path_rate(mueff, d), dtype=float),
        c_1=jnp.asarray(c1, dtype=float),
        c_mu=jnp.asarray(cmu, dtype=float),
        chi_n=jnp.asarray(cma.chi_n(d), dtype=float),
        eigen_gap=jnp.asarray(cma.lazy_gap(c1, cmu, d), dtype=float),
        num_mirrors=mirrors,
    )


def _consts_of(params: LocalCMAParams, dt) -> cma.Consts:
    f = lambda a: jnp.asarray(a).astype(dt)  # noqa: E731
    return cma.Consts(
        f(params.mu_eff),
        f(params.c_std),
        f(params.d_std),
        f(params.c_c),
        f(params.c_1),
        f(params.c_mu),
        f(params.chi_n),
    )


def client_init(
    server_state: "aggregation.ServerCMAState", params: LocalCMAParams | None = None, *, refresh_eigen: bool = False
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
        C, B, D = cma.eigendecompose(C, D)
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
    return generations - 1 >= cma.lazy_gap(c1, cmu, d)


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
        C, B, D, last, _ = cma.lazy_eigen_step(
            state.C, state.B, state.D, state.generation_counter, state.last_eigen_update, params.eigen_gap
        )
    key_z, key_len = jax.random.split(key)
    z = jax.random.normal(key_z, (lam, d), dt)
    population = state.mean + state.std * ((z * D) @ B.T)  # x = m + σ B D z
    in_row0 = jnp.zeros((), bool)
    if params.num_mirrors:
        direction = state.mirror_direction
        maha = cma.mahalanobis(B, D, direction) / state.std
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
    ranks = cma.ranks(jnp.where(finite, fitness, jnp.inf))
    w = params.weights.astype(dt)[ranks]
    w = jnp.where(~finite & (w > 0), 0, w)  # a failed evaluation never pulls the mean
    if params.num_mirrors:
        w = w.at[0].set(jnp.where(state.mirror_in_row0 & (w[0] < 0), 0, w[0]))
    upd = cma.update(
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
        self.num_mirrors = int(cma.num_mirrors(population_size, num_dims)) if num_mirrors is None else num_mirrors

    @property
    def _default_params(self) -> LocalCMAParams:
        return local_params(self.population_size, self.num_dims, num_mirrors=self.num_mirrors)

    def _init(self, key: jax.Array, params: LocalCMAParams) -> LocalCMAState:
        d = self.num_dims
        server = aggregation.server_init(d, params.std_init, 2)
        return client_init(server, params).replace(mean=jnp.full((d,), jnp.nan, server.mean.dtype))

    def _ask(self, key, state: LocalCMAState, params: LocalCMAParams):
        return ask(key, state, params)

    def _tell(self, key, population, fitness, state: LocalCMAState, params: LocalCMAParams):
        return _update(population, fitness, state, params)


@functools.lru_cache(maxsize=None)
def local_strategy(population_size: int, num_dims: int, num_mirrors: int | None = None) -> LocalCMA:
    """A cached :class:`LocalCMA` for (λ, d, mirrors) — one static object per shape."""
    return LocalCMA(int(population_size), int(num_dims), num_mirrors)
