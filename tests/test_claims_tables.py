"""experiments/claims_tables.py: the README's marked claim tables equal their rendering from the committed
reports, and the renderer states what a report says (figures, units, Holm p, verdicts with the methods named),
keeps only declared comparisons and finds a table that was typed differently."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "experiments" / "claims_tables.py"
_spec = importlib.util.spec_from_file_location("claims_tables", PATH)
ct = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ct)


def test_the_readme_tables_equal_their_reports():
    tables = ct.marked_tables(ct.README.read_text())
    assert tables, "experiments/README.md has no marked claim table"
    assert ct.check() == []


def _fig(mean, std, half, p, p_holm, verdict, units=None, n=6):
    d = {"n": n, "mean": mean, "std": std, "ci95_halfwidth": half, "p": p, "p_holm": p_holm, "verdict": verdict}
    return d | ({"units": units} if units is not None else {})


def _pooled_setup(tmp_path: Path) -> Path:
    """Two grid folders (the second declares one pair fewer) and a pooled report over them."""
    results = tmp_path / "results"
    declared = [["fedbpt", "manual"], ["fedbpt", "fedavg_bbt_perturb"], ["fedprompt", "manual"]]
    for name, pairs in (("g1", declared), ("g2", declared[:2])):
        (results / f"grid_{name}").mkdir(parents=True)
        (results / f"grid_{name}" / "grid.json").write_text(json.dumps({"declared": {"pairs": pairs}}))

    def rec(a, b, final, dev):
        return {
            "a": a,
            "b": b,
            "contexts": ["g1", "g2"],
            "grids": ["g1", "g2"],
            "figures": {"final": final, "dev_selected": dev},
        }

    report = {
        "pairs": [],
        "pooled": [
            rec(
                "fedbpt",
                "fedavg_bbt_perturb",
                _fig(-0.1234, 0.05, 0.0525, 0.0004, 0.0081, "A < B", 6),
                _fig(0.0101, 0.02, 0.021, 0.21, 1.0, "inconclusive", 6),
            ),
            rec(
                "fedbpt",
                "manual",
                _fig(-0.02, 0.01, 0.0105, 0.004, 0.06, "A < B unadjusted only", 6),
                _fig(0.0157, 0.0145, 0.015, 0.05, 0.5, "inconclusive", 6),
            ),
            rec(  # declared in g1 only: pooled over a grid that did not declare it, so not in the table
                "fedprompt",
                "manual",
                _fig(0.01, 0.01, 0.01, 0.1, 1.0, "inconclusive", 6),
                _fig(0.01, 0.01, 0.01, 0.1, 1.0, "inconclusive", 6),
            ),
        ],
    }
    path = results / "pooled" / "report.json"
    path.parent.mkdir()
    path.write_text(json.dumps(report))
    return path


def test_pooled_rows_state_the_report(tmp_path):
    table = ct.render("pooled", _pooled_setup(tmp_path)).splitlines()
    assert table[0].startswith("| A − B (declared) | n (units) | final: mean ± std | 95 % CI | p | p Holm |")
    assert len(table) == 4, table  # header, rule, the two pairs declared in both grids, in declared order
    assert table[2] == (
        "| FedBPT − manual | 6 (6) | −2.00 ± 1.00 | −3.05 to −0.95 | 0.004 | 0.060 "
        "| +1.57 ± 1.45 | +0.07 to +3.07 | 0.050 | 0.500 | final: FedBPT < manual, unadjusted only |"
    )
    assert table[3] == (
        "| FedBPT − FedAvg-BBT+p | 6 (6) | −12.34 ± 5.00 | −17.59 to −7.09 | 4.0e-04 | 0.008 "
        "| +1.01 ± 2.00 | −1.09 to +3.11 | 0.210 | 1.000 | final: **FedBPT < FedAvg-BBT+p** |"
    )


def test_check_finds_a_typed_figure_and_write_mends_it(tmp_path):
    report = _pooled_setup(tmp_path)
    rendered = ct.render("pooled", report)
    readme = tmp_path / "README.md"
    marker = f"<!-- claims-table: pooled {report.relative_to(tmp_path)} -->"
    readme.write_text(f"text\n\n{marker}\n{rendered.replace('−12.34', '−12.43')}\n\nmore text\n")
    problems = ct.check(readme)
    assert len(problems) == 1 and "−12.43" in problems[0] and "−12.34" in problems[0]
    assert ct.check(readme, write=True) == []
    assert ct.check(readme) == []
    assert readme.read_text() == f"text\n\n{marker}\n{rendered}\n\nmore text\n"


def test_bad_input_is_named(tmp_path):
    report = _pooled_setup(tmp_path)
    with pytest.raises(ct.TableError, match="unknown table kind 'pool'"):
        ct.render("pool", report)
    data = json.loads(report.read_text())
    del data["pooled"][0]["figures"]["dev_selected"]
    report.write_text(json.dumps(data))
    with pytest.raises(ct.TableError, match="fedbpt − fedavg_bbt_perturb of .* has no dev_selected figure"):
        ct.render("pooled", report)
    report.write_text(json.dumps(data | {"pooled": []}))
    with pytest.raises(ct.TableError, match="no pooled table"):
        ct.render("pooled", report)
    (tmp_path / "README.md").write_text("<!-- claims-table: pairs x/report.json -->\n\nno table\n")
    with pytest.raises(ct.TableError, match="marker with no table"):
        ct.check(tmp_path / "README.md")


def test_a_declared_pair_missing_from_the_report_is_an_error(tmp_path):
    report = _pooled_setup(tmp_path)
    data = json.loads(report.read_text())
    data["pooled"] = [r for r in data["pooled"] if r["b"] != "manual"]
    report.write_text(json.dumps(data))
    with pytest.raises(ct.TableError, match="declared pair fedbpt − manual is not in"):
        ct.render("pooled", report)
