"""Shared pieces of every federated algorithm: data container, frozen model inputs, the algorithm
record and its cost, sampling.

Clients are an array axis. The N clients' data are one padded ``TokenBatch`` of shape ``[N, E, T]``
(E = the largest client's example count, padding rows masked out) plus per-client example counts;
sampling K of N is a gather with static K, and dropouts are masks with zero aggregation weight.
"""

from __future__ import annotations

import dataclasses
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
      clean_context: the clients' clean prepared contexts (the decoder's text-prefix key/value cache,
        leading axis ``[N]``: :meth:`fedbpt_jax.objective.Scorer.prepare` of each client's batch), kept
        across rounds because a client's data never change; None (default): each round rebuilds them.
        :func:`with_clean_context` fills it; :func:`fedbpt_jax.federated.run` does so when it fits
        (``keep_clean_context``).
    """

    train: TokenBatch
    counts: jax.Array
    spec: ScoringSpec
    clean_context: Any = None

    @property
    def num_clients(self) -> int:
        return self.counts.shape[0]

    @classmethod
    def from_host(cls, fed) -> "FederatedData":
        """From :func:`fedbpt_jax.data.federated`'s host-side :class:`~fedbpt_jax.data.FederatedSplits` (numpy) to device arrays."""
        return cls(
            train=jax.tree_util.tree_map(jnp.asarray, fed.train),
            counts=jnp.asarray(fed.train_counts, jnp.int32),
            spec=fed.spec,
        )


@flax.struct.dataclass
class ModelInputs:
    """The big frozen arrays: always jit *arguments*, never closures.

    Attributes:
      params: backbone parameter pytree.
      projection: ``[d, n_prompt·H]`` random projection A (None for FedPrompt).
      start: ``[n, H]`` prompt start, or None for zeros: the soft prompt is ``start + A z``, so z = 0 and
        the manual-prompt baseline are both the start prompt (see :func:`fedbpt_jax.prompt.build_start`).
        FedPrompt tunes an offset from it.
    """

    params: Any
    projection: Any
    start: Any = None

    @classmethod
    def build(cls, key: jax.Array, lm, config, start=None) -> "ModelInputs":
        """The backbone's params, a projection A built from ``key`` as BBT builds it (see
        :func:`fedbpt_jax.prompt.make_projection`), sized by ``config`` (d, n_prompt, kind, α), and the
        prompt start.

        Args:
          start: what the soft prompt is at z = 0 (:func:`fedbpt_jax.prompt.build_start`): None or
            ``"zeros"``; ``"tokens:1000,1001,…"`` or a list of ids; ``"phrase: In short:"`` (its token
            count must equal ``config.n_prompt_tokens``); a ``[n, H]`` array or a ``.npy`` path.

        Example::

            model = ModelInputs.build(jax.random.key(0), lm, cfg, start="phrase: In short:")
        """
        from .. import prompt

        projection = prompt.make_projection(
            key,
            lm.input_embeddings(),
            intrinsic_dim=config.intrinsic_dim,
            n_prompt_tokens=config.n_prompt_tokens,
            kind=config.projection,
            alpha=config.projection_alpha,
        )
        start = prompt.build_start(lm, start, config.n_prompt_tokens, config.layout)
        return cls(params=lm.params, projection=projection, start=start)


@dataclasses.dataclass(frozen=True)
class AlgorithmCost:
    """What one round of an algorithm costs, for the accounting only (the round never reads it).

    Attributes:
      comm: per-client bytes per round (:class:`fedbpt_jax.accounting.CommBytes`).
      forward_calls: model forward passes over a client's local batch per active client per round
        (a backward pass counts as two; a candidate's clean and perturbed copies count as two, as in the
        reference code, although the engine runs them as one batched pass).
      prefix_passes: passes over a client's local batch that only build the decoder's text-prefix
        key/value cache (:meth:`fedbpt_jax.objective.Scorer.prepare`), per active client per round.
      pooled: the algorithm trains on the union of all clients' data (centralized BBT): its forward
        calls run over all ``N × E`` examples, once per round.
      paired: the forward calls come in clean/perturbed pairs run as one pass
        (:meth:`fedbpt_jax.objective.Scorer.paired`): a scorer's per-candidate work (layout "before": the
        prompt cache) runs once per pair.
    """

    comm: Any
    forward_calls: int
    prefix_passes: int = 0
    pooled: bool = False
    paired: bool = False


