"""``fedbpt-jax report RUN_DIR...``: tables and plots comparing finished runs, mean ± std over seeds.

Each ``RUN_DIR`` is a results folder as ``fedbpt-jax simulate --results-dir`` writes it (``config.json``
and ``metrics.json``), or a run folder of ``experiments/grid.py`` (the same two files and ``config.json``
layout, with the grid's keys added; grid runs written before the grid ran on :func:`fedbpt_jax.plan.prepare` have
the grid's older layout, read by its ``settings``). The paired comparisons of grid folders are
:mod:`fedbpt_jax.comparisons`. A folder that holds runs in sub-folders (e.g. ``results/*/``) can be given
instead of each run: its immediate sub-folders with a ``metrics.json`` are taken.

**Grouping.** Runs are grouped by their configuration: every option of ``config.json`` except the seed
and the options that change only where things are written or shown (``SEED_AND_IO``). Runs of one group
differ only by seed; each group is one row of the table, mean ± sample std (ddof = 1) over its seeds.
Groups are labelled by the settings in which they differ (e.g. ``algorithm=fedbpt, alpha=1.0``).
``--same-config`` asks for a single comparison group: runs that differ in anything but the seed are then
an error naming the folders and the settings that differ. Two runs of one group with the same seed are
always an error (the same run twice would count twice).

Written to ``--out`` (default: ``report`` next to the first run folder): ``report.md`` (the table),
``report.json`` (the same figures per group and per seed), ``accuracy_rounds.png`` (test accuracy per
round, mean over seeds with a ± 1 std band) and ``accuracy_bars.png`` (final and dev-selected accuracy).

Figures per run (:func:`run_figures`): z = 0 (round 0, the prompt start), final (last round),
dev-selected (the round with the highest dev accuracy, ties to the earliest: the run's own selection)
and best-on-test (selected on the test set itself: the reference code's optimistic figure, labelled
as such). Per run, :func:`run_diagnostics` adds what became of the global prompt (predictions per label,
the largest one-label share, ‖z‖, the prompt's norm, σ, repaired uploads): a table in ``report.md`` and
``per_run`` in ``report.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .plots import FIGURES, comparison_plots

#: ``config.json`` options that do not change what a run computes (besides the seed): left out of the
#: grouping. CLI keys (``args``) and grid keys (``settings``).
SEED_AND_IO = frozenset(
    {
        "seed",
        "results_dir",
        "overwrite",
        "no_progress",
        "debug",
        "checkpoint_dir",
        "save_uploads",
        "command",
        "tensorboard_dir",
        "eval_cache_gb",
        # display and evaluation-batching options: the same numbers however they are set
        "progress",
        "plot",
        "config",
        "eval_chunk",
    }
)

ACCEPTED = (
    "accepted: a results folder written by 'fedbpt-jax simulate --results-dir' or experiments/grid.py "
    "(config.json and metrics.json), or a folder whose sub-folders are such results folders"
)


class ReportError(ValueError):
    """Bad input of the report (the message names the folder and what is accepted)."""


# --------------------------------------------------------------------------------------------------
# Per run


def run_figures(metrics: dict) -> dict:
    """The accuracy figures a ``metrics.json`` supports, whatever version of ``run`` wrote it:
    ``initial``, ``final``, ``final_round``, ``curve`` ``[(round, test accuracy)]``, ``best_on_test`` and,
    when the run evaluated a dev set, ``dev_selected``, ``dev_selected_round`` and ``dev_selected_dev`` (the
    dev accuracy there: what a choice among configurations made on dev compares)."""
    evals = metrics["evals"]
    finite = [e for e in evals if isinstance(e["accuracy"], float) and math.isfinite(e["accuracy"])]
    out = {
        "initial": evals[0]["accuracy"],
        "final": evals[-1]["accuracy"],
        "final_round": evals[-1]["round"],
        "curve": [(e["round"], e["accuracy"]) for e in evals],
    }
    best = metrics.get("best_test_reference", metrics.get("best_accuracy"))
    if best is None or best < 0:
        best = max((e["accuracy"] for e in finite), default=None)
    out["best_on_test"] = best
    dev = [e for e in finite if isinstance(e.get("dev_accuracy"), float) and math.isfinite(e["dev_accuracy"])]
    if dev:  # highest dev accuracy, ties to the earliest round (the rule run() documents)
        pick = max(dev, key=lambda e: (e["dev_accuracy"], -e["round"]))
        out["dev_selected"], out["dev_selected_round"] = pick["accuracy"], pick["round"]
        if str(metrics.get("selection_rule", "")).startswith("dev") and metrics.get("selected_round") is not None:
            out["dev_selected"], out["dev_selected_round"] = (
                metrics["selected_test_accuracy"],
                metrics["selected_round"],
            )
        at = [e for e in dev if e["round"] == out["dev_selected_round"]]
        out["dev_selected_dev"] = at[0]["dev_accuracy"] if at else pick["dev_accuracy"]
    return out


def _check_accuracies(d: Path, metrics: dict) -> None:
    """Every evaluation's test accuracy is a number or null, and at least one is a finite number."""
    evals = metrics.get("evals")
    if not isinstance(evals, list) or not evals or not all(isinstance(e, dict) for e in evals):
        raise ReportError(f'{str(d / "metrics.json")!r}: no evaluations ("evals" is not a list of rows); {ACCEPTED}')
    for e in evals:
        a = e.get("accuracy")
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float))):
            raise ReportError(
                f"{str(d / 'metrics.json')!r}: round {e.get('round')!r} has accuracy {a!r} "
                f"({type(a).__name__}); accepted: a number or null"
            )
    if not any(_finite(e.get("accuracy")) for e in evals):
        raise ReportError(
            f"{str(d / 'metrics.json')!r}: no evaluation has a finite test accuracy (all null or non-finite): "
            "nothing to report"
        )


