"""FedBPT and its baselines as :class:`FederatedAlgorithm`s.

* :func:`fedbpt` — FedBPT (paper §4, reference §2.2): every sampled client starts from the server's
  CMA-ES state (mean, σ, C and its eigendecomposition; evolution paths reset), runs I local CMA-ES
  generations of λ candidates on its perturbation-regularised fitness, uploads (final mean, its
  fitness, σ history); the server combines the client means with a server-level CMA-ES step
  (variant "reference" or "paper", see :mod:`fedbpt_jax.strategy`).
* :func:`fedavg_bbt` — FedAvg-BBT: local BBT (plain fitness), then the clients' means, σ and C are
  averaged, weighted by example counts.
* :func:`centralized_bbt` — BBT on the union of all clients' data (one CMA-ES, I generations a round).
* :func:`manual_prompt` — z = 0: the template with the prompt start (placeholders in "add" mode).
* :func:`fedprompt` — FedPrompt, the white-box baseline: local Adam on the soft prompt embeddings
  (gradients of the same loss), FedAvg of the prompts weighted by example counts.

Per-client code is written for one client and ``vmap``ped (and sharded) over the client axis; each
client's population is scored in one batched forward pass per generation, so a generation of all K
clients is one pass over clients × population × examples.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from .. import accounting, objective, prompt, strategy
from ..objective import Scorer
from ..types import ScoringSpec, TokenBatch
from .config import FedConfig, HParams
from .core import FederatedAlgorithm, FederatedData, ModelInputs, client_keys, gather_clients, map_clients, sample_clients


@flax.struct.dataclass
class ClientUpload:
    """What one client sends back (FedBPT): final mean, its fitness, σ history; plus local metrics.

    Attributes:
      mean: ``[d]`` final local mean z^k.
      fitness: scalar f(z^k) (the perturbation ratio when perturbation is on).
      sigmas: ``[I]`` σ recorded before each local ask.
      loss: scalar clean mean loss of z^k on the local data (metrics only).
      nonfinite: int32 number of non-finite candidate fitnesses seen locally (metrics only).
    """

    mean: jax.Array
    fitness: jax.Array
    sigmas: jax.Array
    loss: jax.Array
    nonfinite: jax.Array
    local_state: Any = None  # FedAvg-BBT needs σ and C


def _scorer(config: FedConfig, lm) -> Scorer:
    return objective.make_scorer(lm, config.layout, n_prompt_tokens=config.n_prompt_tokens)


def _local_es(
    key: jax.Array,
    server: Any,
    batch: TokenBatch,
    spec: ScoringSpec,
    hp: HParams,
    model: ModelInputs,
    *,
    config: FedConfig,
    scorer: Scorer,
    hidden: int,
    perturb: bool,
    keep_state: bool = False,
) -> ClientUpload:
    """One client's local CMA-ES (unbatched; vmapped over clients by the caller)."""
    key_pert, key_gens = jax.random.split(key)
    es_params = strategy.local_params(config.population_size, config.intrinsic_dim)
    local = strategy.client_init(server, es_params)
    # Within the paper's I = 8 generations no client re-decomposes C (lazy gap ≈ 18.8): the clients then
    # share the broadcast B, D (one GEMM for all clients' samples), and a FedBPT client, which never
    # uploads C, skips the covariance update altogether. Same numbers as the general path.
    frozen = not strategy.eigen_refresh_due(config.population_size, config.intrinsic_dim, config.local_generations)
    track_c = keep_state or not frozen
    clean_ctx = scorer.prepare(model.params, batch)

    def perturbed_ctx(k):
        pert = objective.perturb(k, batch, hp.perturb_rate, spec, exempt_special=config.exempt_special)
        return scorer.prepare(model.params, pert)

    # One perturbed copy per round (reference): the clean and perturbed contexts are stacked once, and
    # every generation scores both in one forward pass.
    paired_ctx = None
    if perturb and config.perturb_every == "round":
        paired_ctx = objective.stack_contexts(clean_ctx, perturbed_ctx(key_pert))

    def score(z, k):
        prompts = prompt.to_prompt(model.projection, z, hidden, model.start)
        kw = dict(loss=config.loss, form=config.fitness_form)
        if paired_ctx is not None:
            return objective.population_fitness_paired(scorer, model.params, paired_ctx, batch, spec, prompts, **kw)
        pert_ctx = perturbed_ctx(k) if perturb else None
        return objective.population_fitness(scorer, model.params, clean_ctx, pert_ctx, batch, spec, prompts, **kw)

    def generation(local, k):
        k_ask, k_pert = jax.random.split(k)
        sigma = strategy.sigma_of(local)
        z, local = strategy.ask(k_ask, local, es_params, frozen_eigen=frozen)
        fit, _ = score(z, k_pert)
        local = strategy.tell(z, fit, local, es_params, track_covariance=track_c)
        return local, (sigma, jnp.sum(~jnp.isfinite(fit)))

    local, (sigmas, nonfinite) = jax.lax.scan(generation, local, jax.random.split(key_gens, config.local_generations))
    mean = strategy.mean_of(local)
    fit, loss = score(mean[None], jax.random.fold_in(key_gens, config.local_generations))
    return ClientUpload(mean=mean, fitness=fit[0], sigmas=sigmas, loss=loss[0], nonfinite=jnp.sum(nonfinite),
                        local_state=local if keep_state else None)


