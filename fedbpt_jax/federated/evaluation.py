"""Evaluation and model selection of a run: the evaluation sets and their prefix caches, one evaluation of
the global prompt on the test and dev sets (:func:`evaluate`), the dev-set selection carried between
segments (:class:`RunCarry`, :func:`select`) and the initial (round-0) evaluation."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from .. import objective
from ..types import TokenBatch
from .core import (
    FederatedAlgorithm,
    FederatedData,
    ModelInputs,
)
from .counters import EVAL_PREFIX, TRACE_COUNTS


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


def evaluate(
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


def select(carry: RunCarry, ev, p, at_round, n_prompt: int, hidden: int) -> RunCarry:
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


def make_initial_eval(algo: FederatedAlgorithm, scorer, n_prompt: int, hidden: int):
    """The jittable evaluation of the initial state: ``(carry, data, model, test, dev, token_norm) -> (carry, eval)``."""

    def initial(
        carry: RunCarry, data: FederatedData, model: ModelInputs, test: EvalSet, dev: EvalSet | None, token_norm
    ):
        TRACE_COUNTS[algo.name + "/eval"] += 1
        ev, p = evaluate(algo, carry.state, model, test, dev, data.spec, scorer, token_norm)
        return select(carry, ev, p, carry.rounds_done, n_prompt, hidden), ev

    initial.__name__ = initial.__qualname__ = EVAL_PREFIX + algo.name
    return initial


@functools.lru_cache(maxsize=16)
def _prepare_eval(scorer):
    return jax.jit(functools.partial(objective.prepare_chunks, scorer))


def mesh_context(mesh):
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def score_cost(scorer, data_spec, seq_len: int, packing=None, examples: int | None = None) -> objective.ScoreCost:
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


def _eval_flops(scorer, chunks: TokenBatch, spec, prefix_cached: bool = False) -> float:
    """FLOPs of one evaluation of the chunked examples ``[C, S, T]`` (without the prefix pass when cached)."""
    c, b, t = np.shape(chunks.input_ids)
    cost = score_cost(scorer, spec, t, chunks.packing, b)
    return c * (b * (cost.forward + (0.0 if prefix_cached else cost.prepare)) + cost.per_prompt)


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
            with mesh_context(mesh):
                ctx = _prepare_eval(scorer)(model.params, c, spec)
            return EvalSet(ctx, c.labels, c.example_mask, prepared=True)
        return EvalSet(c, c.labels, c.example_mask)

    flops = {"eval_flops": _eval_flops(scorer, chunks, spec, cache_prefix)}
    if dev_chunks is not None:
        flops["dev_eval_flops"] = _eval_flops(scorer, dev_chunks, spec, cache_prefix)
    return EvalSets(test=evalset(chunks), dev=evalset(dev_chunks), flops=flops)


def _eval_value(v):
    v = np.asarray(v)
    if v.ndim:
        return [float(x) for x in v.reshape(-1)]
    if np.issubdtype(v.dtype, np.integer):
        return int(v)
    return float(v)
