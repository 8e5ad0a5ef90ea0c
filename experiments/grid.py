"""Resumable grid driver for the paper-claim experiments, and its report.

A *grid* is a base configuration plus axes (algorithm × partition × seed × task/template × any other
setting), declared in a small TOML or JSON file (``experiments/grids/*.toml``). Every point of the grid is
one :func:`fedbpt_jax.run` simulation in its own directory, named from its configuration (a readable
prefix and a hash), holding ``config.json`` (the effective configuration), ``status.json``,
``metrics.json``, ``rounds.csv`` and ``ckpt/`` (orbax checkpoints, git-ignored). Re-running the same
grid skips every run whose ``metrics.json`` already reaches the requested rounds and resumes an
interrupted one from its checkpoint (bit-identical to an uninterrupted run); a run that fails is
recorded in its ``status.json`` and the grid goes on.

Usage::

    python experiments/grid.py run experiments/grids/sst2_noniid.toml --dry-run     # list the runs
    python experiments/grid.py run experiments/grids/sst2_noniid.toml --only seed=0 --max-runs 3
    python experiments/grid.py run experiments/grids/sst2_noniid.toml               # the rest (resumes)
    python experiments/grid.py run experiments/grids/mr_iid.toml --jobs 8           # 8 runs at once (a GPU)
    python experiments/grid.py report experiments/results/grid_sst2_noniid           # tables and plots

A run is the same simulation as ``fedbpt-jax simulate`` with the same settings: ``seed`` drives the few-shot
draw, the partition and the keys (``key_projection, key_run = split(key(seed))``), so runs that differ only
in the algorithm share data, projection and round keys (a paired design over seeds).

Grid file (TOML; JSON with the same structure also works)::

    [grid]
    name = "sst2_noniid"                 # output folder: experiments/results/grid_<name>
    description = "..."

    [base]                               # any setting (see SETTINGS), for every run
    rounds = 15
    partition = "dirichlet:1.0"

    [axes]                               # the cartesian product of these lists
    seed = [0, 1, 2]                     # an axis named after a setting: its values
    method = [                           # any other name: tables of settings, each with a label
      { label = "fedbpt", algorithm = "fedbpt" },
      { label = "fedavg_bbt_perturb", algorithm = "fedavg_bbt", algorithm_options = { perturb = true } },
    ]

    [report]
    pairs = [["fedbpt", "fedavg_bbt_perturb"]]     # paired per-seed differences A − B (labels)

Runs are ordered seed first, so ``--max-runs`` takes every configuration's first seed before any second seed.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import itertools
import json
import math
import os
import re
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import fedbpt_jax  # noqa: E402,F401  (first: sets OPENBLAS_NUM_THREADS before numpy/jax load)
from fedbpt_jax.cli_options import options as simulate_options
from fedbpt_jax.machine import cpu_flags, cpu_model
from fedbpt_jax.report import seed_order as _seed_order

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

#: Every setting a run has, with its default. A grid's [base] and axes may set any of them, nothing else.
SETTINGS: dict[str, Any] = {
    "algorithm": "fedbpt",  # fedbpt | fedavg_bbt | centralized_bbt | manual | fedprompt
    "algorithm_options": {},  # keyword arguments of the algorithm's factory (checked against it)
    "model": "smollm2-135m-instruct",  # registry name, hub id, local dir or .gguf; "tiny" = tiny random decoder
    "compute_dtype": "float32",  # float32 | bfloat16 | auto (float32: bfloat16 measured slower on this CPU)
    "task": "sst2",
    "data": None,  # data source (None: the package default, ../shared/data for sst2)
    "style": None,  # decoder template style: completion (None) | chat | bbt
    "shots": 16,  # few-shot examples per class, train (and as many dev unless dev_shots)
    "dev_shots": None,  # dev examples per class from the training pool (None: as many as shots)
    "test_size": None,  # None: the full test split (872 SST-2 sentences)
    # the training pool without duplicate texts and test texts before the few-shot draw (data.federated's
    # clean); the grids run before that rule set it false, which reproduces their draws
    "clean_data": True,
    "clients": 10,
    "per_round": None,  # K clients a round (None: all)
    "partition": "dirichlet:1.0",  # "iid" | "dirichlet:<alpha>"
    "population": 5,  # λ
    "local_generations": 8,  # I
    "d": 500,
    "n_prompt": None,  # None: the prompt start's token count, else 5
    "prompt_start": "auto",  # auto | zeros | tokens:<ids> | phrase:<text> | <file>.npy
    # decoders: after (None) | before. The grids of experiments/README.md ran when the library's decoder default
    # was the prompt after the text, and their run ids hash None: here None keeps meaning "after" (GRID_LAYOUT).
    "layout": None,
    "loss": "ce",
    "perturb": True,
    "perturb_rate": 0.5,  # r_p
    "fitness_form": "ratio_of_means",
    "server_variant": "reference",
    "client_keys": "independent",
    # further FedConfig fields the settings above do not name, e.g. {norm_clip = true}, {sigma_schedule =
    # "clamp"}, {server_ranking = "random"} (the mechanism studies); checked against FedConfig
    "fed_config": {},
    "sigma0": 1.0,
    "learning_rate": 0.3,  # FedPrompt's Adam learning rate
    "dropout": 0.0,
    "chunk_clients": 2,
    "rounds": 15,
    "eval_every": 1,
    "dev_selection": "auto",  # auto (when run() supports it) | true (required) | false
    "eval_cache_gb": 4.0,  # keep the test/dev prefix caches when they fit (SmolLM2, 872 SST-2: 2.5 GiB)
    "seed": 0,
}
#: ``fedbpt-jax simulate``'s options that a grid spells its own way (``partition``, ``server_variant``,
#: ``algorithm_options = {perturb = true}``) or that say where results go and how they are shown (the grid decides
#: those for each run), and ``--tune-lr`` (a grid picks a learning rate with a grid of its own).
NOT_GRID_SETTINGS = (
    "alpha",
    "server",
    "fedavg_perturb",
    "results_dir",
    "overwrite",
    "progress",
    "debug",
    "checkpoint_dir",
    "save_uploads",
    "tensorboard_dir",
    "plot",
    "tune_lr",
    "lr_grid",
    "devices",
)
#: Every other option of ``simulate`` is a setting too, by the same name and with the CLI's default (so an option
#: added to the package is a grid setting without a change here): e.g. ``norm_clip``, ``sigma_schedule``,
#: ``sampling``, ``template``. The settings above keep the defaults that the shipped grids were written against
#: (task sst2, 15 rounds, the full test set, dev as many as the shots, ...): their run ids hash them.
ADDED_SETTINGS: dict[str, Any] = {
    o.dest: o.default
    for o in simulate_options("simulate")
    if o.dest not in SETTINGS and o.dest not in NOT_GRID_SETTINGS
}
SETTINGS.update(ADDED_SETTINGS)
#: What a grid's ``layout = None`` means for a decoder (the library's default is now the prompt before the text).
GRID_LAYOUT = "after"


def grid_layout(s: dict, kind: str = "decoder") -> str | None:
    """The layout a run uses: ``s["layout"]``, or for a decoder with None the grids' :data:`GRID_LAYOUT`."""
    if s["layout"] is not None or kind != "decoder":
        return s["layout"]
    return GRID_LAYOUT