@flax.struct.dataclass
class FedBPTState:
    """Server state of FedBPT / FedAvg-BBT.

    Attributes:
      server: the server CMA-ES state (mean ``[d]``, σ, C ``[d, d]`` with B, D, paths, counters).
      round: int32 rounds done.
    """

    server: Any
    round: jax.Array


def _round_metrics(up: ClientUpload, active: jax.Array, extra: dict) -> dict:
    ok = active & jnp.isfinite(up.loss)
    w = ok.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    finite_loss = jnp.where(ok, up.loss, 0.0)
    return {
        "client_loss": jnp.sum(finite_loss * w) / n,
        "client_fitness_min": jnp.min(jnp.where(active & jnp.isfinite(up.fitness), up.fitness, jnp.inf)),
        "active_clients": jnp.sum(active.astype(jnp.int32)),
        "nonfinite_fitness": jnp.sum(up.nonfinite * active) + jnp.sum((~jnp.isfinite(up.fitness)) & active),
        **extra,
    }


def _sampled(key, state_round, data: FederatedData, hp: HParams, config: FedConfig):
    key_sample, key_drop, key_clients = jax.random.split(key, 3)
    idx = sample_clients(key_sample, data.counts, config.clients_per_round, config.sampling)
    batch, counts = gather_clients(data, idx)
    active = (jax.random.uniform(key_drop, (config.clients_per_round,)) >= hp.dropout_rate) & (counts > 0)
    keys = client_keys(key_clients, config.clients_per_round, config.client_keys)
    return idx, batch, counts, active, keys


def _comm(config: FedConfig, lm, *, covariance: bool) -> accounting.CommBytes:
    if covariance:
        return accounting.fedavg_bbt_bytes(config.intrinsic_dim, lm.num_params())
    return accounting.fedbpt_bytes(config.intrinsic_dim, config.local_generations, lm.num_params())


