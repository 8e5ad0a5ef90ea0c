"""``fedbpt-jax report``: grouping of results folders by configuration (seed aside), mean ± std over seeds,
the dev-selected figure, plots, and the errors for bad input (a folder that is not a results folder,
runs of several configurations under --same-config, the same run twice). Results folders are written
here as the CLI writes them (config.json with ``args``, metrics.json via write_json_atomic); plot_run's
metrics.png of a synthetic run and of a bad folder.
"""

from __future__ import annotations

import json

import pytest

from fedbpt_jax import cli, plots, report
from fedbpt_jax.checkpoint import read_json, write_json_atomic

PNG = b"\x89PNG\r\n\x1a\n"


def _write_run(d, *, seed, accs, devs=None, algorithm="fedbpt", alpha=1.0, sigmas=None):
    """A results folder: evaluations at rounds 0..len(accs)-1 with these test (and dev) accuracies."""
    d.mkdir(parents=True)
    args = {
        "command": "simulate",
        "model": "tiny",
        "algorithm": algorithm,
        "alpha": alpha,
        "rounds": len(accs) - 1,
        "seed": seed,
        "results_dir": str(d),
        "overwrite": False,
        "no_progress": True,
        "debug": False,
        "checkpoint_dir": None,
    }
    write_json_atomic(d / "config.json", {"command": ["fedbpt-jax", "simulate"], "args": args, "resolved": {}})
    evals = [
        {"round": r, "accuracy": a, "loss": 1.0 - a, **({"dev_accuracy": devs[r]} if devs else {}), "z_norm": float(r)}
        for r, a in enumerate(accs)
    ]
    rounds = [{"round": r, "client_loss": 0.5, "sigma": (sigmas or [1.0] * len(accs))[r]} for r in range(1, len(accs))]
    sel = max(range(len(accs)), key=lambda r: (devs[r], -r)) if devs else len(accs) - 1
    write_json_atomic(
        d / "metrics.json",
        {
            "rounds": rounds,
            "evals": evals,
            "selection_rule": "dev accuracy, ties to the earliest round" if devs else "none (no dev set)",
            "initial_test_accuracy": accs[0],
            "final_round": len(accs) - 1,
            "final_test_accuracy": accs[-1],
            "selected_round": sel,
            "selected_test_accuracy": accs[sel],
            "best_test_reference": max(accs),
        },
    )
    return d