#: Settings that do not change what a run computes up to its last round (the prefix cache changes only the
#: evaluation's speed): left out of the run's hash, so a grid can ask for more rounds later and the finished
#: runs resume from their checkpoints.
NOT_IN_HASH = ("rounds", "eval_cache_gb", "eval_chunk", "keep_clean_cache", "checkpoint_every")
#: Settings added after grids had run, at the value that reproduces those runs: left out of the hash at that value
#: (so the finished runs keep their ids), in it at any other.
HASHED_UNLESS = {"dev_shots": None, "fed_config": {}, "clean_data": False}
#: Settings an algorithm does not read: a finished run that differs from a wanted one only in these is the
#: same experiment, so it is copied instead of computed again. The manual prompt never trains: its copy is
#: exact. Centralized BBT pools every client's examples, so the partition changes only the order in which the
#: pooled examples' losses are summed: the fitness values agree to float rounding (~1e-7 relative), CMA-ES
#: uses only their ranking, and the trajectory is the same unless two candidates tie to within rounding
#: (``tests/test_grid.py`` compares copies with runs computed from scratch; on SmolLM2, SST-2 seed 0, the
#: IID and Dirichlet(1) runs' accuracies and losses were bit-identical over 15 rounds). The copy's cost
#: figures are its source's (:data:`PARTITION_COST_KEYS`). ``--no-reuse`` computes them instead.
UNUSED_BY = {"centralized_bbt": ("partition",), "manual": ("partition",)}
#: Per-round cost figures of ``metrics.json`` that a copy across partitions keeps from its source (the pooled
#: batch is padded to the partition's largest client, so they differ from what the copy's own run would count).
PARTITION_COST_KEYS = ("examples_per_call", "model_flops")
#: The per-client keys of ``config.json``'s ``data`` record (they describe the partition).
PER_CLIENT_DATA = ("train_counts", "train_label_counts")
SECTIONS = ("grid", "base", "axes", "report")


class GridError(ValueError):
    """A bad grid file or command-line value (the message names it and what is accepted)."""


# --------------------------------------------------------------------------------------------------
# Grid files


def load_grid(path: str | Path) -> dict:
    """Reads and checks a grid file (``.toml`` or ``.json``). Raises :class:`GridError`."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise GridError(f"grid file {str(path)!r} is not valid TOML: {err}") from None
    elif path.suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise GridError(f"grid file {str(path)!r} is not valid JSON: {err}") from None
    else:
        raise GridError(f"grid file {str(path)!r}: accepted extensions are .toml and .json")
    return check_grid(raw, str(path))


def _check_settings(table: dict, where: str) -> None:
    for k, v in table.items():
        if k not in SETTINGS:
            raise GridError(f"{where}: unknown grid key {k!r}; accepted: {sorted(SETTINGS)}")
        if k == "algorithm_options" and not isinstance(v, dict):
            raise GridError(f"{where}: algorithm_options must be a table of keyword arguments, got {v!r}")


def check_grid(raw: dict, origin: str = "grid") -> dict:
    """Checks a parsed grid (unknown sections, keys, axes; labels) and returns it normalised:
    ``{"name", "description", "base", "axes": [(name, [(label, overrides)])], "pairs"}``."""
    if not isinstance(raw, dict):
        raise GridError(f"{origin}: a grid is a table with sections {SECTIONS}")
    for s in raw:
        if s not in SECTIONS:
            raise GridError(f"{origin}: unknown section [{s}]; accepted: {list(SECTIONS)}")
    meta = raw.get("grid", {})
    for k in meta:
        if k not in ("name", "description"):
            raise GridError(f"{origin}: unknown key {k!r} in [grid]; accepted: ['description', 'name']")
    name = meta.get("name") or Path(origin).stem
    if not re.fullmatch(r"[A-Za-z0-9._-]+", str(name)):
        raise GridError(f"{origin}: grid name {name!r} may hold only letters, digits, '.', '_' and '-'")
    base = dict(raw.get("base", {}))
    _check_settings(base, f"{origin} [base]")
    axes = []
    for axis, values in raw.get("axes", {}).items():
        where = f"{origin} [axes] {axis}"
        if not isinstance(values, list) or not values:
            raise GridError(f"{where}: an axis is a non-empty list, got {values!r}")
        points = []
        for v in values:
            if isinstance(v, dict):
                v = dict(v)
                label = v.pop("label", None)
                if not isinstance(label, str) or not label:
                    raise GridError(f"{where}: a table value needs a non-empty string 'label', got {label!r}")
                _check_settings(v, f"{where} (label {label!r})")
                points.append((label, v))
            elif axis in SETTINGS:
                points.append((_scalar_label(axis, v), {axis: v}))
            else:
                raise GridError(
                    f"{where}: unknown grid key {axis!r} (an axis named after a setting takes "
                    f"values; any other axis takes tables with a 'label'); accepted settings: "
                    f"{sorted(SETTINGS)}"
                )
        labels = [p[0] for p in points]
        if len(set(labels)) != len(labels):
            raise GridError(f"{where}: duplicate labels {labels}")
        axes.append((axis, points))
    report = raw.get("report", {})
    for k in report:
        if k != "pairs":
            raise GridError(f"{origin}: unknown key {k!r} in [report]; accepted: ['pairs']")
    pairs = report.get("pairs", [])
    if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
        raise GridError(f"{origin} [report] pairs: a list of [label_a, label_b] pairs, got {pairs!r}")
    declared = sorted({label for _, points in axes for label, _ in points})
    for p in pairs:
        unknown = [x for x in p if x not in declared]
        if unknown:
            raise GridError(
                f"{origin} [report] pairs: {p!r} names {', '.join(map(repr, unknown))}, not an axis label; "
                f"declared labels: {declared}"
            )
    return {
        "name": str(name),
        "description": meta.get("description", ""),
        "base": base,
        "axes": axes,
        "pairs": [list(p) for p in pairs],
    }


def _scalar_label(axis: str, v) -> str:
    if axis == "seed":
        return f"s{v}"
    if axis in ("algorithm", "partition", "task", "style", "prompt_start", "model"):
        return str(v)
    return f"{axis}={v}"


def expand(grid: dict) -> list[dict]:
    """The grid's runs: ``{"settings", "labels", "run_id", "dirname"}``, seed varying slowest."""
    axes = grid["axes"]
    runs = []
    for combo in itertools.product(*[points for _, points in axes]):
        settings = copy.deepcopy(SETTINGS)
        settings.update(copy.deepcopy(grid["base"]))
        labels = {}
        for (axis, _), (label, overrides) in zip(axes, combo):
            settings.update(copy.deepcopy(overrides))
            labels[axis] = label
        runs.append({"settings": settings, "labels": labels})
    runs.sort(key=lambda r: _seed_order(r["settings"]["seed"]))  # stable: declared order within a seed
    return runs