def _extent(r: dict) -> str:
    """A run's rounds for the table: the last round reached, with "of N (incomplete)" when it fell short."""
    if r.get("complete") is False and r.get("planned_rounds") is not None:
        return f"{r['final_round']} of {r['planned_rounds']} (incomplete)"
    return str(r["final_round"])


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def run_diagnostics(metrics: dict) -> dict:
    """What became of the global prompt, from a ``metrics.json`` (any version; a field the run did not record
    is None): ``final_pred_dist`` (share of the test predictions per label at the last evaluation),
    ``peak_label_share`` and ``peak_label_round`` (the largest share any one label took in an evaluation after
    round 0: 1.0 is a collapse to one label), ``final_z_norm`` (‖z‖), ``final_prompt_norm_ratio`` (the prompt
    tokens' norm over the median token-embedding norm), ``final_sigma`` (the broadcast σ after the last round;
    None for methods without one) and ``repaired`` ``(min, max)`` of the uploads the server repaired per
    round, with ``clients`` the most clients a round had."""
    evals = metrics.get("evals") or []
    last = evals[-1] if evals else {}
    dist = last.get("pred_dist")
    out = {
        "final_pred_dist": [float(x) for x in dist] if isinstance(dist, list) and dist else None,
        "peak_label_share": None,
        "peak_label_round": None,
        "final_z_norm": last.get("z_norm") if _finite(last.get("z_norm")) else None,
        "final_prompt_norm_ratio": last.get("prompt_norm_ratio") if _finite(last.get("prompt_norm_ratio")) else None,
        "final_sigma": None,
        "repaired": None,
        "clients": None,
    }
    for e in evals:
        d = e.get("pred_dist")
        if e.get("round", 0) > 0 and isinstance(d, list) and d and all(_finite(x) for x in d):
            if out["peak_label_share"] is None or max(d) > out["peak_label_share"]:
                out["peak_label_share"], out["peak_label_round"] = float(max(d)), e["round"]
    rounds = [r for r in metrics.get("rounds") or [] if r.get("active_clients", 1)]
    if rounds and _finite(rounds[-1].get("sigma")) and rounds[-1]["sigma"] > 0:
        out["final_sigma"] = float(rounds[-1]["sigma"])
    rep = [r["num_repaired"] for r in rounds if _finite(r.get("num_repaired"))]
    if rep:
        out["repaired"] = (int(min(rep)), int(max(rep)))
        out["clients"] = int(max(r.get("active_clients", 0) for r in rounds))
    return out