@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
    """Everything about an algorithm beyond its four functions: what it is built with, what it costs, what
    it offers beyond ``round``, and what it declares to :func:`fedbpt_jax.federated.run`.

    Attributes:
      config: the algorithm's static config.
      cost: what a round costs (:class:`AlgorithmCost`: bytes, forward calls, prefix passes, pooled).
      mesh: the device mesh whose ``"clients"`` axis shards the client axis (None: the ambient mesh
        set by :func:`fedbpt_jax.federated.run` or ``jax.set_mesh``, if any).
      scorer: the :class:`~fedbpt_jax.objective.Scorer` the rounds use (:func:`~fedbpt_jax.federated.run`
        evaluates and counts FLOPs with it; None: the backbone's default scorer).
      global_z: ``state -> [d]`` the global intrinsic vector z (None: the algorithm has none, e.g.
        FedPrompt, which tunes the embeddings directly); :func:`~fedbpt_jax.federated.run` logs ‖z‖.
      round_detailed: the same round as ``round`` whose metrics also hold ``"clients"`` (per-client
        diagnostics ``[K]``, among them ``"index"``: which of the N clients were sampled, and
        ``"active"``: which of them took part rather than dropped) and, when ``uploads``, ``"uploads"``
        (what the clients sent, d floats each); None: ``round`` has no per-client detail. ``round``
        itself returns scalar metrics only.
      uses_clean_context: the rounds read the clients' kept clean contexts
        (:attr:`FederatedData.clean_context`) instead of preparing them, one prefix pass fewer per client
        per round (``run(keep_clean_context=...)`` accepts it, :func:`~fedbpt_jax.federated.round_cost`
        counts one prefix pass fewer).
      uploads: ``round_detailed``'s metrics hold ``"uploads"`` (``run(save_uploads=...)`` accepts it).
      hparams: the :class:`~fedbpt_jax.federated.HParams` fields that ``init`` and ``round`` read (see
        :func:`~fedbpt_jax.federated.algorithms.hparams_read`); a sweep over any other field would run
        identical lanes and is refused. None: not declared (a user-built algorithm), every field accepted.
    """

    config: Any
    cost: AlgorithmCost
    mesh: Any = None
    scorer: Any = None
    global_z: Callable | None = None
    round_detailed: Callable | None = None
    uses_clean_context: bool = False
    uploads: bool = False
    hparams: tuple[str, ...] | None = None


class FederatedAlgorithm(NamedTuple):
    """A federated algorithm as pure functions (optax/fedjax style).

    The record holds what every algorithm has, its name and three functions, and one
    :class:`AlgorithmSpec` with the rest (config, cost, mesh, scorer, the optional ``global_z`` and
    ``round_detailed``, and the properties it declares to :func:`fedbpt_jax.federated.run`). The spec's
    fields read as the algorithm's own (``algo.config``, ``algo.cost``, ``algo.mesh``, ``algo.scorer``,
    ``algo.global_z``, ``algo.round_detailed``, ``algo.uses_clean_context``, ``algo.uploads``); a
    variant is ``algo._replace(name=..., spec=dataclasses.replace(algo.spec, ...))``.

    Attributes:
      name: algorithm name.
      init: ``(key, hp) -> state``.
      round: ``(key, state, data, hp, model) -> (state, metrics)``; one round, jittable, pure.
      global_prompt: ``(state, model) -> [n, H]`` the prompt the server would deploy now (evaluated on
        the test set by :func:`fedbpt_jax.federated.run`); None means "no prompt" (manual prompt).
      spec: :class:`AlgorithmSpec`, everything else.
    """

    name: str
    init: Callable
    round: Callable
    global_prompt: Callable
    spec: AlgorithmSpec

    @property
    def config(self) -> Any:
        """``spec.config``."""
        return self.spec.config

    @property
    def cost(self) -> AlgorithmCost:
        """``spec.cost``."""
        return self.spec.cost

    @property
    def mesh(self) -> Any:
        """``spec.mesh``."""
        return self.spec.mesh

    @property
    def scorer(self) -> Any:
        """``spec.scorer``."""
        return self.spec.scorer

    @property
    def global_z(self) -> Callable | None:
        """``spec.global_z``."""
        return self.spec.global_z

    @property
    def round_detailed(self) -> Callable | None:
        """``spec.round_detailed``."""
        return self.spec.round_detailed

    @property
    def uses_clean_context(self) -> bool:
        """``spec.uses_clean_context``."""
        return self.spec.uses_clean_context

    @property
    def uploads(self) -> bool:
        """``spec.uploads``."""
        return self.spec.uploads


