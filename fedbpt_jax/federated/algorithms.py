"""FedBPT and its baselines as :class:`FederatedAlgorithm`s.

* :func:`fedbpt` — FedBPT (docs/algorithm.md, "Client CMA-ES" and "Server step"): every sampled client starts from the server's
  CMA-ES state (mean, σ, C and its eigendecomposition; evolution paths reset), runs I local CMA-ES
  generations of λ candidates on its perturbation-regularised fitness, uploads (final mean, its
  fitness, σ history); the server combines the client means with a server-level CMA-ES step
  (variant "reference" or "paper", see :mod:`fedbpt_jax.strategy`).
* :func:`fedavg_bbt` — FedAvg-BBT: local BBT (plain fitness by default; ``perturb=True`` gives it
  FedBPT's perturbation-regularised fitness, so the server step is the only difference), then the
  clients' means, σ and C are averaged, weighted by example counts.
* :func:`centralized_bbt` — BBT on the union of all clients' data (one CMA-ES, I generations a round).
* :func:`manual_prompt` — z = 0: the template with the prompt start (placeholders in "add" mode).
* :func:`~fedbpt_jax.federated.white_box.fedprompt` (in :mod:`fedbpt_jax.federated.white_box`) — FedPrompt,
  the white-box baseline: local Adam on the soft prompt embeddings (gradients of the same loss), FedAvg of
  the prompts weighted by example counts.

Per-client code is written for one client and ``vmap``ped (and sharded) over the client axis; each
client's population is scored in one batched forward pass per generation, so a generation of all K
clients is one pass over clients × population × examples.

``algo.round`` returns scalar metrics (one CSV column each). ``algo.round_detailed`` is the same round
with two more dicts of per-client ``[K]`` arrays: ``metrics["clients"]`` (diagnostics: which client,
example and label counts, clean and perturbed loss, fitness, server rank and weight, repaired or not)
and, for FedBPT and FedAvg-BBT, ``metrics["uploads"]`` (what the clients sent: means ``[K, d]``,
fitness, σ histories, plus the broadcast mean and σ); :func:`fedbpt_jax.federated.run` uses it and
drops the uploads inside the scan unless asked to save them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from .. import accounting, aggregation, objective, prompt, strategy
from ..objective import Scorer
from ..types import ScoringSpec, TokenBatch
from .config import FedConfig, HParams, check_hparams, default_scorer
from .core import (
    AlgorithmCost,
    AlgorithmSpec,
    ClientSample,
    FederatedAlgorithm,
    FederatedData,
    ModelInputs,
    gather,
    map_clients,
    sample_round,
)
from .diagnostics import client_diagnostics, scalars_only
from .registry import ALGORITHM_NAMES, declares, hparams_read
from .white_box import fedprompt


@flax.struct.dataclass
class ClientUpload:
    """What one client sends back (FedBPT): final mean, its fitness, σ history; plus local metrics.

    Attributes:
      mean: ``[d]`` final local mean z^k.
      fitness: scalar f(z^k) (the perturbation ratio when perturbation is on).
      sigmas: ``[I]`` σ recorded before each local ask.
      loss: scalar clean mean loss of z^k on the local data (metrics only).
      nonfinite: int32 number of non-finite candidate fitnesses seen locally (metrics only).
      perturbed_loss: scalar mean loss of z^k on the round's perturbed copy (NaN without perturbation).
    """

    mean: jax.Array
    fitness: jax.Array
    sigmas: jax.Array
    loss: jax.Array
    nonfinite: jax.Array
    perturbed_loss: jax.Array = None
    local_state: Any = None  # FedAvg-BBT needs σ and C


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
    clip_norm: jax.Array | None = None,
    clean_ctx: Any = None,
) -> ClientUpload:
    """One client's local CMA-ES (unbatched; vmapped over clients by the caller).

    ``clip_norm`` (the optional ‖z‖ clip, :attr:`FedConfig.norm_clip`): every candidate, and the
    uploaded mean, longer than this is scaled back to it before it is scored, as the reference's
    ``norm_prompt`` does (the clipped candidates are what the local CMA-ES is told).

    ``clean_ctx``: this client's clean context kept across rounds (:attr:`FederatedData.clean_context`);
    None: prepared here, one prefix pass.
    """
    # One split, one key per purpose: the round's perturbed copy, the generations, the final mean's score.
    key_pert, key_gens, key_final = jax.random.split(key, 3)
    es_params = strategy.local_params(config.population_size, config.intrinsic_dim)
    local = strategy.client_init(server, es_params)
    # Within the paper's I = 8 generations no client re-decomposes C (lazy gap ≈ 18.8): the clients then
    # share the broadcast B, D (one GEMM for all clients' samples), and a FedBPT client, which never
    # uploads C, skips the covariance update altogether. Same numbers as the general path.
    frozen = not strategy.eigen_refresh_due(config.population_size, config.intrinsic_dim, config.local_generations)
    track_c = keep_state or not frozen
    if clean_ctx is None:
        clean_ctx = scorer.prepare(model.params, batch, spec)

    def perturbed_ctx(k):
        pert = objective.perturb(k, batch, hp.perturb_rate, spec, exempt_special=config.exempt_special)
        return scorer.prepare(model.params, pert, spec)

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

    def clip(z):
        return z if clip_norm is None else clip_rows(z, clip_norm)

    def final_score(z, k):
        """(fitness, clean loss, perturbed loss) of one z: the same one paired pass as ``score``."""
        prompts = prompt.to_prompt(model.projection, z[None], hidden)
        if not perturb:
            fit, loss = objective.population_fitness(
                scorer, model.params, clean_ctx, None, batch, spec, prompts, loss=config.loss, form=config.fitness_form
            )
            return fit[0], loss[0], jnp.asarray(jnp.nan, fit.dtype)
        ctx = paired_ctx if paired_ctx is not None else objective.stack_contexts(clean_ctx, perturbed_ctx(k))
        logits = scorer.paired(model.params, ctx, spec, prompts[0])  # [2, B, C]
        losses = objective.per_example_loss(logits, batch.labels, config.loss)[:, None]  # [2, 1, B]
        fit = objective.fitness(losses[0], losses[1], batch.example_mask, config.fitness_form)
        means = objective.masked_mean(losses, batch.example_mask)  # [2, 1]
        return fit[0], means[0, 0], means[1, 0]

    def generation(local, k):
        k_ask, k_pert = jax.random.split(k)
        sigma = local.std
        z, local = strategy.ask(k_ask, local, es_params, frozen_eigen=frozen)
        z = clip(z)
        fit, _ = score(z, k_pert)
        local = strategy.tell(z, fit, local, es_params, track_covariance=track_c)
        return local, (sigma, jnp.sum(~jnp.isfinite(fit)))

    local, (sigmas, nonfinite) = jax.lax.scan(generation, local, jax.random.split(key_gens, config.local_generations))
    mean = clip(local.mean[None])[0]
    fit, loss, pert_loss = final_score(mean, key_final)
    return ClientUpload(
        mean=mean,
        fitness=fit,
        sigmas=sigmas,
        loss=loss,
        nonfinite=jnp.sum(nonfinite),
        perturbed_loss=pert_loss,
        local_state=local if keep_state else None,
    )


def clip_rows(z: jax.Array, max_norm: jax.Array) -> jax.Array:
    """Rows of ``z`` ``[P, d]`` with ‖z_i‖ > ``max_norm`` scaled to norm ``max_norm`` (others as they are)."""
    norm = jnp.linalg.norm(z, axis=-1, keepdims=True)
    return jnp.where(norm > max_norm, z / jnp.maximum(norm, 1e-30) * max_norm, z)


@flax.struct.dataclass
class FedBPTState:
    """Server state of FedBPT / FedAvg-BBT.

    Attributes:
      server: the server CMA-ES state (mean ``[d]``, σ, C ``[d, d]`` with B, D, paths, counters).
      round: int32 rounds done.
    """

    server: Any
    round: jax.Array
    norm_threshold: jax.Array = None


def _round_metrics(
    up: ClientUpload, sample: ClientSample, extra: dict, *, spec, perturbed: bool, z_norm=None, uploads=None
) -> dict:
    idx, batch, counts, active = sample.index, sample.batch, sample.counts, sample.active
    ok = active & jnp.isfinite(up.loss)
    w = ok.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    finite_loss = jnp.where(ok, up.loss, 0.0)
    extra = dict(extra)
    per_client = {name: extra.pop(f"client_{name}", None) for name in ("rank", "weight", "repaired", "usable")}
    if per_client["weight"] is None:
        per_client["weight"] = jnp.zeros(counts.shape, jnp.float32)
    clients, summary = client_diagnostics(
        idx,
        batch,
        counts,
        active,
        spec,
        loss=up.loss,
        fitness=up.fitness,
        perturbed_loss=up.perturbed_loss if perturbed else None,
        **per_client,
    )
    out = {
        "client_loss": jnp.sum(finite_loss * w) / n,
        "client_fitness_min": jnp.min(jnp.where(active & jnp.isfinite(up.fitness), up.fitness, jnp.inf)),
        "active_clients": jnp.sum(active.astype(jnp.int32)),
        "nonfinite_fitness": jnp.sum(up.nonfinite * active.astype(up.nonfinite.dtype))
        + jnp.sum((~jnp.isfinite(up.fitness)) & active),
        **extra,
        **summary,
        "clients": clients,
    }
    if z_norm is not None:
        out["z_norm"] = z_norm
    if uploads is not None:
        out["uploads"] = uploads
    return out


#: fold_in constant of the server's own key within a round's key (``server_ranking="random"``)
SERVER_STREAM = 0x5E


def _uploads(sample: ClientSample, up: ClientUpload, server) -> dict:
    """What the clients sent this round (and the broadcast it answered), for replaying aggregations."""
    return {
        "client_index": sample.index.astype(jnp.int32),
        "active": sample.active,
        "mean": up.mean,
        "fitness": up.fitness,
        "sigmas": up.sigmas,
        "server_mean": server.mean,
        "server_sigma": server.std,
    }


def _norm_threshold(config: FedConfig, state: "FedBPTState"):
    """This round's ‖z‖ clip τ_t (reference ``norm_prompt``): +1 when the broadcast ‖z_t‖ < the upper bound."""
    if not config.norm_clip:
        return None, state.norm_threshold
    below = jnp.linalg.norm(state.server.mean) < config.norm_clip_upper
    tau = jnp.where(below, state.norm_threshold + 1, state.norm_threshold).astype(state.norm_threshold.dtype)
    return tau, tau


