"""Sweeps of seeds × hyperparameters as one compiled program.

:func:`sweep` runs S seeds × H hyperparameter points, ``S·H`` *lanes*, as a single jitted program: a
``vmap`` over a leading lane axis of *(initial state → initial evaluation → ``lax.scan`` over segments of
``eval_every`` rounds, each followed by an evaluation of the global prompt on the test and dev sets and the
dev-selection update)*. Shapes are static and the swept numbers live in the :class:`HParams` pytree, so
every lane is the same program on other values. The round, the evaluation and the selection are
:func:`~fedbpt_jax.federated.run`'s own pieces (:func:`~fedbpt_jax.federated.run.make_segment`,
:func:`~fedbpt_jax.federated.run.make_initial_eval`, :func:`~fedbpt_jax.federated.run.initial_carry`,
:func:`~fedbpt_jax.federated.run.eval_sets`), so lane ``(seed, hp)`` computes what
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
import importlib
import itertools
import json
import math
import numbers
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import objective
from ..checkpoint import to_json, write_json_atomic
from .config import HParams
from .core import FederatedAlgorithm, FederatedData, ModelInputs
from .distributed import host, to_global

# The module (``fedbpt_jax.federated.run`` as an attribute is the function ``run``).
run_mod = importlib.import_module(".run", __package__)

#: The mesh axis the lanes are sharded over (:func:`lane_mesh`).
LANE_AXIS = "lanes"
_PROGRAM_PREFIX = "fedbpt_jax_sweep__"
#: Figures summarised over the seeds of a hyperparameter point (mean ± std, n finite values).
SUMMARY_FIGURES = ("final_test_accuracy", "selected_test_accuracy", "selected_dev_accuracy", "best_test_reference")
HP_FIELDS = tuple(f.name for f in dataclasses.fields(HParams))


def _on_compile(event: str, duration: float, **kwargs) -> None:
    name = str(kwargs.get("fun_name", ""))
    if event == "/jax/core/compile/backend_compile_duration" and _PROGRAM_PREFIX in name:
        run_mod.COMPILE_COUNTS["sweep/" + name[name.index(_PROGRAM_PREFIX) + len(_PROGRAM_PREFIX) :].rstrip(")")] += 1


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
    and rounds' key (:func:`fedbpt_jax.federated.run.round_key`); everything but the lane inputs is shared.
    """
    name = algo.name
    segment = run_mod.make_segment(
        algo, scorer, eval_every, n_prompt, hidden, key_impl, keep_uploads=False, log_clients=False
    )
    initial = run_mod.make_initial_eval(algo, scorer, n_prompt, hidden)

    def lane(key_init, key_rounds, hp, data, model, test, dev, token_norm):
        carry = run_mod.initial_carry(algo, jax.random.wrap_key_data(key_init, impl=key_impl), hp, hidden)
        carry, ev0 = initial(carry, data, model, test, dev, token_norm)

        def body(carry, _):
            carry, metrics, ev = segment(key_rounds, carry, data, hp, model, test, dev, token_norm)
            return carry, (metrics, ev)

        carry, (metrics, evs) = jax.lax.scan(body, carry, None, length=num_segments)
        return carry, ev0, evs, metrics

    def program(key_init, key_rounds, hp, data, model, test, dev, token_norm):
        counts = run_mod.TRACE_COUNTS
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
    scorer = run_mod.algo_scorer(algo, kind, model_config)
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


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------
def _stats(values: list) -> dict:
    """mean, sample std (ddof 1; NaN with fewer than 2 values) and n over the finite values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    mean = float(np.mean(xs)) if n else float("nan")
    std = float(np.std(xs, ddof=1)) if n >= 2 else float("nan")
    return {"mean": mean, "std": std, "n": n}


def _fmt_stat(s: dict) -> str:
    if not s["n"]:
        return "n/a"
    if not math.isfinite(s["std"]):
        return f"{s['mean']:.4f}"
    return f"{s['mean']:.4f} ± {s['std']:.4f}"


@dataclasses.dataclass
class SweepResults:
    """What :func:`sweep` returns.

    Attributes:
      algorithm: the algorithm's name.
      num_rounds, eval_every: the schedule; ``eval_rounds``: the evaluated rounds (0 = the initial state).
      swept: the hyperparameter fields that vary (in the order given).
      seeds: the S seeds; ``points``: the H hyperparameter points (every :class:`HParams` field).
      lanes: one dict per lane (point-major: lane ``h·S + s`` is point h with seed s): ``lane``, ``seed``,
        ``point``, ``hparams``; per evaluated round ``test_accuracy``, ``dev_accuracy`` (None without a dev
        set), ``test_loss``, ``z_norm`` (when the algorithm has a z); per round the scalar round metrics
        under ``rounds`` (e.g. ``sigma``, ``client_loss``); ``final_round``, ``final_test_accuracy``,
        ``final_dev_accuracy``; the dev-selected ``selected_round``, ``selected_dev_accuracy``,
        ``selected_test_accuracy`` (None when no finite evaluation was ever selected); the
        reference-compatibility ``best_test_reference`` (selected on test: optimistic) and its round;
        ``nonfinite_evals``. NaN accuracies are kept (as ``"nan"`` in JSON).
      summary: one dict per point: ``point``, ``hparams`` (the swept fields), ``seeds`` and, for each of
        :data:`SUMMARY_FIGURES`, ``{"mean", "std", "n"}`` over the seeds' finite values (std: sample std,
        NaN with fewer than two).
      selection_rule: how ``selected_*`` was chosen.
      carry: the lanes' final :class:`~fedbpt_jax.federated.RunCarry` as numpy with a leading lane axis (not
        written to JSON), e.g. ``carry.state.server.mean[lane]``.
    """

    algorithm: str
    num_rounds: int
    eval_every: int
    eval_rounds: list[int]
    swept: list[str]
    seeds: list[int]
    points: list[dict]
    lanes: list[dict]
    summary: list[dict]
    selection_rule: str
    carry: Any = dataclasses.field(default=None, repr=False)

    def lane(self, seed: int, **hparams) -> dict:
        """The lane of ``seed`` at the point whose swept fields equal ``hparams``."""
        for row in self.lanes:
            if row["seed"] == seed and all(row["hparams"].get(k) == float(v) for k, v in hparams.items()):
                return row
        raise KeyError(
            f"no lane with seed {seed} and {hparams}; seeds {self.seeds}, points "
            f"{[{k: p[k] for k in self.swept} for p in self.points]}"
        )

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "carry"}
        return {"kind": "sweep", **d}

    def to_json(self) -> str:
        """Strict JSON (NaN and ±inf as ``"nan"``, ``"inf"``, ``"-inf"``: read back with
        :func:`fedbpt_jax.checkpoint.read_json`)."""
        return json.dumps(to_json(self.as_dict()), indent=2, allow_nan=False) + "\n"

    def write(self, path) -> Path:
        """Writes :meth:`to_json` to ``path`` atomically (a complete file or the previous one, never half)."""
        return write_json_atomic(path, self.as_dict())

    def markdown(self) -> str:
        """A markdown table: one row per hyperparameter point, the swept values, n seeds, and mean ± std of
        the final, dev-selected and best-on-test (reference figure, optimistic) test accuracies."""
        cols = [
            *self.swept,
            "seeds",
            "final test acc",
            "dev-selected test acc",
            "selected dev acc",
            "best-on-test (reference, optimistic)",
        ]
        lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
        for s in self.summary:
            cells = [f"{s['hparams'][k]:g}" for k in self.swept] + [str(len(s["seeds"]))]
            cells += [_fmt_stat(s[f]) for f in SUMMARY_FIGURES]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def _finite_eval(ev0, evs, i: int, e: int, has_dev: bool) -> bool:
    """Whether evaluation ``e`` (0: the initial one) of lane ``i`` had finite logits on test (and dev)."""

    def at(k):
        return np.asarray(ev0[k])[i] if e == 0 else np.asarray(evs[k])[i, e - 1]

    names = ("", "dev_") if has_dev else ("",)
    return all(int(at(p + "nonfinite_examples")) == 0 and math.isfinite(float(at(p + "accuracy"))) for p in names)


def _results(algo, seeds, points, swept, num_rounds, eval_every, out, has_dev: bool) -> SweepResults:
    carry, ev0, evs, metrics = host(out)
    n_lanes = len(seeds) * len(points)
    carry = jax.tree_util.tree_map(lambda a: np.asarray(a)[:n_lanes], carry)
    eval_rounds = list(range(0, num_rounds + 1, eval_every))

    def curve(k, i):
        if k not in ev0:
            return None
        return [float(np.asarray(ev0[k])[i])] + [float(x) for x in np.asarray(evs[k])[i]]

    lanes = []
    for h, point in enumerate(points):
        for j, seed in enumerate(seeds):
            i = h * len(seeds) + j
            test_acc, dev_acc = curve("accuracy", i), curve("dev_accuracy", i)
            nonfinite = sum(1 for e in range(len(eval_rounds)) if not _finite_eval(ev0, evs, i, e, has_dev))
            rounds = {
                k: [float(x) for x in np.asarray(v)[i].reshape(-1)]
                for k, v in metrics.items()
                if np.asarray(v)[i].size == num_rounds
            }
            sel = int(carry.selected_round[i])
            ref_round = int(carry.best_test_reference_round[i])
            lanes.append(
                {
                    "lane": i,
                    "seed": seed,
                    "point": h,
                    "hparams": dict(point),
                    "eval_rounds": eval_rounds,
                    "test_accuracy": test_acc,
                    "dev_accuracy": dev_acc,
                    "test_loss": curve("loss", i),
                    "z_norm": curve("z_norm", i),
                    "rounds": rounds,
                    "final_round": num_rounds,
                    "final_test_accuracy": test_acc[-1],
                    "final_dev_accuracy": None if dev_acc is None else dev_acc[-1],
                    "selected_round": sel if sel >= 0 else None,
                    "selected_dev_accuracy": float(carry.selected_dev_accuracy[i]) if has_dev and sel >= 0 else None,
                    "selected_test_accuracy": float(carry.selected_test_accuracy[i]) if sel >= 0 else None,
                    "best_test_reference": float(carry.best_test_reference[i]) if ref_round >= 0 else None,
                    "best_test_reference_round": ref_round if ref_round >= 0 else None,
                    "nonfinite_evals": nonfinite,
                }
            )
    summary = []
    for h, point in enumerate(points):
        rows = [r for r in lanes if r["point"] == h]
        summary.append(
            {
                "point": h,
                "hparams": {k: point[k] for k in swept},
                "seeds": list(seeds),
                **{f: _stats([r[f] for r in rows]) for f in SUMMARY_FIGURES},
            }
        )
    rule = (
        "dev accuracy, ties to the earliest round; non-finite evaluations never selected"
        if has_dev
        else "none (no dev set): the latest finite evaluation"
    )
    return SweepResults(
        algorithm=algo.name,
        num_rounds=num_rounds,
        eval_every=eval_every,
        eval_rounds=eval_rounds,
        swept=list(swept),
        seeds=list(seeds),
        points=[dict(p) for p in points],
        lanes=lanes,
        summary=summary,
        selection_rule=rule,
        carry=carry,
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


def _lane_keys(seeds: list[int]):
    """Raw key data ``[L, k]`` of each seed's initial-state key and rounds' key, as :func:`run` derives them
    from ``jax.random.key(seed)``, and the key implementation."""
    inits, rounds, impl = [], [], None
    for s in seeds:
        key_init, key_rounds, impl = run_mod.run_keys(jax.random.key(s))
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
      ValueError: bad seeds, hyperparameters (see :func:`hp_points`), schedule, mesh or data, before
        anything compiles.
    """
    seeds = check_seeds(seeds)
    _check_sweep_options(num_rounds, eval_every, eval_chunk, mesh)
    if getattr(algo, "mesh", None) is not None:
        raise ValueError(
            f"algorithm {algo.name!r} was built with a client mesh; a sweep shards lanes, not clients: "
            "build it without mesh= and pass sweep(mesh=fedbpt_jax.federated.lane_mesh())"
        )
    points = hp_points(hp, grid=grid, base=base)
    swept = list(dict(hp or {}))
    run_mod.validate_inputs(algo, data, test, dev, lm)

    key_init, key_rounds, impl = _lane_keys(seeds)
    n_lanes = len(seeds) * len(points)
    key_init, key_rounds = np.tile(key_init, (len(points), 1)), np.tile(key_rounds, (len(points), 1))
    hps = {k: np.repeat(np.asarray([p[k] for p in points], np.float32), len(seeds)) for k in HP_FIELDS}
    pad = 0 if mesh is None else -n_lanes % mesh.devices.size
    if pad:  # copies of the last lane, dropped from the results
        key_init, key_rounds = (np.concatenate([a, np.repeat(a[-1:], pad, 0)]) for a in (key_init, key_rounds))
        hps = {k: np.concatenate([v, np.repeat(v[-1:], pad)]) for k, v in hps.items()}
    hparams = HParams(**{k: jnp.asarray(v) for k, v in hps.items()})

    scorer = run_mod.algo_scorer(algo, lm.kind, lm.config)
    keep = run_mod.decide_clean_context(algo, scorer, lm, data, keep_clean_context, clean_context_budget, num_rounds)

    def chunked(batch):  # as run() chunks them
        return jax.tree_util.tree_map(jnp.asarray, objective.eval_chunks(scorer, batch, eval_chunk, data.spec))

    chunks = chunked(test)
    dev_chunks = None if dev is None else chunked(dev)
    data = run_mod.prepare_clean_context(data, keep, scorer, model, algo.config, None)
    cache = run_mod.decide_eval_prefix_cache(
        scorer, lm.params, chunks, dev_chunks, data.spec, cache_eval_prefix, eval_cache_budget
    )
    evals = run_mod.eval_sets(scorer, lm, model, chunks, dev_chunks, data.spec, cache_prefix=cache)
    token_norm = jnp.asarray(run_mod.median_token_norm(lm), jnp.float32)
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
    out = program(*lane_args, *shared)
    return _results(algo, seeds, points, swept, num_rounds, eval_every, out, dev is not None)
