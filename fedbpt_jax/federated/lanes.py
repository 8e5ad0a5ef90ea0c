"""Sweeps of seeds × hyperparameters as one compiled program.

:func:`sweep` runs S seeds × H hyperparameter points, ``S·H`` *lanes*, as a single jitted program: a
``vmap`` over a leading lane axis of *(initial state → initial evaluation → ``lax.scan`` over segments of
``eval_every`` rounds, each followed by an evaluation of the global prompt on the test and dev sets and the
dev-selection update)*. Shapes are static and the swept numbers live in the :class:`HParams` pytree, so
every lane is the same program on other values. The round, the evaluation and the selection are
:func:`~fedbpt_jax.federated.run`'s own pieces (:func:`~fedbpt_jax.federated.driver.make_segment`,
:func:`~fedbpt_jax.federated.evaluation.make_initial_eval`, :func:`~fedbpt_jax.federated.driver.initial_carry`,
:func:`~fedbpt_jax.federated.evaluation.eval_sets`), so lane ``(seed, hp)`` computes what
``run(algo, jax.random.key(seed), ..., hp=hp)`` computes: the same accuracies, the server's CMA-ES state to
float rounding (a vmapped CMA-ES is not bitwise the unbatched one: XLA fuses the batched program differently).

Compilation: the jitted program is cached per (algorithm, backbone shape, ``eval_every``, number of
segments, key implementation, mesh), and its inputs' shapes depend on the *lane count* ``S·H`` only. So a
second sweep with the same lane count (other seeds, other hyperparameter values, another split of the
lanes into S and H) reuses the compiled program; a different lane count (shape polymorphism is not
available for the lane axis) compiles once more, once per lane count. The counts are visible through
:func:`fedbpt_jax.testing.count_compiles` under the key ``"sweep/" + algo.name``.

Devices: with ``mesh`` (:func:`lane_mesh`, a 1-D mesh whose axis ``"lanes"`` plays the role the
``"clients"`` axis plays in :func:`~fedbpt_jax.federated.run`), the lanes are sharded over the devices
(the lane count is padded to a multiple of the device count with copies of the last lane, which are
dropped from the results) and everything else is replicated; the results come back replicated. Without a
mesh the program runs on the default device. The algorithm's own client sharding is not used inside a
sweep: build it without a ``mesh``.

Example::

    res = fb.sweep(algo, data, fed.test, lm, model, dev=fed.dev, seeds=[0, 1, 2],
                   hp={"sigma0": [0.5, 1.0], "perturb_rate": [0.0, 0.5]}, grid=True,
                   num_rounds=20, eval_every=5)
    print(res.markdown())            # mean ± std over the seeds per hyperparameter point
    res.write("sweep.json")          # every lane's curves and figures (atomic, NaN kept as "nan")
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import numbers
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import objective
from . import counters, driver, evaluation
from .config import HParams
from .core import FederatedAlgorithm, FederatedData, ModelInputs
from .distributed import host, to_global
from .lane_results import SweepResults, sweep_results

#: The mesh axis the lanes are sharded over (:func:`lane_mesh`).
LANE_AXIS = "lanes"
_PROGRAM_PREFIX = "fedbpt_jax_sweep__"
HP_FIELDS = tuple(f.name for f in dataclasses.fields(HParams))


def _on_compile(event: str, duration: float, **kwargs) -> None:
    name = str(kwargs.get("fun_name", ""))
    if event == "/jax/core/compile/backend_compile_duration" and _PROGRAM_PREFIX in name:
        counters.COMPILE_COUNTS["sweep/" + name[name.index(_PROGRAM_PREFIX) + len(_PROGRAM_PREFIX) :].rstrip(")")] += 1


jax.monitoring.register_event_duration_secs_listener(_on_compile)


def lane_mesh(devices: Sequence[Any] | None = None):
    """A 1-D mesh named ``"lanes"`` over ``devices`` (default: ``jax.devices()``) for :func:`sweep`."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("lane_mesh needs at least one device")
    return jax.make_mesh((len(devices),), (LANE_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


# ------------------------------------------------------------------------------------------------
# Inputs: seeds and hyperparameter points
# ------------------------------------------------------------------------------------------------
#: Seeds a run accepts: jax.random.key keeps 32 bits of a seed (without x64), so 2**32 would be seed 0 again,
#: and the few-shot draw (numpy) refuses negative seeds.
SEED_RANGE = (0, 2**32 - 1)


def check_seeds(seeds) -> list[int]:
    """``seeds`` as distinct ints in :data:`SEED_RANGE` (ValueError naming a bad one and what is accepted)."""
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) and not isinstance(seeds, np.ndarray):
        raise ValueError(f"seeds must be a list of integers, got {seeds!r}")
    out = []
    lo, hi = SEED_RANGE
    for s in list(seeds):
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Integral):
            raise ValueError(f"seeds must be integers, got {s!r} in {list(seeds)!r}")
        if not lo <= int(s) <= hi:
            raise ValueError(
                f"seed {int(s)} is outside {lo}..{hi} (jax keeps 32 bits of a seed: {2**32} would repeat seed 0); "
                f"accepted: integers {lo}..{hi}"
            )
        out.append(int(s))
    if not out:
        raise ValueError("seeds is empty: give at least one seed")
    dup = sorted({s for s in out if out.count(s) > 1})
    if dup:
        raise ValueError(f"seeds must be distinct (a repeated seed repeats a lane), got {dup} more than once in {out}")
    return out