def _sigma_schedule(config: FedConfig, old, new):
    """The optional server σ schedule (:attr:`FedConfig.sigma_schedule`) on the aggregated state."""
    if config.sigma_schedule == "none":
        return new
    s_old, s_new = old.std, new.std
    clamped = jnp.minimum(jnp.maximum(s_new, jnp.asarray(config.sigma_floor, s_new.dtype)), s_old)
    return new.replace(std=clamped.astype(s_new.dtype))


def _comm(config: FedConfig, lm, *, covariance: bool) -> accounting.CommBytes:
    if covariance:
        return accounting.fedavg_bbt_bytes(config.intrinsic_dim, lm.num_params())
    return accounting.fedbpt_bytes(config.intrinsic_dim, config.local_generations, lm.num_params())


def _es_cost(config: FedConfig, lm, *, perturb: bool, covariance: bool) -> AlgorithmCost:
    """FedBPT's and FedAvg-BBT's round cost: I·λ candidate passes and the final mean's pass (twice with the
    perturbed copy); one clean prefix pass, plus the perturbed copies' (one a round, or one a generation
    and one for the final mean)."""
    calls = config.local_generations * config.population_size + 1
    prefix = 1
    if perturb:
        calls *= 2
        prefix += 1 if config.perturb_every == "round" else config.local_generations + 1
    return AlgorithmCost(
        comm=_comm(config, lm, covariance=covariance), forward_calls=calls, prefix_passes=prefix, paired=perturb
    )