def fedbpt(config: FedConfig, lm, *, mesh=None, scorer: Scorer | None = None) -> FederatedAlgorithm:
    """FedBPT (see the module docstring and :class:`FedConfig` for every option).

    Args:
      config: static configuration.
      lm: the backbone bundle.
      mesh: shard the client axis over this mesh's ``"clients"`` axis (see :func:`~fedbpt_jax.federated.client_mesh`);
        None: the ambient mesh, if any (``run(..., mesh=...)`` sets it).
      scorer: the black-box scorer (default: :func:`fedbpt_jax.objective.make_scorer` for ``config.layout``);
        e.g. an uncached one to measure the prefix cache's effect.

    Example::

        algo = fl.fedbpt(fl.FedConfig(num_clients=10, clients_per_round=4), lm)
        state = algo.init(jax.random.key(0), fl.HParams().validate())
        state, metrics = jax.jit(algo.round)(jax.random.key(1), state, data, fl.HParams().validate(), model)
    """
    scorer = scorer or _scorer(config, lm)
    hidden = lm.hidden_size

    def init(key, hp: HParams):
        del key  # deterministic start: z = 0, σ = σ₀, C = I
        return FedBPTState(
            server=strategy.server_init(config.intrinsic_dim, hp.sigma0, config.clients_per_round),
            round=jnp.asarray(0, jnp.int32),
        )

    def round_fn(key, state: FedBPTState, data: FederatedData, hp: HParams, model: ModelInputs):
        idx, batch, counts, active, keys = _sampled(key, state.round, data, hp, config)
        local = functools.partial(_local_es, config=config, scorer=scorer, hidden=hidden, perturb=config.perturb)
        up = map_clients(lambda k, b: local(k, state.server, b, data.spec, hp, model),
                         (keys, batch), config.chunk_clients, mesh)
        server, smetrics = strategy.server_update(
            state.server, up.mean, up.fitness, up.sigmas, active,
            variant=config.server_variant, local_population=config.population_size,
        )
        metrics = _round_metrics(up, active, {"sigma": strategy.sigma_of_server(server), **smetrics})
        return FedBPTState(server=server, round=state.round + 1), metrics

    def global_prompt(state: FedBPTState, model: ModelInputs):
        return prompt.to_prompt(model.projection, strategy.mean_of_server(state.server), hidden, model.start)

    calls = config.local_generations * config.population_size + 1
    calls *= 2 if config.perturb else 1
    prefix = 1 + ((1 if config.perturb_every == "round" else config.local_generations + 1) if config.perturb else 0)
    return FederatedAlgorithm("fedbpt", init, round_fn, global_prompt, config, _comm(config, lm, covariance=False),
                              calls, prefix_passes=prefix, mesh=mesh, scorer=scorer)


def fedavg_bbt(config: FedConfig, lm, *, mesh=None, scorer: Scorer | None = None) -> FederatedAlgorithm:
    """FedAvg-BBT: local BBT, then example-weighted averages of the clients' means, σ and C."""
    scorer = scorer or _scorer(config, lm)
    hidden = lm.hidden_size
    base = fedbpt(config, lm, mesh=mesh, scorer=scorer)

    def round_fn(key, state: FedBPTState, data: FederatedData, hp: HParams, model: ModelInputs):
        idx, batch, counts, active, keys = _sampled(key, state.round, data, hp, config)
        local = functools.partial(_local_es, config=config, scorer=scorer, hidden=hidden,
                                  perturb=False, keep_state=True)
        up = map_clients(lambda k, b: local(k, state.server, b, data.spec, hp, model),
                         (keys, batch), config.chunk_clients, mesh)
        weights = counts.astype(jnp.float32) * active
        server, smetrics = strategy.fedavg_aggregate(state.server, up.local_state, weights)
        metrics = _round_metrics(up, active, {"sigma": strategy.sigma_of_server(server), **smetrics})
        return FedBPTState(server=server, round=state.round + 1), metrics

    calls = config.local_generations * config.population_size + 1
    return base._replace(name="fedavg_bbt", round=round_fn, comm=_comm(config, lm, covariance=True), forward_calls=calls,
                         prefix_passes=1)


@flax.struct.dataclass
class CentralState:
    """Centralized BBT: one client-style CMA-ES state that persists across rounds, and the round counter.

    Attributes:
      es: :class:`fedbpt_jax.strategy.LocalCMAState` (mean ``[d]``, σ, C ``[d, d]``, B, D, paths, counters).
      round: int32 rounds done.
    """

    es: Any
    round: jax.Array


