"""Running a simulation: ``lax.scan`` over rounds, evaluation every E rounds, model selection on the dev
set, per-client diagnostics, device sharding, progress bar, orbax checkpoints and resume.

A run is a sequence of jitted *segments*; a segment is ``lax.scan`` over ``eval_every`` rounds
followed by one evaluation of the server's global prompt on the test set and the dev set, and the
selection update (dev-best round, ties to the earliest; the best test accuracy is kept only as a
labelled reference-compatibility figure, :class:`RunCarry`). The jitted segment is cached per
(algorithm, backbone shape, E, mesh) (:func:`compiled_segments`), so every segment of a run and every
later call of :func:`run` with the same algorithm reuses one compiled program (no retrace: see
:func:`fedbpt_jax.testing.count_compiles`), and its size does not depend on N or K (clients are a
vmapped axis, rounds a scanned one). The round key of round r is ``fold_in(key_rounds, r)``
(:func:`round_key`), so a run resumed from a checkpoint after round r draws exactly what an
uninterrupted run draws: states and metrics are bit-identical.

:func:`run` itself is a short loop over named pieces, each usable alone: option and input checks,
:func:`compiled_segments`, :func:`initial_carry`, :func:`eval_sets` (the evaluation sets and their
prefix caches), the checkpoint (restore and save), :func:`round_rows` (the history rows with the
accounting) and :func:`write_results`. After each segment the callbacks (:mod:`fedbpt_jax.callbacks`)
receive its round rows and its evaluation row, and may stop the run at that segment boundary; at the
end, ``metrics.png`` (:func:`fedbpt_jax.plots.plot_run`) is drawn next to ``metrics.json``.

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
from ..checkpoint import Checkpointer, CheckpointMismatch, fingerprint, write_csv_atomic, write_json_atomic
from ..types import TokenBatch
from . import records
from .config import HParams
from .core import (
    FederatedAlgorithm,
    FederatedData,
    ModelInputs,
    clean_context_bytes,
    validate_data,
    validate_test,
    with_clean_context,
)
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
        name = name[name.index("fedbpt_jax_") :].rstrip(")")
        if name.startswith(_SEGMENT_PREFIX):
            COMPILE_COUNTS[name[len(_SEGMENT_PREFIX) :]] += 1
        elif name.startswith(_EVAL_PREFIX):
            COMPILE_COUNTS[name[len(_EVAL_PREFIX) :] + "/eval"] += 1


jax.monitoring.register_event_duration_secs_listener(_on_compile)


def trace_count(name: str) -> int:
    """How many times :func:`run`'s segment of algorithm ``name`` has been traced in this process
    (``name + "/eval"``: its initial evaluation). Tests count within a block with
    :func:`fedbpt_jax.testing.count_compiles`."""
    return TRACE_COUNTS[name]


def compile_count(name: str) -> int:
    """How many times :func:`run`'s segment of algorithm ``name`` has been compiled by XLA in this process."""
    return COMPILE_COUNTS[name]


@flax.struct.dataclass
class RunCarry:
    """What a run carries between segments (and what a checkpoint holds).

    Model selection is on the **dev** set (when :func:`run` gets one): the selected round is the
    evaluation with the highest dev accuracy, ties to the earliest round; a non-finite evaluation (or
    prompt) is never selected. Without a dev set the selected round is the latest finite evaluation
    (no selection); an evaluation with non-finite logits on dev or test is never selected. The best
    *test* accuracy is kept only as a reference-compatibility figure: the
    reference code reports the peak of its test curve, which is optimistic and not a model selection.

    Attributes:
      state: the algorithm's server state.
      selected_round: round of the selected evaluation (−1 before the first finite one).
      selected_dev_accuracy: its dev accuracy (NaN without a dev set, −1 before any).
      selected_test_accuracy: its test accuracy (−1 before any).
      selected_prompt: ``[n, H]`` its global prompt (zeros while none is set, and for "no prompt").
      best_test_reference: highest finite test accuracy so far (reference-compatibility figure only).
      best_test_reference_round: the round where it was reached (ties: earliest).
      rounds_done: int32.
    """

    state: Any
    selected_round: jax.Array
    selected_dev_accuracy: jax.Array
    selected_test_accuracy: jax.Array
    selected_prompt: jax.Array
    best_test_reference: jax.Array
    best_test_reference_round: jax.Array
    rounds_done: jax.Array


@dataclasses.dataclass
class History:
    """Host-side record of a run: per-round metrics and the evaluations (round 0 = the initial state).

    Each round row holds scalar metrics (the ``rounds.csv`` columns) and, for algorithms with clients,
    ``"clients"``: one dict per sampled client (see
    :func:`fedbpt_jax.federated.algorithms.client_diagnostics`). Each evaluation row holds the test
    metrics (``accuracy``, ``loss``, ``f1``, ``nonfinite_examples``, ``pred_dist``), the same with a
    ``dev_`` prefix when a dev set is given, and the global prompt's ``z_norm`` and
    ``prompt_norm_ratio``. Every key, with its meaning and units: ``docs/metrics.md``.

    ``stopped_early``: the round after which a callback stopped the run (None: it was not stopped; see
    :mod:`fedbpt_jax.callbacks`); written to ``metrics.json`` only when set.
    """

    rounds: list[dict] = dataclasses.field(default_factory=list)
    evals: list[dict] = dataclasses.field(default_factory=list)
    stopped_early: int | None = None

    def as_dict(self) -> dict:
        out = {"rounds": self.rounds, "evals": self.evals}
        if self.stopped_early is not None:
            out["stopped_early"] = self.stopped_early
        return out


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


def set_metrics(scorer, params, evalset: EvalSet, spec, p) -> dict:
    """Accuracy, loss, F1, count of examples with non-finite label logits and the predicted-label
    distribution ``[C]`` of prompt ``p`` on one example set. Any non-finite example makes accuracy,
    loss and F1 NaN: an argmax over NaN logits is not a prediction."""
    if evalset.prepared:
        logits = objective.evaluate_prepared(scorer, params, evalset.ctx, spec, p)
    else:
        logits = objective.evaluate_logits(scorer, params, evalset.ctx, spec, p)
    ev = objective.classification_metrics(logits, evalset.labels, evalset.example_mask)
    flat = logits.reshape(-1, logits.shape[-1])
    real = evalset.example_mask.reshape(-1) > 0
    bad = jnp.sum((real & ~jnp.all(jnp.isfinite(flat), axis=-1)).astype(jnp.int32))
    ev = {k: jnp.where(bad > 0, jnp.nan, v) for k, v in ev.items()}
    onehot = jax.nn.one_hot(jnp.argmax(flat, axis=-1), flat.shape[-1], dtype=jnp.float32) * real[:, None].astype(
        jnp.float32
    )
    ev["nonfinite_examples"] = bad
    ev["pred_dist"] = jnp.sum(onehot, axis=0) / jnp.maximum(jnp.sum(real.astype(jnp.float32)), 1.0)
    return ev