def _es_round(
    config: FedConfig, scorer: Scorer, hidden: int, mesh, *, perturb: bool, keep_state: bool, aggregate: Callable
):
    """The round FedBPT and FedAvg-BBT share, as ``round_detailed``: sample the K clients
    (:func:`~fedbpt_jax.federated.core.sample_round`), run every client's local CMA-ES from the broadcast
    server state (:func:`_local_es`, under the round's ‖z‖ clip τ_t when on), aggregate, apply the optional
    σ schedule, and report the round's metrics, per-client diagnostics and uploads.

    ``aggregate(server, uploads, sample, key) -> (server, metrics)`` is the server step, the only difference
    between the two: FedBPT's server CMA-ES step, FedAvg-BBT's example-weighted average. ``keep_state``:
    the clients also upload their CMA-ES states (``uploads.local_state``, FedAvg-BBT); with the ‖z‖ clip
    their means are the clipped means, what the clients send.
    """

    def round_detailed(key, state: FedBPTState, data: FederatedData, hp: HParams, model: ModelInputs):
        sample = sample_round(key, data, hp, config)
        tau, next_tau = _norm_threshold(config, state)
        local = functools.partial(
            _local_es,
            config=config,
            scorer=scorer,
            hidden=hidden,
            perturb=perturb,
            keep_state=keep_state,
            clip_norm=tau,
        )
        up = map_clients(
            lambda k, b, c: local(k, state.server, b, data.spec, hp, model, clean_ctx=c),
            (sample.keys, sample.batch, gather(data.clean_context, sample.index)),
            config.chunk_clients,
            mesh,
        )
        if keep_state and tau is not None:
            up = up.replace(local_state=up.local_state.replace(mean=up.mean))
        # the server's own draws (only the random-ranking study has any): folded in, so the round's other
        # streams (sampling, dropout, client keys) are the same with and without it
        key_server = jax.random.fold_in(key, SERVER_STREAM)
        server, smetrics = aggregate(state.server, up, sample, key_server)
        server = _sigma_schedule(config, state.server, server)
        extra = {"sigma": server.std, **smetrics}
        if tau is not None:
            extra["norm_threshold"] = tau
        metrics = _round_metrics(
            up,
            sample,
            extra,
            spec=data.spec,
            perturbed=perturb,
            z_norm=jnp.linalg.norm(server.mean),
            uploads=_uploads(sample, up, state.server),
        )
        return FedBPTState(server=server, round=state.round + 1, norm_threshold=next_tau), metrics

    return round_detailed