def centralized_bbt(config: FedConfig, lm, *, population_size: int | None = None, mesh=None,
                    scorer: Scorer | None = None) -> FederatedAlgorithm:
    """BBT on the union of all clients' data: one CMA-ES, ``local_generations`` generations a round.

    The CMA-ES is :mod:`fedbpt_jax.strategy`'s pycma-like client (pycma's constants, lazy
    eigendecomposition, selective mirroring) started like FedBPT's server (z = 0, σ₀, pycma's initial
    C) and kept across rounds (paths and counters are *not* reset: one continuous BBT run). Fitness is
    the plain mean loss on all examples (no perturbation); NaN/inf rank worst.
    """
    del mesh  # one CMA-ES: nothing to shard over clients
    scorer = scorer or _scorer(config, lm)
    hidden, d = lm.hidden_size, config.intrinsic_dim
    pop = population_size or config.population_size
    es_params = strategy.local_params(pop, d)

    def init(key, hp: HParams):
        del key  # deterministic start, as FedBPT's server
        es = strategy.client_init(strategy.server_init(d, hp.sigma0, 2), es_params)
        return CentralState(es=es, round=jnp.asarray(0, jnp.int32))

    def round_fn(key, state: CentralState, data: FederatedData, hp: HParams, model: ModelInputs):
        flat = jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[2:]), data.train)
        ctx = scorer.prepare(model.params, flat)

        def score(z):
            prompts = prompt.to_prompt(model.projection, z, hidden, model.start)
            return objective.population_fitness(scorer, model.params, ctx, None, flat, data.spec, prompts,
                                                loss=config.loss)

        def generation(es, k):
            z, es = strategy.ask(k, es, es_params)
            fit, _ = score(z)
            return strategy.tell(z, fit, es, es_params), jnp.sum(~jnp.isfinite(fit))

        es, nonfinite = jax.lax.scan(generation, state.es, jax.random.split(key, config.local_generations))
        _, loss = score(strategy.mean_of(es)[None])
        metrics = {"client_loss": loss[0], "sigma": strategy.sigma_of(es),
                   "nonfinite_fitness": jnp.sum(nonfinite).astype(jnp.int32),
                   "active_clients": jnp.asarray(1, jnp.int32)}
        return CentralState(es=es, round=state.round + 1), metrics

    def global_prompt(state: CentralState, model: ModelInputs):
        return prompt.to_prompt(model.projection, strategy.mean_of(state.es), hidden, model.start)

    comm = accounting.CommBytes(0, 0, 0)
    return FederatedAlgorithm("centralized_bbt", init, round_fn, global_prompt, config, comm,
                              config.local_generations * pop + 1, prefix_passes=1, pooled=True, scorer=scorer)


def manual_prompt(config: FedConfig, lm, *, mesh=None) -> FederatedAlgorithm:
    """The manual prompt baseline: the prompt start (``model.start``; zeros when None), i.e. exactly
    FedBPT's z = 0 prompt under every start option; rounds do nothing."""
    del mesh
    n, hidden = config.n_prompt_tokens, lm.hidden_size

    def init(key, hp):
        return jnp.asarray(0, jnp.int32)

    def round_fn(key, state, data, hp, model):
        return state + 1, {"client_loss": jnp.asarray(jnp.nan), "sigma": jnp.asarray(0.0),
                           "nonfinite_fitness": jnp.asarray(0, jnp.int32), "active_clients": jnp.asarray(0, jnp.int32)}

    def global_prompt(state, model):
        return prompt.start_prompt(model.start, n, hidden)

    return FederatedAlgorithm("manual", init, round_fn, global_prompt, config, accounting.CommBytes(0, 0, 0), 0)


@flax.struct.dataclass
class PromptState:
    """FedPrompt server state: the global soft prompt's offset ``[n, H]`` from the prompt start
    (``model.start``; the deployed prompt is start + offset) and the round counter."""

    prompt: jax.Array
    round: jax.Array