def label_shares(metrics: dict) -> dict:
    """The label-bias figures of a ``metrics.json``: ``final_label_share`` (the largest share one label takes among
    the test predictions at the last evaluation; 1/L for a prompt that predicts all L labels equally often, 1.0
    for one label) and ``label_share_by_round`` (``[round, largest share]`` per evaluation that recorded its
    predictions). Missing or non-finite prediction counts are left out."""
    rows = []
    for e in metrics.get("evals") or []:
        d = e.get("pred_dist")
        if isinstance(d, list) and d and all(_finite(x) for x in d):
            rows.append([int(e.get("round", 0)), float(max(d))])
    last = (metrics.get("evals") or [{}])[-1]
    final = rows[-1][1] if rows and rows[-1][0] == int(last.get("round", -1)) else None
    return {"final_label_share": final, "label_share_by_round": rows}


#: The fields :func:`run_diagnostics` returns.
DIAGNOSTICS = (
    "final_pred_dist",
    "peak_label_share",
    "peak_label_round",
    "final_z_norm",
    "final_prompt_norm_ratio",
    "final_sigma",
    "repaired",
    "clients",
)


def per_run_record(label: str, seed, directory: str, record: dict) -> dict:
    """One run's entry of ``report.json``'s ``per_run``: its figures (:func:`run_figures`) and diagnostics."""
    return {"label": label, "seed": seed, "dir": directory} | {
        k: record.get(k) for k in (*FIGURES, "dev_selected_round", *DIAGNOSTICS)
    }


