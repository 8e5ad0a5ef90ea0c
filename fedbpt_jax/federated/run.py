"""Running a simulation: ``lax.scan`` over rounds, evaluation every E rounds, best-round tracking,
device sharding, progress bar, orbax checkpoints and resume.

A run is a sequence of jitted *segments*; a segment is ``lax.scan`` over ``eval_every`` rounds
followed by one evaluation of the server's global prompt on the test set. The jitted segment is
cached per (algorithm, backbone shape, E, mesh), so every segment of a run and every later call of
:func:`run` with the same algorithm reuses one compiled program (no retrace: see :func:`trace_count`),
and its size does not depend on N or K (clients are a vmapped axis, rounds a scanned one). The round
key of round r is ``fold_in(key_rounds, r)`` (:func:`round_key`), so a run resumed from a checkpoint
after round r draws exactly what an uninterrupted run draws: states and metrics are bit-identical.

With a ``mesh`` (:func:`fedbpt_jax.federated.client_mesh`), every input becomes a global array on it
(the N clients' data sharded on the ``"clients"`` axis when the device count divides N, the rest
replicated), the round's client axis is sharded over all devices, and the carry, metrics and
evaluations come back replicated, so each process of a multi-host run reads them locally.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from .. import objective
from ..checkpoint import CheckpointMismatch, Checkpointer, fingerprint, write_csv_atomic, write_json_atomic
from ..types import TokenBatch
from .config import HParams
from .core import FederatedAlgorithm, FederatedData, ModelInputs, validate_data, validate_test
from .distributed import host, to_global

#: Number of times each segment (key: algorithm name) and initial evaluation (key: ``name + "/eval"``)
#: has been traced in this process. A steady number across calls means no retrace.
TRACE_COUNTS: collections.Counter = collections.Counter()
#: Number of XLA compilations of the same functions (a recompilation can happen without a retrace,
#: e.g. when the inputs' placement changes).
COMPILE_COUNTS: collections.Counter = collections.Counter()
_SEGMENT_PREFIX = "fedbpt_jax_segment__"
_EVAL_PREFIX = "fedbpt_jax_initial_eval__"


def _on_compile(event: str, duration: float, **kwargs) -> None:
    name = str(kwargs.get("fun_name", ""))
    if event == "/jax/core/compile/backend_compile_duration" and "fedbpt_jax_" in name:
        name = name[name.index("fedbpt_jax_"):].rstrip(")")
        if name.startswith(_SEGMENT_PREFIX):
            COMPILE_COUNTS[name[len(_SEGMENT_PREFIX):]] += 1
        elif name.startswith(_EVAL_PREFIX):
            COMPILE_COUNTS[name[len(_EVAL_PREFIX):] + "/eval"] += 1


jax.monitoring.register_event_duration_secs_listener(_on_compile)


def trace_count(name: str) -> int:
    """How many times :func:`run`'s segment of algorithm ``name`` has been traced in this process
    (``name + "/eval"``: its initial evaluation)."""
    return TRACE_COUNTS[name]


def compile_count(name: str) -> int:
    """How many times :func:`run`'s segment of algorithm ``name`` has been compiled by XLA in this process."""
    return COMPILE_COUNTS[name]


@flax.struct.dataclass
class RunCarry:
    """What a run carries between segments (and what a checkpoint holds).

    Attributes:
      state: the algorithm's server state.
      best_accuracy: best test accuracy of the global prompt so far.
      best_round: round at which it was reached.
      best_prompt: ``[n, H]`` that prompt (zeros while none is set).
      rounds_done: int32.
    """

    state: Any
    best_accuracy: jax.Array
    best_round: jax.Array
    best_prompt: jax.Array
    rounds_done: jax.Array


@dataclasses.dataclass
class History:
    """Host-side record of a run: per-round metrics and the evaluations (round 0 = the initial state)."""

    rounds: list[dict] = dataclasses.field(default_factory=list)
    evals: list[dict] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "evals": self.evals}


def round_key(key: jax.Array, r: int | jax.Array) -> jax.Array:
    """The key of round ``r`` (0-based) of a run started with ``key`` (what :func:`run` passes to ``round``)."""
    _, key_rounds = jax.random.split(key)
    return jax.random.fold_in(key_rounds, r)


@flax.struct.dataclass
class EvalSet:
    """The test set as a segment sees it: chunks ``[C, S, T]`` (``ctx`` is the raw chunks, or their
    prefix caches when ``prepared``: computed once per run, not once per evaluation)."""

    ctx: Any
    labels: jax.Array
    example_mask: jax.Array
    prepared: bool = flax.struct.field(pytree_node=False, default=False)