class ClientSample(NamedTuple):
    """The clients of one round (:func:`sample_round`).

    Attributes:
      index: ``[K]`` int which of the N clients were sampled.
      active: ``[K]`` bool which of them take part (False: dropped out, or no examples).
      batch: their ``TokenBatch`` ``[K, E, T]``.
      counts: ``[K]`` their example counts.
      keys: ``[K]`` their keys (:func:`client_keys`).
    """

    index: jax.Array
    active: jax.Array
    batch: TokenBatch
    counts: jax.Array
    keys: jax.Array


def sample_round(key: jax.Array, data: "FederatedData", hp, config) -> ClientSample:
    """Samples the round's K clients (``config.sampling``), drops each with probability ``hp.dropout_rate``
    and gives each its key (``config.client_keys``); ``key`` is split once into the three purposes."""
    key_sample, key_drop, key_clients = jax.random.split(key, 3)
    idx = sample_clients(key_sample, data.counts, config.clients_per_round, config.sampling)
    batch, counts = gather_clients(data, idx)
    active = (jax.random.uniform(key_drop, (config.clients_per_round,)) >= hp.dropout_rate) & (counts > 0)
    keys = client_keys(key_clients, config.clients_per_round, config.client_keys)
    return ClientSample(index=idx, active=active, batch=batch, counts=counts, keys=keys)


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


def gather(tree, idx: jax.Array):
    """The sampled clients' rows ``[K, ...]`` of every leaf of a client-leading ``tree`` (None stays None)."""
    return jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), tree)


def gather_clients(data: FederatedData, idx: jax.Array) -> tuple[TokenBatch, jax.Array]:
    """The sampled clients' batches ``[K, E, T]`` and counts ``[K]`` (their kept clean contexts:
    ``gather(data.clean_context, idx)``)."""
    return gather(data.train, idx), gather(data.counts, idx)


def clean_context_bytes(scorer, params, data: FederatedData) -> int:
    """Bytes the N clients' clean contexts take when kept across rounds (shape inference only).

    For a decoder with the prefix cache (layout "after") this is the text tokens' keys and values in every
    layer: ``N · E · T · layers · 2 · kv_heads · head_dim`` × the cache dtype's bytes (SmolLM2-135M in
    float32: about 46 KB per token, 12 MB per 256-token example). 0 for a scorer with no prefix cache.
    """
    from .. import objective

    if not scorer.caches_prefix:
        return 0
    return objective.prepared_bytes(scorer, params, data.train, data.spec)


def with_clean_context(data: FederatedData, scorer, params, *, chunk: int = 0, mesh=None) -> FederatedData:
    """``data`` with every client's clean context prepared once (:attr:`FederatedData.clean_context`).

    FedBPT and FedAvg-BBT then skip one prefix pass per client per round; the numbers are those of the
    rebuilt contexts up to float rounding (the same computation, batched differently). A scorer without a
    prefix cache (encoders, layout "before") has nothing worth keeping: ``data`` comes back unchanged.
    ``chunk`` clients are prepared at a time (0: all at once) and the result is sharded like the clients
    (``mesh``, or the ambient mesh).
    """
    if not scorer.caches_prefix:
        return data
    ctx = jax.jit(lambda p, b, s: map_clients(lambda x: scorer.prepare(p, x, s), (b,), chunk, mesh))(
        params, data.train, data.spec
    )
    return data.replace(clean_context=ctx)