def test_groups_by_configuration_with_mean_and_std_over_seeds(tmp_path, capsys):
    a0 = _write_run(tmp_path / "a0", seed=0, accs=[0.5, 0.6, 0.7], devs=[0.5, 0.9, 0.8])
    a1 = _write_run(tmp_path / "a1", seed=1, accs=[0.5, 0.8, 0.9], devs=[0.5, 0.6, 0.6])
    b0 = _write_run(tmp_path / "b0", seed=0, accs=[0.5, 0.55, 0.6], algorithm="fedavg_bbt")
    out = tmp_path / "rep"
    assert cli.main(["report", str(a0), str(a1), str(b0), "--out", str(out)]) == 0
    rep = read_json(out / "report.json")
    by = {g["label"]: g for g in rep["groups"]}
    # b0 evaluated no dev set: that is part of its configuration too (dev selection), so it is in the label.
    fa, fb_ = "algorithm=fedbpt, dev_set=True", "algorithm=fedavg_bbt, dev_set=False"
    assert set(by) == {fa, fb_}
    g = by[fa]
    assert g["seeds"] == [0, 1] and g["final"]["n"] == 2
    assert g["final"]["mean"] == pytest.approx(0.8) and g["final"]["std"] == pytest.approx(0.1 * 2**0.5)
    # Dev-selected: seed 0 picks round 1 (dev 0.9) -> 0.6; seed 1 ties at 0.6 -> the earliest, round 1 -> 0.8.
    assert g["by_seed"]["dev_selected"] == {"0": 0.6, "1": 0.8}
    assert g["initial"]["mean"] == pytest.approx(0.5) and g["best_on_test"]["mean"] == pytest.approx(0.8)
    b = by[fb_]
    assert b["final"] == {"mean": 0.6, "std": None, "n": 1, "min": 0.6, "max": 0.6} and b["dev_selected"] is None
    md = (out / "report.md").read_text()
    assert (
        "| algorithm=fedbpt, dev_set=True | 2 | 0,1 | 2 | 50.00 ± 0.00 (n=2) | 80.00 ± 14.14 (n=2) | 70.00 ± 14.14 (n=2) | 1,1 |"
        in md
    )
    assert "| algorithm=fedavg_bbt, dev_set=False | 1 | 0 | 2 | 50.00 (n=1) | 60.00 (n=1) | — | — |" in md
    assert '| model | "tiny" |' in md  # settings all runs share
    # Per run: what became of the prompt (these runs record ‖z‖ = round and σ per round, no label shares).
    per = {(r["label"], r["seed"]): r for r in rep["per_run"]}
    assert per[(fa, 1)]["final_z_norm"] == 2.0 and per[(fa, 1)]["final_sigma"] == 1.0
    assert per[(fa, 1)]["final_pred_dist"] is None and per[(fa, 1)]["repaired"] is None
    assert f"| {fa} | 1 | 90.00 | 80.00 (1) | — | — | 2.0 | — | 1.000 | — |" in md
    for name in ("accuracy_rounds.png", "accuracy_bars.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert "report written to" in capsys.readouterr().out


def test_runs_with_and_without_a_dev_set_are_two_configurations(tmp_path):
    """The same settings and seed, one run with dev-set selection and one without (as a grid keeps when
    dev selection was added), are two groups rather than a duplicate."""
    with_dev = _write_run(tmp_path / "d", seed=0, accs=[0.5, 0.7], devs=[0.5, 0.6])
    without = _write_run(tmp_path / "n", seed=0, accs=[0.5, 0.7])
    rep = report.write_report([with_dev, without], out=tmp_path / "rep")
    assert sorted(g["label"] for g in rep["groups"]) == ["dev_set=False", "dev_set=True"]


def test_a_folder_of_runs_and_the_default_output(tmp_path):
    _write_run(tmp_path / "runs" / "s0", seed=0, accs=[0.5, 0.7])
    _write_run(tmp_path / "runs" / "s1", seed=1, accs=[0.5, 0.9])
    rep = report.write_report([tmp_path / "runs"], same_config=True)
    assert rep["out"] == str(tmp_path / "runs" / "report")
    (g,) = rep["groups"]
    assert g["label"] == "fedbpt" and g["final"]["mean"] == pytest.approx(0.8)
    assert json.loads((tmp_path / "runs" / "report" / "report.json").read_text())["groups"][0]["seeds"] == [0, 1]


def test_same_config_refuses_runs_that_differ_in_more_than_the_seed(tmp_path, capsys):
    a = _write_run(tmp_path / "a", seed=0, accs=[0.5, 0.7])
    b = _write_run(tmp_path / "b", seed=1, accs=[0.5, 0.7], alpha=0.1)
    with pytest.raises(
        report.ReportError,
        match=r"--same-config: the runs differ in more than the seed "
        r"\(alpha: 1.0 in '.*a', 0.1 in '.*b'\)",
    ):
        report.write_report([a, b], tmp_path / "out", same_config=True)
    assert cli.main(["report", "--same-config", str(a), str(b), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedbpt-jax report: error: --same-config") and "leave out --same-config" in err
    # Without the flag: two groups, labelled by the setting that differs.
    labels = [g["label"] for g in report.write_report([a, b], tmp_path / "out")["groups"]]
    assert labels == ["alpha=1.0", "alpha=0.1"]


def test_bad_folders_are_named_with_what_is_accepted(tmp_path):
    run = _write_run(tmp_path / "ok", seed=0, accs=[0.5, 0.7])
    (tmp_path / "empty").mkdir()
    (tmp_path / "bbt").mkdir()
    write_json_atomic(tmp_path / "bbt" / "config.json", {"args": {}})
    write_json_atomic(tmp_path / "bbt" / "bbt.json", {})
    (tmp_path / "file.txt").write_text("x")
    cases = {
        tmp_path / "missing": "is not a folder",
        tmp_path / "file.txt": "is not a folder",
        tmp_path / "empty": r"is not a results folder \(no config.json and no metrics.json\)",
        tmp_path / "bbt": r"holds a 'fedbpt-jax bbt' result \(bbt.json\)",
    }
    for bad, why in cases.items():
        with pytest.raises(report.ReportError, match=rf"'{bad}' {why}.*accepted: a results folder"):
            report.write_report([run, bad], tmp_path / "out")
    broken = _write_run(tmp_path / "broken", seed=1, accs=[0.5])
    (broken / "metrics.json").write_text("{not json")
    with pytest.raises(report.ReportError, match=r"broken': config.json or metrics.json is not valid JSON"):
        report.write_report([broken], tmp_path / "out")
    twin = tmp_path / "twin"
    twin.mkdir()
    for f in ("config.json", "metrics.json"):
        (twin / f).write_bytes((run / f).read_bytes())
    with pytest.raises(report.ReportError, match=r"same configuration with the same seed \(0\)"):
        report.write_report([run, twin], tmp_path / "out")


def test_plot_run_writes_metrics_png_next_to_metrics_json(tmp_path):
    d = _write_run(tmp_path / "r", seed=0, accs=[0.5, 0.6, 0.7], devs=[0.5, 0.7, 0.6], sigmas=[1.0, 0.8, 0.6])
    path = plots.plot_run(d)
    assert path == str(d / "metrics.png") and (d / "metrics.png").read_bytes()[:8] == PNG
    # A metrics dict needs an output path; a folder without metrics.json is named.
    m = read_json(d / "metrics.json")
    with pytest.raises(ValueError, match="give out="):
        plots.plot_run(m)
    assert plots.plot_run(m, tmp_path / "x" / "m.png") == str(tmp_path / "x" / "m.png")
    with pytest.raises(FileNotFoundError, match=r"'.*nothing' holds no metrics.json; accepted: a results folder"):
        plots.plot_run(tmp_path / "nothing")
    with pytest.raises(ValueError, match="no evaluation"):
        plots.plot_run({"evals": [], "rounds": []}, tmp_path / "e.png")


def test_run_diagnostics_reads_what_became_of_the_prompt():
    """Label shares, the largest one-label share after round 0, ‖z‖, prompt norm, σ and repaired uploads;
    rounds without clients (the manual prompt) and σ = 0 (gradient methods) count as no σ."""
    metrics = {
        "evals": [
            {"round": 0, "accuracy": 0.8, "pred_dist": [0.99, 0.01], "z_norm": 0.0},  # round 0 never counts
            {"round": 1, "accuracy": 0.7, "pred_dist": [0.2, 0.8], "z_norm": 3.0},
            {"round": 2, "accuracy": 0.6, "pred_dist": [float("nan"), 0.1]},  # non-finite: skipped
            {"round": 3, "accuracy": 0.5, "pred_dist": [0.6, 0.4], "z_norm": 5.5, "prompt_norm_ratio": 2.5},
        ],
        "rounds": [
            {"round": 1, "active_clients": 10, "sigma": 0.9, "num_repaired": 7},
            {"round": 2, "active_clients": 9, "sigma": 0.8, "num_repaired": 3},
            {"round": 3, "active_clients": 10, "sigma": 0.7, "num_repaired": 5},
        ],
    }
    d = report.run_diagnostics(metrics)
    assert d["final_pred_dist"] == [0.6, 0.4]
    assert (d["peak_label_share"], d["peak_label_round"]) == (0.8, 1)
    assert (d["final_z_norm"], d["final_prompt_norm_ratio"], d["final_sigma"]) == (5.5, 2.5, 0.7)
    assert d["repaired"] == (3, 7) and d["clients"] == 10
    manual = {"evals": metrics["evals"][:1], "rounds": [{"round": 1, "active_clients": 0, "sigma": 0.0}]}
    m = report.run_diagnostics(manual)
    assert m["final_sigma"] is None and m["repaired"] is None and m["peak_label_share"] is None
    gradient = {"evals": metrics["evals"], "rounds": [{"round": 1, "active_clients": 10, "sigma": 0.0}]}
    assert report.run_diagnostics(gradient)["final_sigma"] is None
    assert set(d) == set(report.DIAGNOSTICS)
    row = report.diagnostics_markdown([("fedbpt", {**report.run_figures(metrics), **d, "seed": 0})])[-1]
    assert row == "| fedbpt | 0 | 50.00 | — | 0.60 / 0.40 | 0.80 (1) | 5.5 | 2.50 | 0.700 | 3-7 of 10 |"