def hp_points(hp: Mapping[str, Any] | None, *, grid: bool = False, base: HParams = HParams()) -> list[dict]:
    """The hyperparameter points of a sweep: one dict of every :class:`HParams` field per point.

    Args:
      hp: ``{field: [values]}`` for the swept fields (a single number counts as a one-value list); None or
        ``{}``: one point, ``base``.
      grid: False (default): the lists are zipped, position i of every list is point i (all lists must have
        the same length); True: their cartesian product (first field slowest).
      base: the values of the fields not swept.

    Raises:
      ValueError: an unknown field (naming the accepted ones), an empty list, lists of different lengths
        without ``grid`` (naming each field and its length), a non-numeric or out-of-range value (naming
        the point, the value and the accepted range), or a point given twice.
    """
    hp = dict(hp or {})
    unknown = [k for k in hp if k not in HP_FIELDS]
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown}; accepted: {list(HP_FIELDS)} (HParams fields)")
    lists = {}
    for k, v in hp.items():
        vals = list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v]
        if not vals:
            raise ValueError(f"hyperparameter {k!r} has an empty list of values; give at least one value")
        for x in vals:
            if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
                raise ValueError(f"hyperparameter {k!r}: {x!r} is not a number")
        lists[k] = [float(x) for x in vals]
    if not lists:
        rows = [{}]
    elif grid:
        rows = [dict(zip(lists, combo)) for combo in itertools.product(*lists.values())]
    else:
        lengths = {k: len(v) for k, v in lists.items()}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{k}: {n}" for k, n in lengths.items())
            raise ValueError(
                f"hyperparameter lists have different lengths ({shown}): without grid=True position i "
                "of every list is point i, so give lists of one length, or grid=True (--grid) for "
                "their cartesian product"
            )
        n = next(iter(lengths.values()))
        rows = [{k: v[i] for k, v in lists.items()} for i in range(n)]
    base_values = {k: float(np.asarray(host(getattr(base, k)))) for k in HP_FIELDS}
    points = []
    for i, row in enumerate(rows):
        point = {**base_values, **row}
        try:
            HParams(**point).validate()
        except ValueError as err:
            raise ValueError(f"hyperparameter point {i} {row}: {err}") from None
        if point in points:
            raise ValueError(f"hyperparameter point {i} {row} is given twice (it equals point {points.index(point)})")
        points.append(point)
    return points