def _eval(
    algo: FederatedAlgorithm, state, model: ModelInputs, test: EvalSet, dev: EvalSet | None, spec, scorer, token_norm
):
    p = algo.global_prompt(state, model)
    ev = set_metrics(scorer, model.params, test, spec, p)
    if dev is not None:
        ev.update({f"dev_{k}": v for k, v in set_metrics(scorer, model.params, dev, spec, p).items()})
    if algo.global_z is not None:
        ev["z_norm"] = jnp.linalg.norm(algo.global_z(state))
    if p is not None:
        # Prompt tokens' norm relative to a typical token: the median norm of the input embeddings.
        ev["prompt_norm_ratio"] = jnp.mean(jnp.linalg.norm(p.astype(jnp.float32), axis=-1)) / token_norm
    return ev, p


def _select(carry: RunCarry, ev, p, at_round, n_prompt: int, hidden: int) -> RunCarry:
    """Dev-based selection (ties: earliest; non-finite never) and the best-test reference figure."""
    p = jnp.zeros((n_prompt, hidden), jnp.float32) if p is None else p.astype(jnp.float32)
    prompt_ok = jnp.all(jnp.isfinite(p))
    test_acc = ev["accuracy"].astype(jnp.float32)
    if "dev_accuracy" in ev:
        # Chosen by dev accuracy alone; an evaluation with non-finite logits anywhere (dev or test) is a
        # broken prompt and is never selected.
        dev_acc = ev["dev_accuracy"].astype(jnp.float32)
        better = (
            prompt_ok
            & jnp.isfinite(dev_acc)
            & jnp.isfinite(test_acc)
            & ((dev_acc > carry.selected_dev_accuracy) | (carry.selected_round < 0))
        )
    else:  # no dev set: no selection, the latest finite evaluation
        dev_acc = jnp.asarray(jnp.nan, jnp.float32)
        better = prompt_ok & jnp.isfinite(test_acc)
    best_test = prompt_ok & jnp.isfinite(test_acc) & (test_acc > carry.best_test_reference)
    return carry.replace(
        selected_round=jnp.where(better, at_round, carry.selected_round).astype(jnp.int32),
        selected_dev_accuracy=jnp.where(better, dev_acc, carry.selected_dev_accuracy).astype(jnp.float32),
        selected_test_accuracy=jnp.where(better, test_acc, carry.selected_test_accuracy).astype(jnp.float32),
        selected_prompt=jnp.where(better, p, carry.selected_prompt),
        best_test_reference=jnp.where(best_test, test_acc, carry.best_test_reference).astype(jnp.float32),
        best_test_reference_round=jnp.where(best_test, at_round, carry.best_test_reference_round).astype(jnp.int32),
    )


def _drop_keys(metrics: dict, keep_uploads: bool, log_clients: bool) -> dict:
    drop = set() if keep_uploads else {"uploads"}
    if not log_clients:
        drop.add("clients")
    return {k: v for k, v in metrics.items() if k not in drop}


def make_segment(
    algo: FederatedAlgorithm,
    scorer,
    eval_every: int,
    n_prompt: int,
    hidden: int,
    key_impl=None,
    *,
    keep_uploads: bool = False,
    log_clients: bool = True,
):
    """The jittable segment ``(key_data, carry, data, hp, model, test, dev, token_norm) -> (carry, metrics, eval)``.

    ``eval_every`` rounds in a ``lax.scan`` (round ``r`` gets ``fold_in(key, r)``), then one evaluation
    of the global prompt on the test set and the dev set (``dev`` may be None) and the selection update.
    ``key_data`` is the raw data of the rounds' key (``jax.random.key_data``), so it can be a global
    array on a multi-host mesh. The clients' uploads (``metrics["uploads"]``, d floats per client) leave
    the scan only with ``keep_uploads``; the per-client diagnostics only with ``log_clients``.
    """

    def segment(
        key_data,
        carry: RunCarry,
        data: FederatedData,
        hp: HParams,
        model: ModelInputs,
        test: EvalSet,
        dev: EvalSet | None,
        token_norm,
    ):
        TRACE_COUNTS[algo.name] += 1  # Python side effect: runs only while tracing
        key = jax.random.wrap_key_data(key_data, impl=key_impl)

        round_fn = (
            algo.round_detailed if algo.round_detailed is not None and (keep_uploads or log_clients) else algo.round
        )

        def body(state, r):
            state, metrics = round_fn(jax.random.fold_in(key, r), state, data, hp, model)
            return state, _drop_keys(metrics, keep_uploads, log_clients)

        rounds = carry.rounds_done + jnp.arange(eval_every, dtype=jnp.int32)
        state, metrics = jax.lax.scan(body, carry.state, rounds)
        ev, p = _eval(algo, state, model, test, dev, data.spec, scorer, token_norm)
        done = carry.rounds_done + eval_every
        new = _select(carry.replace(state=state, rounds_done=done), ev, p, done, n_prompt, hidden)
        return new, metrics, ev

    segment.__name__ = segment.__qualname__ = _SEGMENT_PREFIX + algo.name
    return segment


def make_initial_eval(algo: FederatedAlgorithm, scorer, n_prompt: int, hidden: int):
    """The jittable evaluation of the initial state: ``(carry, data, model, test, dev, token_norm) -> (carry, eval)``."""

    def initial(
        carry: RunCarry, data: FederatedData, model: ModelInputs, test: EvalSet, dev: EvalSet | None, token_norm
    ):
        TRACE_COUNTS[algo.name + "/eval"] += 1
        ev, p = _eval(algo, carry.state, model, test, dev, data.spec, scorer, token_norm)
        return _select(carry, ev, p, carry.rounds_done, n_prompt, hidden), ev

    initial.__name__ = initial.__qualname__ = _EVAL_PREFIX + algo.name
    return initial


def _replicated(mesh):
    if mesh is None:
        return None
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    return NamedSharding(mesh, P())


def algo_scorer(algo: FederatedAlgorithm, kind: str, model_config):
    cfg = algo.config
    if algo.scorer is not None:
        return algo.scorer
    return objective.scorer_for(
        kind, model_config, cfg.layout, n_prompt_tokens=cfg.n_prompt_tokens, cache=getattr(cfg, "scorer_cache", "auto")
    )


def compiled_segments(
    algo: FederatedAlgorithm,
    lm,
    eval_every: int,
    key_impl,
    mesh,
    *,
    keep_uploads: bool = False,
    log_clients: bool = True,
):
    """The jitted ``(segment, initial_eval)`` of :func:`make_segment` and :func:`make_initial_eval` for this
    algorithm, backbone shape, E, key implementation and mesh, with replicated outputs on a mesh.

    Cached: every segment of a run and every later :func:`run` with the same arguments reuse one compiled
    program (see :func:`fedbpt_jax.testing.count_compiles`).
    """
    return _jitted(
        algo, lm.kind, lm.config, eval_every, lm.hidden_size, key_impl, mesh, bool(keep_uploads), bool(log_clients)
    )