def check_settings(s: dict) -> None:
    """Value checks that need no model (types, choices): raises :class:`GridError` naming the value."""

    def need(cond, msg):
        if not cond:
            raise GridError(msg)

    from fedbpt_jax.federated.algorithms import ALGORITHMS

    need(s["algorithm"] in ALGORITHMS, f"unknown algorithm {s['algorithm']!r}; accepted: {sorted(ALGORITHMS)}")
    need(
        s["compute_dtype"] in ("float32", "bfloat16", "auto"),
        f"compute_dtype {s['compute_dtype']!r}; accepted: ['auto', 'bfloat16', 'float32']",
    )
    parse_partition(s["partition"])
    for k in (
        "shots",
        "clients",
        "population",
        "local_generations",
        "d",
        "rounds",
        "eval_every",
        "seed",
        "chunk_clients",
    ):
        need(
            isinstance(s[k], int) and not isinstance(s[k], bool) and s[k] >= 0,
            f"{k} must be a non-negative integer, got {s[k]!r}",
        )
    for k in ("test_size", "n_prompt", "per_round", "dev_shots"):
        need(
            s[k] is None or (isinstance(s[k], int) and s[k] > 0),
            f"{k} must be a positive integer or null, got {s[k]!r}",
        )
    need(
        isinstance(s["eval_cache_gb"], (int, float))
        and not isinstance(s["eval_cache_gb"], bool)
        and s["eval_cache_gb"] >= 0,
        f"eval_cache_gb must be a number >= 0, got {s['eval_cache_gb']!r}",
    )
    need(
        s["dev_selection"] in ("auto", True, False),
        f"dev_selection {s['dev_selection']!r}; accepted: 'auto', true, false",
    )
    need(isinstance(s["perturb"], bool), f"perturb must be true or false, got {s['perturb']!r}")
    need(
        not (s["perturb"] and float(s["perturb_rate"]) == 0.0),
        "perturb = true with perturb_rate = 0 makes every fitness exactly 1 (the perturbed copy is the clean "
        "one): the paper's r_p = 0 is perturb = false",
    )
    for k, v in fed_config_extra(s).items():
        if k in ADDED_SETTINGS and s[k] != ADDED_SETTINGS[k] and s[k] != v:
            raise GridError(f"{k} is set twice, to {s[k]!r} and in fed_config to {v!r}: set it once")
    from fedbpt_jax.plan import check

    try:  # the library's own checks of the names and numbers (loss, server_variant, client_keys, rates, ...)
        check(run_options(s), "simulate")
    except (ValueError, TypeError) as err:
        raise GridError(str(err)) from None


def run_options(s: dict, kind: str | None = None):
    """The ``fedbpt-jax simulate`` options (:mod:`fedbpt_jax.cli_options`) that a grid run's settings describe,
    as the namespace :func:`fedbpt_jax.plan.prepare` takes: the same names where the grid has them, ``partition``
    as ``alpha`` (0: IID), ``server_variant`` as ``server``, ``test_size`` None as 0 (all), the ``fed_config``
    table as its fields' options; ``layout`` None is the grids' :data:`GRID_LAYOUT` for a decoder (``kind``)."""
    opts = simulate_options("simulate")
    ns = {o.dest: o.default for o in opts}
    ns.update({k: v for k, v in s.items() if k in ns})
    dest_of = {o.field: o.dest for o in opts}
    ns.update({dest_of[k]: v for k, v in fed_config_extra(s).items()})
    ns.update(
        alpha=parse_partition(s["partition"]) or 0.0,
        server=s["server_variant"],
        test_size=s["test_size"] or 0,
        layout=grid_layout(s, kind) if kind else s["layout"],
        clean_data=s["clean_data"],
        progress=False,
    )
    return argparse.Namespace(**ns)