def _eval(algo: FederatedAlgorithm, state, model: ModelInputs, test: EvalSet, spec, scorer):
    p = algo.global_prompt(state, model)
    if test.prepared:
        logits = objective.evaluate_prepared(scorer, model.params, test.ctx, spec, p)
    else:
        logits = objective.evaluate_logits(scorer, model.params, test.ctx, spec, p)
    return objective.classification_metrics(logits, test.labels, test.example_mask), p


def _keep_best(carry: RunCarry, ev, p, at_round, n_prompt: int, hidden: int) -> RunCarry:
    p = jnp.zeros((n_prompt, hidden), jnp.float32) if p is None else p.astype(jnp.float32)
    better = ev["accuracy"] > carry.best_accuracy
    return carry.replace(
        best_accuracy=jnp.where(better, ev["accuracy"], carry.best_accuracy).astype(jnp.float32),
        best_round=jnp.where(better, at_round, carry.best_round).astype(jnp.int32),
        best_prompt=jnp.where(better, p, carry.best_prompt),
    )


def make_segment(algo: FederatedAlgorithm, scorer, eval_every: int, n_prompt: int, hidden: int, key_impl=None):
    """The jittable segment ``(key_data, carry, data, hp, model, test) -> (carry, metrics, eval)``.

    ``eval_every`` rounds in a ``lax.scan`` (round ``r`` gets ``fold_in(key, r)``), then one test
    evaluation of the global prompt and the best-round update. ``key_data`` is the raw data of the
    rounds' key (``jax.random.key_data``), so it can be a global array on a multi-host mesh.
    """

    def segment(key_data, carry: RunCarry, data: FederatedData, hp: HParams, model: ModelInputs, test: EvalSet):
        TRACE_COUNTS[algo.name] += 1  # Python side effect: runs only while tracing
        key = jax.random.wrap_key_data(key_data, impl=key_impl)

        def body(state, r):
            return algo.round(jax.random.fold_in(key, r), state, data, hp, model)

        rounds = carry.rounds_done + jnp.arange(eval_every, dtype=jnp.int32)
        state, metrics = jax.lax.scan(body, carry.state, rounds)
        ev, p = _eval(algo, state, model, test, data.spec, scorer)
        done = carry.rounds_done + eval_every
        new = _keep_best(carry.replace(state=state, rounds_done=done), ev, p, done, n_prompt, hidden)
        return new, metrics, ev

    segment.__name__ = segment.__qualname__ = _SEGMENT_PREFIX + algo.name
    return segment


def make_initial_eval(algo: FederatedAlgorithm, scorer, n_prompt: int, hidden: int):
    """The jittable evaluation of the initial state: ``(carry, data, model, test) -> (carry, eval)``."""

    def initial(carry: RunCarry, data: FederatedData, model: ModelInputs, test: EvalSet):
        TRACE_COUNTS[algo.name + "/eval"] += 1
        ev, p = _eval(algo, carry.state, model, test, data.spec, scorer)
        return _keep_best(carry, ev, p, carry.rounds_done, n_prompt, hidden), ev

    initial.__name__ = initial.__qualname__ = _EVAL_PREFIX + algo.name
    return initial


def _replicated(mesh):
    if mesh is None:
        return None
    from jax.sharding import NamedSharding, PartitionSpec as P

    return NamedSharding(mesh, P())


def _algo_scorer(algo: FederatedAlgorithm, kind: str, model_config):
    cfg = algo.config
    if algo.scorer is not None:
        return algo.scorer
    return objective.scorer_for(kind, model_config, cfg.layout, n_prompt_tokens=cfg.n_prompt_tokens)


@functools.lru_cache(maxsize=64)
def _jitted(algo: FederatedAlgorithm, kind: str, model_config, eval_every: int, hidden: int, key_impl, mesh):
    cfg = algo.config
    scorer = _algo_scorer(algo, kind, model_config)
    out = _replicated(mesh)
    segment = jax.jit(make_segment(algo, scorer, eval_every, cfg.n_prompt_tokens, hidden, key_impl), out_shardings=out)
    initial = jax.jit(make_initial_eval(algo, scorer, cfg.n_prompt_tokens, hidden), out_shardings=out)
    return segment, initial


@functools.lru_cache(maxsize=16)
def _prepare_eval(scorer):
    return jax.jit(functools.partial(objective.prepare_chunks, scorer))