@functools.lru_cache(maxsize=64)
def _jitted(
    algo: FederatedAlgorithm,
    kind: str,
    model_config,
    eval_every: int,
    hidden: int,
    key_impl,
    mesh,
    keep_uploads: bool = False,
    log_clients: bool = True,
):
    cfg = algo.config
    scorer = algo_scorer(algo, kind, model_config)
    out = _replicated(mesh)
    segment = jax.jit(
        make_segment(
            algo,
            scorer,
            eval_every,
            cfg.n_prompt_tokens,
            hidden,
            key_impl,
            keep_uploads=keep_uploads,
            log_clients=log_clients,
        ),
        out_shardings=out,
    )
    initial = jax.jit(make_initial_eval(algo, scorer, cfg.n_prompt_tokens, hidden), out_shardings=out)
    return segment, initial


@functools.lru_cache(maxsize=16)
def _prepare_eval(scorer):
    return jax.jit(functools.partial(objective.prepare_chunks, scorer))


def _mesh_context(mesh):
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def _costs(scorer, data_spec, seq_len: int, packing=None, examples: int | None = None) -> objective.ScoreCost:
    """The scorer's cost model for a batch of ``examples`` examples of padded text length ``seq_len``
    (packed as ``packing``, :attr:`TokenBatch.packing`) and this task's spec."""
    lead = 0 if getattr(data_spec, "lead_ids", None) is None else int(np.shape(data_spec.lead_ids)[0])
    return scorer.cost(
        int(seq_len),
        int(np.shape(data_spec.cue_ids)[0]),
        int(np.shape(data_spec.label_ids)[0]),
        packing,
        lead,
        examples,
    )


def round_cost(algo: FederatedAlgorithm, lm, data: FederatedData) -> dict[str, float]:
    """Model compute per *active* client per round, from the scorer's cost model and the batch shapes.

    Returns ``examples_per_call`` (the padded local batch E, or N·E for a pooled algorithm),
    ``forward_calls`` (over that batch), ``prefix_passes`` and ``flops_per_client`` =
    calls · examples · forward FLOPs/example + prefix passes · examples · prepare FLOPs/example. Padding
    rows are computed, so they are counted.
    """
    scorer = algo_scorer(algo, lm.kind, lm.config)
    n, e, t = np.shape(data.train.input_ids)
    examples = n * e if algo.cost.pooled else e
    packing = data.train.packing
    if algo.cost.pooled and packing is not None:  # each client's rows, stacked (objective.prepare_pooled)
        packing = (n * packing[0], *packing[1:])
    cost = _costs(scorer, data.spec, t, packing, examples)
    prefix = algo.cost.prefix_passes
    if data.clean_context is not None and algo.uses_clean_context and prefix:
        prefix -= 1  # the clean prefix cache is kept across rounds
    calls = algo.cost.forward_calls
    prompt_passes = calls // 2 if algo.cost.paired and scorer.logits_paired is not None else calls
    flops = calls * examples * cost.forward + prompt_passes * cost.per_prompt + prefix * examples * cost.prepare
    return {
        "examples_per_call": examples,
        "forward_calls": algo.cost.forward_calls,
        "prefix_passes": prefix,
        "flops_per_client": flops,
    }


def decide_clean_context(
    algo, scorer, lm, data: FederatedData, keep: bool | None, budget: int, num_rounds: int
) -> bool:
    """Whether ``run`` keeps the clients' clean prefix caches across rounds (see ``run``'s ``keep_clean_context``)."""
    usable = algo.uses_clean_context and bool(scorer.caches_prefix)
    if keep is None:
        # Preparing all N clients once pays off when the run prepares at least as many anyway (K per round).
        pays = num_rounds * algo.config.clients_per_round >= data.num_clients
        return usable and pays and clean_context_bytes(scorer, lm.params, data) <= budget
    if keep and not usable:
        from .algorithms import declaring

        why = (
            f"algorithm {algo.name!r} does not use it (its spec.uses_clean_context is False)"
            if not algo.uses_clean_context
            else "its scorer has no prefix cache (decoders with layout 'after' have one)"
        )
        raise ValueError(
            f"keep_clean_context=True: {why}; accepted for an algorithm whose spec declares "
            f"uses_clean_context (built in: {declaring('uses_clean_context')}) with a "
            "prefix-caching scorer (or pass None to decide automatically)"
        )
    return bool(keep)


def _eval_flops(scorer, chunks: TokenBatch, spec, prefix_cached: bool = False) -> float:
    """FLOPs of one evaluation of the chunked examples ``[C, S, T]`` (without the prefix pass when cached)."""
    c, b, t = np.shape(chunks.input_ids)
    cost = _costs(scorer, spec, t, chunks.packing, b)
    return c * (b * (cost.forward + (0.0 if prefix_cached else cost.prepare)) + cost.per_prompt)


def _fingerprint(x) -> str | None:
    """A short digest of an array's shape, dtype and bytes (None stays None)."""
    if x is None:
        return None
    import hashlib

    arr = np.ascontiguousarray(np.asarray(host(x)))
    return f"{arr.dtype}{list(arr.shape)}:{hashlib.sha256(arr.tobytes()).hexdigest()[:16]}"


def _readable(x) -> bool:
    return not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated


