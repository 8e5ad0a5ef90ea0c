"""Running a simulation: ``lax.scan`` over rounds, evaluation every E rounds, best-round tracking,
progress bar, orbax checkpoints and resume.

A run is a sequence of jitted *segments*; a segment is ``lax.scan`` over ``eval_every`` rounds
followed by one evaluation of the server's global prompt on the test set. The same compiled segment
serves every call (no retrace on the second call), and compile time does not depend on N or K beyond
array shapes. The round key of round r is ``fold_in(key, r)``, so a run resumed from a checkpoint after
round r draws exactly what an uninterrupted run draws: states and metrics are bit-identical.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from .. import objective
from ..checkpoint import Checkpointer, fingerprint, write_csv_atomic, write_json_atomic
from ..types import TokenBatch
from .config import HParams
from .core import FederatedAlgorithm, FederatedData, ModelInputs


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
    """Host-side record of a run: per-round metrics and the evaluations."""

    rounds: list[dict] = dataclasses.field(default_factory=list)
    evals: list[dict] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "evals": self.evals}


def _eval(algo: FederatedAlgorithm, state, model: ModelInputs, test: TokenBatch, spec, scorer):
    p = algo.global_prompt(state, model)
    logits = objective.evaluate_logits(scorer, model.params, test, spec, p)
    return objective.classification_metrics(logits, test.labels, test.example_mask), p


def make_segment(algo: FederatedAlgorithm, scorer, eval_every: int, n_prompt: int, hidden: int):
    """The jittable segment: ``eval_every`` rounds in a scan, then one test evaluation."""

    def segment(key, carry: RunCarry, data: FederatedData, hp: HParams, model: ModelInputs, test: TokenBatch):
        def body(state, r):
            return algo.round(jax.random.fold_in(key, r), state, data, hp, model)

        rounds = carry.rounds_done + jnp.arange(eval_every, dtype=jnp.int32)
        state, metrics = jax.lax.scan(body, carry.state, rounds)
        ev, p = _eval(algo, state, model, test, data.spec, scorer)
        p = jnp.zeros((n_prompt, hidden), jnp.float32) if p is None else p.astype(jnp.float32)
        better = ev["accuracy"] > carry.best_accuracy
        new = RunCarry(
            state=state,
            best_accuracy=jnp.where(better, ev["accuracy"], carry.best_accuracy),
            best_round=jnp.where(better, carry.rounds_done + eval_every, carry.best_round),
            best_prompt=jnp.where(better, p, carry.best_prompt),
            rounds_done=carry.rounds_done + eval_every,
        )
        return new, metrics, ev

    return segment


def initial_eval(algo, scorer, carry, data, model, test):
    ev, _ = _eval(algo, carry.state, model, test, data.spec, scorer)
    return ev


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
) -> tuple[RunCarry, History]:
    """Runs ``num_rounds`` rounds of ``algo`` and evaluates the global prompt every ``eval_every`` rounds.

    Args:
      algo: a :class:`FederatedAlgorithm`.
      key: the run's key (round r uses ``fold_in(key, r)``).
      data: all clients' training data.
      test: test examples ``[B, T]`` (chunked internally).
      lm: the backbone bundle (for the scorer and sizes).
      model: frozen arrays (params, projection).
      num_rounds: total rounds; must be a multiple of ``eval_every``.
      hp: numeric hyperparameters.
      checkpoint_dir: orbax checkpoints go here; an existing checkpoint of the same configuration is
        resumed, one of another configuration is an error.
      results_dir: ``metrics.json`` and ``rounds.csv`` are written there atomically after each segment.
      stop_after: stop (as if killed) after this many rounds; for resume tests and time-boxed runs.

    Returns:
      ``(carry, history)``: the final carry (state, best accuracy, best round, best prompt) and the
      host-side history (per-round metrics and evaluations, including round 0 = the initial state).
    """
    from tqdm.auto import tqdm

    if num_rounds < 1 or eval_every < 1 or num_rounds % eval_every:
        raise ValueError(f"num_rounds ({num_rounds}) must be a positive multiple of eval_every ({eval_every})")
    hp = hp.validate()
    cfg = algo.config
    if data.num_clients != cfg.num_clients:
        raise ValueError(f"data holds {data.num_clients} clients but the config says num_clients={cfg.num_clients}")
    scorer = objective.make_scorer(lm, cfg.layout, n_prompt_tokens=cfg.n_prompt_tokens)
    chunks = jax.tree_util.tree_map(jnp.asarray, objective.chunk_examples(test, eval_chunk))
    segment = jax.jit(make_segment(algo, scorer, eval_every, cfg.n_prompt_tokens, lm.hidden_size))
    key_init, key_rounds = jax.random.split(key)
    carry = RunCarry(
        state=algo.init(key_init, hp),
        best_accuracy=jnp.asarray(-1.0, jnp.float32),
        best_round=jnp.asarray(-1, jnp.int32),
        best_prompt=jnp.zeros((cfg.n_prompt_tokens, lm.hidden_size), jnp.float32),
        rounds_done=jnp.asarray(0, jnp.int32),
    )
    history = History()
    ckpt = None
    if checkpoint_dir is not None:
        ckpt = Checkpointer(checkpoint_dir, fingerprint(algo.name, cfg, jax.device_get(hp), eval_every, num_rounds,
                                                        jax.random.key_data(key).tolist()))
        if ckpt.latest_step() is not None:
            _, carry, meta = ckpt.restore(carry)
            history = History(rounds=meta["rounds"], evals=meta["evals"])
    if not history.evals:
        ev = jax.device_get(jax.jit(functools.partial(initial_eval, algo, scorer))(carry, data, model, chunks))
        history.evals.append({"round": 0, **{k: float(v) for k, v in ev.items()}})
        if float(ev["accuracy"]) > float(carry.best_accuracy):
            p = algo.global_prompt(carry.state, model)
            carry = carry.replace(best_accuracy=jnp.asarray(ev["accuracy"], jnp.float32), best_round=jnp.asarray(0, jnp.int32),
                                  best_prompt=carry.best_prompt if p is None else p.astype(jnp.float32))
    comm = algo.comm
    start = int(carry.rounds_done)
    last = num_rounds if stop_after is None else min(num_rounds, stop_after)
    with tqdm(total=num_rounds, initial=start, desc=algo.name, unit="round", disable=not progress) as bar:
        while int(carry.rounds_done) < last:
            t0 = time.perf_counter()
            carry, metrics, ev = segment(key_rounds, carry, data, hp, model, chunks)
            metrics, ev = jax.device_get((metrics, ev))
            dt = time.perf_counter() - t0
            done = int(carry.rounds_done)
            for i in range(eval_every):
                row = {"round": done - eval_every + i + 1, **{k: float(np.asarray(v)[i]) for k, v in metrics.items()}}
                row.update({"bytes_down_per_client": comm.down_per_client, "bytes_up_per_client": comm.up_per_client,
                            "fedavg_full_model_bytes_per_client": comm.fedavg_full_model_per_client,
                            "forward_calls": int(algo.forward_calls * row.get("active_clients", 0)),
                            "seconds": dt / eval_every})
                history.rounds.append(row)
            history.evals.append({"round": done, **{k: float(v) for k, v in ev.items()}})
            bar.set_postfix({"acc": f"{float(ev['accuracy']):.3f}", "loss": f"{history.rounds[-1]['client_loss']:.3f}",
                             "σ": f"{history.rounds[-1]['sigma']:.3f}", "up": f"{comm.up_per_client}B"})
            bar.update(eval_every)
            if ckpt is not None and (done % checkpoint_every == 0 or done >= last):
                ckpt.save(done, carry, history.as_dict())
            if results_dir is not None:
                write_results(results_dir, history, carry)
    if ckpt is not None:
        ckpt.close()
    return carry, history


def write_results(results_dir, history: History, carry: RunCarry) -> None:
    """``metrics.json`` (everything) and ``rounds.csv`` (one row a round), each replaced atomically."""
    d = Path(results_dir)
    write_json_atomic(d / "metrics.json", {**history.as_dict(), "best_accuracy": float(carry.best_accuracy),
                                           "best_round": int(carry.best_round)})
    write_csv_atomic(d / "rounds.csv", history.rounds)
