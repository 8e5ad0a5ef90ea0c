"""Paired comparisons of experiment-grid runs: the tables of ``experiments/grid.py report``.

A grid folder (``experiments/grid.py run`` writes one per grid file) holds one run folder per point and a
``grid.json`` with the pairs the grid declares. :func:`write_grid_report` reads one or more such folders, groups the
runs that differ only by seed (:func:`group_runs`), pairs the groups that differ in one axis label
(:func:`pair_groups`: paired per-seed differences, t-interval, p, Holm and Benjamini-Hochberg adjusted over the
report's family, the effect a test at this n detects with 80 % power), pools a comparison over every grid that has it
(:func:`pooled`), and writes ``report.md``, ``report.json`` and the plots. The per-run figures, diagnostics, cells
and plots are :mod:`fedbpt_jax.report`'s and :mod:`fedbpt_jax.plots`', shared with ``fedbpt-jax report``.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import stats as fstats
from .plots import FIGURES
from .plots import comparison_plots as plots
from .report import ReportError, diagnostics_markdown, label_shares, per_run_record, run_diagnostics, run_figures
from .report import cell as _cell
from .report import pct as _pct
from .report import seed_order as _seed_order
from .report import stats as _stats


def paired(a: dict, b: dict) -> dict | None:
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
                rec.update(label_shares(m))
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
    selections: dict[str, set] = {}
    for g in out:
        selections.setdefault(g["label"], set()).add(json.loads(g["key"])["dev_selection"])
    several_grids = len({g["grid"] for g in out}) > 1
    for g in out:
        # A label the report has with and without dev selection is told apart (everywhere, so that the pooled
        # table, which matches on labels, pools like with like); otherwise a label stays as the grid file wrote
        # it, and across grids ``display`` names the grid.
        if len(selections[g["label"]]) > 1:
            g["label"] += " (dev)" if json.loads(g["key"])["dev_selection"] else " (no dev)"
        g["display"] = f"{g['label']} [{g['grid']}]" if several_grids else g["label"]
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


def pair_groups(
    groups: list[dict], wanted: list[list[str]], declared: dict | None = None, figures=FIGURES
) -> list[dict]:
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
                "declared": declared_status(declared.get(a["grid"]), la, lb),
                "figures": {},
            }
            for fig in figures:
                p = paired(_by_seed(a, fig), _by_seed(b, fig))
                if p is not None:
                    rec["figures"][fig] = p
            pairs.append(rec)
    return pairs


def _by_seed(group: dict, key: str) -> dict:
    """``{seed: value}`` of one figure or measure over a group's runs (runs without it left out)."""
    if key in group.get("by_seed", {}):
        return group["by_seed"][key]
    return {r["settings"]["seed"]: r[key] for r in group["runs"] if r.get(key) is not None}


def declared_status(pairs: list | None, la: str, lb: str) -> str:
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
            key,
            {
                "a": p["a"],
                "b": p["b"],
                "contexts": [],
                "grids": [],
                "figures": {},
                "precision": set(),
                "tasks_seeds": {},
            },
        )
        rec["contexts"].append(f"{p.get('grid')}: {p['context']}" if p["context"] else str(p.get("grid")))
        if p.get("grid") not in rec["grids"]:
            rec["grids"].append(p.get("grid"))
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


# --------------------------------------------------------------------------------------------------
# Label bias: the declared label-bias pairs and the late-collapse reading

#: A run *drifts to one label* when one label takes at least this share of the test predictions in an evaluation
#: after round 0 (the threshold of every drift count in this project's reports).
DRIFT_SHARE = 0.85
#: The label-bias measures of a run (:func:`fedbpt_jax.report.label_shares`); the first is the tested one.
BIAS_FIGURES = {
    "final_label_share": "largest one-label share of the test predictions at the final round",
    "peak_label_share": "largest one-label share in any evaluation after round 0",
}


def bias_pairs(groups: list[dict], wanted: list[list[str]], declared: dict | None = None) -> list[dict]:
    """The declared label-bias pairs: per seed, A's largest one-label share minus B's (negative: A's prompt is
    the less biased), tested on the final round's share (its own family: Holm over these pairs); the peak share
    after round 0 is described, not tested; ``drifted`` counts each side's runs whose peak share reaches
    :data:`DRIFT_SHARE`."""
    if not wanted:
        return []
    out = pair_groups(groups, wanted, declared, figures=BIAS_FIGURES)
    by_label = {(g["grid"], g["label"]): g for g in groups}
    for p in out:
        p["drifted"] = {}
        for side in ("a", "b"):
            runs = by_label[(p["grid"], p[side])]["runs"]
            peaks = [r.get("peak_label_share") for r in runs if r.get("peak_label_share") is not None]
            p["drifted"][side] = [sum(x >= DRIFT_SHARE for x in peaks), len(peaks)]
    fstats.adjust([p["figures"]["final_label_share"] for p in out if "final_label_share" in p["figures"]])
    for p in out:  # the verdict in the measure's own words
        d = p["figures"].get("final_label_share")
        if d is not None:
            d["verdict"] = d["verdict"].replace("A < B", "A less biased").replace("A > B", "A more biased")
    return out