def _tree_fingerprint(tree) -> str | None:
    """One digest of every array leaf of ``tree`` (examples, a scoring spec); None when a leaf lives on
    devices this process cannot read (a multi-process run: the shapes and the other entries still apply)."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if x is not None]
    if not all(_readable(x) for x in leaves):
        return None
    return fingerprint(*[_fingerprint(x) for x in leaves])


#: What a checkpoint's description entries are, in words (a refused resume names these, not raw values).
_DESCRIBED_IN_WORDS = {
    "key": "the run's key (--seed)",
    "train_examples": "the clients' training examples (task, data source, shots, seed, partition, template)",
    "test_examples": "the test examples (task, data source, --test-size, template)",
    "dev_examples": "the dev examples (task, data source, --dev-shots, template)",
    "scoring": "the scoring (label words, answer cue, instruction lead)",
    "backbone": "the backbone (model and its configuration)",
    "prompt_start": "the prompt start",
}


#: FedConfig fields recorded in a checkpoint's description under their earlier names.
_DESCRIBED_AS = {"projection_alpha": "alpha"}


def _describe(
    algo: FederatedAlgorithm,
    hp: HParams,
    eval_every: int,
    key_data,
    data: FederatedData,
    lm,
    model: ModelInputs,
    test: TokenBatch | None = None,
    dev: TokenBatch | None = None,
) -> dict[str, str]:
    """What identifies a run for resuming (everything but the round count, the mesh and the I/O): the
    configuration, the hyperparameters, the key, and digests of every example it trains, selects and is
    scored on, and of how it scores them (label words, cue, instruction)."""
    c = data.counts
    readable = not isinstance(c, jax.Array) or c.is_fully_addressable or c.is_fully_replicated
    counts = host(c) if readable else None
    desc = {
        "algorithm": algo.name,
        "eval_every": eval_every,
        "key": np.asarray(host(key_data)).tolist(),
        "backbone": f"{lm.name} {lm.config!r}",
        "data_shape": list(np.shape(data.train.input_ids)),
        "client_counts_sum": None if counts is None else int(np.sum(counts)),
        "projection_shape": None if model.projection is None else list(np.shape(model.projection)),
        "prompt_start": _fingerprint(getattr(model, "start", None)),
        "train_examples": _tree_fingerprint(data.train),
        "test_examples": None if test is None else _tree_fingerprint(test),
        "dev_examples": None if dev is None else _tree_fingerprint(dev),
        "scoring": _tree_fingerprint(data.spec),
    }
    # Keys keep their historical names (projection_alpha was "alpha"), so older checkpoints still resume.
    desc.update(
        {
            f"config.{_DESCRIBED_AS.get(f.name, f.name)}": getattr(algo.config, f.name)
            for f in dataclasses.fields(algo.config)
        }
    )
    desc.update({f"hp.{k}": float(np.asarray(v)) for k, v in dataclasses.asdict(host(hp)).items()})
    return {k: repr(v) for k, v in desc.items()}


def _differs(name: str, then: str, now: str) -> str:
    """One difference between a checkpoint's description and this run's, in words: digests and keys are named
    by what they cover ("the test examples differ"), settings by name with both values."""
    if name in _DESCRIBED_IN_WORDS:
        if "<absent>" in (then, now):
            where = "the checkpoint" if then == "<absent>" else "this run"
            return f"{_DESCRIBED_IN_WORDS[name]}: not recorded by {where}"
        return f"{_DESCRIBED_IN_WORDS[name]}: not the checkpoint's"
    label = name.replace("config.", "FedConfig.").replace("hp.", "HParams.")
    return f"{label}: checkpoint {then}, this run {now}"


class _RunCheckpoint:
    """A run's checkpoints: the carry and the history under the run's configuration (its fingerprint)."""

    def __init__(self, directory, desc: dict[str, str]):
        self.desc = desc
        self.ckpt = Checkpointer(directory, fingerprint(sorted(desc.items())))

    def resume(self, template: RunCarry, num_rounds: int, mesh) -> tuple[RunCarry, History] | None:
        """The latest checkpoint's carry and history (None when there is none); a checkpoint of another
        configuration is a :class:`CheckpointMismatch` naming every differing value."""
        ckpt = self.ckpt
        if ckpt.latest_step() is None:
            return None
        try:
            step, carry, meta = ckpt.restore(template)
        except CheckpointMismatch as err:
            raise CheckpointMismatch(self._mismatch(err)) from None
        if mesh is None:  # restored arrays are committed to a device: match a fresh run's placement
            carry = jax.tree_util.tree_map(jnp.asarray, host(carry))
        if step > num_rounds:
            raise ValueError(f"checkpoint {ckpt.directory} is at round {step}, past num_rounds={num_rounds}")
        return carry, History(rounds=meta["rounds"], evals=meta["evals"])

    def _mismatch(self, err: Exception) -> str:
        step = self.ckpt.latest_step()
        old = self.ckpt.restore_meta(step).get("config", {})
        diff = [_differs(k, old.get(k, "<absent>"), v) for k, v in self.desc.items() if old.get(k) != v]
        diff += [_differs(k, v, "<absent>") for k, v in old.items() if k not in self.desc]
        return (
            f"checkpoint {self.ckpt.directory} (round {step}) is from another configuration: "
            + ("; ".join(diff) or str(err))
            + ". Resume with the same configuration or use a new checkpoint directory"
        )

    def save(self, done: int, carry: RunCarry, history: History) -> None:
        self.ckpt.save(done, carry, {**history.as_dict(), "config": self.desc})

    def close(self) -> None:
        self.ckpt.close()


def _row_value(v):
    v = np.asarray(v)
    if v.dtype == bool or np.issubdtype(v.dtype, np.integer):
        return int(v)
    return float(v)


def _check_options(
    algo: FederatedAlgorithm, *, num_rounds, eval_every, checkpoint_every, eval_chunk, stop_after, save_uploads, mesh
):
    """Checks :func:`run`'s options (before anything compiles); returns the mesh the run uses."""
    for name, v in (
        ("num_rounds", num_rounds),
        ("eval_every", eval_every),
        ("checkpoint_every", checkpoint_every),
        ("eval_chunk", eval_chunk),
    ):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if num_rounds % eval_every:
        raise ValueError(f"num_rounds ({num_rounds}) must be a positive multiple of eval_every ({eval_every})")
    if stop_after is not None and (stop_after < 0 or stop_after % eval_every):
        raise ValueError(f"stop_after ({stop_after}) must be a non-negative multiple of eval_every ({eval_every})")
    if mesh is not None and algo.mesh is not None and mesh != algo.mesh:
        raise ValueError("run(mesh=...) differs from the mesh the algorithm was built with; pass one of them")
    if save_uploads is not None and not algo.uploads:
        from .algorithms import declaring

        raise ValueError(
            f"save_uploads: algorithm {algo.name!r} has no client uploads to save (its spec.uploads "
            f"is False); accepted for an algorithm whose spec declares uploads (built in: "
            f"{declaring('uploads')})"
        )
    return algo.mesh if mesh is None else mesh


def validate_inputs(
    algo: FederatedAlgorithm, data: FederatedData, test: TokenBatch, dev: TokenBatch | None, lm
) -> None:
    """Host-side checks of the training data, the test set and the dev set (clear errors before compiling)."""
    validate_data(data, algo.config, vocab_size=lm.vocab_size, kind=lm.kind, context=model_context(lm))
    num_labels = int(np.shape(data.spec.label_ids)[0])
    validate_test(test, num_labels)
    if dev is not None:
        try:
            validate_test(dev, num_labels)
        except ValueError as err:
            raise ValueError(f"dev set: {err}") from None


def run_keys(key) -> tuple[jax.Array, jax.Array, Any]:
    """``(key_init, key_data of the rounds' key, key implementation)`` of a run's key (typed or raw uint32):
    the key is split once into the initial state's key and the rounds' key (see :func:`round_key`)."""
    if not jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(jnp.asarray(key))  # a raw uint32 key
    key_init, key_rounds = jax.random.split(key)
    return key_init, jax.random.key_data(key_rounds), jax.random.key_impl(key)