def fedprompt(config: FedConfig, lm, *, local_steps: int | None = None, mesh=None,
              scorer: Scorer | None = None) -> FederatedAlgorithm:
    """FedPrompt: white-box soft-prompt tuning (gradients w.r.t. the prompt embeddings, Adam via optax),
    FedAvg of the prompts weighted by example counts. Local steps default to ``local_generations``."""
    import optax

    scorer = scorer or _scorer(config, lm)
    steps = local_steps or config.local_generations
    n, hidden = config.n_prompt_tokens, lm.hidden_size

    def init(key, hp):
        # The state holds the offset from the prompt start (model.start): zero = FedBPT's z = 0 prompt.
        return PromptState(prompt=jnp.zeros((n, hidden), jnp.float32), round=jnp.asarray(0, jnp.int32))

    def client(key, p0, batch, spec, hp, model):
        opt = optax.adam(hp.learning_rate)
        ctx = scorer.prepare(model.params, batch)

        def loss_fn(p):
            logits = scorer.logits(model.params, ctx, spec, p if model.start is None else p + model.start)
            return objective.masked_mean(objective.per_example_loss(logits, batch.labels, config.loss), batch.example_mask)

        def step(carry, _):
            p, s = carry
            loss, g = jax.value_and_grad(loss_fn)(p)
            upd, s = opt.update(g, s, p)
            return (optax.apply_updates(p, upd), s), loss

        (p, _), losses = jax.lax.scan(step, (p0, opt.init(p0)), None, length=steps)
        return p, loss_fn(p)

    def round_fn(key, state: PromptState, data: FederatedData, hp: HParams, model: ModelInputs):
        idx, batch, counts, active, keys = _sampled(key, state.round, data, hp, config)
        prompts, losses = map_clients(lambda k, b: client(k, state.prompt, b, data.spec, hp, model),
                                      (keys, batch), config.chunk_clients, mesh)
        # A client whose loss or prompt is not finite is dropped from the average (it would poison it).
        finite = jnp.isfinite(losses) & jnp.all(jnp.isfinite(prompts.reshape(prompts.shape[0], -1)), axis=-1)
        usable = active & finite
        w = counts.astype(jnp.float32) * usable
        total = jnp.sum(w)
        clean = jnp.where(usable[:, None, None], prompts, 0.0)
        new = jnp.where(total > 0, jnp.einsum("k,knh->nh", w, clean) / jnp.maximum(total, 1e-12), state.prompt)
        nw = jnp.maximum(jnp.sum(usable), 1)
        metrics = {"client_loss": jnp.sum(jnp.where(usable, losses, 0.0)) / nw, "sigma": jnp.asarray(0.0),
                   "nonfinite_fitness": jnp.sum((active & ~finite).astype(jnp.int32)),
                   "active_clients": jnp.sum(active.astype(jnp.int32)), "weight_total": total}
        return PromptState(prompt=new, round=state.round + 1), metrics

    def global_prompt(state: PromptState, model):
        return state.prompt if model.start is None else state.prompt + model.start

    comm = accounting.prompt_bytes(n, hidden, lm.num_params())
    # Each local step is a forward and a backward pass (≈ 2 forwards), plus the final loss.
    return FederatedAlgorithm("fedprompt", init, round_fn, global_prompt, config, comm, 3 * steps + 1,
                              prefix_passes=1, mesh=mesh, scorer=scorer)


ALGORITHMS = {
    "fedbpt": fedbpt,
    "fedavg_bbt": fedavg_bbt,
    "centralized_bbt": centralized_bbt,
    "manual": manual_prompt,
    "fedprompt": fedprompt,
}


def make(name: str, config: FedConfig, lm, **kwargs) -> FederatedAlgorithm:
    """Builds an algorithm by name (``sorted(ALGORITHMS)``)."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; accepted: {sorted(ALGORITHMS)}")
    return ALGORITHMS[name](config, lm, **kwargs)
