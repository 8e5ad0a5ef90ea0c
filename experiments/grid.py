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
from fedbpt_jax import stats as fstats
from fedbpt_jax.machine import cpu_flags, cpu_model
from fedbpt_jax.plots import FIGURES
from fedbpt_jax.plots import comparison_plots as plots
from fedbpt_jax.report import cell as _cell
from fedbpt_jax.report import diagnostics_markdown, per_run_record, run_diagnostics, run_figures
from fedbpt_jax.report import pct as _pct
from fedbpt_jax.report import seed_order as _seed_order
from fedbpt_jax.report import stats as _stats

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
NOT_IN_HASH = ("rounds", "eval_cache_gb")
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
    import fedbpt_jax as fb

    try:  # the library's own checks of the names and numbers (loss, server_variant, client_keys, rates, ...)
        fb.FedConfig(
            num_clients=s["clients"],
            clients_per_round=s["per_round"] or s["clients"],
            population_size=s["population"],
            local_generations=s["local_generations"],
            intrinsic_dim=s["d"],
            n_prompt_tokens=s["n_prompt"] or 1,
            loss=s["loss"],
            perturb=s["perturb"],
            fitness_form=s["fitness_form"],
            server_variant=s["server_variant"],
            client_keys=s["client_keys"],
            layout=s["layout"],
            chunk_clients=s["chunk_clients"],
            **fed_config_extra(s),
        )
        fb.HParams(
            sigma0=s["sigma0"],
            perturb_rate=s["perturb_rate"],
            dropout_rate=s["dropout"],
            learning_rate=s["learning_rate"],
        ).validate()
    except (ValueError, TypeError) as err:
        raise GridError(str(err)) from None


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


def fed_config_extra(s: dict) -> dict:
    """The ``fed_config`` table: FedConfig fields beyond the grid's own settings (GridError naming a bad key)."""
    import dataclasses

    import fedbpt_jax as fb

    extra = s["fed_config"]
    if not isinstance(extra, dict):
        raise GridError(f"fed_config must be a table of FedConfig fields, got {extra!r}")
    fields = {f.name for f in dataclasses.fields(fb.FedConfig)}
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
    """Caches across the runs of one process: the backbone per (model, dtype), data per data settings."""

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

    def federated(self, s: dict, lm, n_prompt: int):
        import fedbpt_jax as fb

        key = (
            s["model"],
            s["task"],
            s["data"],
            s["style"],
            s["shots"],
            s["dev_shots"],
            s["test_size"],
            s["clients"],
            s["partition"],
            s["seed"],
            n_prompt,
            s["clean_data"],
        )
        if key not in self.data:
            fed = fb.data.federated(
                s["task"],
                lm.tokenizer,
                lm.kind,
                num_clients=s["clients"],
                shots_per_class=s["shots"],
                dev_shots_per_class=s["dev_shots"],
                clean=s["clean_data"],
                alpha=parse_partition(s["partition"]),
                seed=s["seed"],
                n_prompt=n_prompt,
                source=s["data"],
                style=s["style"],
                test_size=s["test_size"],
                max_positions=getattr(lm.config, "max_position_embeddings", None),
            )
            self.data = {key: fed}
        return self.data[key]


CONTEXT = Context()


def resolve_start(s: dict, lm):
    """(PromptStart, n_prompt) as the CLI resolves them; ``auto`` with a conflicting n_prompt is an error."""
    from fedbpt_jax import prompt, tasks

    option = s["prompt_start"]
    if option == "auto":
        option = (tasks.get(s["task"]).decoder_prompt_start if lm.kind == "decoder" else None) or "zeros"
        length = prompt.start_length(option, lm.tokenizer)
        if s["n_prompt"] is not None and length is not None and s["n_prompt"] != length:
            raise GridError(
                f"prompt_start 'auto' is {option!r} ({length} tokens) but n_prompt = {s['n_prompt']}: "
                "set prompt_start explicitly or n_prompt = null"
            )
    start = prompt.parse_start(option)
    n = s["n_prompt"] or prompt.start_length(start, lm.tokenizer) or 5
    return start, n


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