def initial_carry(algo: FederatedAlgorithm, key: jax.Array, hp: HParams, hidden: int) -> RunCarry:
    """A run's carry before round 1: the algorithm's initial state, nothing selected yet."""
    return RunCarry(
        state=algo.init(key, hp),
        selected_round=jnp.asarray(-1, jnp.int32),
        selected_dev_accuracy=jnp.asarray(-1.0, jnp.float32),
        selected_test_accuracy=jnp.asarray(-1.0, jnp.float32),
        selected_prompt=jnp.zeros((algo.config.n_prompt_tokens, hidden), jnp.float32),
        best_test_reference=jnp.asarray(-1.0, jnp.float32),
        best_test_reference_round=jnp.asarray(-1, jnp.int32),
        rounds_done=jnp.asarray(0, jnp.int32),
    )


def _place_data(data: FederatedData, mesh) -> FederatedData:
    """The clients' data as global arrays on ``mesh`` (clients sharded), or as they are without one."""
    if mesh is None:
        return data
    return data.replace(
        train=to_global(data.train, mesh, clients=True),
        counts=to_global(data.counts, mesh, clients=True),
        spec=to_global(data.spec, mesh),
        clean_context=None if data.clean_context is None else to_global(data.clean_context, mesh, clients=True),
    )


def prepare_clean_context(data: FederatedData, keep: bool, scorer, model: ModelInputs, config, mesh) -> FederatedData:
    """``data`` with the clients' clean contexts kept across rounds (prepared once here if missing), or
    without any when ``keep`` is False."""
    if not keep:
        return data.replace(clean_context=None)
    if data.clean_context is not None:
        return data
    with _mesh_context(mesh):
        return with_clean_context(data, scorer, model.params, chunk=config.chunk_clients, mesh=mesh)


@dataclasses.dataclass(frozen=True)
class EvalSets:
    """The test set and the dev set as a segment sees them, and what one evaluation of each costs.

    Attributes:
      test, dev: :class:`EvalSet` (``dev`` None without a dev set).
      flops: ``{"eval_flops": …, "dev_eval_flops": …}`` (the latter only with a dev set), added to every
        evaluation row.
    """

    test: EvalSet
    dev: EvalSet | None
    flops: dict

    def row(self, r: int, ev: dict) -> dict:
        """The history row of the evaluation ``ev`` (host values) after round ``r``."""
        return {"round": r, **{k: _eval_value(v) for k, v in ev.items()}, **self.flops}


def decide_eval_prefix_cache(scorer, params, chunks, dev_chunks, spec, cache: bool | None, budget: int) -> bool:
    """Whether the evaluation sets' prefix caches are kept for the run (``run``'s ``cache_eval_prefix``):
    only for a scorer that has one; ``None``: when they fit ``budget`` bytes."""
    if not scorer.caches_prefix:
        return False
    if cache is None:
        need = sum(objective.prepared_bytes(scorer, params, c, spec) for c in (chunks, dev_chunks) if c is not None)
        if need > budget:
            import warnings

            warnings.warn(
                f"the evaluation sets' prefix caches need {need / 2**30:.2f} GiB, more than eval_cache_budget "
                f"({budget / 2**30:.2f} GiB): every evaluation recomputes the examples' text, which is slower "
                "(the results agree to float rounding); raise eval_cache_budget (bytes) where memory allows",
                stacklevel=3,
            )
        return need <= budget
    return bool(cache)


def eval_sets(
    scorer,
    lm,
    model: ModelInputs,
    chunks: TokenBatch,
    dev_chunks: TokenBatch | None,
    spec,
    *,
    cache_prefix: bool,
    mesh=None,
) -> EvalSets:
    """The run's :class:`EvalSets` from the chunked test and dev examples ``[C, S, T]``; with
    ``cache_prefix`` their prefix caches are computed here, once per run."""

    def evalset(c):
        if c is None:
            return None
        if cache_prefix:
            with _mesh_context(mesh):
                ctx = _prepare_eval(scorer)(model.params, c, spec)
            return EvalSet(ctx, c.labels, c.example_mask, prepared=True)
        return EvalSet(c, c.labels, c.example_mask)

    flops = {"eval_flops": _eval_flops(scorer, chunks, spec, cache_prefix)}
    if dev_chunks is not None:
        flops["dev_eval_flops"] = _eval_flops(scorer, dev_chunks, spec, cache_prefix)
    return EvalSets(test=evalset(chunks), dev=evalset(dev_chunks), flops=flops)


def round_rows(metrics: dict, first_round: int, algo: FederatedAlgorithm, cost: dict, seconds: float) -> list[dict]:
    """The history rows of one segment's rounds from its stacked host metrics ``{name: [E, ...]}``
    (without ``"uploads"``): the algorithm's scalars, the accounting for the round's active clients
    (bytes, forward calls, prefix passes, FLOPs, from ``algo.cost`` and :func:`round_cost`), ``seconds``
    and, when logged, the per-client diagnostics."""
    metrics = dict(metrics)
    clients = metrics.pop("clients", None)
    comm = algo.cost.comm
    rows = []
    for i in range(len(next(iter(metrics.values())))):
        row = {"round": first_round + i, **{k: _row_value(v[i]) for k, v in metrics.items()}}
        active = 1 if algo.cost.pooled and row.get("active_clients", 0) > 0 else row.get("active_clients", 0)
        row.update(
            {
                "bytes_down_per_client": comm.down_per_client,
                "bytes_up_per_client": comm.up_per_client,
                "fedavg_full_model_bytes_per_client": comm.fedavg_full_model_per_client,
                "forward_calls": int(algo.cost.forward_calls * active),
                "prefix_passes": int(cost["prefix_passes"] * active),
                "examples_per_call": cost["examples_per_call"],
                "model_flops": float(cost["flops_per_client"] * active),
                "seconds": seconds,
            }
        )
        if clients is not None:
            row["clients"] = _client_rows({k: v[i] for k, v in clients.items()})
        rows.append(row)
    return rows