#: FedConfig fields that the grid's own settings set (a ``fed_config`` table may not name them)
_FED_SET_BY_GRID = (
    "num_clients",
    "clients_per_round",
    "population_size",
    "local_generations",
    "intrinsic_dim",
    "n_prompt_tokens",
    "loss",
    "perturb",
    "fitness_form",
    "server_variant",
    "client_keys",
    "layout",
    "chunk_clients",
)


def fed_config_fields() -> set[str]:
    import dataclasses

    import fedbpt_jax as fb

    return {f.name for f in dataclasses.fields(fb.FedConfig)}


def fed_config_extra(s: dict) -> dict:
    """The ``fed_config`` table: FedConfig fields beyond the grid's own settings (GridError naming a bad key).
    Each of them is also a setting of its own (``norm_clip = true`` is ``fed_config = {norm_clip = true}``)."""
    extra = s["fed_config"]
    if not isinstance(extra, dict):
        raise GridError(f"fed_config must be a table of FedConfig fields, got {extra!r}")
    fields = fed_config_fields()
    for k in extra:
        if k in _FED_SET_BY_GRID:
            raise GridError(f"fed_config key {k!r} is a grid setting of its own; set it outside fed_config")
        if k not in fields:
            raise GridError(
                f"fed_config key {k!r} is not a FedConfig field; accepted: {sorted(fields - set(_FED_SET_BY_GRID))}"
            )
    return dict(extra)


def parse_partition(p) -> float | None:
    """``"iid"`` → None; ``"dirichlet:<alpha>"`` → alpha."""
    if p == "iid":
        return None
    if isinstance(p, str) and p.startswith("dirichlet:"):
        try:
            alpha = float(p.split(":", 1)[1])
        except ValueError:
            alpha = -1.0
        if alpha > 0 and math.isfinite(alpha):
            return alpha
    raise GridError(f"partition {p!r}; accepted: 'iid' or 'dirichlet:<alpha>' with alpha > 0 (e.g. 'dirichlet:1.0')")


def run_supports_dev() -> bool:
    import fedbpt_jax as fb

    return "dev" in inspect.signature(fb.run).parameters


def resolve_dev_selection(value) -> bool:
    supported = run_supports_dev()
    if value is True and not supported:
        raise GridError(
            "dev_selection = true, but this version of fedbpt_jax.run has no dev-set selection "
            "(no 'dev' argument): use 'auto' or false"
        )
    return supported if value == "auto" else bool(value)


def _digest(settings: dict, unused: tuple[str, ...] = ()) -> str:
    """Hash of the settings that change the computation, leaving out ``unused`` ones as well."""
    ident = {k: v for k, v in settings.items() if k not in NOT_IN_HASH and k not in unused}
    # Settings that came with simulate's options count only away from their default (the runs before them keep
    # their ids), and a FedConfig field set on its own hashes as in the fed_config table (one run, one id).
    fields = fed_config_fields()
    extra = {k: v for k, v in ident.items() if k in ADDED_SETTINGS and v != ADDED_SETTINGS[k]}
    ident = {k: v for k, v in ident.items() if k not in ADDED_SETTINGS}
    ident.update({k: v for k, v in extra.items() if k not in fields})
    if any(k in fields for k in extra):
        ident["fed_config"] = {**ident.get("fed_config", {}), **{k: v for k, v in extra.items() if k in fields}}
    ident = {k: v for k, v in ident.items() if k not in HASHED_UNLESS or v != HASHED_UNLESS[k]}
    ident["dev_selection"] = resolve_dev_selection(settings["dev_selection"])
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]


def identify(run: dict) -> None:
    """Adds ``run_id`` (hash of the settings that change the computation) and ``dirname`` to ``run``."""
    s = run["settings"]
    digest = _digest(s)
    labels = [v for k, v in run["labels"].items() if k != "seed"] + [f"s{s['seed']}"]
    prefix = "_".join(labels)
    prefix = re.sub(r"[^A-Za-z0-9._=-]+", "-", prefix).strip("-")[:80]
    run["run_id"] = digest
    run["dirname"] = f"{prefix}-{digest}"


def algorithm_options(name: str, options: dict) -> dict:
    """The factory's keyword options with their defaults, overridden by ``options``; an option the factory
    does not take is an error naming it and the accepted ones (never silently dropped)."""
    from fedbpt_jax.federated.algorithms import ALGORITHMS

    params = inspect.signature(ALGORITHMS[name]).parameters
    accepted = {
        k: p.default
        for k, p in params.items()
        if p.kind == inspect.Parameter.KEYWORD_ONLY and k not in ("mesh", "scorer")
    }
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise GridError(
            f"algorithm {name!r} has no option {', '.join(map(repr, unknown))}; accepted: "
            f"{sorted(accepted) or 'none'} (this version of fedbpt_jax)"
        )
    return {**{k: (None if v is inspect.Parameter.empty else v) for k, v in accepted.items()}, **options}


def matches(run: dict, filters: list[tuple[str, list[str]]]) -> bool:
    for key, values in filters:
        if key in run["labels"] and run["labels"][key] in values:
            continue
        if key in run["settings"] and any(_same(run["settings"][key], v) for v in values):
            continue
        return False
    return True


def _same(setting, text: str) -> bool:
    if isinstance(setting, bool) or setting is None:
        return str(setting).lower() == text.lower() or (setting is None and text in ("null", "none"))
    if isinstance(setting, (int, float)):
        try:
            return float(text) == float(setting)
        except ValueError:
            return False
    return str(setting) == text


def parse_filters(items: list[str], runs: list[dict]) -> list[tuple[str, list[str]]]:
    known = set(SETTINGS) | {a for r in runs for a in r["labels"]}
    out = []
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise GridError(f"--only {item!r}: expected key=value (several values: key=v1,v2)")
        if key not in known:
            raise GridError(
                f"--only {item!r}: unknown key {key!r}; accepted: axes {sorted(known - set(SETTINGS))} "
                f"or settings {sorted(SETTINGS)}"
            )
        out.append((key, value.split(",")))
    return out