def _mesh_context(mesh):
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def _costs(scorer, data_spec, seq_len: int) -> objective.ScoreCost:
    """The scorer's cost model for a batch of padded text length ``seq_len`` and this task's spec."""
    return scorer.cost(int(seq_len), int(np.shape(data_spec.cue_ids)[0]), int(np.shape(data_spec.label_ids)[0]))


def round_cost(algo: FederatedAlgorithm, lm, data: FederatedData) -> dict[str, float]:
    """Model compute per *active* client per round, from the scorer's cost model and the batch shapes.

    Returns ``examples_per_call`` (the padded local batch E, or N·E for a pooled algorithm),
    ``forward_calls`` (over that batch), ``prefix_passes`` and ``flops_per_client`` =
    calls · examples · forward FLOPs/example + prefix passes · examples · prepare FLOPs/example. Padding
    rows are computed, so they are counted.
    """
    scorer = _algo_scorer(algo, lm.kind, lm.config)
    n, e, t = np.shape(data.train.input_ids)
    cost = _costs(scorer, data.spec, t)
    examples = n * e if algo.pooled else e
    flops = algo.forward_calls * examples * cost.forward + algo.prefix_passes * examples * cost.prepare
    return {"examples_per_call": examples, "forward_calls": algo.forward_calls, "prefix_passes": algo.prefix_passes,
            "flops_per_client": flops}


def _eval_flops(lm, algo, chunks: TokenBatch, spec, prefix_cached: bool = False) -> float:
    scorer = _algo_scorer(algo, lm.kind, lm.config)
    c, b, t = np.shape(chunks.input_ids)
    cost = _costs(scorer, spec, t)
    return c * b * (cost.forward + (0.0 if prefix_cached else cost.prepare))


def _describe(algo: FederatedAlgorithm, hp: HParams, eval_every: int, key_data, data: FederatedData, lm,
              model: ModelInputs) -> dict[str, str]:
    """What identifies a run for resuming (everything but the round count, the mesh and the I/O)."""
    c = data.counts
    readable = not isinstance(c, jax.Array) or c.is_fully_addressable or c.is_fully_replicated
    counts = host(c) if readable else None
    desc = {"algorithm": algo.name, "eval_every": eval_every, "key": np.asarray(host(key_data)).tolist(),
            "backbone": f"{lm.name} {lm.config!r}", "data_shape": list(np.shape(data.train.input_ids)),
            "client_counts_sum": None if counts is None else int(np.sum(counts)),
            "projection_shape": None if model.projection is None else list(np.shape(model.projection))}
    desc.update({f"config.{f.name}": getattr(algo.config, f.name) for f in dataclasses.fields(algo.config)})
    desc.update({f"hp.{k}": float(np.asarray(v)) for k, v in dataclasses.asdict(host(hp)).items()})
    return {k: repr(v) for k, v in desc.items()}


