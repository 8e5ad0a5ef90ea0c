"""Shared pieces of every federated algorithm: data container, frozen model inputs, sampling.

Clients are an array axis. The N clients' data are one padded ``TokenBatch`` of shape ``[N, E, T]``
(E = the largest client's example count, padding rows masked out) plus per-client example counts;
sampling K of N is a gather with static K, and dropouts are masks with zero aggregation weight.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from ..types import ScoringSpec, TokenBatch

CLIENT_AXIS = "clients"


@flax.struct.dataclass
class FederatedData:
    """All clients' training data.

    Attributes:
      train: ``TokenBatch`` with leading axes ``[N, E]``.
      counts: ``[N]`` int32 real examples per client (FedAvg weights, sampling weights).
      spec: the task's :class:`ScoringSpec`.
    """

    train: TokenBatch
    counts: jax.Array
    spec: ScoringSpec

    @property
    def num_clients(self) -> int:
        return self.counts.shape[0]


@flax.struct.dataclass
class ModelInputs:
    """The big frozen arrays: always jit *arguments*, never closures.

    Attributes:
      params: backbone parameter pytree.
      projection: ``[d, n_prompt·H]`` random projection A (None for FedPrompt).
    """

    params: Any
    projection: Any


class FederatedAlgorithm(NamedTuple):
    """A federated algorithm as pure functions (optax/fedjax style).

    Attributes:
      name: algorithm name.
      init: ``(key, hp) -> state``.
      round: ``(key, state, data, hp, model) -> (state, metrics)``; one round, jittable, pure.
      global_prompt: ``(state, model) -> [n, H]`` the prompt the server would deploy now (evaluated on
        the test set by :func:`fedbpt_jax.federated.run`); None means "no prompt" (manual prompt).
      config: the algorithm's static config.
      comm: per-client bytes per round (:class:`fedbpt_jax.accounting.CommBytes`).
      forward_calls: model forward passes over a client's local batch per active client per round.
    """

    name: str
    init: Callable
    round: Callable
    global_prompt: Callable
    config: Any
    comm: Any
    forward_calls: int


def sample_clients(key: jax.Array, counts: jax.Array, k: int, how: str = "uniform") -> jax.Array:
    """Indices ``[K]`` of the clients taking part in a round, without replacement.

    Clients with no examples are never sampled while enough non-empty clients exist.
    """
    n = counts.shape[0]
    if k > n:
        raise ValueError(f"cannot sample K={k} clients out of N={n}")
    nonempty = (counts > 0).astype(jnp.float32)
    weights = nonempty if how == "uniform" else counts.astype(jnp.float32)
    if k == n:
        return jnp.arange(n)
    # Gumbel top-k: sampling without replacement ∝ weights, O(N) and static-shaped.
    g = jax.random.gumbel(key, (n,))
    scores = jnp.where(weights > 0, jnp.log(jnp.maximum(weights, 1e-30)) + g, -jnp.inf)
    return jax.lax.top_k(scores, k)[1]


def gather_clients(data: FederatedData, idx: jax.Array) -> tuple[TokenBatch, jax.Array]:
    """The sampled clients' batches ``[K, E, T]`` and counts ``[K]``."""
    batch = jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), data.train)
    return batch, jnp.take(data.counts, idx)


def client_keys(key: jax.Array, k: int, mode: str) -> jax.Array:
    """Per-client keys ``[K]``: independent (split) or the reference's shared draws (all equal)."""
    if mode == "shared":
        return jnp.repeat(key[None], k, axis=0)
    return jax.random.split(key, k)


def constrain_clients(tree, mesh):
    """Shards the leading (client) axis of every leaf over ``mesh``'s client axis (no-op without mesh)."""
    if mesh is None:
        return tree
    from jax.sharding import NamedSharding, PartitionSpec as P

    def one(x):
        if getattr(x, "ndim", 0) == 0:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(CLIENT_AXIS)))

    return jax.tree_util.tree_map(one, tree)


def map_clients(fn: Callable, xs, chunk: int = 0, mesh=None):
    """``vmap(fn)`` over the client axis of ``xs``, in chunks of ``chunk`` clients when > 0.

    Chunking (``lax.map`` over chunks, vmapped inside) bounds the peak memory of the batched
    clients × population × examples forward pass, so K = 1000 with a real model fits one device.
    """
    xs = constrain_clients(xs, mesh)
    k = jax.tree_util.tree_leaves(xs)[0].shape[0]
    if chunk and chunk < k:
        out = jax.lax.map(lambda x: fn(*x), xs, batch_size=chunk)
    else:
        out = jax.vmap(lambda x: fn(*x))(xs)
    return constrain_clients(out, mesh)