def client_keys(key: jax.Array, k: int, mode: str) -> jax.Array:
    """Per-client keys ``[K]``: independent (split) or the reference's shared draws (all equal)."""
    if mode == "shared":
        return jnp.repeat(key[None], k, axis=0)
    return jax.random.split(key, k)


def _client_sharding(mesh):
    """The sharding of a client-leading array: ``mesh`` or, without one, the ambient mesh (if it has a
    ``"clients"`` axis); None when there is nothing to shard over."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if mesh is None:
        ambient = jax.sharding.get_abstract_mesh()
        if ambient.empty or CLIENT_AXIS not in ambient.axis_names:
            return None
        return P(CLIENT_AXIS)  # resolved against the ambient mesh
    if CLIENT_AXIS not in mesh.axis_names:
        raise ValueError(
            f"the mesh needs an axis named {CLIENT_AXIS!r}, got axes {mesh.axis_names}; "
            "build it with fedbpt_jax.federated.client_mesh()"
        )
    return NamedSharding(mesh, P(CLIENT_AXIS))


def constrain_clients(tree, mesh=None):
    """Shards the leading (client) axis of every leaf over the mesh's ``"clients"`` axis.

    ``mesh=None`` uses the ambient mesh (``jax.set_mesh``, as :func:`fedbpt_jax.federated.run` sets it)
    and is a no-op without one. A client count that the device count does not divide is fine inside
    ``jit``: XLA pads the last shard.
    """
    sharding = _client_sharding(mesh)
    if sharding is None:
        return tree

    def one(x):
        if getattr(x, "ndim", 0) == 0:
            return x
        return jax.lax.with_sharding_constraint(x, sharding)

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


def _host_value(x):
    """``x`` as numpy when its values can be read on this host (None for a multi-process global array)."""
    import numpy as np

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    return np.asarray(x)


def _check_context(data: FederatedData, config, t: int, kind: str, context: int) -> None:
    """Raises unless texts of ``t`` tokens (with the prompt and the cue for a decoder) fit the model's ``context``."""
    import numpy as np

    from ..models.kinds import get

    causal = get(kind).causal  # the prompt and the cue are tokens of the sequence
    cue = int(np.shape(data.spec.cue_ids)[0])
    total = t + config.n_prompt_tokens + cue if causal else t
    if total > context:
        what = (
            f"prompt ({config.n_prompt_tokens}) + text part ({t}) + cue ({cue}) = {total} tokens"
            if causal
            else f"{t} tokens per example"
        )
        raise ValueError(
            f"the data need {what}, more than the model's context of {context}; build them with "
            "data.federated(..., max_positions=<the model's context>) or a smaller max_length"
        )


def _check_counts(data: FederatedData, e: int) -> None:
    """Raises unless every client has between 1 and ``e`` examples, as its example mask says (values read
    only where they are addressable here)."""
    import numpy as np

    train = data.train
    counts = _host_value(data.counts)
    if counts is not None:
        empty = np.flatnonzero(counts <= 0)
        if empty.size:
            shown = empty[:10].tolist()
            raise ValueError(
                f"{empty.size} client(s) have no training examples (e.g. clients {shown}, "
                f"counts {counts[empty[:10]].tolist()}): every client needs at least 1 example"
            )
        if counts.max() > e:
            i = int(np.argmax(counts))
            raise ValueError(f"client {i} has counts={int(counts[i])} examples but the padded width is E={e}")
        mask = _host_value(train.example_mask)
        if mask is not None:
            real = np.sum(mask > 0, axis=1)
            bad = np.flatnonzero(real != counts)
            if bad.size:
                i = int(bad[0])
                raise ValueError(
                    f"client {i}: counts says {int(counts[i])} examples but its example_mask has "
                    f"{int(real[i])} real rows"
                )