def check_swept(algorithm: str, reads: Sequence[str] | None, swept: Sequence[str]) -> None:
    """Refuses sweeping an :class:`HParams` field that ``algorithm`` never reads (``reads``: its spec's
    ``hparams``; None accepts every field): its lanes would be identical runs reported as a spread.

    Raises:
      ValueError: naming the field, the algorithm and the fields it does read.
    """
    if reads is None:
        return
    unread = [k for k in swept if k not in reads]
    if unread:
        what = ", ".join(reads) if reads else "none: its rounds do not depend on any of them"
        raise ValueError(
            f"hyperparameter(s) {', '.join(unread)}: {algorithm} never reads {'it' if len(unread) == 1 else 'them'}, "
            f"so every lane would be the same run; accepted for {algorithm}: {what}"
        )


# ------------------------------------------------------------------------------------------------
# The compiled program
# ------------------------------------------------------------------------------------------------
def make_program(
    algo: FederatedAlgorithm,
    scorer,
    eval_every: int,
    num_segments: int,
    n_prompt: int,
    hidden: int,
    key_impl=None,
    mesh=None,
):
    """The jittable sweep ``(key_init [L, k], key_rounds [L, k], hp [L], data, model, test, dev, token_norm) ->
    (carry [L], initial eval [L], evals [L, num_segments], metrics [L, num_segments, eval_every])``.

    ``key_init`` and ``key_rounds`` are raw key data (``jax.random.key_data``) of each lane's initial-state key
    and rounds' key (:func:`fedbpt_jax.federated.round_key`); everything but the lane inputs is shared.
    """
    name = algo.name
    segment = driver.make_segment(
        algo, scorer, eval_every, n_prompt, hidden, key_impl, keep_uploads=False, log_clients=False
    )
    initial = evaluation.make_initial_eval(algo, scorer, n_prompt, hidden)

    def lane(key_init, key_rounds, hp, data, model, test, dev, token_norm):
        carry = driver.initial_carry(algo, jax.random.wrap_key_data(key_init, impl=key_impl), hp, hidden)
        carry, ev0 = initial(carry, data, model, test, dev, token_norm)

        def body(carry, _):
            carry, metrics, ev = segment(key_rounds, carry, data, hp, model, test, dev, token_norm)
            return carry, (metrics, ev)

        carry, (metrics, evs) = jax.lax.scan(body, carry, None, length=num_segments)
        return carry, ev0, evs, metrics

    def program(key_init, key_rounds, hp, data, model, test, dev, token_norm):
        counts = counters.TRACE_COUNTS
        own = {k: counts[k] for k in (name, name + "/eval")}
        counts["sweep/" + name] += 1  # Python side effect: runs only while tracing
        if mesh is not None:
            key_init, key_rounds, hp = _constrain_lanes((key_init, key_rounds, hp), mesh)
        out = jax.vmap(lane, in_axes=(0, 0, 0, None, None, None, None, None))(
            key_init, key_rounds, hp, data, model, test, dev, token_norm
        )
        for k, v in own.items():  # the segment and initial evaluation count for run(), not here
            counts[k] = v
        return out

    program.__name__ = program.__qualname__ = _PROGRAM_PREFIX + name
    return program


def _constrain_lanes(tree, mesh):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    sharding = NamedSharding(mesh, P(LANE_AXIS))
    return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


@functools.lru_cache(maxsize=32)
def _jitted(
    algo: FederatedAlgorithm, kind: str, model_config, hidden: int, eval_every: int, num_segments: int, key_impl, mesh
):
    scorer = driver.algo_scorer(algo, kind, model_config)
    out = None
    if mesh is not None:
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        out = NamedSharding(mesh, P())
    program = make_program(algo, scorer, eval_every, num_segments, algo.config.n_prompt_tokens, hidden, key_impl, mesh)
    return jax.jit(program, out_shardings=out, compiler_options=_compiler_options())


