"""The condensed claim tables of ``experiments/README.md``, rendered from committed ``report.json`` files.

A table in the README that states a grid report's declared comparisons is preceded by a marker line::

    <!-- claims-table: pairs results/grid_sst2_noniid_before/report/report.json -->
    <!-- claims-table: pooled results/pooled_before/report.json -->

(paths relative to ``experiments/``). ``pairs`` renders the report's per-grid pairs, ``pooled`` its pooled
table; either keeps only the comparisons declared in the grid file before the grid's runs (``grid.json``'s
``declared``), in the declared order. ``check`` compares every marked table with its rendering, so no figure of
those tables is typed by hand; ``write`` rewrites them in place.

    python experiments/claims_tables.py render pairs results/grid_sst2_noniid_before/report/report.json
    python experiments/claims_tables.py check      # exit 1 and a diff when a marked table differs
    python experiments/claims_tables.py write      # rewrite every marked table from its report
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

from fedbpt_jax.comparisons import fmt_p
from fedbpt_jax.report import pct

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
MARKER = re.compile(r"^<!-- claims-table: (pairs|pooled) (\S+) -->$")
KINDS = ("pairs", "pooled")

#: display names of the grids' method labels (a label not listed is shown as it is)
NAMES = {
    "fedbpt": "FedBPT",
    "manual": "manual",
    "fedavg_bbt_perturb": "FedAvg-BBT+p",
    "fedavg_bbt": "FedAvg-BBT",
    "centralized_bbt": "centralized BBT",
    "fedprompt": "FedPrompt",
}
#: the figures a row states, in order (best-on-test is optimistic: in the report, never in these tables)
SHOWN = (("final", "final"), ("dev_selected", "dev-selected"))


class TableError(Exception):
    """A marker, report or grid folder that cannot give a table."""


def _pts(x: float, signed: bool = True) -> str:
    """Points of accuracy as the report writes them, with the README's minus sign (U+2212)."""
    return pct(x, signed).replace("-", "\u2212")


def _declared(results: Path, grid: str) -> list[tuple[str, str]]:
    meta_path = results / f"grid_{grid}" / "grid.json"
    if not meta_path.is_file():
        raise TableError(f"no grid.json for grid {grid!r} at {meta_path}")
    pairs = (json.loads(meta_path.read_text()).get("declared") or {}).get("pairs")
    if not pairs:
        raise TableError(f"grid {grid!r} recorded no declared pairs in {meta_path}")
    return [tuple(p) for p in pairs]


def _cell(d: dict) -> str:
    ci = (
        f"{_pts(d['mean'] - d['ci95_halfwidth'])} to {_pts(d['mean'] + d['ci95_halfwidth'])}"
        if d.get("ci95_halfwidth") is not None
        else "—"
    )
    std = _pts(d["std"], signed=False) if d.get("std") is not None else "—"
    return f"{_pts(d['mean'])} ± {std} | {ci} | {fmt_p(d.get('p'))} | {fmt_p(d.get('p_holm'))}"


def _verdict(a: str, b: str, figures: dict) -> str:
    """The report's verdicts of the shown figures with the methods named; "inconclusive" when none is more."""
    parts = []
    for key, name in SHOWN:
        v = figures[key]["verdict"]
        m = re.fullmatch(r"A ([<>]) B( unadjusted only)?", v)
        if m:
            v = f"{NAMES.get(a, a)} {m.group(1)} {NAMES.get(b, b)}{', unadjusted only' if m.group(2) else ''}"
        if v != "inconclusive":
            parts.append(f"{name}: {'**' + v + '**' if m and not m.group(2) else v}")
    return "; ".join(parts) or "inconclusive"