def validate_data(
    data: FederatedData, config, *, vocab_size: int | None = None, kind: str | None = None, context: int | None = None
) -> None:
    """Host-side checks of the federated data against ``config`` (clear errors before anything compiles).

    Checks: ``[N, E, T]`` shapes with N = ``config.num_clients``; every client has at least one example;
    ``counts`` agree with the example masks and fit the padded width E; labels index the task's label
    words; token ids fit the vocabulary; the perturbation has a vocabulary to draw from. Values of a
    multi-process global array are not read (only its shapes are checked).

    Raises:
      ValueError: naming the offending value.
    """
    import numpy as np

    train, n_cfg = data.train, config.num_clients
    counts_shape = tuple(np.shape(data.counts))
    if len(counts_shape) != 1:
        raise ValueError(f"data.counts must have shape [num_clients], got shape {counts_shape}")
    n = counts_shape[0]
    if n != n_cfg:
        raise ValueError(f"data holds {n} clients but the config says num_clients={n_cfg}")
    ids_shape = tuple(np.shape(train.input_ids))
    if len(ids_shape) != 3 or ids_shape[0] != n:
        raise ValueError(f"data.train.input_ids must have shape [num_clients={n}, examples, tokens], got {ids_shape}")
    e = ids_shape[1]
    for name in ("attention_mask",):
        if tuple(np.shape(getattr(train, name))) != ids_shape:
            raise ValueError(
                f"data.train.{name} has shape {tuple(np.shape(getattr(train, name)))}, "
                f"expected {ids_shape} like input_ids"
            )
    for name in ("labels", "example_mask", "answer_pos"):
        if tuple(np.shape(getattr(train, name))) != (n, e):
            raise ValueError(f"data.train.{name} has shape {tuple(np.shape(getattr(train, name)))}, expected {(n, e)}")
    n_built = int(getattr(data.spec, "n_prompt", 0) or 0)
    if n_built and n_built != config.n_prompt_tokens:
        raise ValueError(
            f"the data were built for n_prompt={n_built} prompt tokens but the config says "
            f"n_prompt_tokens={config.n_prompt_tokens}; build the data with "
            f"n_prompt={config.n_prompt_tokens} or set FedConfig(n_prompt_tokens={n_built})"
        )
    if context is not None and kind is not None:
        _check_context(data, config, ids_shape[2], kind, context)
    num_labels = int(np.shape(data.spec.label_ids)[0])
    if num_labels < 2:
        raise ValueError(f"the task needs at least 2 label words, got {num_labels}")
    if config.perturb and data.spec.vocab_size < 1:
        raise ValueError(f"perturbation needs data.spec.vocab_size >= 1, got {data.spec.vocab_size}")
    _check_counts(data, e)
    labels, mask = _host_value(train.labels), _host_value(train.example_mask)
    if labels is not None and mask is not None:
        real = labels[mask > 0]
        if real.size and (real.min() < 0 or real.max() >= num_labels):
            bad = int(real.max()) if real.max() >= num_labels else int(real.min())
            raise ValueError(
                f"a training label is {bad}, outside [0, {num_labels}) (the task has {num_labels} label words)"
            )
    ids = _host_value(train.input_ids)
    if vocab_size is not None and ids is not None and ids.size and (ids.max() >= vocab_size or ids.min() < 0):
        bad = int(ids.max()) if ids.max() >= vocab_size else int(ids.min())
        raise ValueError(f"a training token id is {bad}, outside the model's vocabulary [0, {vocab_size})")


def validate_test(test: TokenBatch, num_labels: int) -> None:
    """Host-side checks of the test set: at least one real example, labels in range."""
    import numpy as np

    mask = np.asarray(test.example_mask)
    if mask.ndim < 1 or np.sum(mask > 0) == 0:
        raise ValueError(
            f"the test set has no examples (example_mask shape {mask.shape}, {int(np.sum(mask > 0))} real rows)"
        )
    labels = np.asarray(test.labels)[mask > 0]
    if labels.min() < 0 or labels.max() >= num_labels:
        bad = int(labels.max()) if labels.max() >= num_labels else int(labels.min())
        raise ValueError(f"a test label is {bad}, outside [0, {num_labels}) (the task has {num_labels} label words)")