def _postfix(ev: dict, row: dict, comm) -> dict:
    """The progress bar's figures after a segment."""
    postfix = {"acc": f"{float(ev['accuracy']):.3f}"}
    if "dev_accuracy" in ev:
        postfix["dev"] = f"{float(ev['dev_accuracy']):.3f}"
    postfix.update({"loss": f"{row['client_loss']:.3f}", "σ": f"{row['sigma']:.3f}", "up": f"{comm.up_per_client}B"})
    return postfix


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
    dev: TokenBatch | None = None,
    eval_every: int = 1,
    eval_chunk: int = 64,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    results_dir: str | Path | None = None,
    save_uploads: str | Path | None = None,
    log_clients: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    mesh=None,
    cache_eval_prefix: bool | None = None,
    eval_cache_budget: int = 2 << 30,
    keep_clean_context: bool | None = None,
    clean_context_budget: int = 1 << 30,
    callbacks=None,
    tensorboard_dir: str | Path | None = None,
    plot: bool = True,
    run_config: dict | None = None,
) -> tuple[RunCarry, History]:
    """Runs ``num_rounds`` rounds of ``algo``, evaluates the global prompt every ``eval_every`` rounds on
    the test set and the dev set, and selects the round on dev.

    Example::

        fed = fb.data.federated("sst2", lm.tokenizer, lm.kind, num_clients=10, shots_per_class=16)
        algo = fl.fedbpt(fl.FedConfig(num_clients=10, clients_per_round=4), lm)
        carry, history = fl.run(algo, jax.random.key(0), fl.FederatedData.from_host(fed), fed.test, lm, model,
                                dev=fed.dev, num_rounds=20, eval_every=5, mesh=fl.client_mesh())
        print(summarize(history, carry))   # final, dev-selected and best_test_reference accuracies

    Args:
      algo: a :class:`FederatedAlgorithm`.
      key: the run's key (round r uses :func:`round_key` ``(key, r)``).
      data: all clients' training data (validated first: see :func:`~fedbpt_jax.federated.core.validate_data`).
      test: test examples ``[B, T]`` (chunked by ``eval_chunk`` internally).
      lm: the backbone bundle (for the scorer, sizes and FLOP counts).
      model: frozen arrays (params, projection).
      num_rounds: total rounds; must be a positive multiple of ``eval_every``.
      hp: numeric hyperparameters (validated: finite and in range, see :data:`~fedbpt_jax.federated.config.HPARAM_RANGES`).
      dev: dev examples ``[B_dev, T]`` (``data.federated(...).dev``): evaluated with every test evaluation;
        the round with the highest dev accuracy is selected (ties: earliest). None: no selection, the
        "selected" figures are those of the latest finite evaluation.
      eval_every: E, rounds per jitted segment (static).
      checkpoint_dir: orbax checkpoints go here; an existing checkpoint of the same configuration is
        resumed, one of another configuration is an error naming the differing values.
      checkpoint_every: save every this many rounds (at segment ends) and at the last round.
      results_dir: ``metrics.json`` and ``rounds.csv`` are written there atomically after each segment,
        and ``metrics.png`` (:func:`fedbpt_jax.plots.plot_run`) once at the end when ``plot``.
      save_uploads: a directory; each round's client uploads (means ``[K, d]``, fitness ``[K]``, σ
        histories ``[K, I]``, which clients, who was active, and the broadcast mean and σ they answered)
        are saved there as ``round_000001.npz`` … (read back with :func:`load_uploads`), so other server
        aggregations can be replayed on the same uploads. FedBPT and FedAvg-BBT only.
      log_clients: keep the per-client diagnostics of every round (``history.rounds[i]["clients"]``).
      progress: show a per-segment tqdm progress bar.
      stop_after: stop (as if killed) after this many rounds (a multiple of ``eval_every``); for resume
        tests and time-boxed runs.
      mesh: shard the client axis over this mesh's devices (default: ``algo.mesh``; None: one device).
      cache_eval_prefix: keep the test and dev sets' prefix caches (decoder, layout "after") for the
        whole run, so an evaluation costs only the prompt and cue tokens per example. ``None`` (default):
        on when the caches fit ``eval_cache_budget`` bytes.
      keep_clean_context: prepare every client's clean text-prefix cache once and keep it across rounds
        (:func:`~fedbpt_jax.federated.core.with_clean_context`): a client's data never change, so FedBPT
        and FedAvg-BBT then skip one prefix pass per client per round (``prefix_passes`` in the rows).
        It holds :func:`~fedbpt_jax.federated.core.clean_context_bytes` bytes for the whole run (SmolLM2-135M
        in float32: ~46 KB per padded text token, i.e. N · E · T · 46 KB). ``None`` (default): on when the
        algorithm can use it (FedBPT, FedAvg-BBT; a decoder with layout "after"), it fits
        ``clean_context_budget`` bytes and the run samples at least N clients in all (rounds × K ≥ N, so
        preparing all N once costs no more than rebuilding). ``True`` where it cannot be used is an error.
      callbacks: objects with ``on_round(row)`` and ``on_eval(row)`` (:mod:`fedbpt_jax.callbacks`), called on
        the host after each segment with its rows; one returning True stops the run cleanly at the end of
        that segment (checkpoint, results and plot written; ``history.stopped_early`` set). Closed at the end.
      tensorboard_dir: adds a :class:`fedbpt_jax.callbacks.TensorBoardLogger` writing to this folder (needs
        ``tensorboardX``).
      plot: with ``results_dir``, write ``metrics.png`` when the run ends (a plotting failure warns, it does
        not fail the run).
      run_config: with ``results_dir``, written there as ``config.json`` once the run owns the folder and a
        checkpoint (if any) was accepted, never before: a refused resume or a failed set-up leaves the
        folder's earlier ``config.json`` as it was.

    The run holds ``results_dir`` and ``save_uploads`` (:func:`~fedbpt_jax.federated.records.claim`) from
    the start to the end: a second run on either folder meanwhile is refused
    (:class:`~fedbpt_jax.federated.records.FolderInUse`). ``metrics.json`` records the planned rounds, the
    last round reached and whether the run is complete.

    Returns:
      ``(carry, history)``: the final carry (state, the dev-selected round with its dev and test accuracy
      and prompt, the best-test reference figure) and the host-side history. Each round's row holds the
      algorithm's metrics, the accounting (``bytes_down_per_client``, ``bytes_up_per_client``,
      ``fedavg_full_model_bytes_per_client``, ``forward_calls`` over the local batch of all active
      clients, ``model_flops``, ``seconds``: wall time of the segment divided by E; the first segment
      includes compilation) and the per-client diagnostics. :func:`summarize` condenses it; a run where
      every active client's fitness was non-finite in every round warns (``RuntimeWarning``) and says so
      in the summary (``fitness_all_nonfinite``).
    """

    from ..callbacks import check_callbacks

    callbacks = check_callbacks(callbacks)
    mesh = _check_options(
        algo,
        num_rounds=num_rounds,
        eval_every=eval_every,
        checkpoint_every=checkpoint_every,
        eval_chunk=eval_chunk,
        stop_after=stop_after,
        save_uploads=save_uploads,
        mesh=mesh,
    )
    hp = hp.validate()
    validate_inputs(algo, data, test, dev, lm)
    with contextlib.ExitStack() as held:  # the output folders are this run's until it returns or fails
        if jax.process_index() == 0:
            held.enter_context(records.claim(results_dir))
            if save_uploads is not None:
                held.enter_context(records.claim(save_uploads, "uploads folder"))
        key_init, key_data, impl = run_keys(key)
        segment, initial = compiled_segments(
            algo, lm, eval_every, impl, mesh, keep_uploads=save_uploads is not None, log_clients=log_clients
        )
        scorer = algo_scorer(algo, lm.kind, lm.config)
        keep_ctx = decide_clean_context(algo, scorer, lm, data, keep_clean_context, clean_context_budget, num_rounds)
        chunks = objective.eval_chunks(scorer, test, eval_chunk, data.spec)
        dev_chunks = None if dev is None else objective.eval_chunks(scorer, dev, eval_chunk, data.spec)
        carry = initial_carry(algo, key_init, hp, lm.hidden_size)
        token_norm = jnp.asarray(median_token_norm(lm), jnp.float32)
        data = _place_data(data, mesh)
        if mesh is not None:
            model, hp, chunks, dev_chunks, carry, key_data, token_norm = to_global(
                (model, hp, chunks, dev_chunks, carry, key_data, token_norm), mesh
            )
        else:
            chunks, dev_chunks = jax.tree_util.tree_map(jnp.asarray, (chunks, dev_chunks))
        data = prepare_clean_context(data, keep_ctx, scorer, model, algo.config, mesh)
        cost = round_cost(algo, lm, data)
        cache = decide_eval_prefix_cache(
            scorer, lm.params, chunks, dev_chunks, data.spec, cache_eval_prefix, eval_cache_budget
        )
        evals = eval_sets(scorer, lm, model, chunks, dev_chunks, data.spec, cache_prefix=cache, mesh=mesh)

        history = History()
        lead = jax.process_index() == 0
        if tensorboard_dir is not None and lead:
            from ..callbacks import TensorBoardLogger

            callbacks = [*callbacks, TensorBoardLogger(tensorboard_dir)]
        desc = None
        if checkpoint_dir is not None:
            desc = _describe(algo, hp, eval_every, key_data, data, lm, model, test=test, dev=dev)
            desc["dev_shape"] = repr(None if dev is None else list(np.shape(dev.input_ids)))
        try:
            return _loop(
                algo,
                segment,
                initial,
                carry,
                history,
                data,
                hp,
                model,
                evals,
                token_norm,
                key_data,
                cost,
                ckpt_args=None if desc is None else (checkpoint_dir, desc),
                num_rounds=num_rounds,
                eval_every=eval_every,
                checkpoint_every=checkpoint_every,
                results_dir=results_dir,
                save_uploads=save_uploads,
                progress=progress,
                stop_after=stop_after,
                mesh=mesh,
                callbacks=callbacks if lead else [],
                lead=lead,
                plot=plot,
                run_config=run_config,
            )
        finally:
            from ..callbacks import close_all

            close_all(callbacks)