def _encode(x):
    """Floats that JSON cannot hold (NaN, ±inf) as strings, so a restored history is bit-identical."""
    if isinstance(x, dict):
        return {k: _encode(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_encode(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    return x


def _decode(x):
    if isinstance(x, dict):
        return {k: _decode(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode(v) for v in x]
    if x in ("nan", "inf", "-inf"):
        return float(x)
    return x


def _restore(ckpt: Checkpointer, template: RunCarry, desc: dict[str, str]):
    try:
        return ckpt.restore(template)
    except CheckpointMismatch as err:
        import orbax.checkpoint as ocp

        step = ckpt.latest_step()
        old = ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"].get("config", {})
        diff = [f"{k}: checkpoint {old.get(k, '<absent>')}, this run {v}" for k, v in desc.items() if old.get(k) != v]
        diff += [f"{k}: checkpoint {v}, this run <absent>" for k, v in old.items() if k not in desc]
        raise CheckpointMismatch(f"checkpoint {ckpt.directory} (round {step}) is from another configuration: "
                                 + ("; ".join(diff) or str(err))
                                 + ". Resume with the same configuration or use a new checkpoint directory") from None


def _row_value(v):
    v = np.asarray(v)
    if v.dtype == bool or np.issubdtype(v.dtype, np.integer):
        return int(v)
    return float(v)


def run(
    algo: FederatedAlgorithm,
    key: jax.Array,
    data: FederatedData,
    test: TokenBatch,
    lm,
    model: ModelInputs,
    *,
    num_rounds: int,
    hp: HParams = HParams(),
    eval_every: int = 1,
    eval_chunk: int = 64,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    results_dir: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    mesh=None,
    cache_eval_prefix: bool | None = None,
    eval_cache_budget: int = 2 << 30,
) -> tuple[RunCarry, History]:
    """Runs ``num_rounds`` rounds of ``algo`` and evaluates the global prompt every ``eval_every`` rounds.

    Example::

        algo = fl.fedbpt(fl.FedConfig(num_clients=10, clients_per_round=4), lm)
        carry, history = fl.run(algo, jax.random.key(0), data, test, lm, model, num_rounds=20,
                                eval_every=5, mesh=fl.client_mesh())
        print(history.evals[-1]["accuracy"], int(carry.best_round))

    Args:
      algo: a :class:`FederatedAlgorithm`.
      key: the run's key (round r uses :func:`round_key` ``(key, r)``).
      data: all clients' training data (validated first: see :func:`~fedbpt_jax.federated.core.validate_data`).
      test: test examples ``[B, T]`` (chunked by ``eval_chunk`` internally).
      lm: the backbone bundle (for the scorer, sizes and FLOP counts).
      model: frozen arrays (params, projection).
      num_rounds: total rounds; must be a positive multiple of ``eval_every``.
      hp: numeric hyperparameters.
      eval_every: E, rounds per jitted segment (static).
      checkpoint_dir: orbax checkpoints go here; an existing checkpoint of the same configuration is
        resumed, one of another configuration is an error naming the differing values.
      checkpoint_every: save every this many rounds (at segment ends) and at the last round.
      results_dir: ``metrics.json`` and ``rounds.csv`` are written there atomically after each segment.
      progress: show a per-segment tqdm progress bar.
      stop_after: stop (as if killed) after this many rounds (a multiple of ``eval_every``); for resume
        tests and time-boxed runs.
      mesh: shard the client axis over this mesh's devices (default: ``algo.mesh``; None: one device).
      cache_eval_prefix: keep the test set's prefix cache (decoder, layout "after") for the whole run,
        so an evaluation costs only the prompt and cue tokens per example. ``None`` (default): on
        when the cache fits ``eval_cache_budget`` bytes.

    Returns:
      ``(carry, history)``: the final carry (state, best accuracy, best round, best prompt) and the
      host-side history. Each round's row holds the algorithm's metrics and the accounting:
      ``bytes_down_per_client``, ``bytes_up_per_client``, ``fedavg_full_model_bytes_per_client``,
      ``forward_calls`` (over the local batch, all active clients), ``model_flops`` and ``seconds``
      (wall time of the segment divided by E; the first segment includes compilation).
    """
    from tqdm.auto import tqdm

    for name, v in (("num_rounds", num_rounds), ("eval_every", eval_every), ("checkpoint_every", checkpoint_every),
                    ("eval_chunk", eval_chunk)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if num_rounds % eval_every:
        raise ValueError(f"num_rounds ({num_rounds}) must be a positive multiple of eval_every ({eval_every})")
    if stop_after is not None and (stop_after < 0 or stop_after % eval_every):
        raise ValueError(f"stop_after ({stop_after}) must be a non-negative multiple of eval_every ({eval_every})")
    if mesh is not None and algo.mesh is not None and mesh != algo.mesh:
        raise ValueError("run(mesh=...) differs from the mesh the algorithm was built with; pass one of them")
    mesh = algo.mesh if mesh is None else mesh
    hp = hp.validate()
    cfg = algo.config
    validate_data(data, cfg, vocab_size=lm.vocab_size)
    num_labels = int(np.shape(data.spec.label_ids)[0])
    validate_test(test, num_labels)

    if jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
        impl = jax.random.key_impl(key)
    else:  # a raw uint32 key
        key = jax.random.wrap_key_data(jnp.asarray(key))
        impl = jax.random.key_impl(key)
    key_init, key_rounds = jax.random.split(key)
    key_data = jax.random.key_data(key_rounds)
    segment, initial = _jitted(algo, lm.kind, lm.config, eval_every, lm.hidden_size, impl, mesh)
    chunks = objective.chunk_examples(test, eval_chunk)
    cost = round_cost(algo, lm, data)

    carry = RunCarry(
        state=algo.init(key_init, hp),
        best_accuracy=jnp.asarray(-1.0, jnp.float32),
        best_round=jnp.asarray(-1, jnp.int32),
        best_prompt=jnp.zeros((cfg.n_prompt_tokens, lm.hidden_size), jnp.float32),
        rounds_done=jnp.asarray(0, jnp.int32),
    )
    if mesh is not None:
        data = data.replace(train=to_global(data.train, mesh, clients=True),
                            counts=to_global(data.counts, mesh, clients=True), spec=to_global(data.spec, mesh))
        model, hp, chunks, carry, key_data = to_global((model, hp, chunks, carry, key_data), mesh)
    else:
        chunks = jax.tree_util.tree_map(jnp.asarray, chunks)
    scorer = _algo_scorer(algo, lm.kind, lm.config)
    if cache_eval_prefix is None:
        cache_eval_prefix = scorer.caches_prefix and objective.prepared_bytes(scorer, lm.params, chunks) <= eval_cache_budget
    cache_eval_prefix = bool(cache_eval_prefix and scorer.caches_prefix)
    if cache_eval_prefix:
        with _mesh_context(mesh):
            ctx = _prepare_eval(scorer)(model.params, chunks)
        evalset = EvalSet(ctx, chunks.labels, chunks.example_mask, prepared=True)
    else:
        evalset = EvalSet(chunks, chunks.labels, chunks.example_mask)
    eval_flops = _eval_flops(lm, algo, chunks, data.spec, cache_eval_prefix)

    history = History()
    ckpt = None
    lead = jax.process_index() == 0
    if checkpoint_dir is not None:
        desc = _describe(algo, hp, eval_every, key_data, data, lm, model)
        ckpt = Checkpointer(checkpoint_dir, fingerprint(sorted(desc.items())))
        if ckpt.latest_step() is not None:
            step, carry, meta = _restore(ckpt, carry, desc)
            if mesh is None:  # restored arrays are committed to a device: match a fresh run's placement
                carry = jax.tree_util.tree_map(jnp.asarray, host(carry))
            if step > num_rounds:
                raise ValueError(f"checkpoint {ckpt.directory} is at round {step}, past num_rounds={num_rounds}")
            history = History(rounds=_decode(meta["rounds"]), evals=_decode(meta["evals"]))
    if not history.evals:
        with _mesh_context(mesh):
            carry, ev = initial(carry, data, model, evalset)
        history.evals.append({"round": 0, **{k: float(v) for k, v in host(ev).items()}, "eval_flops": eval_flops})

    comm = algo.comm
    done = int(host(carry.rounds_done))
    last = num_rounds if stop_after is None else min(num_rounds, stop_after)
    with tqdm(total=num_rounds, initial=done, desc=algo.name, unit="round", disable=not (progress and lead)) as bar:
        while done < last:
            t0 = time.perf_counter()
            with _mesh_context(mesh):
                carry, metrics, ev = segment(key_data, carry, data, hp, model, evalset)
            metrics, ev = host((metrics, ev))
            dt = time.perf_counter() - t0
            done += eval_every
            for i in range(eval_every):
                row = {"round": done - eval_every + i + 1, **{k: _row_value(v[i]) for k, v in metrics.items()}}
                active = 1 if algo.pooled and row.get("active_clients", 0) > 0 else row.get("active_clients", 0)
                row.update({"bytes_down_per_client": comm.down_per_client, "bytes_up_per_client": comm.up_per_client,
                            "fedavg_full_model_bytes_per_client": comm.fedavg_full_model_per_client,
                            "forward_calls": int(algo.forward_calls * active),
                            "examples_per_call": cost["examples_per_call"],
                            "model_flops": float(cost["flops_per_client"] * active),
                            "seconds": dt / eval_every})
                history.rounds.append(row)
            history.evals.append({"round": done, **{k: float(v) for k, v in ev.items()}, "eval_flops": eval_flops})
            last_row = history.rounds[-1]
            bar.set_postfix({"acc": f"{float(ev['accuracy']):.3f}", "loss": f"{last_row['client_loss']:.3f}",
                             "σ": f"{last_row['sigma']:.3f}", "up": f"{comm.up_per_client}B"})
            bar.update(eval_every)
            if ckpt is not None and (done % checkpoint_every == 0 or done >= last):
                ckpt.save(done, carry, {**_encode(history.as_dict()), "config": desc})
            if results_dir is not None and lead:
                write_results(results_dir, history, carry)
    if ckpt is not None:
        ckpt.close()
    return carry, history


def write_results(results_dir, history: History, carry: RunCarry) -> None:
    """``metrics.json`` (everything) and ``rounds.csv`` (one row a round), each replaced atomically."""
    d = Path(results_dir)
    best = host((carry.best_accuracy, carry.best_round))
    write_json_atomic(d / "metrics.json", {**history.as_dict(), "best_accuracy": float(best[0]),
                                           "best_round": int(best[1])})
    write_csv_atomic(d / "rounds.csv", history.rounds)