def run_one(run: dict, out: Path, ctx: Context, grid_name: str) -> dict:
    """Runs (or resumes) one grid point; returns its status record."""
    import jax

    import fedbpt_jax as fb
    from fedbpt_jax.checkpoint import write_json_atomic

    s = run["settings"]
    d = out / run["dirname"]
    t0 = time.time()
    d.mkdir(parents=True, exist_ok=True)
    _, seen = is_finished(d, s["rounds"])
    lm = ctx.model(s["model"], s["compute_dtype"])
    start, n_prompt = resolve_start(s, lm)
    options = algorithm_options(s["algorithm"], s["algorithm_options"])
    dev = resolve_dev_selection(s["dev_selection"])
    fed = ctx.federated(s, lm, n_prompt)
    cfg = fb.FedConfig(
        num_clients=s["clients"],
        clients_per_round=s["per_round"] or s["clients"],
        population_size=s["population"],
        local_generations=s["local_generations"],
        intrinsic_dim=s["d"],
        n_prompt_tokens=n_prompt,
        loss=s["loss"],
        perturb=s["perturb"],
        fitness_form=s["fitness_form"],
        server_variant=s["server_variant"],
        client_keys=s["client_keys"],
        layout=grid_layout(s, lm.kind),
        chunk_clients=s["chunk_clients"],
        **fed_config_extra(s),
    )
    hp = fb.HParams(
        sigma0=s["sigma0"], perturb_rate=s["perturb_rate"], dropout_rate=s["dropout"], learning_rate=s["learning_rate"]
    )
    key = jax.random.key(s["seed"])
    key_projection, key_run = jax.random.split(key)
    model = fb.ModelInputs.build(key_projection, lm, cfg, start=start)
    algo = ctx.algorithm(s["algorithm"], cfg, lm, s["algorithm_options"])
    import dataclasses

    import numpy as np

    train_labels = np.asarray(fed.train.labels)
    mask = np.asarray(fed.train.example_mask) > 0
    nl = int(np.shape(fed.spec.label_ids)[0])
    effective = {
        "grid": grid_name,
        "run_id": run["run_id"],
        "labels": run["labels"],
        "settings": s,
        "resolved": {
            "prompt_start": start.describe(),
            "n_prompt": n_prompt,
            "algorithm_options": options,
            "dev_selection": dev,
            "precision": str(lm.config.compute_dtype) if s["model"] != "tiny" else "float32",
            "fed_config": dataclasses.asdict(cfg),
            "hparams": {k: float(v) for k, v in dataclasses.asdict(hp).items()},
            "keys": "key(seed) -> split -> (projection, run); data seed = seed",
        },
        "data": {
            "train_counts": np.asarray(fed.train_counts).tolist(),
            "train_label_counts": [
                [int(((train_labels[i] == c) & mask[i]).sum()) for c in range(nl)] for i in range(train_labels.shape[0])
            ],
            "dev_size": int(len(fed.dev.labels)),
            "test_size": int(len(fed.test.labels)),
        },
        "environment": {
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
    }
    write_json_atomic(d / "config.json", effective)
    write_json_atomic(d / "status.json", {"state": "running", "started": t0, "from_round": seen})
    # The manual prompt never changes: evaluating it at round 0 and at the last round is enough (the same
    # numbers as every round, at a fraction of the evaluation cost; the run's identity is unchanged). It
    # keeps no checkpoint: asked for more rounds later, it simply runs again (two evaluations).
    manual = s["algorithm"] == "manual"
    kw = dict(
        num_rounds=s["rounds"],
        hp=hp,
        eval_every=s["rounds"] if manual else s["eval_every"],
        checkpoint_dir=None if manual else d / "ckpt",
        results_dir=d,
        progress=False,
        eval_cache_budget=int(s["eval_cache_gb"] * 2**30),
    )
    if dev:
        kw["dev"] = fed.dev
    watcher = Watcher(d, run["dirname"][:40], seen)
    watcher.start()
    try:
        carry, hist = fb.run(algo, key_run, fb.FederatedData.from_host(fed), fed.test, lm, model, **kw)
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


def cmd_run(args) -> int:
    grid = load_grid(args.grid)
    runs = expand(grid)
    filters = parse_filters(args.only, runs)
    out = Path(args.out) if args.out else RESULTS / f"grid_{grid['name']}"
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
    if args.jobs < 1:
        raise GridError(f"--jobs {args.jobs}: expected a positive number of worker processes")
    names = [r["dirname"] for r in selected]
    if len(set(names)) != len(names):
        raise GridError(
            "two grid points have the same settings (an axis changes nothing?): "
            + ", ".join(sorted({n for n in names if names.count(n) > 1}))
        )
    if not args.dry_run:
        from fedbpt_jax.checkpoint import write_json_atomic

        meta = {
            "name": grid["name"],
            "description": grid["description"],
            "axes": [a for a, _ in grid["axes"]],
            "pairs": grid["pairs"],
            "source": Path(args.grid).name,
            "base": grid["base"],
        }
        old = json.loads((out / "grid.json").read_text()) if (out / "grid.json").exists() else {}
        if "declared" in old:  # the comparisons as they stood when the first run started: kept
            meta["declared"] = old["declared"]
        elif not any(out.glob("*/config.json")) and not any(out.glob("*/status.json")):
            meta["declared"] = declaration(Path(args.grid), grid["pairs"])
        write_json_atomic(out / "grid.json", meta)
        if meta.get("declared", {}).get("grid_file_commit") in (None, "uncommitted"):
            print(
                f"note: the grid file {_portable(str(args.grid))} is not committed as it is: its comparisons count as "
                "declared before the runs only from a committed file (grid.json's 'declared')",
                flush=True,
            )
    print(f"grid {grid['name']}: {len(runs)} runs, {len(selected)} selected, output {_portable(str(out))}", flush=True)
    ctx = CONTEXT
    _git_commit()
    started = 0
    counts = {"finished": 0, "skipped": 0, "failed": 0}
    pending: list[tuple[str, dict]] = []
    for i, r in enumerate(selected, 1):
        d = out / r["dirname"]
        done, last = is_finished(d, r["settings"]["rounds"])
        tag = f"[{i}/{len(selected)}] {r['dirname']}"
        if done:
            counts["skipped"] += 1
            more = (
                f" (has {last} rounds, more than the {r['settings']['rounds']} asked)"
                if last > r["settings"]["rounds"]
                else ""
            )
            print(f"{tag}: finished, skipped{more}", flush=True)
            continue
        src = find_reusable(out, r) if args.reuse and not last else None
        if src is not None:
            counts["skipped"] += 1
            if not args.dry_run:
                reuse(src, d, r, grid["name"])
            print(f"{tag}: {'would copy' if args.dry_run else 'copied'} the finished {_portable(str(src))}", flush=True)
            continue
        if args.dry_run:
            try:
                algorithm_options(r["settings"]["algorithm"], r["settings"]["algorithm_options"])
                what = f"resume from round {last}" if last else "run"
            except GridError as err:
                what = f"would fail: {err}"
            print(f"{tag}: {what} ({r['settings']['rounds']} rounds)", flush=True)
            continue
        if args.max_runs is not None and started >= args.max_runs:
            print(f"--max-runs {args.max_runs} reached; {len(selected) - i + 1} selected run(s) left", flush=True)
            break
        started += 1
        again = r["settings"]["algorithm"] == "manual" and last
        what = (
            "running again (the manual prompt keeps no checkpoint)"
            if again
            else (f"resuming after round {last}" if last else "starting")
        )
        if args.jobs > 1:
            print(f"{tag}: queued ({what})", flush=True)
            pending.append((tag, r))
            continue
        print(f"{tag}: {what}", flush=True)
        try:
            st = run_one(r, out, ctx, grid["name"])
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


# --------------------------------------------------------------------------------------------------
# Report (the per-run figures, statistics, cells and plots are the package's: fedbpt_jax.report and
# fedbpt_jax.plots, shared with `fedbpt-jax report`)


def _paired(a: dict, b: dict) -> dict | None:
    """Paired per-seed differences a − b over the seeds both have (:func:`fedbpt_jax.stats.paired`)."""
    seeds = sorted(set(a) & set(b), key=_seed_order)
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    return {"seeds": seeds, "per_seed": diffs, **fstats.paired(diffs)}


def run_precision(cfg: dict) -> str:
    """The compute dtype, and where a run did not run on a CPU, the device and matmul precision it ran with
    (float32 on a GPU at JAX's default precision means TF32 products)."""
    p = cfg["resolved"]["precision"]
    env = cfg.get("environment", {})
    if env.get("backend", "cpu") != "cpu":
        p += f" ({env.get('device', env['backend'])}, matmul {env.get('matmul_precision', 'default')})"
    return p


def collect(dirs: list[Path]) -> tuple[list[dict], list[dict]]:
    """(runs with metrics, runs without a complete result) under the given grid folders."""
    from fedbpt_jax.checkpoint import read_json

    done, other = [], []
    for root in dirs:
        for cfg_path in sorted(Path(root).glob("*/config.json")):
            d = cfg_path.parent
            cfg = json.loads(cfg_path.read_text())
            status = {}
            if (d / "status.json").exists():
                status = json.loads((d / "status.json").read_text())
            rec = {
                "dir": d.name,
                "grid": cfg.get("grid"),
                "labels": cfg["labels"],
                "settings": cfg["settings"],
                "precision": run_precision(cfg),
                "dev_selection": cfg["resolved"]["dev_selection"],
                "state": status.get("state", "unknown"),
                "error": status.get("error"),
            }
            try:
                m = read_json(d / "metrics.json")
                rec.update(run_figures(m))
                rec.update(run_diagnostics(m))
            except (FileNotFoundError, json.JSONDecodeError, KeyError, IndexError):
                rec["final_round"] = 0
            if rec["final_round"] >= cfg["settings"]["rounds"] and rec["state"] != "failed":
                done.append(rec)
            else:
                other.append(rec)
        for st_path in sorted(Path(root).glob("*/status.json")):  # failed before config.json was written
            if not (st_path.parent / "config.json").exists():
                st = json.loads(st_path.read_text())
                other.append(
                    {
                        "dir": st_path.parent.name,
                        "labels": st.get("labels", {}),
                        "state": st.get("state"),
                        "error": st.get("error"),
                        "final_round": 0,
                    }
                )
    return done, other


def group_runs(runs: list[dict]) -> list[dict]:
    groups: dict[str, dict] = {}
    for r in runs:
        ident = {k: v for k, v in r["settings"].items() if k != "seed"}
        ident["dev_selection"] = r["dev_selection"]
        ident["grid"] = r["grid"]
        key = json.dumps(ident, sort_keys=True, default=str)
        labels = {k: v for k, v in r["labels"].items() if k != "seed"}
        g = groups.setdefault(
            key,
            {
                "key": key,
                "labels": labels,
                "label": " / ".join(labels.values()) or r["dir"],
                "grid": r["grid"],
                "runs": [],
            },
        )
        g["runs"].append(r)
    out = list(groups.values())
    names = [g["label"] for g in out]
    for g in out:
        if names.count(g["label"]) > 1:
            g["label"] += " (dev)" if json.loads(g["key"])["dev_selection"] else " (no dev)"
        # Seeds of one configuration computed on different machines: every precision is named.
        g["precision"] = " + ".join(sorted({r["precision"] for r in g["runs"]}))
        g["by_seed"] = {}
        for fig in FIGURES:
            vals = {r["settings"]["seed"]: r[fig] for r in g["runs"] if r.get(fig) is not None}
            g["by_seed"][fig] = vals
            g[fig] = _stats(list(vals.values())) if vals else None
        devs = [r["dev_selected_dev"] for r in g["runs"] if r.get("dev_selected_dev") is not None]
        g["dev_at_selected"] = _stats(devs) if devs else None
    return out


def pair_groups(groups: list[dict], wanted: list[list[str]], declared: dict | None = None) -> list[dict]:
    """Pairs of groups that differ in exactly one axis label; ``wanted`` ([[a, b]] labels of that axis)
    picks and orients them (all pairs, in declared order, when empty). ``declared`` maps a grid's name to the
    pairs its first run recorded (``grid.json``'s ``declared``; None: not recorded): each pair says whether it
    was declared before that grid's runs ("yes"), added later ("post hoc") or cannot tell ("not recorded")."""
    declared = declared or {}
    pairs = []
    for i, ga in enumerate(groups):
        for gb in groups[i + 1 :]:
            if ga["grid"] != gb["grid"] or set(ga["labels"]) != set(gb["labels"]):
                continue
            diff = [k for k in ga["labels"] if ga["labels"][k] != gb["labels"][k]]
            if len(diff) != 1:
                continue
            la, lb = ga["labels"][diff[0]], gb["labels"][diff[0]]
            if wanted:
                if [la, lb] in wanted:
                    a, b = ga, gb
                elif [lb, la] in wanted:
                    a, b = gb, ga
                else:
                    continue
            else:
                a, b = ga, gb
            rest = " / ".join(v for k, v in a["labels"].items() if k != diff[0])
            rec = {
                "a": a["label"],
                "b": b["label"],
                "axis": diff[0],
                "context": rest,
                "precision": " + ".join(sorted({a["precision"], b["precision"]})),
                "grid": a["grid"],
                "declared": _declared(declared.get(a["grid"]), la, lb),
                "figures": {},
            }
            for fig in FIGURES:
                p = _paired(a["by_seed"][fig], b["by_seed"][fig])
                if p is not None:
                    rec["figures"][fig] = p
            pairs.append(rec)
    return pairs


def _declared(pairs: list | None, la: str, lb: str) -> str:
    if pairs is None:
        return "not recorded"
    return "yes" if ([la, lb] in pairs or [lb, la] in pairs) else "post hoc"


#: The figures whose paired tests form a report's family (z = 0 is the same prompt in every paired run).
TESTED = ("final", "dev_selected", "best_on_test")


def family(pairs: list[dict]) -> list[dict]:
    """Every paired test of ``pairs`` that the report states (figures in :data:`TESTED`), as one list."""
    return [d for p in pairs for fig, d in p["figures"].items() if fig in TESTED]


def pooled(pairs: list[dict]) -> list[dict]:
    """The same comparison (A and B labels) pooled over every grid and context that has it: one paired test
    over all their seed pairs. Pairs that share a task and a seed share the few-shot draw, the projection and
    the keys (``units`` counts the distinct (task, seed) draws): not independent."""
    out: dict[tuple, dict] = {}
    for p in pairs:
        key = (p["a"], p["b"])
        rec = out.setdefault(
            key, {"a": p["a"], "b": p["b"], "contexts": [], "figures": {}, "precision": set(), "tasks_seeds": {}}
        )
        rec["contexts"].append(f"{p.get('grid')}: {p['context']}" if p["context"] else str(p.get("grid")))
        rec["precision"].add(p["precision"])
        for fig, d in p["figures"].items():
            acc = rec["tasks_seeds"].setdefault(fig, [])
            acc += [((p.get("task"), s), x) for s, x in zip(d["seeds"], d["per_seed"])]
    result = []
    for rec in out.values():
        if len(rec["contexts"]) < 2:
            continue
        for fig, items in rec.pop("tasks_seeds").items():
            diffs = [x for _, x in items]
            d = {"seeds": [f"{t}:{s}" for (t, s), _ in items], "per_seed": diffs, **fstats.paired(diffs)}
            d["units"] = len({u for u, _ in items})
            rec["figures"][fig] = d
        rec["precision"] = " + ".join(sorted(rec["precision"]))
        result.append(rec)
    return result


def _pair_rows(pairs: list[dict], per_seed: bool = True) -> list[str]:
    rows = []
    for p in pairs:
        for fig, d in p["figures"].items():
            if fig not in TESTED:
                continue
            per = ", ".join(f"{100 * x:+.2f}" for x in d["per_seed"]) if per_seed else str(d.get("units", ""))
            ms = f"{_pct(d['mean'], True)} ± {_pct(d['std'])}" if d["std"] is not None else _pct(d["mean"], True)
            ci = (
                f"{_pct(d['mean'] - d['ci95_halfwidth'], True)} to {_pct(d['mean'] + d['ci95_halfwidth'], True)}"
                if d["ci95_halfwidth"] is not None
                else "—"
            )
            pv = " | ".join(_p(d.get(k)) for k in ("p", "p_holm", "p_bh"))
            decl = p.get("declared", "")
            rows.append(
                f"| {p['a']} | {p['b']} | {FIGURES[fig]} | {p['precision']} | {d['n']} | {per} | {ms} | {ci} | {pv} "
                f"| {_pct(d['power80_effect'])} | {d['verdict']} |" + (f" {decl} |" if per_seed else "")
            )
    return rows


def _p(p) -> str:
    return "—" if p is None else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def markdown(groups: list[dict], pairs: list[dict], other: list[dict], title: str, pools: list[dict] = ()) -> str:
    lines = [
        f"# {title}",
        "",
        "Accuracy in % on the test split: mean ± std over seeds (sample std, ddof = 1), n = seeds. "
        "Final = the last round's global prompt; dev-selected = the round with the highest dev accuracy "
        "(shown only when the runs evaluated a dev set); best-on-test picks the round on the test set itself, as "
        "the reference code's reported peak does: a **reference-compatibility (optimistic)** figure, not a "
        "claim. Dev at selected = the dev accuracy of the dev-selected round (the figure to compare when choosing "
        "among configurations without touching the test set).",
        "",
        "| configuration | precision | rounds | seeds | z = 0 | final | dev-selected | dev at selected "
        "| best-on-test (ref.-compat., optimistic) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for g in groups:
        seeds = ",".join(
            str(r["settings"]["seed"]) for r in sorted(g["runs"], key=lambda r: _seed_order(r["settings"]["seed"]))
        )
        rounds = sorted({r["final_round"] for r in g["runs"]})
        lines.append(
            f"| {g['label']} | {g['precision']} | {','.join(map(str, rounds))} | {seeds} | {_cell(g['initial'])} "
            f"| {_cell(g['final'])} | {_cell(g['dev_selected'])} | {_cell(g['dev_at_selected'])} "
            f"| {_cell(g['best_on_test'])} |"
        )
    stat_rule = (
        "mean ± std of the differences; 95 % CI = the t-interval of the mean difference; p = two-sided paired "
        "t-test; p Holm / p BH = adjusted over the family of every test in this table (Holm: family-wise error; "
        "Benjamini-Hochberg: false discovery rate); 80 %-power effect = the true mean difference this test would "
        "detect with probability 0.8 at the observed std (at n = 3 about 5.7 standard errors). Verdict: A > B or "
        "A < B when the Holm-adjusted p < 0.05; 'unadjusted only' when only the raw p is; else inconclusive."
    )
    if pools:
        lines += [
            "",
            "## Pooled over grids (the headline comparisons)",
            "",
            "Each comparison pooled over every grid and context that has it: one paired test over all their seed "
            "pairs (units = distinct (task, seed) draws; pairs sharing one share the few-shot draw, projection and "
            "keys, so they are not independent). " + stat_rule,
            "",
            "| A | B | figure | precision | n | units | mean ± std | 95 % CI | p | p Holm | p BH "
            "| 80 %-power effect | verdict |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *_pair_rows(pools, per_seed=False),
        ]
    if pairs:
        lines += [
            "",
            "## Paired per-seed differences (A − B, points of accuracy)",
            "",
            "Per seed, A and B share data, partition, projection and round keys. " + stat_rule + " Declared = "
            "whether the pair was in the grid file when its first run started (post hoc: added later; not recorded: "
            "a grid run before declarations were recorded).",
            "",
            "| A | B | figure | precision | n | per seed | mean ± std | 95 % CI | p | p Holm | p BH "
            "| 80 %-power effect | verdict | declared |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *_pair_rows(pairs),
        ]
    if groups:
        rows = [
            (g["label"], {**r, "seed": r["settings"]["seed"]})
            for g in groups
            for r in sorted(g["runs"], key=lambda r: _seed_order(r["settings"]["seed"]))
        ]
        lines += ["", *diagnostics_markdown(rows)]
    if other:
        lines += ["", "## Not (yet) complete", "", "| run | state | rounds done | error |", "| --- | --- | --- | --- |"]
        for r in other:
            err = (r.get("error") or "").replace("|", "/").replace("\n", " ")[:200]
            lines.append(f"| {r['dir']} | {r.get('state')} | {r.get('final_round', 0)} | {err} |")
    return "\n".join(lines) + "\n"


def cmd_report(args) -> int:
    from fedbpt_jax.checkpoint import write_json_atomic

    dirs = [Path(d) for d in args.dirs]
    for d in dirs:
        if not d.is_dir():
            raise GridError(f"report: {str(d)!r} is not a folder (give the grid's output folder)")
    done, other = collect(dirs)
    wanted = []
    names = []
    declared = {}
    for d in dirs:
        if (d / "grid.json").exists():
            meta = json.loads((d / "grid.json").read_text())
            wanted += meta.get("pairs", [])
            names.append(meta["name"])
            declared[meta["name"]] = meta.get("declared", {}).get("pairs")
    title = args.title or ("grid " + ", ".join(names or [d.name for d in dirs]))
    out = Path(args.out) if args.out else dirs[0] / "report"
    groups = group_runs(done)
    pairs = pair_groups(groups, wanted, declared)
    tasks = {g["grid"]: g["runs"][0]["settings"].get("task") for g in groups}
    for p in pairs:
        p["task"] = tasks.get(p["grid"])
    fstats.adjust(family(pairs))
    pools = pooled(pairs) if len(dirs) > 1 or len({p["context"] for p in pairs}) > 1 else []
    fstats.adjust(family(pools))
    precisions = sorted({g["precision"] for g in groups})
    if precisions:
        title += f" ({', '.join(precisions)})"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown(groups, pairs, other, title, pools))
    made = plots(groups, out, title) if groups else []
    summary = {
        "title": title,
        "figures": FIGURES,
        "rules": {
            "std": "sample std over seeds (ddof = 1)",
            "p": "two-sided paired t-test of mean(A - B) = 0 over seeds",
            "p_holm": "Holm-adjusted over every test of the report's pairs table (figures final, dev_selected, "
            "best_on_test); the pooled table is its own family",
            "p_bh": "Benjamini-Hochberg-adjusted over the same family",
            "power80_effect": "true mean difference detected with probability 0.8 (two-sided, alpha 0.05) at the "
            "observed std",
            "verdict": "A > B / A < B when p_holm < 0.05; '... unadjusted only' when only p < 0.05; else inconclusive",
            "dev_selected": "the round with the highest dev accuracy, ties to the earliest; absent without a dev set",
            "best_on_test": "reference-compatibility (optimistic): selected on the test set itself",
        },
        "groups": [
            {k: g[k] for k in ("label", "labels", "grid", "precision", *FIGURES)}
            | {
                "seeds": sorted(g["by_seed"]["final"], key=_seed_order),
                "by_seed": g["by_seed"],
                "runs": [r["dir"] for r in g["runs"]],
            }
            for g in groups
        ],
        "pairs": pairs,
        "pooled": pools,
        "per_run": [per_run_record(g["label"], r["settings"]["seed"], r["dir"], r) for g in groups for r in g["runs"]],
        "incomplete": [{k: r.get(k) for k in ("dir", "state", "final_round", "error")} for r in other],
        "plots": [Path(p).name for p in made],
    }
    write_json_atomic(out / "report.json", summary)
    print((out / "report.md").read_text())
    print(f"report written to {out}")
    return 0


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