def render(kind: str, report_path: Path, results: Path | None = None) -> str:
    """The markdown table (header included, no trailing newline) of ``report_path``'s declared comparisons:
    ``kind`` "pairs" (per grid) or "pooled"."""
    if kind not in KINDS:
        raise TableError(f"unknown table kind {kind!r}; accepted: {KINDS}")
    if not report_path.is_file():
        raise TableError(f"no report at {report_path} (run: python experiments/grid.py report ... --out ...)")
    results = results or report_path.resolve().parents[1 if kind == "pooled" else 2]
    report = json.loads(report_path.read_text())
    if kind == "pairs":
        entries = [(p, [p["grid"]]) for p in report["pairs"]]
    else:
        entries = [(p, p["grids"]) for p in report["pooled"]]
        if not entries:
            raise TableError(f"{report_path} has no pooled table (a report of one grid folder has none)")
    grids = sorted({g for _, gs in entries for g in gs})
    declared = {g: _declared(results, g) for g in grids}
    order = declared[grids[0]]
    by_pair = {(p["a"], p["b"]): (p, gs) for p, gs in entries}
    n_col = "n (units)" if kind == "pooled" else "n"
    lines = [
        f"| A − B (declared) | {n_col} "
        + "".join(f"| {name}: mean ± std | 95 % CI | p | p Holm " for _, name in SHOWN)
        + "| verdict |",
        "| --- | --- " + "| --- | --- | --- | --- " * len(SHOWN) + "| --- |",
    ]
    for a, b in order:
        if (a, b) not in by_pair:
            raise TableError(f"declared pair {a} − {b} is not in {report_path}")
        p, gs = by_pair[(a, b)]
        if not all((a, b) in declared[g] for g in gs):
            continue  # pooled over a grid that did not declare it: not a declared comparison
        figs = p["figures"]
        missing = [key for key, _ in SHOWN if key not in figs]
        if missing:
            raise TableError(f"pair {a} − {b} of {report_path} has no {', '.join(missing)} figure (no dev set?)")
        n = figs["dev_selected"]["n"]
        n_txt = f"{n} ({figs['dev_selected']['units']})" if kind == "pooled" else str(n)
        cells = " | ".join(_cell(figs[key]) for key, _ in SHOWN)
        lines.append(f"| {NAMES.get(a, a)} − {NAMES.get(b, b)} | {n_txt} | {cells} | {_verdict(a, b, figs)} |")
    return "\n".join(lines)


def marked_tables(text: str) -> list[tuple[int, int, str, str]]:
    """``(first, end, kind, path)`` of every marked table: its lines ``first:end`` of ``text``'s lines."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = MARKER.match(line.strip())
        if not m:
            continue
        first = i + 1
        end = first
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        if end == first:
            raise TableError(f"README line {i + 1}: a claims-table marker with no table under it")
        out.append((first, end, m.group(1), m.group(2)))
    return out


def check(readme: Path = README, write: bool = False) -> list[str]:
    """Diffs of the marked tables of ``readme`` that differ from their rendering (empty: all agree); with
    ``write``, rewrites them in place instead."""
    text = readme.read_text()
    lines = text.splitlines()
    problems = []
    for first, end, kind, rel in reversed(marked_tables(text)):
        want = render(kind, readme.parent / rel).splitlines()
        have = lines[first:end]
        if have != want:
            if write:
                lines[first:end] = want
            else:
                diff = difflib.unified_diff(have, want, f"README ({rel}, as written)", "rendered", lineterm="")
                problems.append("\n".join(diff))
    if write:
        readme.write_text("\n".join(lines) + ("\n" if text.endswith("\n") else ""))
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="print one table")
    r.add_argument("kind", choices=KINDS)
    r.add_argument("report", help="report.json (path as given, or relative to experiments/)")
    for name, help_ in (("check", "compare every marked table with its rendering"), ("write", "rewrite them")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("readme", nargs="?", default=str(README))
    args = ap.parse_args(argv)
    try:
        if args.command == "render":
            path = Path(args.report)
            print(render(args.kind, path if path.is_file() else HERE / path))
            return 0
        problems = check(Path(args.readme), write=args.command == "write")
    except TableError as err:
        print(f"claims_tables.py: error: {err}", file=sys.stderr)
        return 2
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} marked table(s) differ from their reports", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
