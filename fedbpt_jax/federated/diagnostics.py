"""Per-client round diagnostics (``metrics["clients"]``) and the split of a detailed round into its scalar
metrics: what every built-in algorithm reports beside its own numbers (:mod:`fedbpt_jax.federated.algorithms`,
:mod:`fedbpt_jax.federated.white_box`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..types import ScoringSpec, TokenBatch


def _finite_mean(x: jax.Array, where: jax.Array) -> jax.Array:
    ok = where & jnp.isfinite(x)
    return jnp.sum(jnp.where(ok, x, 0.0)) / jnp.maximum(jnp.sum(ok.astype(jnp.float32)), 1.0)


def label_counts(batch: TokenBatch, num_labels: int) -> jax.Array:
    """``[..., C]`` int32 real examples per label of each client's batch ``[..., E]``."""
    onehot = jax.nn.one_hot(batch.labels, num_labels, dtype=jnp.int32)
    return jnp.sum(onehot * (batch.example_mask > 0).astype(jnp.int32)[..., None], axis=-2)


def client_diagnostics(
    idx,
    batch: TokenBatch,
    counts,
    active,
    spec: ScoringSpec,
    *,
    loss,
    weight,
    perturbed_loss=None,
    fitness=None,
    rank=None,
    repaired=None,
    usable=None,
) -> dict:
    """Per-client ``[K]`` diagnostics of a round (``metrics["clients"]``) and their scalar summaries.

    Returns ``(clients, summary)``. ``clients``: ``index`` (which of the N clients), ``active``,
    ``examples``, ``label_counts`` ``[K, C]``, ``loss`` (clean), ``perturbed_loss``, ``fitness`` (NaN for
    a dropped client: it sent nothing),
    ``rank`` (server rank by fitness, 0 = best, −1 unranked), ``weight`` (share of the new global
    mean), ``repaired`` (the server's Mahalanobis repair clipped its mean), ``usable`` (finite upload
    the server used). ``summary`` (CSV columns): ``single_class_clients`` (active clients whose
    examples all have one label), ``single_class_weight`` (their total weight), ``top_weight``,
    ``perturbed_loss_mean`` (with perturbation only) and ``all_fitness_nonfinite`` (1 if clients were active but none had a
    finite fitness: the server could not move).
    """
    k = counts.shape[0]
    lc = label_counts(batch, int(spec.label_ids.shape[0]))
    nan = jnp.full((k,), jnp.nan, jnp.float32)
    fitness = nan if fitness is None else fitness.astype(jnp.float32)
    perturbed = perturbed_loss is not None
    perturbed_loss = nan if perturbed_loss is None else perturbed_loss.astype(jnp.float32)
    usable = (active & jnp.isfinite(fitness)) if usable is None else usable
    # A dropped client sent nothing: its would-be values are not reported.
    sent = lambda x: jnp.where(active, x, jnp.nan)  # noqa: E731
    clients = {
        "index": idx.astype(jnp.int32),
        "active": active,
        "examples": counts.astype(jnp.int32),
        "label_counts": lc,
        "loss": sent(loss.astype(jnp.float32)),
        "perturbed_loss": sent(perturbed_loss),
        "fitness": sent(fitness),
        "rank": jnp.full((k,), -1, jnp.int32) if rank is None else rank.astype(jnp.int32),
        "weight": weight.astype(jnp.float32),
        "repaired": jnp.zeros((k,), bool) if repaired is None else repaired,
        "usable": usable,
    }
    single = active & (jnp.sum((lc > 0).astype(jnp.int32), axis=-1) == 1)
    n_active = jnp.sum(active.astype(jnp.int32))
    summary = {
        "single_class_clients": jnp.sum(single.astype(jnp.int32)),
        "single_class_weight": jnp.sum(jnp.where(single, clients["weight"], 0.0)),
        "top_weight": jnp.max(clients["weight"]),
        "all_fitness_nonfinite": ((n_active > 0) & ~jnp.any(active & jnp.isfinite(fitness))).astype(jnp.int32),
    }
    if perturbed:
        summary["perturbed_loss_mean"] = _finite_mean(perturbed_loss, active)
    return clients, summary


#: Round-metric keys that hold per-client arrays (only :attr:`FederatedAlgorithm.round_detailed` returns them).
DETAIL_KEYS = ("clients", "uploads")


def scalars_only(round_detailed):
    """``round`` from ``round_detailed``: the same round with only its scalar metrics (what a benchmark
    or a plain ``jit(algo.round)`` wants; under ``jit`` the per-client extras are not even computed)."""

    def round_fn(key, state, data, hp, model):
        state, metrics = round_detailed(key, state, data, hp, model)
        return state, {k: v for k, v in metrics.items() if k not in DETAIL_KEYS}

    return round_fn