def late_collapse(runs: list[dict], rule: dict) -> list[dict]:
    """The declared late-collapse reading of every complete run: after round ``rule["after_round"]``, the largest
    one-label share of any evaluation (and its round) and the first round at or above ``rule["share"]``; the
    final test accuracy against ``rule["accuracy_floor"]``; ``collapses`` when either criterion holds."""
    out = []
    for r in runs:
        later = [(rd, x) for rd, x in r.get("label_share_by_round") or [] if rd > rule["after_round"]]
        peak = max(later, key=lambda t: (t[1], -t[0])) if later else None
        first = next((rd for rd, x in later if x >= rule["share"]), None)
        final = r.get("final")
        below = final is not None and final < rule["accuracy_floor"]
        why = [w for w, hit in (("one label", first is not None), ("below the floor", below)) if hit]
        out.append(
            {
                "dir": r["dir"],
                "label": " / ".join(v for k, v in r["labels"].items() if k != "seed"),
                "seed": r["settings"]["seed"],
                "final_round": r.get("final_round"),
                "final": final,
                "peak_share_after": peak[1] if peak else None,
                "peak_round_after": peak[0] if peak else None,
                "first_round_at_share": first,
                "collapses": bool(why) if later or final is not None else None,
                "why": why,
            }
        )
    return out