def declaring(prop: str) -> list[str]:
    """The names of the built-in algorithms (:data:`ALGORITHMS`) whose specs declare ``prop``
    (``"uses_clean_context"`` or ``"uploads"``), sorted; for error messages."""
    out = []
    for name, factory in ALGORITHMS.items():
        declares = getattr(getattr(factory, "func", factory), "declares")  # a functools.partial: its function
        if prop not in declares:
            raise ValueError(f"unknown declared property {prop!r}; accepted: {sorted(declares)}")
        if declares[prop]:
            out.append(name)
    return sorted(out)


@declares(uses_clean_context=True, uploads=True)
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
    scorer = scorer or default_scorer(config, lm)
    hidden = lm.hidden_size

    def init(key, hp: HParams):
        del key  # deterministic start: z = 0, σ = σ₀, C = I
        check_hparams(hp)
        return FedBPTState(
            server=aggregation.server_init(config.intrinsic_dim, hp.sigma0, config.clients_per_round),
            round=jnp.asarray(0, jnp.int32),
            norm_threshold=jnp.asarray(config.norm_clip_threshold, jnp.float32),
        )

    def aggregate(server, up: ClientUpload, sample: ClientSample, key):
        return aggregation.server_update(
            server,
            up.mean,
            up.fitness,
            up.sigmas,
            sample.active,
            variant=config.server_variant,
            local_population=config.population_size,
            ranking_key=key if config.server_ranking == "random" else None,
        )

    round_detailed = _es_round(
        config, scorer, hidden, mesh, perturb=config.perturb, keep_state=False, aggregate=aggregate
    )

    def global_prompt(state: FedBPTState, model: ModelInputs):
        return prompt.to_prompt(model.projection, state.server.mean, hidden, model.start)

    def global_z(state: FedBPTState):
        return state.server.mean

    spec = AlgorithmSpec(
        config,
        _es_cost(config, lm, perturb=config.perturb, covariance=False),
        mesh=mesh,
        scorer=scorer,
        global_z=global_z,
        round_detailed=round_detailed,
        hparams=hparams_read("fedbpt", config),
        **fedbpt.declares,
    )
    return FederatedAlgorithm("fedbpt", init, scalars_only(round_detailed), global_prompt, spec)