def _loop(
    algo,
    segment,
    initial,
    carry,
    history,
    data,
    hp,
    model,
    evals,
    token_norm,
    key_data,
    cost,
    *,
    ckpt_args,
    num_rounds,
    eval_every,
    checkpoint_every,
    results_dir,
    save_uploads,
    progress,
    stop_after,
    mesh,
    callbacks,
    lead,
    plot,
    run_config=None,
):
    """:func:`run`'s segments after its set-up: resume, initial evaluation, the segment loop with the
    checkpoints, results and callbacks (see :mod:`fedbpt_jax.callbacks` for when they fire)."""
    from tqdm.auto import tqdm

    from ..callbacks import dispatch

    ckpt = None
    if ckpt_args is not None:
        ckpt = _RunCheckpoint(*ckpt_args)
        resumed = ckpt.resume(carry, num_rounds, mesh)
        if resumed is not None:
            carry, history = resumed
            if progress and lead:
                print(
                    f"{algo.name}: resuming from checkpoint {ckpt.ckpt.directory} at round "
                    f"{int(host(carry.rounds_done))} of {num_rounds}",
                    flush=True,
                )
    if results_dir is not None and lead and run_config is not None:  # the checkpoint (if any) was accepted
        write_json_atomic(Path(results_dir) / "config.json", run_config)
    stop = False
    if not history.evals:
        with _mesh_context(mesh):
            carry, ev = initial(carry, data, model, evals.test, evals.dev, token_norm)
        history.evals.append(evals.row(0, host(ev)))
        stop = dispatch(callbacks, [], history.evals[-1:])

    done = int(host(carry.rounds_done))
    last = num_rounds if stop_after is None else min(num_rounds, stop_after)
    if stop:
        history.stopped_early = done
    with tqdm(total=num_rounds, initial=done, desc=algo.name, unit="round", disable=not (progress and lead)) as bar:
        while done < last and not stop:
            t0 = time.perf_counter()
            with _mesh_context(mesh):
                carry, metrics, ev = segment(key_data, carry, data, hp, model, evals.test, evals.dev, token_norm)
            metrics, ev = host((metrics, ev))
            seconds = (time.perf_counter() - t0) / eval_every
            uploads = metrics.pop("uploads", None)
            rows = round_rows(metrics, done + 1, algo, cost, seconds)
            if uploads is not None and lead:
                for i, row in enumerate(rows):
                    _save_upload(save_uploads, row["round"], {k: v[i] for k, v in uploads.items()})
            done += eval_every
            history.rounds.extend(rows)
            history.evals.append(evals.row(done, ev))
            bar.set_postfix(_postfix(ev, rows[-1], algo.cost.comm))
            bar.update(eval_every)
            if dispatch(callbacks, rows, history.evals[-1:]):
                stop, history.stopped_early = True, done
            if ckpt is not None and (done % checkpoint_every == 0 or done >= last or stop):
                ckpt.save(done, carry, history)
            if results_dir is not None and lead:
                write_results(results_dir, history, carry, planned_rounds=num_rounds)
    if ckpt is not None:
        ckpt.close()
    if results_dir is not None and lead:
        if stop and not history.rounds:  # stopped before round 1: the initial evaluation alone
            write_results(results_dir, history, carry, planned_rounds=num_rounds)
        if plot and (Path(results_dir) / "metrics.json").exists():
            _plot(results_dir, algo.name)
    _warn_nonfinite(summarize(history, carry), algo.name)
    return carry, history


def _plot(results_dir, name: str) -> None:
    """``metrics.png`` next to ``metrics.json``; a failure to plot warns and leaves the run's results as they are."""
    import warnings

    from ..plots import plot_run

    try:
        plot_run(results_dir)
    except Exception as err:  # noqa: BLE001  (a plot never fails a finished run)
        warnings.warn(
            f"{name}: could not write {Path(results_dir) / 'metrics.png'}: {err}", RuntimeWarning, stacklevel=3
        )


def model_context(lm) -> int | None:
    """The longest sequence the backbone takes: a decoder's ``max_position_embeddings``; an encoder's position
    table less its position offset (RoBERTa); None when the config does not say."""
    c = getattr(lm, "config", None)
    n = getattr(c, "max_position_embeddings", None)
    if n is None:
        return None
    return int(n) - int(getattr(c, "position_offset", 0) or 0) if lm.kind == "encoder" else int(n)