# --------------------------------------------------------------------------------------------------
# Running


def is_finished(run_dir: Path, rounds: int) -> tuple[bool, int]:
    """(finished, last evaluated round) from ``metrics.json``."""
    from fedbpt_jax.checkpoint import read_json

    try:
        m = read_json(run_dir / "metrics.json")
        last = int(m["evals"][-1]["round"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError, IndexError):
        return False, 0
    return last >= rounds, last


def find_reusable(out: Path, run: dict) -> Path | None:
    """A finished run that computed what ``run`` would, or None: one with ``run``'s id (the same settings)
    in another grid folder beside ``out``, else one in ``out`` or beside it that differs only in settings
    ``run``'s algorithm does not read (:data:`UNUSED_BY`: the IID grid's centralized BBT is the non-IID
    grid's).

    Grids overlap (the perturbation-rate ablation's r_p = 0.5 arm is the main grid's FedBPT); a run found
    finished elsewhere is copied instead of being computed again. The newest such folder wins."""
    rounds = run["settings"]["rounds"]
    found = [
        d
        for d in out.parent.glob(f"*/*-{run['run_id']}")
        if d.is_dir() and d.parent.resolve() != out.resolve() and is_finished(d, rounds)[0]
    ]
    if not found and run["settings"]["algorithm"] in UNUSED_BY:
        unused = UNUSED_BY[run["settings"]["algorithm"]]
        wanted = _digest(run["settings"], unused)
        for cfg_path in out.parent.glob("*/*/config.json"):
            d = cfg_path.parent
            if d.name.endswith(".copying") or (d.name == run["dirname"] and d.parent.resolve() == out.resolve()):
                continue
            try:  # the algorithm is in the digest: only runs of the same algorithm match
                same = _digest({**SETTINGS, **json.loads(cfg_path.read_text())["settings"]}, unused) == wanted
            except (json.JSONDecodeError, KeyError, TypeError, GridError):
                continue
            if same and is_finished(d, rounds)[0]:
                found.append(d)
    return max(found, key=lambda d: (d / "metrics.json").stat().st_mtime) if found else None


def reuse(src: Path, dst: Path, run: dict, grid_name: str) -> None:
    """Copies the finished run ``src`` (checkpoint included) to ``dst`` under this grid's name and labels.

    The copy is assembled beside ``dst`` and renamed into place, so an interruption leaves no half copy;
    ``config.json`` records where it came from (``copied_from``). A copy of an equivalent run (differing
    only in settings the algorithm does not read) takes ``run``'s settings and id, and keeps the source's
    values of those settings under ``copied_settings``; the source's per-client data counts, which describe
    its partition, are left out, and ``copied_cost_figures`` names the per-round cost figures that are the
    source's (:data:`PARTITION_COST_KEYS`)."""
    from fedbpt_jax.checkpoint import read_json, write_json_atomic

    tmp = dst.with_name(dst.name + ".copying")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    cfg = read_json(tmp / "config.json")
    if cfg.get("run_id") == run["run_id"]:
        how = "identical settings, same run id; relabelled"
    else:
        src_settings = {**SETTINGS, **cfg.get("settings", {})}
        differ = sorted(
            k for k in run["settings"] if run["settings"][k] != src_settings.get(k) and k not in NOT_IN_HASH
        )
        how = (
            f"run id {cfg.get('run_id')}: differs only in {', '.join(differ)}, which "
            f"{run['settings']['algorithm']} does not read; relabelled"
        )
        cfg["copied_settings"] = {k: src_settings.get(k) for k in differ}
        cfg["copied_cost_figures"] = (
            f"{', '.join(PARTITION_COST_KEYS)} in metrics.json count the source's padded batches "
            f"({', '.join(f'{k} = {v}' for k, v in cfg['copied_settings'].items())})"
        )
        cfg["settings"] = {**cfg.get("settings", {}), **{k: run["settings"][k] for k in differ}}
        cfg["run_id"] = run["run_id"]
        if isinstance(cfg.get("data"), dict):
            cfg["data"] = {k: v for k, v in cfg["data"].items() if k not in PER_CLIENT_DATA}
    cfg.update(grid=grid_name, labels=run["labels"], copied_from=f"{src.parent.name}/{src.name} ({how})")
    write_json_atomic(tmp / "config.json", cfg)
    shutil.rmtree(dst, ignore_errors=True)  # an empty or failed attempt of this run
    tmp.rename(dst)


class Context:
    """Caches across the runs of one process: the backbone per (model, dtype), the algorithm objects."""

    def __init__(self):
        self.models: dict = {}
        self.data: dict = {}
        self.algos: dict = {}

    def algorithm(self, name: str, cfg, lm, options: dict):
        """One algorithm object per (name, config, options): runs differing only in seed (or data) reuse
        its compiled segment (``run`` caches the jitted segment per algorithm object)."""
        import fedbpt_jax as fb

        key = (name, cfg, json.dumps(options, sort_keys=True, default=str), id(lm))
        if key not in self.algos:
            self.algos[key] = fb.make(name, cfg, lm, **options)
        return self.algos[key]

    def model(self, name: str, dtype: str):
        key = (name, dtype)
        if key not in self.models:
            import fedbpt_jax as fb

            if name == "tiny":
                lm = fb.testing.tiny_decoder(0, num_layers=1, tokenizer=fb.testing.chatml_tokenizer())
            else:
                lm = fb.models.load(name, compute_dtype=dtype)
            self.models = {key: lm}  # one backbone in memory at a time
            self.algos = {}
        return self.models[key]


CONTEXT = Context()


def declaration(grid_file: Path, pairs: list) -> dict:
    """The comparisons a grid declares before its first run, with the commit that holds the grid file as it is
    ("uncommitted" when it differs from that commit or is not tracked; None outside a repository)."""
    import subprocess

    rec = {"pairs": [list(p) for p in pairs], "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    where = grid_file.resolve().parent
    try:
        last = subprocess.run(
            ["git", "log", "-1", "--format=%H", "--", grid_file.name],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", grid_file.name],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if last.returncode != 0:
            rec["grid_file_commit"] = None
        else:
            commit = last.stdout.strip()
            rec["grid_file_commit"] = commit if commit and not dirty.stdout.strip() else "uncommitted"
    except (OSError, subprocess.SubprocessError):
        rec["grid_file_commit"] = None
    return rec


def _git_commit() -> str | None:
    """The commit this process started from (read once: later commits do not change the code it runs)."""
    global _COMMIT
    if _COMMIT is None:
        _COMMIT = _read_commit() or "unknown"
    return _COMMIT


_COMMIT = None


def _read_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE.parent, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "fedbpt_jax"],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if out.returncode == 0:
            return out.stdout.strip() + ("+uncommitted changes in fedbpt_jax" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    # A copy of the tree without its git folder (a remote machine): the commit it was copied from, if given.
    return os.environ.get("FEDBPT_JAX_COMMIT") or None


class Watcher(threading.Thread):
    """Prints a line per new evaluation that :func:`fedbpt_jax.run` writes to ``metrics.json``."""

    def __init__(self, run_dir: Path, tag: str, seen: int, interval: float = 5.0):
        super().__init__(daemon=True)
        self.path, self.tag, self.seen, self.interval = run_dir / "metrics.json", tag, seen, interval
        self.stop = threading.Event()

    def poll(self):
        try:
            m = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return
        rows = {r["round"]: r for r in m.get("rounds", [])}
        for ev in m.get("evals", []):
            if ev["round"] <= self.seen:
                continue
            r = rows.get(ev["round"], {})
            dev = f" dev {ev['dev_accuracy']:.4f}" if "dev_accuracy" in ev else ""
            loss = r.get("client_loss")
            extra = (
                ""
                if not r
                else (f" loss {loss:.4f}" if isinstance(loss, float) and math.isfinite(loss) else "")
                + f" σ {r.get('sigma', float('nan')):.3f} {r.get('seconds', float('nan')):.1f}s/round"
            )
            print(f"    {self.tag} round {ev['round']:3d}: test {ev['accuracy']:.4f}{dev}{extra}", flush=True)
            self.seen = ev["round"]

    def run(self):
        while not self.stop.wait(self.interval):
            self.poll()

    def finish(self):
        self.stop.set()
        self.join()
        self.poll()


def run_record(run: dict, grid_name: str, plan, options, dev: bool) -> dict:
    """``config.json`` of a grid run: the layout ``fedbpt-jax simulate`` writes (``command``, ``args``: every
    option, ``resolved``, ``versions``, ``git_revision``) with the grid's own keys: ``grid``, ``run_id``,
    ``labels``, ``settings`` (the grid's vocabulary, what the run id hashes), ``data`` (per-client label counts)
    and ``environment`` (where it ran)."""
    import dataclasses

    import jax
    import numpy as np

    import fedbpt_jax as fb
    from fedbpt_jax.plan import config_record

    s, fed, lm = run["settings"], plan.fed, plan.lm
    train_labels = np.asarray(fed.train.labels)
    mask = np.asarray(fed.train.example_mask) > 0
    nl = int(np.shape(fed.spec.label_ids)[0])
    resolved = plan.resolved(
        algorithm_options=algorithm_options(s["algorithm"], s["algorithm_options"]),
        dev_selection=dev,
        precision=str(lm.config.compute_dtype) if s["model"] != "tiny" else "float32",
        hparams={k: float(v) for k, v in dataclasses.asdict(plan.hp).items()},
        keys="key(seed) -> split -> (projection, run); data seed = seed",
    )
    record = config_record(options, resolved)
    record["command"] = ["python", "experiments/grid.py", *sys.argv[1:]]
    record.update(
        grid=grid_name,
        run_id=run["run_id"],
        labels=run["labels"],
        settings=s,
        data={
            "train_counts": np.asarray(fed.train_counts).tolist(),
            "train_label_counts": [
                [int(((train_labels[i] == c) & mask[i]).sum()) for c in range(nl)] for i in range(train_labels.shape[0])
            ],
            "dev_size": int(len(fed.dev.labels)),
            "test_size": int(len(fed.test.labels)),
        },
        environment={
            "model": lm.name,
            "fedbpt_jax": fb.__version__,
            "commit": _git_commit(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind,
            "cpu": cpu_model(),
            "cpu_flags": cpu_flags(),
            # float32 on a GPU means TF32 matmul inputs unless this says "highest" (bit width of the figures)
            "matmul_precision": jax.config.jax_default_matmul_precision or "default",
        },
    )
    return record


def run_one(run: dict, out: Path, ctx: Context, grid_name: str) -> dict:
    """Runs (or resumes) one grid point; returns its status record. The run is prepared as ``fedbpt-jax
    simulate`` prepares one (:func:`fedbpt_jax.plan.prepare` from :func:`run_options`)."""
    import fedbpt_jax as fb
    from fedbpt_jax.checkpoint import write_json_atomic
    from fedbpt_jax.plan import prepare

    s = run["settings"]
    d = out / run["dirname"]
    t0 = time.time()
    d.mkdir(parents=True, exist_ok=True)
    _, seen = is_finished(d, s["rounds"])
    lm = ctx.model(s["model"], s["compute_dtype"])
    options = run_options(s, lm.kind)
    algorithm_options(s["algorithm"], s["algorithm_options"])  # an option the factory does not take: named
    dev = resolve_dev_selection(s["dev_selection"])
    plan = prepare(options, "simulate", lm=lm, algorithm_options=s["algorithm_options"])
    # runs that differ only in seed (or data) share one algorithm object, and so its compiled segment
    algo = ctx.algorithm(s["algorithm"], plan.config, lm, s["algorithm_options"])
    write_json_atomic(d / "config.json", run_record(run, grid_name, plan, options, dev))
    write_json_atomic(d / "status.json", {"state": "running", "started": t0, "from_round": seen})
    # The manual prompt never changes: evaluating it at round 0 and at the last round is enough (the same
    # numbers as every round, at a fraction of the evaluation cost; the run's identity is unchanged). It
    # keeps no checkpoint: asked for more rounds later, it simply runs again (two evaluations).
    manual = s["algorithm"] == "manual"
    kw = dict(
        num_rounds=s["rounds"],
        hp=plan.hp,
        eval_every=s["rounds"] if manual else s["eval_every"],
        eval_chunk=s["eval_chunk"],
        checkpoint_dir=None if manual else d / "ckpt",
        checkpoint_every=s["checkpoint_every"],
        results_dir=d,
        progress=False,
        eval_cache_budget=int(s["eval_cache_gb"] * 2**30),
        keep_clean_context={"auto": None, "on": True, "off": False}[s["keep_clean_cache"]],
    )
    if dev:
        kw["dev"] = plan.fed.dev
    watcher = Watcher(d, run["dirname"][:40], seen)
    watcher.start()
    try:
        carry, hist = fb.run(algo, plan.key_run, plan.data, plan.fed.test, lm, plan.model, **kw)
    finally:
        watcher.finish()
    ev = hist.evals
    status = {
        "state": "finished",
        "started": t0,
        "seconds": time.time() - t0,
        "from_round": seen,
        "rounds": ev[-1]["round"],
        "initial_test_accuracy": ev[0]["accuracy"],
        "final_test_accuracy": ev[-1]["accuracy"],
    }
    write_json_atomic(d / "status.json", status)
    return status


def run_in_workers(grid_path: Path, out: Path, pending: list[tuple[str, dict]], jobs: int) -> tuple[int, int]:
    """Runs each pending run in its own ``grid.py run --run NAME`` process, at most ``jobs`` at a time;
    returns (finished, failed). For accelerators that one small simulation does not fill (a SmolLM2 run with
    10 clients uses a few percent of a GPU): the runs share the device. Each worker writes only its own run
    folder (every file atomically), so the results are those of running the runs one after another. JAX's
    preallocation of most of the device memory per process is turned off unless the caller set it."""
    import subprocess

    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    queue, running = list(pending), {}
    finished = failed = 0
    try:
        while queue or running:
            while queue and len(running) < jobs:
                tag, r = queue.pop(0)
                cmd = [sys.executable, str(HERE / "grid.py"), "run", str(grid_path), "--out", str(out)]
                cmd += ["--run", r["dirname"], "--no-reuse"]
                running[subprocess.Popen(cmd, env=env)] = tag
                print(f"{tag}: started in a worker process ({len(running)} of {jobs})", flush=True)
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                tag = running.pop(proc)
                if proc.returncode == 0:
                    finished += 1
                else:
                    failed += 1
                    print(f"{tag}: worker exited with code {proc.returncode}", flush=True)
    except KeyboardInterrupt:
        for proc in running:
            proc.terminate()
        for proc in running:
            proc.wait()
        raise
    return finished, failed


def select_runs(args, grid: dict) -> tuple[list[dict], list[dict]]:
    """(all runs of the grid, those ``--only`` and ``--run`` select, checked and identified)."""
    runs = expand(grid)
    filters = parse_filters(args.only, runs)
    selected = []
    for r in runs:
        if matches(r, filters):
            check_settings(r["settings"])
            identify(r)
            selected.append(r)
    if args.run:
        wanted = set(args.run)
        unknown = sorted(wanted - {r["dirname"] for r in selected} - {r["run_id"] for r in selected})
        if unknown:
            raise GridError(
                f"--run {', '.join(unknown)}: no such run among the {len(selected)} selected; accepted: the "
                "run folder names (or their hash) that --dry-run lists"
            )
        selected = [r for r in selected if r["dirname"] in wanted or r["run_id"] in wanted]
    names = [r["dirname"] for r in selected]
    if len(set(names)) != len(names):
        raise GridError(
            "two grid points have the same settings (an axis changes nothing?): "
            + ", ".join(sorted({n for n in names if names.count(n) > 1}))
        )
    return runs, selected


def write_grid_meta(out: Path, grid: dict, grid_file: str) -> None:
    """``grid.json``: the grid's name, axes, base and pairs, and the comparisons as declared when its first run
    started (kept from then on)."""
    from fedbpt_jax.checkpoint import write_json_atomic

    meta = {
        "name": grid["name"],
        "description": grid["description"],
        "axes": [a for a, _ in grid["axes"]],
        "pairs": grid["pairs"],
        "source": Path(grid_file).name,
        "base": grid["base"],
    }
    old = json.loads((out / "grid.json").read_text()) if (out / "grid.json").exists() else {}
    if "declared" in old:  # the comparisons as they stood when the first run started: kept
        meta["declared"] = old["declared"]
    elif not any(out.glob("*/config.json")) and not any(out.glob("*/status.json")):
        meta["declared"] = declaration(Path(grid_file), grid["pairs"])
    write_json_atomic(out / "grid.json", meta)
    if meta.get("declared", {}).get("grid_file_commit") in (None, "uncommitted"):
        print(
            f"note: the grid file {_portable(str(grid_file))} is not committed as it is: its comparisons count as "
            "declared before the runs only from a committed file (grid.json's 'declared')",
            flush=True,
        )


def record_failure(d: Path, r: dict, err: Exception, tag: str) -> None:
    from fedbpt_jax.checkpoint import write_json_atomic

    d.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        d / "status.json",
        {
            "state": "failed",
            "error": f"{type(err).__name__}: {err}",
            "traceback": _portable(traceback.format_exc()),
            "settings": r["settings"],
            "labels": r["labels"],
            "run_id": r["run_id"],
        },
    )
    print(f"{tag}: FAILED: {type(err).__name__}: {err}", flush=True)


def settled(args, out: Path, r: dict, tag: str, grid_name: str) -> tuple[bool, int]:
    """(whether ``r`` needs no run here: finished, copied from a finished twin, or listed by --dry-run; the last
    round it has), saying so on the console."""
    done, last = is_finished(out / r["dirname"], r["settings"]["rounds"])
    rounds = r["settings"]["rounds"]
    if done:
        more = f" (has {last} rounds, more than the {rounds} asked)" if last > rounds else ""
        print(f"{tag}: finished, skipped{more}", flush=True)
        return True, last
    src = find_reusable(out, r) if args.reuse and not last else None
    if src is not None:
        if not args.dry_run:
            reuse(src, out / r["dirname"], r, grid_name)
        print(f"{tag}: {'would copy' if args.dry_run else 'copied'} the finished {_portable(str(src))}", flush=True)
        return True, last
    if args.dry_run:
        try:
            algorithm_options(r["settings"]["algorithm"], r["settings"]["algorithm_options"])
            what = f"resume from round {last}" if last else "run"
        except GridError as err:
            what = f"would fail: {err}"
        print(f"{tag}: {what} ({rounds} rounds)", flush=True)
    return False, last


def cmd_run(args) -> int:
    grid = load_grid(args.grid)
    if args.jobs < 1:
        raise GridError(f"--jobs {args.jobs}: expected a positive number of worker processes")
    runs, selected = select_runs(args, grid)
    out = Path(args.out) if args.out else RESULTS / f"grid_{grid['name']}"
    if not args.dry_run:
        write_grid_meta(out, grid, args.grid)
    print(f"grid {grid['name']}: {len(runs)} runs, {len(selected)} selected, output {_portable(str(out))}", flush=True)
    _git_commit()
    started = 0
    counts = {"finished": 0, "skipped": 0, "failed": 0}
    pending: list[tuple[str, dict]] = []
    for i, r in enumerate(selected, 1):
        tag = f"[{i}/{len(selected)}] {r['dirname']}"
        skip, last = settled(args, out, r, tag, grid["name"])
        if skip or args.dry_run:
            counts["skipped"] += skip
            continue
        if args.max_runs is not None and started >= args.max_runs:
            print(f"--max-runs {args.max_runs} reached; {len(selected) - i + 1} selected run(s) left", flush=True)
            break
        started += 1
        again = r["settings"]["algorithm"] == "manual" and last
        what = "running again (the manual prompt keeps no checkpoint)" if again else "starting"
        what = f"resuming after round {last}" if last and not again else what
        if args.jobs > 1:
            print(f"{tag}: queued ({what})", flush=True)
            pending.append((tag, r))
            continue
        print(f"{tag}: {what}", flush=True)
        try:
            st = run_one(r, out, CONTEXT, grid["name"])
            counts["finished"] += 1
            print(
                f"{tag}: finished in {st['seconds']:.0f}s, test z=0 {st['initial_test_accuracy']:.4f} "
                f"final {st['final_test_accuracy']:.4f}",
                flush=True,
            )
        except KeyboardInterrupt:
            raise
        except Exception as err:  # recorded; the grid goes on
            counts["failed"] += 1
            record_failure(out / r["dirname"], r, err, tag)
    if pending:
        finished, failed = run_in_workers(Path(args.grid), out, pending, args.jobs)
        counts["finished"] += finished
        counts["failed"] += failed
    if args.dry_run:
        print(
            f"grid {grid['name']}: dry run, {counts['skipped']} of {len(selected)} selected run(s) already finished",
            flush=True,
        )
        return 0
    print(
        f"grid {grid['name']}: {counts['finished']} finished now, {counts['skipped']} already finished, "
        f"{counts['failed']} failed",
        flush=True,
    )
    return 1 if counts["failed"] else 0


def _portable(text: str) -> str:
    """``text`` with this machine's repository and Python prefixes shortened, for files that get committed."""
    for prefix, short in ((sys.prefix, "<python>"), (sys.base_prefix, "<python>"), (str(HERE.parent), ".")):
        text = text.replace(prefix.rstrip("/") + "/", short + "/")
    return text


def cmd_report(args) -> int:
    from fedbpt_jax.comparisons import write_grid_report
    from fedbpt_jax.report import ReportError

    try:
        summary = write_grid_report(args.dirs, args.out, args.title)
    except ReportError as err:
        raise GridError(str(err)) from None
    out = Path(args.out) if args.out else Path(args.dirs[0]) / "report"
    print((out / "report.md").read_text())
    print(f"report written to {out}")
    return 0 if summary else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) a grid")
    r.add_argument("grid", help="grid file (.toml or .json)")
    r.add_argument("--out", default=None, help="output folder (default experiments/results/grid_<name>)")
    r.add_argument(
        "--only",
        action="append",
        default=[],
        help="keep runs whose axis label or setting equals a value: key=value or key=v1,v2 (repeatable: all must hold)",
    )
    r.add_argument(
        "--run",
        action="append",
        default=[],
        help="only this run (its folder name or hash, as --dry-run lists them; repeatable)",
    )
    r.add_argument("--max-runs", type=int, default=None, help="start at most N runs (skipped ones do not count)")
    r.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="run up to N runs at once, each in its own process (for a GPU/TPU that one run does not fill; "
        "on a CPU they only share its cores)",
    )
    r.add_argument("--dry-run", action="store_true", help="list what would run, resume or be skipped")
    r.add_argument(
        "--no-reuse",
        dest="reuse",
        action="store_false",
        help="compute every run here, even one finished with the same settings in another grid folder beside "
        "the output folder (by default that run is copied, checkpoint included, and relabelled)",
    )
    p = sub.add_parser("report", help="tables (markdown + JSON) and plots of one or more grid folders")
    p.add_argument("dirs", nargs="+", help="grid output folders")
    p.add_argument("--out", default=None, help="report folder (default <first dir>/report)")
    p.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    try:
        return cmd_run(args) if args.command == "run" else cmd_report(args)
    except GridError as err:
        print(f"grid.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