@declares(uses_clean_context=True, uploads=True)
def fedavg_bbt(
    config: FedConfig, lm, *, perturb: bool = False, mesh=None, scorer: Scorer | None = None
) -> FederatedAlgorithm:
    """FedAvg-BBT: local BBT, then example-weighted averages of the clients' means, σ and C.

    Args:
      config: static configuration (the FedBPT-only server options do not apply).
      lm: the backbone bundle.
      perturb: local fitness with FedBPT's perturbation term (``config.fitness_form``,
        ``config.perturb_every``, ``hp.perturb_rate``), so FedAvg-BBT and FedBPT differ only in the
        server step. Default False: plain local loss, the paper's baseline (algorithm name
        ``"fedavg_bbt"``; with ``perturb=True`` it is ``"fedavg_bbt_perturbed"``).
      mesh, scorer: as :func:`fedbpt`.
    """
    scorer = scorer or default_scorer(config, lm)
    hidden = lm.hidden_size
    if perturb and config.loss == "accuracy":
        raise ValueError("FedAvg-BBT with perturbation needs a positive loss: use loss 'ce' or 'hinge'")
    if config.server_ranking != "fitness":
        raise ValueError(
            f"server_ranking {config.server_ranking!r} changes FedBPT's server CMA-ES ranking; FedAvg-BBT averages "
            "and ranks nothing: use server_ranking 'fitness' (the default)"
        )
    base = fedbpt(config, lm, mesh=mesh, scorer=scorer)  # the same state, init and global prompt

    def aggregate(server, up: ClientUpload, sample: ClientSample, key):
        del key  # averaging draws nothing
        weights = sample.counts.astype(jnp.float32) * sample.active.astype(jnp.float32)
        return aggregation.fedavg_aggregate(server, up.local_state, weights)

    round_detailed = _es_round(config, scorer, hidden, mesh, perturb=perturb, keep_state=True, aggregate=aggregate)
    name = "fedavg_bbt_perturbed" if perturb else "fedavg_bbt"
    spec = dataclasses.replace(
        base.spec,
        round_detailed=round_detailed,
        cost=_es_cost(config, lm, perturb=perturb, covariance=True),
        hparams=hparams_read(name, config),
        **fedavg_bbt.declares,
    )
    return base._replace(name=name, round=scalars_only(round_detailed), spec=spec)


@flax.struct.dataclass
class CentralState:
    """Centralized BBT: one client-style CMA-ES state that persists across rounds, and the round counter.

    Attributes:
      es: :class:`fedbpt_jax.strategy.LocalCMAState` (mean ``[d]``, σ, C ``[d, d]``, B, D, paths, counters).
      round: int32 rounds done.
    """

    es: Any
    round: jax.Array


