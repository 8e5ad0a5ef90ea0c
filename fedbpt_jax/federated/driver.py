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

import contextlib
import functools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import objective
from ..checkpoint import write_json_atomic
from ..types import TokenBatch
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
from .counters import SEGMENT_PREFIX, TRACE_COUNTS
from .distributed import host, to_global
from .evaluation import (
    EvalSet,
    RunCarry,
    decide_eval_prefix_cache,
    eval_sets,
    evaluate,
    make_initial_eval,
    mesh_context,
    score_cost,
    select,
)
from .identity import RunCheckpoint, describe
from .records import (
    History,
    claim,
    earlier_record,
    plot_metrics,
    resumed_record,
    round_rows,
    save_upload,
    summarize,
    warn_nonfinite,
    write_results,
)


def round_key(key: jax.Array, r: int | jax.Array) -> jax.Array:
    """The key of round ``r`` (0-based) of a run started with ``key`` (what :func:`run` passes to ``round``)."""
    _, key_rounds = jax.random.split(key)
    return jax.random.fold_in(key_rounds, r)


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
        ev, p = evaluate(algo, state, model, test, dev, data.spec, scorer, token_norm)
        done = carry.rounds_done + eval_every
        new = select(carry.replace(state=state, rounds_done=done), ev, p, done, n_prompt, hidden)
        return new, metrics, ev

    segment.__name__ = segment.__qualname__ = SEGMENT_PREFIX + algo.name
    return segment


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
    cost = score_cost(scorer, data.spec, t, packing, examples)
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
    with mesh_context(mesh):
        return with_clean_context(data, scorer, model.params, chunk=config.chunk_clients, mesh=mesh)


def _postfix(ev: dict, row: dict, comm) -> dict:
    """The progress bar's figures after a segment."""
    postfix = {"acc": f"{float(ev['accuracy']):.3f}"}
    if "dev_accuracy" in ev:
        postfix["dev"] = f"{float(ev['dev_accuracy']):.3f}"
    postfix.update({"loss": f"{row['client_loss']:.3f}", "σ": f"{row['sigma']:.3f}", "up": f"{comm.up_per_client}B"})
    return postfix


def _placed(arrays: tuple, mesh) -> tuple:
    """``(model, hp, chunks, dev_chunks, carry, key_data, token_norm)`` as global arrays on ``mesh``; without a
    mesh, the same with the evaluation chunks as device arrays."""
    if mesh is not None:
        return to_global(arrays, mesh)
    model, hp, chunks, dev_chunks, carry, key_data, token_norm = arrays
    chunks, dev_chunks = jax.tree_util.tree_map(jnp.asarray, (chunks, dev_chunks))
    return model, hp, chunks, dev_chunks, carry, key_data, token_norm


def _with_tensorboard(callbacks: list, tensorboard_dir) -> list:
    """``callbacks`` and, with a ``tensorboard_dir``, a :class:`~fedbpt_jax.callbacks.TensorBoardLogger` writing there."""
    if tensorboard_dir is None:
        return callbacks
    from ..callbacks import TensorBoardLogger

    return [*callbacks, TensorBoardLogger(tensorboard_dir)]


def _checkpoint_description(algo, hp, eval_every, key_data, data, lm, model, test, dev) -> dict:
    """What a checkpoint of this run records of its configuration (a resume must match it)."""
    desc = describe(algo, hp, eval_every, key_data, data, lm, model, test=test, dev=dev)
    desc["dev_shape"] = repr(None if dev is None else list(np.shape(dev.input_ids)))
    return desc


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
            held.enter_context(claim(results_dir))
            if save_uploads is not None:
                held.enter_context(claim(save_uploads, "uploads folder"))
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
        model, hp, chunks, dev_chunks, carry, key_data, token_norm = _placed(
            (model, hp, chunks, dev_chunks, carry, key_data, token_norm), mesh
        )
        data = prepare_clean_context(data, keep_ctx, scorer, model, algo.config, mesh)
        cost = round_cost(algo, lm, data)
        cache = decide_eval_prefix_cache(
            scorer, lm.params, chunks, dev_chunks, data.spec, cache_eval_prefix, eval_cache_budget
        )
        evals = eval_sets(scorer, lm, model, chunks, dev_chunks, data.spec, cache_prefix=cache, mesh=mesh)

        history = History()
        lead = jax.process_index() == 0
        callbacks = _with_tensorboard(callbacks, tensorboard_dir if lead else None)
        desc = None
        if checkpoint_dir is not None:
            desc = _checkpoint_description(algo, hp, eval_every, key_data, data, lm, model, test, dev)
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

    ckpt = resumed = None
    if ckpt_args is not None:
        ckpt = RunCheckpoint(*ckpt_args)
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
        path = Path(results_dir) / "config.json"
        if resumed is not None:  # which rounds ran where: the folder's earlier record names the earlier process
            run_config = resumed_record(earlier_record(path), run_config, int(host(carry.rounds_done)))
        write_json_atomic(path, run_config)
    stop = False
    if not history.evals:
        with mesh_context(mesh):
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
            with mesh_context(mesh):
                carry, metrics, ev = segment(key_data, carry, data, hp, model, evals.test, evals.dev, token_norm)
            metrics, ev = host((metrics, ev))
            seconds = (time.perf_counter() - t0) / eval_every
            uploads = metrics.pop("uploads", None)
            rows = round_rows(metrics, done + 1, algo, cost, seconds)
            if uploads is not None and lead:
                for i, row in enumerate(rows):
                    save_upload(save_uploads, row["round"], {k: v[i] for k, v in uploads.items()})
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
            plot_metrics(results_dir, algo.name)
    warn_nonfinite(summarize(history, carry), algo.name)
    return carry, history


def model_context(lm) -> int | None:
    """The longest sequence the backbone takes: a decoder's ``max_position_embeddings``; an encoder's position
    table less its position offset (RoBERTa); None when the config does not say."""
    c = getattr(lm, "config", None)
    n = getattr(c, "max_position_embeddings", None)
    if n is None:
        return None
    return int(n) - int(getattr(c, "position_offset", 0) or 0)


def median_token_norm(lm) -> float:
    """The median L2 norm of the backbone's input token embeddings (the scale a prompt token is compared to)."""
    emb = np.asarray(jax.device_get(lm.input_embeddings()), np.float32)
    return float(np.median(np.linalg.norm(emb, axis=-1)))