def _compiler_options() -> dict | None:
    """XLA options of the sweep program. On CPU, YNNPACK fusions are off: the lane axis adds a batch dimension
    to every dot, and the decoder's grouped-query attention under clients × population × lanes reaches rank 8,
    which XLA's YNNPACK emitter rejects with a fatal check ("b_rank < YNN_MAX_TENSOR_RANK", jaxlib 0.10) that
    aborts the process."""
    if jax.default_backend() != "cpu":
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiled_program(algo: FederatedAlgorithm, lm, eval_every: int, num_segments: int, key_impl=None, mesh=None):
    """The jitted :func:`make_program` for this algorithm, backbone shape, E, segment count, key
    implementation and mesh (cached: a later sweep with the same lane count reuses its compilation)."""
    return _jitted(algo, lm.kind, lm.config, lm.hidden_size, eval_every, num_segments, key_impl, mesh)


def memory_floor(jaxpr) -> tuple[int, int]:
    """A lower bound on what a traced program needs at once, from its jaxpr, before XLA compiles it:
    ``(inputs, largest)``, the bytes of the program's inputs and of its largest matrix product
    (``dot_general``) result, inner programs (scans, loops, conditionals) included. Both are live together
    (the inputs for the whole call), and a product's result is a buffer XLA cannot fuse away, so their sum
    is a floor, not an estimate of the peak (which is higher)."""

    def nbytes(aval) -> int:
        shape = getattr(aval, "shape", None)
        return 0 if shape is None else int(np.prod(shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize

    def inner(value):
        if hasattr(value, "eqns"):
            yield value
        elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
            yield value.jaxpr
        elif isinstance(value, (tuple, list)):
            for v in value:
                yield from inner(v)

    def largest(jx) -> int:
        out = 0
        for eqn in jx.eqns:
            if eqn.primitive.name == "dot_general":
                out = max(out, sum(nbytes(v.aval) for v in eqn.outvars))
            for value in eqn.params.values():
                for sub in inner(value):
                    out = max(out, largest(sub))
        return out

    jx = jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr
    return sum(nbytes(v.aval) for v in jx.invars), largest(jx)


def available_memory(device=None) -> int | None:
    """Bytes the program could still allocate on ``device`` (default: the first device): an accelerator's
    ``memory_stats()`` limit less what is in use; on the CPU, the host's ``MemAvailable``; None if unknown."""
    device = device or jax.devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - not every backend implements it
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    if device.platform == "cpu":
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def check_memory(jaxpr, n_lanes: int, n_devices: int = 1, available: int | None = None) -> None:
    """Refuses, before compiling, a sweep whose :func:`memory_floor` (per device: lanes are sharded over
    ``n_devices``) exceeds :func:`available_memory` (or ``available``), naming both and how many lanes would
    fit; a sweep that passes can still run out of memory (the floor is not the peak).

    Raises:
      ValueError: the one-line refusal.
    """
    available = available_memory() if available is None else available
    if available is None:
        return
    inputs, largest = memory_floor(jaxpr)
    need = (inputs + largest) / n_devices
    if need <= available:
        return
    per_lane = need / n_lanes
    fit = int(available // per_lane) if per_lane > 0 else n_lanes
    gib = 2**30
    raise ValueError(
        f"a sweep of {n_lanes} lanes needs at least {need / gib:.1f} GiB{' per device' if n_devices > 1 else ''} "
        f"(its inputs {inputs / n_devices / gib:.1f} GiB and its largest matrix product "
        f"{largest / n_devices / gib:.1f} GiB, before anything else) but {available / gib:.1f} GiB are available; "
        f"accepted: at most about {max(fit, 0)} lanes at once (fewer seeds or hyperparameter points per sweep, "
        "or more devices with lanes='all')"
    )


# ------------------------------------------------------------------------------------------------
# The entry point
# ------------------------------------------------------------------------------------------------
def _check_sweep_options(num_rounds, eval_every, eval_chunk, mesh):
    for name, v in (("num_rounds", num_rounds), ("eval_every", eval_every), ("eval_chunk", eval_chunk)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if num_rounds % eval_every:
        raise ValueError(f"num_rounds ({num_rounds}) must be a positive multiple of eval_every ({eval_every})")
    if mesh is not None and LANE_AXIS not in mesh.axis_names:
        raise ValueError(
            f"the sweep's mesh needs an axis named {LANE_AXIS!r}, got axes {mesh.axis_names}; build it "
            "with fedbpt_jax.federated.lane_mesh()"
        )


def _lane_keys(seeds: list[int], keys: Sequence[jax.Array] | None = None):
    """Raw key data ``[L, k]`` of each seed's initial-state key and rounds' key, as :func:`run` derives them
    from ``jax.random.key(seed)`` (or from each of ``keys``), and the key implementation."""
    inits, rounds, impl = [], [], None
    for key in keys if keys is not None else [jax.random.key(s) for s in seeds]:
        key_init, key_rounds, impl = driver.run_keys(key)
        inits.append(np.asarray(jax.random.key_data(key_init)))
        rounds.append(np.asarray(key_rounds))
    return np.stack(inits), np.stack(rounds), impl


def sweep(
    algo: FederatedAlgorithm,
    data: FederatedData,
    test,
    lm,
    model: ModelInputs,
    *,
    seeds: Sequence[int],
    num_rounds: int,
    hp: Mapping[str, Any] | None = None,
    grid: bool = False,
    base: HParams = HParams(),
    dev=None,
    eval_every: int = 1,
    eval_chunk: int = 64,
    mesh=None,
    cache_eval_prefix: bool | None = None,
    eval_cache_budget: int = 2 << 30,
    keep_clean_context: bool | None = None,
    clean_context_budget: int = 1 << 30,
) -> SweepResults:
    """Runs every (seed, hyperparameter point) lane of ``algo`` for ``num_rounds`` rounds as one compiled
    program and reports each lane and a summary over the seeds of each point.

    Lane ``(seed, point)`` computes what ``run(algo, jax.random.key(seed), data, test, lm, model, hp=point,
    dev=dev, num_rounds=num_rounds, eval_every=eval_every)`` computes: the same rounds, evaluations (round 0,
    then every ``eval_every`` rounds, test and dev) and dev selection (the dev-best evaluation, ties to the
    earliest, a non-finite one never), up to float rounding (see the module docstring).

    Args:
      algo: a :class:`FederatedAlgorithm` built without a ``mesh``.
      data, test, lm, model: as :func:`~fedbpt_jax.federated.run` takes them (shared by every lane).
      seeds: S distinct integers: lane keys ``jax.random.key(seed)``.
      num_rounds: rounds per lane, a positive multiple of ``eval_every``.
      hp: the swept :class:`HParams` fields, ``{field: [values]}`` (see :func:`hp_points`); None: one point.
      grid: the cartesian product of the lists instead of zipping them.
      base: the values of the fields that are not swept.
      dev: dev examples (selection on dev; None: no selection, the latest finite evaluation).
      eval_every: E, rounds between evaluations.
      eval_chunk: examples per evaluation chunk.
      mesh: a :func:`lane_mesh`: lanes sharded over its devices (None: the default device).
      cache_eval_prefix, eval_cache_budget, keep_clean_context, clean_context_budget: as in
        :func:`~fedbpt_jax.federated.run` (decided the same way, shared by every lane).

    Returns:
      :class:`SweepResults` (``to_json``, ``write(path)``, ``markdown()``).

    Raises:
      ValueError: bad seeds, hyperparameters (see :func:`hp_points`; a swept field the algorithm never
        reads, see :func:`check_swept`), schedule, mesh or data, before anything compiles.
    """
    seeds = check_seeds(seeds)
    return _sweep_lanes(
        algo,
        data,
        test,
        lm,
        model,
        seeds=seeds,
        lane_keys=_lane_keys(seeds),
        num_rounds=num_rounds,
        hp=hp,
        grid=grid,
        base=base,
        dev=dev,
        eval_every=eval_every,
        eval_chunk=eval_chunk,
        mesh=mesh,
        cache_eval_prefix=cache_eval_prefix,
        eval_cache_budget=eval_cache_budget,
        keep_clean_context=keep_clean_context,
        clean_context_budget=clean_context_budget,
    )


def _sweep_lanes(
    algo,
    data,
    test,
    lm,
    model,
    *,
    seeds,
    lane_keys,
    num_rounds,
    hp,
    grid,
    base,
    dev,
    eval_every,
    eval_chunk,
    mesh,
    cache_eval_prefix,
    eval_cache_budget,
    keep_clean_context,
    clean_context_budget,
) -> SweepResults:
    """:func:`sweep` once its seeds are checked, with each seed's lane keys ``(key_init [S, k], key_rounds
    [S, k], impl)`` given (:func:`_lane_keys`, or one run key's for :func:`tune_learning_rate`)."""
    _check_sweep_options(num_rounds, eval_every, eval_chunk, mesh)
    if getattr(algo, "mesh", None) is not None:
        raise ValueError(
            f"algorithm {algo.name!r} was built with a client mesh; a sweep shards lanes, not clients: "
            "build it without mesh= and pass sweep(mesh=fedbpt_jax.federated.lane_mesh())"
        )
    points = hp_points(hp, grid=grid, base=base)
    swept = list(dict(hp or {}))
    check_swept(algo.name, getattr(algo.spec, "hparams", None), swept)
    driver.validate_inputs(algo, data, test, dev, lm)

    key_init, key_rounds, impl = lane_keys
    n_lanes = len(seeds) * len(points)
    key_init, key_rounds = np.tile(key_init, (len(points), 1)), np.tile(key_rounds, (len(points), 1))
    hps = {k: np.repeat(np.asarray([p[k] for p in points], np.float32), len(seeds)) for k in HP_FIELDS}
    pad = 0 if mesh is None else -n_lanes % mesh.devices.size
    if pad:  # copies of the last lane, dropped from the results
        key_init, key_rounds = (np.concatenate([a, np.repeat(a[-1:], pad, 0)]) for a in (key_init, key_rounds))
        hps = {k: np.concatenate([v, np.repeat(v[-1:], pad)]) for k, v in hps.items()}
    hparams = HParams(**{k: jnp.asarray(v) for k, v in hps.items()})

    scorer = driver.algo_scorer(algo, lm.kind, lm.config)
    keep = driver.decide_clean_context(algo, scorer, lm, data, keep_clean_context, clean_context_budget, num_rounds)

    def chunked(batch):  # as run() chunks them
        return jax.tree_util.tree_map(jnp.asarray, objective.eval_chunks(scorer, batch, eval_chunk, data.spec))

    chunks = chunked(test)
    dev_chunks = None if dev is None else chunked(dev)
    data = driver.prepare_clean_context(data, keep, scorer, model, algo.config, None)
    cache = evaluation.decide_eval_prefix_cache(
        scorer, lm.params, chunks, dev_chunks, data.spec, cache_eval_prefix, eval_cache_budget
    )
    evals = evaluation.eval_sets(scorer, lm, model, chunks, dev_chunks, data.spec, cache_prefix=cache)
    token_norm = jnp.asarray(driver.median_token_norm(lm), jnp.float32)
    lane_args = (jnp.asarray(key_init), jnp.asarray(key_rounds), hparams)
    shared = (data, model, evals.test, evals.dev, token_norm)
    if mesh is not None:
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from .distributed import put_sharded

        lanes_sharding = NamedSharding(mesh, P(LANE_AXIS))
        lane_args = jax.tree_util.tree_map(lambda x: put_sharded(np.asarray(x), lanes_sharding), lane_args)
        shared = to_global(shared, mesh)

    program = compiled_program(algo, lm, eval_every, num_rounds // eval_every, impl, mesh)
    traced = program.trace(*lane_args, *shared)  # the trace the call below reuses: nothing compiled yet
    check_memory(traced.jaxpr, n_lanes, 1 if mesh is None else mesh.devices.size)
    out = program(*lane_args, *shared)
    return sweep_results(algo, seeds, points, swept, num_rounds, eval_every, out, dev is not None)


#: FedPrompt's learning-rate grid for :func:`tune_learning_rate`: Adam step sizes on the soft-prompt
#: embeddings, half-decades from 1e-3 to 0.3 (0.3 is prompt tuning's usual rate and the old default;
#: Adam moves every embedding entry by about the learning rate per step, and token-embedding entries
#: are typically of order 0.01-0.1, so the useful rates sit well below it).
LR_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)


def tune_learning_rate(
    algo: FederatedAlgorithm,
    key: jax.Array,
    data: FederatedData,
    dev,
    lm,
    model: ModelInputs,
    *,
    num_rounds: int,
    hp: HParams = HParams(),
    grid=LR_GRID,
    eval_every: int = 1,
    eval_chunk: int = 64,
    mesh=None,
    eval_cache_budget: int = 2 << 30,
) -> tuple[float, list[dict]]:
    """Picks the learning rate (FedPrompt's local Adam rate, ``hp.learning_rate``) on the **dev** set.

    One :func:`sweep` over the grid's rates: every lane runs from ``key`` (the client sampling of
    ``run(algo, key, ...)``) and is evaluated on ``dev`` only: the test set is never touched. A rate's
    score is its best dev accuracy over the evaluations (what dev selection would keep); the highest
    score wins, ties to the earlier grid value (the smaller rate, with the default ascending grid).
    Each lane computes what ``run`` with that rate computes, up to float rounding (see :func:`sweep`).

    Example::

        lr, table = fl.tune_learning_rate(fl.fedprompt(cfg, lm), jax.random.key(0), data, fed.dev, lm, model,
                                          num_rounds=10)
        carry, hist = fl.run(algo, key, data, fed.test, lm, model, dev=fed.dev, hp=fl.HParams(learning_rate=lr), ...)

    Args:
      algo: an algorithm that reads ``learning_rate`` (FedPrompt), built without a client mesh.
      mesh: a :func:`lane_mesh` (the rates' lanes sharded over its devices), or None.

    Returns:
      ``(best_rate, table)``: ``table`` has one row per grid value: ``learning_rate``, ``dev_accuracy``
      (its score, NaN if no evaluation was finite), ``dev_round`` (where it was reached) and
      ``final_dev_accuracy``.

    Raises:
      ValueError: an empty or invalid grid, an algorithm that never reads the rate, or no finite evaluation.
    """
    grid = tuple(float(g) for g in grid)
    if not grid:
        raise ValueError("grid must hold at least one learning rate")
    _check_sweep_options(num_rounds, eval_every, eval_chunk, mesh)
    res = _sweep_lanes(
        algo,
        data,
        dev,
        lm,
        model,
        seeds=[0],
        lane_keys=_lane_keys([0], [key]),
        num_rounds=num_rounds,
        hp={"learning_rate": list(grid)},
        grid=False,
        base=hp,
        dev=None,
        eval_every=eval_every,
        eval_chunk=eval_chunk,
        mesh=mesh,
        cache_eval_prefix=None,
        eval_cache_budget=eval_cache_budget,
        keep_clean_context=None,
        clean_context_budget=1 << 30,
    )
    table = []
    for lane in res.lanes:  # one lane a rate, in grid order
        accs = [(a, r) for a, r in zip(lane["test_accuracy"], lane["eval_rounds"]) if math.isfinite(a)]
        best = max(accs, key=lambda a: (a[0], -a[1])) if accs else (float("nan"), None)
        table.append(
            {
                "learning_rate": lane["hparams"]["learning_rate"],
                "dev_accuracy": best[0],
                "dev_round": best[1],
                "final_dev_accuracy": lane["test_accuracy"][-1],
            }
        )
    scored = [(row["dev_accuracy"], -i) for i, row in enumerate(table) if math.isfinite(row["dev_accuracy"])]
    if not scored:
        raise ValueError(f"no learning rate of the grid {grid} gave a finite dev evaluation")
    return table[-max(scored)[1]]["learning_rate"], table