@declares()
def centralized_bbt(
    config: FedConfig, lm, *, population_size: int | None = None, mesh=None, scorer: Scorer | None = None
) -> FederatedAlgorithm:
    """BBT on the union of all clients' data: one CMA-ES, ``local_generations`` generations a round.

    The CMA-ES is :mod:`fedbpt_jax.strategy`'s pycma-like client (pycma's constants, lazy
    eigendecomposition, selective mirroring) started like FedBPT's server (z = 0, σ₀, pycma's initial
    C) and kept across rounds (paths and counters are *not* reset: one continuous BBT run). Fitness is
    the plain mean loss on all examples (no perturbation); NaN/inf rank worst.
    """
    del mesh  # one CMA-ES: nothing to shard over clients
    scorer = scorer or default_scorer(config, lm)
    hidden, d = lm.hidden_size, config.intrinsic_dim
    pop = population_size or config.population_size
    es_params = strategy.local_params(pop, d)

    def init(key, hp: HParams):
        del key  # deterministic start, as FedBPT's server
        check_hparams(hp)
        es = strategy.client_init(aggregation.server_init(d, hp.sigma0, 2), es_params)
        return CentralState(es=es, round=jnp.asarray(0, jnp.int32))

    def round_fn(key, state: CentralState, data: FederatedData, hp: HParams, model: ModelInputs):
        flat = objective.flatten_clients(data.train)
        ctx = objective.prepare_pooled(scorer, model.params, data.train, data.spec)

        def score(z):
            prompts = prompt.to_prompt(model.projection, z, hidden, model.start)
            return objective.population_fitness(
                scorer, model.params, ctx, None, flat, data.spec, prompts, loss=config.loss
            )

        def generation(es, k):
            z, es = strategy.ask(k, es, es_params)
            fit, _ = score(z)
            return strategy.tell(z, fit, es, es_params), jnp.sum(~jnp.isfinite(fit))

        es, nonfinite = jax.lax.scan(generation, state.es, jax.random.split(key, config.local_generations))
        _, loss = score(es.mean[None])
        gens = config.local_generations * pop
        metrics = {
            "client_loss": loss[0],
            "sigma": es.std,
            "nonfinite_fitness": jnp.sum(nonfinite).astype(jnp.int32),
            "active_clients": jnp.asarray(1, jnp.int32),
            "all_fitness_nonfinite": (jnp.sum(nonfinite) == gens).astype(jnp.int32),
            "z_norm": jnp.linalg.norm(es.mean),
        }
        return CentralState(es=es, round=state.round + 1), metrics

    def global_prompt(state: CentralState, model: ModelInputs):
        return prompt.to_prompt(model.projection, state.es.mean, hidden, model.start)

    def global_z(state: CentralState):
        return state.es.mean

    cost = AlgorithmCost(
        comm=accounting.CommBytes(0, 0, 0),
        forward_calls=config.local_generations * pop + 1,
        prefix_passes=1,
        pooled=True,
    )
    spec = AlgorithmSpec(
        config,
        cost,
        scorer=scorer,
        global_z=global_z,
        hparams=hparams_read("centralized_bbt", config),
        **centralized_bbt.declares,
    )
    return FederatedAlgorithm("centralized_bbt", init, round_fn, global_prompt, spec)


@declares()
def manual_prompt(config: FedConfig, lm, *, mesh=None) -> FederatedAlgorithm:
    """The manual prompt baseline: the prompt start (``model.start``; zeros when None), i.e. exactly
    FedBPT's z = 0 prompt under every start option; rounds do nothing."""
    del mesh
    n, hidden = config.n_prompt_tokens, lm.hidden_size

    def init(key, hp):
        check_hparams(hp)
        return jnp.asarray(0, jnp.int32)

    def round_fn(key, state, data, hp, model):
        return state + 1, {
            "client_loss": jnp.asarray(jnp.nan),
            "sigma": jnp.asarray(0.0),
            "nonfinite_fitness": jnp.asarray(0, jnp.int32),
            "active_clients": jnp.asarray(0, jnp.int32),
        }

    def global_prompt(state, model):
        return prompt.start_prompt(model.start, n, hidden)

    spec = AlgorithmSpec(
        config,
        AlgorithmCost(comm=accounting.CommBytes(0, 0, 0), forward_calls=0),
        hparams=hparams_read("manual", config),
        **manual_prompt.declares,
    )
    return FederatedAlgorithm("manual", init, round_fn, global_prompt, spec)


ALGORITHMS = {
    "fedbpt": fedbpt,
    "fedavg_bbt": fedavg_bbt,
    "fedavg_bbt_perturbed": functools.partial(fedavg_bbt, perturb=True),
    "centralized_bbt": centralized_bbt,
    "manual": manual_prompt,
    "fedprompt": fedprompt,
}
assert tuple(ALGORITHMS) == ALGORITHM_NAMES, "the factories cover exactly the registry's names"


def make(name: str, config: FedConfig, lm, **kwargs) -> FederatedAlgorithm:
    """Builds an algorithm by name (``sorted(ALGORITHMS)``)."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; accepted: {sorted(ALGORITHMS)}")
    return ALGORITHMS[name](config, lm, **kwargs)
