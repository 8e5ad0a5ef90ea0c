"""The experiment grid's files and settings: what a grid declares, what each of its runs is, and its run ids.

``grid.py`` (the driver: running, resuming, copying finished runs, workers, the report command) builds on this.
A grid's settings are ``fedbpt-jax simulate``'s options by the same names (:data:`SETTINGS`); a run's id hashes
the settings that change what it computes (:func:`digest`), so re-running a grid finds its finished and interrupted
runs by folder name.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import itertools
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import fedbpt_jax  # noqa: F401  (first: sets OPENBLAS_NUM_THREADS before numpy/jax load)
from fedbpt_jax.cli_options import options as simulate_options
from fedbpt_jax.report import seed_order as _seed_order

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
        if k not in REPORT_KEYS:
            raise GridError(f"{origin}: unknown key {k!r} in [report]; accepted: {list(REPORT_KEYS)}")
    declared = sorted({label for _, points in axes for label, _ in points})
    pairs = _check_pairs(report.get("pairs", []), declared, f"{origin} [report] pairs")
    bias_pairs = _check_pairs(report.get("label_bias_pairs", []), declared, f"{origin} [report] label_bias_pairs")
    late = _check_late_collapse(report.get("late_collapse"), f"{origin} [report] late_collapse")
    return {
        "name": str(name),
        "description": meta.get("description", ""),
        "base": base,
        "axes": axes,
        "pairs": pairs,
        # declared only where the grid file has them (grid.json stays as it was for grids without them)
        **({"label_bias_pairs": bias_pairs} if bias_pairs else {}),
        **({"late_collapse": late} if late else {}),
    }


#: The readings a grid file's ``[report]`` may declare besides its pairs (recorded in ``grid.json`` only when given).
READINGS = ("label_bias_pairs", "late_collapse")
#: The keys of a grid file's ``[report]`` section.
REPORT_KEYS = ("pairs", *READINGS)
#: ``late_collapse``'s keys: the reading "a run collapses late when, after round ``after_round``, one label takes
#: at least ``share`` of the test predictions in any evaluation, or its final test accuracy is below
#: ``accuracy_floor``" (a fraction, e.g. the manual prompt's accuracy).
LATE_COLLAPSE_KEYS = ("after_round", "share", "accuracy_floor")


def _check_pairs(pairs, declared: list, where: str) -> list:
    if not isinstance(pairs, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs
    ):
        raise GridError(f"{where}: a list of [label_a, label_b] pairs, got {pairs!r}")
    for p in pairs:
        unknown = [x for x in p if x not in declared]
        if unknown:
            raise GridError(
                f"{where}: {p!r} names {', '.join(map(repr, unknown))}, not an axis label; declared labels: {declared}"
            )
    return [list(p) for p in pairs]


def _check_late_collapse(v, where: str) -> dict | None:
    if v is None:
        return None
    if not isinstance(v, dict) or set(v) != set(LATE_COLLAPSE_KEYS):
        raise GridError(f"{where}: a table with exactly the keys {list(LATE_COLLAPSE_KEYS)}, got {v!r}")
    after, share, floor = v["after_round"], v["share"], v["accuracy_floor"]
    if not isinstance(after, int) or isinstance(after, bool) or after < 0:
        raise GridError(f"{where}: after_round must be an integer >= 0, got {after!r}")
    for name, x in (("share", share), ("accuracy_floor", floor)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x <= 1:
            raise GridError(f"{where}: {name} must be a fraction in (0, 1], got {x!r}")
    return {"after_round": after, "share": float(share), "accuracy_floor": float(floor)}


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


def digest(settings: dict, unused: tuple[str, ...] = ()) -> str:
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
    run_id = digest(s)
    labels = [v for k, v in run["labels"].items() if k != "seed"] + [f"s{s['seed']}"]
    prefix = "_".join(labels)
    prefix = re.sub(r"[^A-Za-z0-9._=-]+", "-", prefix).strip("-")[:80]
    run["run_id"] = run_id
    run["dirname"] = f"{prefix}-{run_id}"


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


def declaration(grid_file: Path, pairs: list, extra: dict | None = None) -> dict:
    """The comparisons a grid declares before its first run, with the commit that holds the grid file as it is
    ("uncommitted" when it differs from that commit or is not tracked; None outside a repository). ``extra``:
    the grid's other declared readings (``label_bias_pairs``, ``late_collapse``), recorded beside the pairs."""
    import subprocess

    rec = {"pairs": [list(p) for p in pairs], **(extra or {})}
    rec["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
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