def _num(x, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def diagnostics_markdown(rows: list[tuple[str, dict]]) -> list[str]:
    """Markdown lines of the per-run diagnostics table: ``rows`` are ``(configuration label, run record)``
    with the record holding :func:`run_figures` and :func:`run_diagnostics` fields and ``seed``."""
    lines = [
        "## Per run: what became of the global prompt",
        "",
        "Test predictions per label at the final round (label order of the task's verbalizer); the largest "
        "share one label took in any evaluation after round 0 (1.00 = every test example given one label), "
        "with its round; ‖z‖, the prompt tokens' norm over the median token-embedding norm and the broadcast "
        "σ after the final round; the uploads the server repaired per round (min-max of the clients). — = "
        "not recorded or not defined for the method.",
        "",
        "| configuration | seed | final | dev-selected (round) | predictions per label, final "
        "| largest one-label share (round) | ‖z‖ | prompt norm ÷ median token norm | σ | uploads repaired a round |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, r in rows:
        dist = r.get("final_pred_dist")
        dist_s = " / ".join(f"{x:.2f}" for x in dist) if dist else "—"
        peak = r.get("peak_label_share")
        peak_s = f"{peak:.2f} ({r['peak_label_round']})" if peak is not None else "—"
        sel = r.get("dev_selected")
        sel_s = f"{pct(sel)} ({r['dev_selected_round']})" if sel is not None else "—"
        rep = r.get("repaired")
        rep_s = f"{rep[0]}-{rep[1]} of {r['clients']}" if rep else "—"
        lines.append(
            f"| {label} | {r.get('seed')} | {pct(r.get('final'))} | {sel_s} | {dist_s} | {peak_s} "
            f"| {_num(r.get('final_z_norm'), '.1f')} | {_num(r.get('final_prompt_norm_ratio'), '.2f')} "
            f"| {_num(r.get('final_sigma'), '.3f')} | {rep_s} |"
        )
    return lines


def stats(xs: list[float]) -> dict:
    """``mean``, sample ``std`` (ddof = 1; None for one value), ``n``, ``min`` and ``max`` of ``xs``."""
    import numpy as np

    a = np.asarray(xs, float)
    n = len(a)
    std = float(a.std(ddof=1)) if n > 1 else None
    return {"mean": float(a.mean()), "std": std, "n": n, "min": float(a.min()), "max": float(a.max())}


def seed_order(seed):
    """Sort key of seeds: integers first, in order, then anything else by its text."""
    return (0, seed) if isinstance(seed, int) else (1, str(seed))


def pct(x, signed: bool = False) -> str:
    """An accuracy (fraction) in percent with two decimals; ``—`` for None."""
    if x is None:
        return "—"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def cell(st: dict | None) -> str:
    """A table cell of :func:`stats` in percent: ``mean ± std (n=…)``."""
    if st is None:
        return "—"
    return (
        f"{100 * st['mean']:.2f} ± {pct(st['std'])} (n={st['n']})" if st["n"] > 1 else f"{100 * st['mean']:.2f} (n=1)"
    )


def _settings(cfg: dict, where: Path) -> dict:
    """The run's settings from its ``config.json``: ``args`` (the CLI's layout, which grid runs also write), else
    ``settings`` (grid runs of the older layout)."""
    if isinstance(cfg.get("args"), dict):
        return dict(cfg["args"])
    if isinstance(cfg.get("settings"), dict):
        return dict(cfg["settings"])
    raise ReportError(
        f"{str(where)!r}: config.json has neither 'args' (fedbpt-jax simulate) nor 'settings' "
        f"(experiments/grid.py); {ACCEPTED}"
    )


def load_run(directory) -> dict:
    """One results folder as a record: ``dir``, ``seed``, ``settings`` (all of them), ``identity`` (those
    that define its group) and :func:`run_figures`. Raises :class:`ReportError` for anything else."""
    from .checkpoint import read_json

    d = Path(directory)
    if not d.is_dir():
        raise ReportError(f"{str(d)!r} is not a folder; {ACCEPTED}")
    missing = [n for n in ("config.json", "metrics.json") if not (d / n).is_file()]
    if missing:
        if (d / "bbt.json").is_file() and "metrics.json" in missing:
            raise ReportError(
                f"{str(d)!r} holds a 'fedbpt-jax bbt' result (bbt.json), which report does not compare; {ACCEPTED}"
            )
        raise ReportError(f"{str(d)!r} is not a results folder (no {' and no '.join(missing)}); {ACCEPTED}")
    try:
        cfg = read_json(d / "config.json")
        metrics = read_json(d / "metrics.json")
        for name, value in (("config.json", cfg), ("metrics.json", metrics)):
            if not isinstance(value, dict):
                raise ReportError(f"{str(d / name)!r} holds a JSON {type(value).__name__}, not an object; {ACCEPTED}")
        _check_accuracies(d, metrics)
        figures = run_figures(metrics) | run_diagnostics(metrics)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReportError(f"{str(d)!r}: config.json or metrics.json is not valid JSON ({err}); {ACCEPTED}") from None
    except (KeyError, IndexError, TypeError) as err:
        raise ReportError(
            f"{str(d)!r}: metrics.json has no evaluations ({type(err).__name__}: {err}); {ACCEPTED}"
        ) from None
    settings = _settings(cfg, d)
    identity = {k: v for k, v in settings.items() if k not in SEED_AND_IO}
    # Whether the run evaluated a dev set is part of what it is (dev selection), though not always a setting.
    identity["dev_set"] = "dev_selected" in figures
    return {
        "dir": str(d),
        "name": d.name,
        "seed": settings.get("seed"),
        "settings": settings,
        "identity": identity,
        "stopped_early": metrics.get("stopped_early"),
        # the run's extent (metrics.json of runs before this field: None, not known)
        "planned_rounds": metrics.get("planned_rounds"),
        "complete": metrics.get("complete"),
        **figures,
    }


def expand_dirs(dirs) -> list[Path]:
    """The run folders: each given folder that is a run, or else its sub-folders that hold a ``metrics.json``."""
    out = []
    for d in map(Path, dirs):
        if d.is_dir() and not (d / "metrics.json").exists() and not (d / "config.json").exists():
            subs = sorted(p.parent for p in d.glob("*/metrics.json"))
            if subs:
                out += subs
                continue
        out.append(d)
    return out


# --------------------------------------------------------------------------------------------------
# Groups


def _key(identity: dict) -> str:
    return json.dumps(identity, sort_keys=True, default=str)


def _differing(records: list[dict]) -> list[str]:
    keys = sorted({k for r in records for k in r["identity"]})
    return [
        k
        for k in keys
        if len({json.dumps(r["identity"].get(k, "<absent>"), sort_keys=True, default=str) for r in records}) > 1
    ]


def group_runs(records: list[dict], *, same_config: bool = False) -> list[dict]:
    """Groups runs that differ only by seed (see the module docstring), in first-seen order.

    Each group: ``label``, ``identity`` (its settings), ``runs``, ``by_seed`` ``{figure: {seed: value}}`` and
    per figure of :data:`~fedbpt_jax.plots.FIGURES` its :func:`stats` over seeds (None when no run has it).
    ``same_config``: more than one group is a :class:`ReportError` naming the folders and the settings.
    """
    groups: dict[str, dict] = {}
    for r in records:
        g = groups.setdefault(_key(r["identity"]), {"identity": r["identity"], "runs": []})
        twin = next((o for o in g["runs"] if o["seed"] == r["seed"]), None)
        if twin is not None:
            raise ReportError(
                f"{r['dir']!r} and {twin['dir']!r} are the same configuration with the same seed "
                f"({r['seed']!r}); accepted: runs that differ by seed (give each run once)"
            )
        g["runs"].append(r)
    out = list(groups.values())
    diff = _differing(records)
    if same_config and len(out) > 1:
        first = out[0]["runs"][0]
        odd = next(g["runs"][0] for g in out[1:])
        shown = "; ".join(
            f"{k}: {first['identity'].get(k, '<absent>')!r} in {first['dir']!r}, "
            f"{odd['identity'].get(k, '<absent>')!r} in {odd['dir']!r}"
            for k in diff
        )
        raise ReportError(
            f"--same-config: the runs differ in more than the seed ({shown}); accepted: runs of one "
            "configuration that differ only by seed (leave out --same-config to report one group "
            "per configuration)"
        )
    for g in out:
        label = ", ".join(f"{k}={g['identity'].get(k, '<absent>')}" for k in diff)
        g["label"] = label or str(g["identity"].get("algorithm") or "runs")
        g["runs"].sort(key=lambda r: seed_order(r["seed"]))
        g["by_seed"] = {}
        for fig in FIGURES:
            vals = {r["seed"]: r[fig] for r in g["runs"] if r.get(fig) is not None}
            g["by_seed"][fig] = vals
            g[fig] = stats(list(vals.values())) if vals else None
    return out


def markdown(groups: list[dict], title: str) -> str:
    """The report's markdown: one row per group (accuracy in %, mean ± std over seeds)."""
    common = {}
    if groups:
        shared = set.intersection(*[set(g["identity"]) for g in groups])
        common = {
            k: groups[0]["identity"][k]
            for k in sorted(shared)
            if all(_key({k: g["identity"][k]}) == _key({k: groups[0]["identity"][k]}) for g in groups)
        }
    lines = [
        f"# {title}",
        "",
        "Accuracy in % on the test split: mean ± std over seeds (sample std, ddof = 1), n = seeds. "
        "z = 0 = round 0 (the prompt start); final = the last round's global prompt; dev-selected = the "
        "round with the highest dev accuracy, ties to the earliest (— when the runs had no dev set); "
        "best-on-test picks the round on the test set itself, as the reference code's reported peak does: "
        "a **reference-compatibility (optimistic)** figure, not a claim.",
        "",
        "| configuration | n | seeds | rounds | z = 0 | final | dev-selected | dev-selected round "
        "| best-on-test (ref.-compat., optimistic) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for g in groups:
        seeds = ",".join(str(r["seed"]) for r in g["runs"])
        rounds = ",".join(sorted({_extent(r) for r in g["runs"]}, key=lambda x: (len(x), x)))
        sel = [r["dev_selected_round"] for r in g["runs"] if r.get("dev_selected_round") is not None]
        sel_rounds = ",".join(map(str, sel)) if sel else "—"
        lines.append(
            f"| {g['label']} | {len(g['runs'])} | {seeds} | {rounds} | {cell(g['initial'])} | "
            f"{cell(g['final'])} | {cell(g['dev_selected'])} | {sel_rounds} | {cell(g['best_on_test'])} |"
        )
    short = [r for g in groups for r in g["runs"] if r.get("complete") is False and r.get("stopped_early") is None]
    if short:
        lines += [
            "",
            '**Incomplete runs** (interrupted: their "final" is the last round reached, not the planned last '
            "round): "
            + ", ".join(f"{r['name']} (round {r['final_round']} of {r['planned_rounds']})" for r in short)
            + ".",
        ]
    stopped = [r for g in groups for r in g["runs"] if r.get("stopped_early") is not None]
    if stopped:
        lines += [
            "",
            "Stopped early by a callback: "
            + ", ".join(f"{r['name']} (after round {r['stopped_early']})" for r in stopped)
            + ".",
        ]
    lines += ["", "## Runs", "", "| configuration | seed | folder |", "| --- | --- | --- |"]
    lines += [f"| {g['label']} | {r['seed']} | {r['name']} |" for g in groups for r in g["runs"]]
    if groups:
        lines += ["", *diagnostics_markdown([(g["label"], r) for g in groups for r in g["runs"]])]
    if common:
        lines += ["", "## Settings shared by every run", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {k} | {json.dumps(v, default=str)} |" for k, v in common.items()]
    return "\n".join(lines) + "\n"


def write_report(dirs, out=None, *, same_config: bool = False, title: str | None = None) -> dict:
    """Reads the results folders ``dirs``, groups them (:func:`group_runs`) and writes ``report.md``,
    ``report.json`` and the comparison plots to ``out`` (default: ``report`` next to the first run
    folder). Returns the ``report.json`` content (with ``out``: the folder written)."""
    from .checkpoint import write_json_atomic, write_text_atomic

    runs = expand_dirs(dirs)
    if not runs:
        raise ReportError(f"no results folder given; {ACCEPTED}")
    records = [load_run(d) for d in runs]
    groups = group_runs(records, same_config=same_config)
    out = Path(out) if out is not None else Path(records[0]["dir"]).parent / "report"
    title = title or "fedbpt-jax report: " + (
        groups[0]["label"] if len(groups) == 1 else f"{len(groups)} configurations"
    )
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {str(out)!r} is a file; accepted: a folder (created if absent)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".fedbpt-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ReportError(
            f"--out {str(out)!r} cannot be written ({err.strerror or err}); choose a writable folder"
        ) from None
    md = markdown(groups, title)
    write_text_atomic(out / "report.md", md)
    made = comparison_plots(groups, out, title)
    summary = {
        "title": title,
        "figures": FIGURES,
        "rules": {
            "std": "sample std over seeds (ddof = 1)",
            "grouping": "runs with the same config.json settings except the seed and the output options",
            "dev_selected": "the round with the highest dev accuracy, ties to the earliest; absent without a dev set",
            "best_on_test": "reference-compatibility (optimistic): selected on the test set itself",
        },
        "groups": [
            {
                "label": g["label"],
                "settings": g["identity"],
                **{f: g[f] for f in FIGURES},
                "seeds": [r["seed"] for r in g["runs"]],
                "by_seed": {f: {str(s): v for s, v in d.items()} for f, d in g["by_seed"].items()},
                "runs": [r["dir"] for r in g["runs"]],
            }
            for g in groups
        ],
        "per_run": [per_run_record(g["label"], r["seed"], r["dir"], r) for g in groups for r in g["runs"]],
        "plots": [Path(p).name for p in made],
        "out": str(out),
    }
    write_json_atomic(out / "report.json", summary)
    summary["markdown"] = md
    return summary


def build_parser() -> argparse.ArgumentParser:
    from .cli_options import OneLineParser

    p = OneLineParser(
        prog="fedbpt-jax report",
        description=__doc__.split("\n\n")[0],
        epilog="Runs are grouped by configuration (all settings but the seed and the "
        "output options); each group is reported as mean ± std over its seeds.",
    )
    p.add_argument(
        "dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="results folders (config.json + metrics.json), or folders of such folders",
    )
    p.add_argument("--out", default=None, help="report folder (default: 'report' next to the first run folder)")
    p.add_argument("--title", default=None, help="the report's title")
    p.add_argument(
        "--same-config",
        action="store_true",
        help="require one comparison group: runs that differ in more than the seed are an error",
    )
    return p


def main(argv=None) -> int:
    """``fedbpt-jax report``: exit status 0, or 2 with a one-line error."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        summary = write_report(args.dirs, args.out, same_config=args.same_config, title=args.title)
    except ReportError as err:
        print(f"fedbpt-jax report: error: {err}", file=sys.stderr)
        return 2
    print(summary["markdown"], end="")
    print(f"report written to {summary['out']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
