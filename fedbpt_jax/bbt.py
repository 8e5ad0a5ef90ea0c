"""Centralized Black-Box Tuning (BBT): one CMA-ES, the whole population scored in one forward pass.

BBT (Sun et al., 2022) is FedBPT with one client: CMA-ES searches ``z ∈ R^d``, each candidate's
fitness is the loss of the frozen model's label-word logits with prompt ``A z``. Here a generation is
one batched forward pass over population × examples, and generations run inside ``lax.scan``.

The CMA-ES is the one :func:`fedbpt_jax.federated.centralized_bbt` and FedBPT's clients use:
:mod:`fedbpt_jax.strategy`'s pycma-3.4-faithful client (pycma's constants, active weights, lazy
eigendecomposition, selective mirroring), started at z = 0 with σ₀ and pycma's initial C. There is one
BBT in the package: :func:`step` with key ``k`` is exactly a generation of ``centralized_bbt`` with
that key, and this module adds the host-side driver (:func:`tune`: progress bar, dev-set selection).

Functional API (keys first, then state, then read-only inputs; every step returns
``(state, metrics)``)::

    config = BBTConfig(population_size=10)
    scorer = objective.make_scorer(lm, config.layout, n_prompt_tokens=config.n_prompt_tokens)
    projection = prompt.make_projection(key_proj, lm.input_embeddings(), intrinsic_dim=config.intrinsic_dim,
                                        n_prompt_tokens=config.n_prompt_tokens, alpha=config.projection_alpha,
                                        sigma=config.sigma0)
    state, es_params = init(key_init, config)
    ctx = scorer.prepare(lm.params, train)                     # once per data set
    state, metrics = step(key, state, es_params, lm.params, projection, ctx, train, spec,
                          config=config, scorer=scorer, hidden_size=lm.hidden_size)
    state, history = run_generations(key, state, es_params, lm.params, projection, ctx, train, spec,
                                     config=config, scorer=scorer, hidden_size=lm.hidden_size,
                                     num_generations=50)        # lax.scan; jit it at the call site

    result = tune(key, lm, train, spec, config, dev=dev)       # all of the above, with dev selection
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from . import objective, prompt, strategy
from .objective import Scorer
from .types import ScoringSpec, TokenBatch

#: σ₀ range accepted by :class:`BBTConfig` (the same as the federated ``HParams``).
SIGMA0_RANGE = (1e-6, 1e3)


@dataclasses.dataclass(frozen=True)
class BBTConfig:
    """Static configuration of centralized BBT (hashable: shapes and names).

    Defaults follow BBT's ``bbt.py``: d = 500, 50 prompt tokens, population 20, σ₀ = 1, CE loss,
    "normal" projection with α = σ = 1, budget 8000 calls = 400 generations.

    Attributes:
      intrinsic_dim: d, the dimension of the searched subspace (the prompt is start + A z, z in R^d).
      n_prompt_tokens: soft prompt length.
      population_size: λ, CMA-ES candidates per generation.
      num_generations: CMA-ES generations.
      sigma0: initial CMA-ES σ (accepted: [1e-6, 1e3]).
      loss: "ce" | "hinge" | "accuracy", of the label-word logits.
      projection: "normal" | "uniform" (see :mod:`fedbpt_jax.prompt`).
      projection_alpha: BBT's projection scale α (``A ~ N(0, (α σ̂_E / √d)²)``).
      layout: prompt placement (encoder "add"/"cat", decoder "after"/"before"; None = backbone default).
      chunk_size: candidates scored per chunk (0 = the whole population at once); bounds peak memory.
      eval_every: generations between dev-set evaluations (one jitted segment each).
    """

    intrinsic_dim: int = 500
    n_prompt_tokens: int = 50
    population_size: int = 20
    num_generations: int = 400
    sigma0: float = 1.0
    loss: str = dataclasses.field(default="ce", metadata={"choices": objective.LOSSES})
    projection: str = dataclasses.field(default="normal", metadata={"choices": prompt.PROJECTIONS})
    projection_alpha: float = 1.0
    layout: str | None = None
    chunk_size: int = 0
    eval_every: int = 25

    def __post_init__(self):
        for name in ("intrinsic_dim", "n_prompt_tokens", "num_generations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.population_size < 2:
            raise ValueError(f"population_size must be >= 2, got {self.population_size}")
        lo, hi = SIGMA0_RANGE
        if not (math.isfinite(self.sigma0) and lo <= self.sigma0 <= hi):
            raise ValueError(f"sigma0 must be a finite value in [{lo:g}, {hi:g}], got {self.sigma0!r}")
        if not (math.isfinite(self.projection_alpha) and self.projection_alpha > 0):
            raise ValueError(f"projection_alpha must be finite and > 0, got {self.projection_alpha!r}")
        if self.loss not in objective.LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; accepted: {objective.LOSSES}")
        if self.projection not in prompt.PROJECTIONS:
            raise ValueError(f"unknown projection {self.projection!r}; accepted: {prompt.PROJECTIONS}")


@flax.struct.dataclass
class BBTState:
    """BBT state.

    Attributes:
      es: :class:`fedbpt_jax.strategy.LocalCMAState` (mean ``[d]``, σ, C ``[d, d]``, B, D, paths, counters).
      best_z: ``[d]`` best candidate seen (lowest finite training fitness).
      best_fitness: scalar.
      generation: int32 scalar.
    """

    es: Any
    best_z: jax.Array
    best_fitness: jax.Array
    generation: jax.Array


def init(key: jax.Array, config: BBTConfig) -> tuple[BBTState, Any]:
    """Initial state (mean z = 0, σ = σ₀, pycma's initial C) and the CMA-ES's constants.

    The same start as :func:`fedbpt_jax.federated.centralized_bbt` (deterministic: ``key`` is unused).
    """
    del key
    es_params = strategy.local_params(config.population_size, config.intrinsic_dim)
    es = strategy.client_init(strategy.server_init(config.intrinsic_dim, config.sigma0, 2), es_params)
    state = BBTState(
        es=es,
        best_z=jnp.zeros(config.intrinsic_dim, es.mean.dtype),
        best_fitness=jnp.asarray(jnp.inf, jnp.float32),
        generation=jnp.asarray(0, jnp.int32),
    )
    return state, es_params


def step(
    key: jax.Array,
    state: BBTState,
    es_params: Any,
    lm_params: Any,
    projection: jax.Array,
    ctx: Any,
    batch: TokenBatch,
    spec: ScoringSpec,
    *,
    config: BBTConfig,
    scorer: Scorer,
    hidden_size: int,
) -> tuple[BBTState, dict]:
    """One CMA-ES generation: ask (with ``key``), score the whole population in one pass, tell."""
    z, es = strategy.ask(key, state.es, es_params)
    prompts = prompt.to_prompt(projection, z, hidden_size)
    fit, clean = objective.population_fitness(
        scorer, lm_params, ctx, None, batch, spec, prompts, loss=config.loss, chunk_size=config.chunk_size
    )
    # NaN/inf ranks worst inside the CMA-ES (never a positive weight); here it is never the best z either.
    es = strategy.tell(z, fit, es, es_params)
    safe = jnp.where(jnp.isfinite(fit), fit, jnp.inf).astype(jnp.float32)
    i = jnp.argmin(safe)
    better = safe[i] < state.best_fitness
    new = BBTState(
        es=es,
        best_z=jnp.where(better, z[i], state.best_z),
        best_fitness=jnp.where(better, safe[i], state.best_fitness),
        generation=state.generation + 1,
    )
    finite = jnp.isfinite(fit)
    metrics = {
        "fitness_min": jnp.min(safe),
        "fitness_mean": jnp.sum(jnp.where(finite, fit, 0)) / jnp.maximum(jnp.sum(finite), 1).astype(fit.dtype),
        "loss_mean": jnp.mean(clean),
        "sigma": es.std,
        "nonfinite": jnp.sum(~finite),
    }
    return new, metrics


def run_generations(
    key: jax.Array,
    state: BBTState,
    es_params: Any,
    lm_params: Any,
    projection: jax.Array,
    ctx: Any,
    batch: TokenBatch,
    spec: ScoringSpec,
    *,
    config: BBTConfig,
    scorer: Scorer,
    hidden_size: int,
    num_generations: int,
) -> tuple[BBTState, dict]:
    """``num_generations`` steps inside one ``lax.scan`` (generation g gets ``split(key, n)[g]``, as a
    round of ``centralized_bbt`` does); metrics stacked over generations."""

    def body(carry, k):
        return step(
            k,
            carry,
            es_params,
            lm_params,
            projection,
            ctx,
            batch,
            spec,
            config=config,
            scorer=scorer,
            hidden_size=hidden_size,
        )

    return jax.lax.scan(body, state, jax.random.split(key, num_generations))


@dataclasses.dataclass
class BBTResult:
    """What :func:`tune` returns (host side)."""

    z: np.ndarray  # the selected z (best on dev if a dev set was given, else the final mean)
    final_mean: np.ndarray
    history: dict[str, np.ndarray]
    dev_history: list[tuple[int, float]]
    projection: Any


def tune(
    key: jax.Array,
    lm,
    train: TokenBatch,
    spec: ScoringSpec,
    config: BBTConfig = BBTConfig(),
    *,
    dev: TokenBatch | None = None,
    progress: bool = True,
    eval_chunk: int = 64,
) -> BBTResult:
    """Runs BBT on ``train`` with a progress bar; returns the tuned z.

    Generations run in jitted ``lax.scan`` segments of ``config.eval_every``; after each segment the
    current mean is scored on ``dev`` (when given) and the best-on-dev z is kept, as BBT does (ties:
    the earliest; a non-finite dev evaluation is never kept). The CMA-ES is :mod:`fedbpt_jax.strategy`'s
    pycma-faithful one, shared with ``centralized_bbt``.
    """
    from tqdm.auto import tqdm

    key_proj, key_init, key_run = jax.random.split(key, 3)
    scorer = objective.make_scorer(lm, config.layout, n_prompt_tokens=config.n_prompt_tokens)
    projection = prompt.make_projection(
        key_proj,
        lm.input_embeddings(),
        intrinsic_dim=config.intrinsic_dim,
        n_prompt_tokens=config.n_prompt_tokens,
        kind=config.projection,
        alpha=config.projection_alpha,
        sigma=config.sigma0,
    )
    state, es_params = init(key_init, config)
    hidden = lm.hidden_size
    ctx = jax.jit(scorer.prepare)(lm.params, train, spec)
    segment = max(1, min(config.eval_every or config.num_generations, config.num_generations))
    run = jax.jit(
        functools.partial(run_generations, config=config, scorer=scorer, hidden_size=hidden),
        static_argnames=("num_generations",),
    )
    evaluator = Evaluator(lm, scorer, dev, spec, chunk=eval_chunk) if dev is not None else None

    history: dict[str, list] = {}
    dev_history: list[tuple[int, float]] = []
    best_dev, best_z = -1.0, np.zeros(config.intrinsic_dim, np.float32)
    done = 0
    keys = jax.random.split(key_run, -(-config.num_generations // segment))
    with tqdm(total=config.num_generations, desc="BBT", unit="gen", disable=not progress) as bar:
        for k in keys:
            n = min(segment, config.num_generations - done)
            state, metrics = run(k, state, es_params, lm.params, projection, ctx, train, spec, num_generations=n)
            metrics = jax.device_get(metrics)
            for name, v in metrics.items():
                history.setdefault(name, []).extend(np.asarray(v).tolist())
            done += n
            postfix = {"loss": f"{history['loss_mean'][-1]:.4f}", "σ": f"{history['sigma'][-1]:.3f}"}
            if evaluator is not None:
                mean = state.es.mean
                acc = evaluator.accuracy(projection, mean)
                dev_history.append((done, acc))
                if math.isfinite(acc) and acc > best_dev and np.all(np.isfinite(np.asarray(mean))):
                    best_dev, best_z = acc, np.asarray(mean)
                postfix["dev"] = f"{acc:.3f}"
            bar.set_postfix(postfix)
            bar.update(n)
    final_mean = np.asarray(state.es.mean)
    z = best_z if evaluator is not None else final_mean
    return BBTResult(
        z=z,
        final_mean=final_mean,
        history={k: np.asarray(v) for k, v in history.items()},
        dev_history=dev_history,
        projection=projection,
    )


class Evaluator:
    """Scores one z on a fixed example set (chunked, jitted once).

    With a caching scorer (decoder, prompt after the text) the examples' prefix cache is computed once
    here, when it fits ``cache_budget`` bytes, so every later evaluation costs only prompt + cue tokens.
    """

    def __init__(
        self, lm, scorer: Scorer, batch: TokenBatch, spec: ScoringSpec, *, chunk: int = 64, cache_budget: int = 2 << 30
    ):
        self.lm, self.scorer = lm, scorer
        chunks = jax.tree_util.tree_map(jnp.asarray, objective.eval_chunks(scorer, batch, chunk, spec))
        self.labels, self.example_mask = chunks.labels, chunks.example_mask
        self.spec = spec
        self.prepared = (
            scorer.caches_prefix and objective.prepared_bytes(scorer, lm.params, chunks, spec) <= cache_budget
        )
        self.ctx = (
            jax.jit(functools.partial(objective.prepare_chunks, scorer))(lm.params, chunks, spec)
            if self.prepared
            else chunks
        )
        hidden = lm.hidden_size
        prepared = self.prepared
        from .federated.evaluation import EvalSet, set_metrics

        def metrics(params, ctx, labels, mask, spec, projection, z):
            p = None if z is None else prompt.to_prompt(projection, z, hidden)
            return set_metrics(scorer, params, EvalSet(ctx, labels, mask, prepared=prepared), spec, p)

        self._metrics = jax.jit(metrics)

    def metrics(self, projection, z) -> dict[str, float]:
        """Accuracy, loss, F1 (NaN when any example's logits are non-finite), ``nonfinite_examples`` and
        ``pred_dist`` (share of examples predicted as each label) of prompt ``A z`` (``z=None``: no prompt)."""
        out = jax.device_get(
            self._metrics(self.lm.params, self.ctx, self.labels, self.example_mask, self.spec, projection, z)
        )
        return {k: (np.asarray(v).tolist() if np.ndim(v) else float(v)) for k, v in out.items()}

    def accuracy(self, projection, z) -> float:
        return self.metrics(projection, z)["accuracy"]