def median_token_norm(lm) -> float:
    """The median L2 norm of the backbone's input token embeddings (the scale a prompt token is compared to)."""
    emb = np.asarray(jax.device_get(lm.input_embeddings()), np.float32)
    return float(np.median(np.linalg.norm(emb, axis=-1)))


def _eval_value(v):
    v = np.asarray(v)
    if v.ndim:
        return [float(x) for x in v.reshape(-1)]
    if np.issubdtype(v.dtype, np.integer):
        return int(v)
    return float(v)


def _client_rows(clients: dict) -> list[dict]:
    """``{name: [K, ...]}`` → one JSON-friendly dict per sampled client (NaN → None)."""
    k = len(next(iter(clients.values())))
    rows = []
    for i in range(k):
        row = {}
        for name, v in clients.items():
            x = np.asarray(v[i])
            if x.ndim:
                row[name] = x.tolist()
            elif x.dtype == bool:
                row[name] = bool(x)
            elif np.issubdtype(x.dtype, np.integer):
                row[name] = int(x)
            else:  # NaN (nothing sent, or a NaN fitness) as None: JSON null, and equal to itself
                row[name] = None if np.isnan(x) else float(x)
        rows.append(row)
    return rows


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def _save_upload(directory, r: int, uploads: dict) -> None:
    import os
    import tempfile

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".round_{r:06d}.", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, round=np.asarray(r, np.int32), **{k: np.asarray(v) for k, v in uploads.items()})
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what any new file gets, like every other output
        os.replace(tmp, d / f"round_{r:06d}.npz")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_uploads(directory) -> dict[str, np.ndarray]:
    """The uploads :func:`run` saved with ``save_uploads=directory``, stacked over rounds.

    Returns ``round`` ``[R]`` and, stacked on a leading round axis, ``client_index`` ``[R, K]``,
    ``active`` ``[R, K]``, ``mean`` ``[R, K, d]``, ``fitness`` ``[R, K]``, ``sigmas`` ``[R, K, I]``,
    ``server_mean`` ``[R, d]`` and ``server_sigma`` ``[R]`` (the broadcast the clients answered). E.g.
    replay another server rule: ``strategy.server_update(state, u["mean"][r], u["fitness"][r],
    u["sigmas"][r], u["active"][r])``.
    """
    files = sorted(Path(directory).glob("round_[0-9][0-9][0-9][0-9][0-9][0-9].npz"))
    if not files:
        raise FileNotFoundError(f"no round_NNNNNN.npz uploads in {directory}")
    loaded = []
    for f in files:
        x = dict(np.load(f))
        if "round" not in x or int(x["round"]) != int(f.stem.split("_")[1]):
            raise ValueError(
                f"{f} is not an upload file of round {f.stem.split('_')[1]} (its 'round' entry: "
                f"{x.get('round')!r}); the folder holds files of another kind or run"
            )
        loaded.append(x)
    keys = set(loaded[0])
    odd = [f.name for f, x in zip(files, loaded) if set(x) != keys]
    if odd:
        raise ValueError(f"{directory}: {odd[0]} holds other entries than {files[0].name}: uploads of two runs mixed")
    return {k: np.stack([x[k] for x in loaded]) for k in loaded[0]}


def summarize(history: History, carry: RunCarry) -> dict:
    """The figures a run reports: z = 0 / initial, final, dev-selected, and the reference-compatibility
    best-on-test (optimistic: it selects on the test set, as the reference code's reported peak does).

    Keys: ``selection_rule``; ``initial_test_accuracy``; ``final_round``, ``final_test_accuracy``,
    ``final_dev_accuracy``; ``selected_round``, ``selected_dev_accuracy``, ``selected_test_accuracy``;
    ``best_test_reference``, ``best_test_reference_round``; ``nonfinite_evals`` (evaluations with
    non-finite logits, never selected); ``fitness_all_nonfinite_rounds`` (rounds where clients were
    active but none had a finite fitness) and ``fitness_all_nonfinite`` (true when that held for every
    round with active clients: the server never moved).
    """
    c = host(carry)
    first, final = history.evals[0], history.evals[-1]
    has_dev = "dev_accuracy" in final
    bad_rounds = [r["round"] for r in history.rounds if r.get("all_fitness_nonfinite", 0)]
    with_clients = [r for r in history.rounds if r.get("active_clients", 0) > 0]
    sel_round = int(c.selected_round)

    def num(x):
        return None if x < 0 else float(x)

    return {
        "selection_rule": "dev accuracy, ties to the earliest round"
        if has_dev
        else "none (no dev set): the latest finite evaluation",
        "initial_test_accuracy": first["accuracy"],
        "final_round": final["round"],
        "final_test_accuracy": final["accuracy"],
        "final_dev_accuracy": final.get("dev_accuracy"),
        "selected_round": sel_round if sel_round >= 0 else None,
        "selected_dev_accuracy": num(float(c.selected_dev_accuracy)) if has_dev else None,
        "selected_test_accuracy": num(float(c.selected_test_accuracy)),
        "best_test_reference": num(float(c.best_test_reference)),
        "best_test_reference_round": int(c.best_test_reference_round)
        if int(c.best_test_reference_round) >= 0
        else None,
        "nonfinite_evals": sum(
            1 for e in history.evals if e.get("nonfinite_examples", 0) > 0 or not math.isfinite(e["accuracy"])
        ),
        "fitness_all_nonfinite_rounds": len(bad_rounds),
        "fitness_all_nonfinite": bool(with_clients) and len(bad_rounds) == len(with_clients),
    }


def _warn_nonfinite(summary: dict, name: str) -> None:
    import warnings

    if summary["fitness_all_nonfinite"]:
        warnings.warn(
            f"{name}: every active client's fitness was non-finite in every round "
            f"({summary['fitness_all_nonfinite_rounds']} rounds): the server never moved and the "
            "reported prompt is the initial one",
            RuntimeWarning,
            stacklevel=3,
        )
    if summary["nonfinite_evals"]:
        warnings.warn(
            f"{name}: {summary['nonfinite_evals']} evaluation(s) had non-finite logits (reported as NaN, "
            "never selected)",
            RuntimeWarning,
            stacklevel=3,
        )


def write_results(results_dir, history: History, carry: RunCarry, planned_rounds: int | None = None) -> None:
    """``metrics.json`` (history, per-client diagnostics, :func:`summarize`'s figures and the run's extent:
    planned rounds, the last round reached, complete or not) and ``rounds.csv`` (one row a round, scalars
    only), each replaced atomically."""
    from ..interrupts import deferred

    d = Path(results_dir)
    extent = records.completeness(planned_rounds, history.evals, history.stopped_early)
    with deferred():  # a Ctrl-C / SIGTERM lands after both files describe the same round
        write_json_atomic(d / "metrics.json", {**history.as_dict(), **summarize(history, carry), **extent})
        write_csv_atomic(d / "rounds.csv", [{k: v for k, v in r.items() if k != "clients"} for r in history.rounds])