def bias_markdown(pairs: list[dict]) -> list[str]:
    rows = []
    for p in pairs:
        d = p["figures"].get("final_label_share")
        pk = p["figures"].get("peak_label_share")
        if d is None:
            continue
        per = ", ".join(f"{x:+.2f}" for x in d["per_seed"])
        sd = f" ± {d['std']:.2f}" if d["std"] is not None else ""
        ci = (
            f"{d['mean'] - d['ci95_halfwidth']:+.2f} to {d['mean'] + d['ci95_halfwidth']:+.2f}"
            if d["ci95_halfwidth"] is not None
            else "—"
        )
        peak = f"{pk['mean']:+.2f}" if pk else "—"
        (ka, na), (kb, nb) = p["drifted"]["a"], p["drifted"]["b"]
        rows.append(
            f"| {p['a']} | {p['b']} | {d['n']} | {per} | {d['mean']:+.2f}{sd} | {ci} | {fmt_p(d.get('p'))} "
            f"| {fmt_p(d.get('p_holm'))} | {peak} | {ka} of {na} / {kb} of {nb} | {d['verdict']} | {p['declared']} |"
        )
    return [
        "## Label bias (declared label-bias pairs)",
        "",
        "Per seed, A's largest one-label share of the test predictions minus B's (shares of all test predictions: "
        "negative = A's prompt is the less biased). Tested: the final round's share, two-sided paired t-test, "
        "Holm over these pairs (their own family); verdict 'A less biased' / 'A more biased' at Holm p < 0.05. "
        f"Described: the mean difference of the peak share after round 0, and the runs whose peak reaches "
        f"{DRIFT_SHARE} (drifted to one label), A / B.",
        "",
        "| A | B | n | per seed (final share) | mean ± std | 95 % CI | p | p Holm | peak share: mean diff. "
        "| drifted ≥ 0.85 (A / B) | verdict | declared |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ]


def late_collapse_markdown(rows: list[dict], rule: dict) -> list[str]:
    lines = [
        "## Late collapse (the declared reading)",
        "",
        f"A run collapses late when after round {rule['after_round']} one label takes ≥ {rule['share']:.2f} of the "
        f"test predictions in any evaluation, or its final test accuracy is below {100 * rule['accuracy_floor']:.2f} %"
        " (declared in the grid file before its runs). Complete runs only.",
        "",
        f"| configuration | seed | rounds | final | largest one-label share after round {rule['after_round']} (round) "
        "| first round at the share | reading |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        peak = f"{r['peak_share_after']:.2f} ({r['peak_round_after']})" if r["peak_share_after"] is not None else "—"
        first = "—" if r["first_round_at_share"] is None else str(r["first_round_at_share"])
        reading = (
            "n/a"
            if r["collapses"] is None
            else ("collapses late (" + ", ".join(r["why"]) + ")" if r["collapses"] else "holds")
        )
        lines.append(
            f"| {r['label']} | {r['seed']} | {r['final_round']} | {_pct(r['final'])} | {peak} | {first} | {reading} |"
        )
    return lines


def pair_rows(pairs: list[dict], per_seed: bool = True, grid_column: bool = False) -> list[str]:
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
            pv = " | ".join(fmt_p(d.get(k)) for k in ("p", "p_holm", "p_bh"))
            decl = p.get("declared", "")
            rows.append(
                (f"| {p.get('grid')} " if grid_column else "")
                + f"| {p['a']} | {p['b']} | {FIGURES[fig]} | {p['precision']} | {d['n']} | {per} | {ms} | {ci} | {pv} "
                f"| {_pct(d['power80_effect'])} | {d['verdict']} |" + (f" {decl} |" if per_seed else "")
            )
    return rows


def fmt_p(p) -> str:
    return "—" if p is None else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def markdown(
    groups: list[dict],
    pairs: list[dict],
    other: list[dict],
    title: str,
    pools: list[dict] = (),
    extra: list[str] = (),
) -> str:
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
            f"| {g['display']} | {g['precision']} | {','.join(map(str, rounds))} | {seeds} | {_cell(g['initial'])} "
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
            *pair_rows(pools, per_seed=False),
        ]
    if pairs:
        by_grid = len({p.get("grid") for p in pairs}) > 1
        lines += [
            "",
            "## Paired per-seed differences (A − B, points of accuracy)",
            "",
            "Per seed, A and B share data, partition, projection and round keys. " + stat_rule + " Declared = "
            "whether the pair was in the grid file when its first run started (post hoc: added later; not recorded: "
            "a grid run before declarations were recorded).",
            "",
            ("| grid " if by_grid else "")
            + "| A | B | figure | precision | n | per seed | mean ± std | 95 % CI | p | p Holm | p BH "
            "| 80 %-power effect | verdict | declared |",
            ("| --- " if by_grid else "")
            + "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *pair_rows(pairs, grid_column=by_grid),
        ]
    if extra:
        lines += ["", *extra]
    if groups:
        rows = [
            (g["display"], {**r, "seed": r["settings"]["seed"]})
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


def write_grid_report(dirs, out=None, title: str | None = None) -> dict:
    """The report of the grid folders ``dirs`` (see the module docstring) in ``out`` (default: ``report`` in the
    first folder); returns ``report.json``'s content. Raises :class:`~fedbpt_jax.report.ReportError` for a folder
    that is not one.
    """
    from .checkpoint import write_json_atomic, write_text_atomic

    dirs = [Path(d) for d in dirs]
    for d in dirs:
        if not d.is_dir():
            raise ReportError(f"report: {str(d)!r} is not a folder (give the grid's output folder)")
    done, other = collect(dirs)
    wanted, bias_wanted = [], []
    names = []
    declared, bias_declared, late_rules = {}, {}, {}
    for d in dirs:
        if (d / "grid.json").exists():
            meta = json.loads((d / "grid.json").read_text())
            wanted += meta.get("pairs", [])
            bias_wanted += meta.get("label_bias_pairs", [])
            names.append(meta["name"])
            declared[meta["name"]] = meta.get("declared", {}).get("pairs")
            bias_declared[meta["name"]] = meta.get("declared", {}).get("label_bias_pairs")
            if meta.get("late_collapse"):
                late_rules[meta["name"]] = meta["late_collapse"]
    title = title or ("grid " + ", ".join(names or [d.name for d in dirs]))
    out = Path(out) if out else dirs[0] / "report"
    groups = group_runs(done)
    pairs = pair_groups(groups, wanted, declared)
    tasks = {g["grid"]: g["runs"][0]["settings"].get("task") for g in groups}
    for p in pairs:
        p["task"] = tasks.get(p["grid"])
    fstats.adjust(family(pairs))
    pools = pooled(pairs) if len(dirs) > 1 or len({p["context"] for p in pairs}) > 1 else []
    fstats.adjust(family(pools))
    biases = bias_pairs(groups, bias_wanted, bias_declared)
    late = {name: late_collapse([r for r in done if r["grid"] == name], rule) for name, rule in late_rules.items()}
    sections = ([bias_markdown(biases)] if biases else []) + [
        late_collapse_markdown(rows, late_rules[name]) for name, rows in late.items()
    ]
    extra = [line for i, sec in enumerate(sections) for line in ([""] if i else []) + sec]
    precisions = sorted({g["precision"] for g in groups})
    if precisions:
        title += f" ({', '.join(precisions)})"
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "report.md", markdown(groups, pairs, other, title, pools, extra))
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
            {k: g[k] for k in ("label", "display", "labels", "grid", "precision", *FIGURES)}
            | {
                "seeds": sorted(g["by_seed"]["final"], key=_seed_order),
                "by_seed": g["by_seed"],
                "runs": [r["dir"] for r in g["runs"]],
            }
            for g in groups
        ],
        "pairs": pairs,
        "pooled": pools,
        # only where a grid declares them, so that the reports of grids without them stay as they were
        **({"label_bias_pairs": biases} if biases else {}),
        **({"late_collapse": {n: {"rule": late_rules[n], "runs": rows} for n, rows in late.items()}} if late else {}),
        "per_run": [per_run_record(g["label"], r["settings"]["seed"], r["dir"], r) for g in groups for r in g["runs"]],
        "incomplete": [{k: r.get(k) for k in ("dir", "state", "final_round", "error")} for r in other],
        "plots": [Path(p).name for p in made],
    }
    write_json_atomic(out / "report.json", summary)
    return summary
