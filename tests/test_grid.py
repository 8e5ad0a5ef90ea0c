"""The grid driver end to end on a tiny random model: run, skip when finished, resume from a checkpoint
(same metrics as an uninterrupted run), a failing run recorded without stopping the grid, the report, and
clear errors for bad grid files."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from fedbpt_jax import comparisons, machine, report

PATH = Path(__file__).resolve().parents[1] / "experiments" / "grid.py"
_spec = importlib.util.spec_from_file_location("grid_driver", PATH)
grid = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grid)
import grid_spec  # noqa: E402  (beside grid.py, on the path grid.py sets)

BASE = """
[grid]
name = "tiny"

[base]
model = "tiny"
task = "rotten_tomatoes"
clients = 4
shots = 4
d = 8
n_prompt = 2
prompt_start = "zeros"
population = 4
local_generations = 2
test_size = 24
rounds = {rounds}
partition = "dirichlet:1.0"

[axes]
seed = [0]
method = [{{ label = "fedbpt", algorithm = "fedbpt" }}, {{ label = "manual", algorithm = "manual" }}]

[report]
pairs = [["fedbpt", "manual"]]
"""


def _grid_file(tmp_path, rounds, name="g.toml", text=BASE):
    p = tmp_path / f"r{rounds}_{name}"
    p.write_text(text.format(rounds=rounds))
    return p


def _strip_seconds(m):
    return {"rounds": [{k: v for k, v in r.items() if k != "seconds"} for r in m["rounds"]], "evals": m["evals"]}


def test_grid_runs_skips_resumes_and_reports(tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    g2 = _grid_file(tmp_path, 2)
    assert grid.main(["run", str(g2), "--out", str(full)]) == 0
    dirs = sorted(d for d in full.iterdir() if d.is_dir())
    assert len(dirs) == 2
    for d in dirs:
        m = json.loads((d / "metrics.json").read_text())
        manual = d.name.startswith("manual_")
        # The manual prompt is evaluated at round 0 and the last round only, and keeps no checkpoint.
        assert [e["round"] for e in m["evals"]] == ([0, 2] if manual else [0, 1, 2])
        if manual:
            assert m["evals"][0]["accuracy"] == m["evals"][1]["accuracy"]
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["settings"]["rounds"] == 2 and cfg["resolved"]["n_prompt"] == 2
        env = cfg["environment"]
        assert env["backend"] == "cpu" and env["device"] == "cpu" and env["matmul_precision"] == "default"
        assert env["cpu"] and set(env["cpu_flags"].split()) <= set(machine.RELEVANT_FLAGS)
        assert (d / "rounds.csv").exists() and (d / "ckpt").is_dir() != manual
        assert json.loads((d / "status.json").read_text())["state"] == "finished"
    capsys.readouterr()

    # Finished runs are skipped.
    mtimes = [(d / "metrics.json").stat().st_mtime_ns for d in dirs]
    assert grid.main(["run", str(g2), "--out", str(full)]) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 2
    assert mtimes == [(d / "metrics.json").stat().st_mtime_ns for d in dirs]

    # Interrupted after round 1 (a 1-round grid, same run directories: rounds are not in the hash), then
    # the 2-round grid resumes from the checkpoint and ends where the uninterrupted run ended.
    # (--no-reuse: the finished runs beside it in `full` would otherwise be copied instead.)
    assert grid.main(["run", str(_grid_file(tmp_path, 1)), "--out", str(part), "--no-reuse"]) == 0
    capsys.readouterr()
    assert grid.main(["run", str(g2), "--out", str(part), "--no-reuse"]) == 0
    printed = capsys.readouterr().out
    assert "resuming after round 1" in printed  # FedBPT from its checkpoint; the manual prompt runs again
    man = next(d.name for d in dirs if d.name.startswith("manual_"))
    assert _strip_seconds(json.loads((full / man / "metrics.json").read_text())) == _strip_seconds(
        json.loads((part / man / "metrics.json").read_text())
    )
    name = next(d.name for d in dirs if d.name.startswith("fedbpt_"))
    a = json.loads((full / name / "metrics.json").read_text())
    b = json.loads((part / name / "metrics.json").read_text())
    assert _strip_seconds(a) == _strip_seconds(b)
    # Its config.json says which rounds an earlier process computed, and where (the manual prompt ran again).
    cfg_full = json.loads((full / name / "config.json").read_text())
    cfg_part = json.loads((part / name / "config.json").read_text())
    assert "earlier_segments" not in cfg_full and "earlier_segments" not in json.loads(
        (part / man / "config.json").read_text()
    )
    (seg,) = cfg_part["earlier_segments"]
    assert (seg["from_round"], seg["to_round"]) == (0, 1) and seg["environment"] == cfg_full["environment"]
    assert seg["machine"] == cfg_full["machine"] and {k: v for k, v in cfg_part.items() if k != "earlier_segments"}

    # Carrying a grid across machines: a run stopped after round 2 of 3 (the finished 2-round folder read as a
    # 3-round run) is parked elsewhere with its newest checkpoint only, resumes there to the bits it reaches
    # where it stopped, and landing it finished removes the parked checkpoint.
    stopped, parked, resumed_here = tmp_path / "stopped", tmp_path / "parked", tmp_path / "here"
    shutil.copytree(full, stopped)
    for d in stopped.iterdir():
        if d.is_dir():
            cfg = json.loads((d / "config.json").read_text())
            cfg["settings"]["rounds"] = 3
            (d / "config.json").write_text(json.dumps(cfg))
    shutil.copytree(stopped, resumed_here)
    lines = grid.sync(stopped, parked)
    assert any(line.startswith(f"{name}: in flight, parked at checkpoint step 2") for line in lines)
    assert not (parked / man).exists()  # unfinished and nothing to resume from: not carried
    assert sorted(p.name for p in (parked / name / "ckpt").iterdir()) == ["2"]
    assert json.loads((parked / name / "status.json").read_text())["state"] == "parked"
    for f in (parked / name / "ckpt").rglob("*"):  # nothing of this machine's paths travels with it
        assert not f.is_file() or str(tmp_path).encode() not in f.read_bytes()
    assert grid.sync(stopped, parked) == []  # nothing newer
    g3 = _grid_file(tmp_path, 3)
    capsys.readouterr()
    for where in (parked, resumed_here):
        assert grid.main(["run", str(g3), "--out", str(where), "--no-reuse", "--only", "method=fedbpt"]) == 0
        assert "resuming after round 2" in capsys.readouterr().out
    assert _strip_seconds(json.loads((parked / name / "metrics.json").read_text())) == _strip_seconds(
        json.loads((resumed_here / name / "metrics.json").read_text())
    )
    assert [
        (g["from_round"], g["to_round"])
        for g in json.loads((parked / name / "config.json").read_text())["earlier_segments"]
    ] == [(0, 2)]
    committed, earlier = tmp_path / "committed", tmp_path / "earlier"
    shutil.copytree(stopped, earlier)  # the same run one checkpoint earlier: parked first, then replaced
    shutil.rmtree(earlier / name / "ckpt" / "2")
    assert any("parked at checkpoint step 1" in line for line in grid.sync(earlier, committed))
    assert any("parked at checkpoint step 2" in line for line in grid.sync(stopped, committed))
    assert sorted(p.name for p in (committed / name).iterdir() if p.name.startswith("ckpt")) == ["ckpt"]
    assert sorted(p.name for p in (committed / name / "ckpt").iterdir()) == ["2"]
    assert grid.sync(earlier, committed) == []  # an older checkpoint never replaces a newer one
    # A run resumed by code that predates earlier_segments lands with them added from the parked record, as
    # the run records them itself; a later sync finds nothing new.
    old_code, committed_old = tmp_path / "old_code", tmp_path / "committed_old"
    shutil.copytree(parked, old_code)
    shutil.copytree(committed, committed_old)
    record = json.loads((old_code / name / "config.json").read_text())
    segments = record.pop("earlier_segments")
    (old_code / name / "config.json").write_text(json.dumps(record))
    assert [line for line in grid.sync(old_code, committed_old) if line.startswith(name)] == [
        f"{name}: finished (round 3), results copied, checkpoint removed, rounds 1-2 recorded as earlier "
        "segments from the parked config.json"
    ]
    assert json.loads((committed_old / name / "config.json").read_text()) == record | {"earlier_segments": segments}
    assert grid.sync(old_code, committed_old) == []
    landed = [line for line in grid.sync(parked, committed) if line.startswith(name)]
    assert landed == [f"{name}: finished (round 3), results copied, checkpoint removed"]
    assert not (committed / name / "ckpt").exists()
    assert json.loads((committed / name / "status.json").read_text())["state"] == "finished"
    assert grid.sync(parked, committed) == []
    # A run finished in both whose files differ (here the committed record was amended) is said, never overwritten.
    amended = json.loads((committed / name / "config.json").read_text()) | {"note": "amended"}
    (committed / name / "config.json").write_text(json.dumps(amended))
    (line,) = grid.sync(parked, committed)
    assert line.startswith(f"{name}: finished in both (round 3 there) with different files, left alone")
    assert json.loads((committed / name / "config.json").read_text())["note"] == "amended"

    # The report: table, JSON with paired differences, plots.
    assert grid.main(["report", str(full)]) == 0
    rep = json.loads((full / "report" / "report.json").read_text())
    assert {g["label"] for g in rep["groups"]} == {"fedbpt", "manual"}
    assert all(g["final"]["n"] == 1 and g["precision"] == "float32" for g in rep["groups"])
    (pair,) = rep["pairs"]
    assert (pair["a"], pair["b"]) == ("fedbpt", "manual")
    assert pair["figures"]["final"]["per_seed"][0] == pytest.approx(
        a["evals"][-1]["accuracy"]
        - json.loads((full / [d.name for d in dirs if d.name != name][0] / "metrics.json").read_text())["evals"][-1][
            "accuracy"
        ]
    )
    md = (full / "report" / "report.md").read_text()
    assert "reference-compatibility (optimistic)" in md and "float32" in md and "| dev at selected |" in md
    fedbpt_row = next(line for line in md.splitlines() if line.startswith("| fedbpt |"))
    assert len(fedbpt_row.split("|")) == len(md.splitlines()[4].split("|"))  # every column filled
    # Per run: the final round's label shares and ‖z‖ as the run recorded them.
    per = {r["dir"]: r for r in rep["per_run"]}
    assert per[name]["final_pred_dist"] == pytest.approx(a["evals"][-1]["pred_dist"])
    assert per[name]["final_z_norm"] == pytest.approx(a["evals"][-1]["z_norm"])
    assert "## Per run: what became of the global prompt" in md
    assert (full / "report" / "accuracy_rounds.png").stat().st_size > 0
    assert (full / "report" / "accuracy_bars.png").stat().st_size > 0


def test_failed_run_is_recorded_and_the_grid_goes_on(tmp_path, capsys):
    text = BASE.replace(
        '{{ label = "manual", algorithm = "manual" }}',
        '{{ label = "bad", algorithm = "fedavg_bbt", algorithm_options = {{ no_such_option = true }} }}',
    ).replace('pairs = [["fedbpt", "manual"]]', 'pairs = [["fedbpt", "bad"]]')
    g = _grid_file(tmp_path, 1, text=text)
    out = tmp_path / "out"
    assert grid.main(["run", str(g), "--out", str(out), "--dry-run"]) == 0
    assert "would fail: algorithm 'fedavg_bbt' has no option 'no_such_option'" in capsys.readouterr().out
    assert not out.exists()
    assert grid.main(["run", str(g), "--out", str(out)]) == 1  # one failure, reported in the exit code
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "1 finished now" in printed
    bad = next(d for d in out.iterdir() if d.name.startswith("bad_"))
    st = json.loads((bad / "status.json").read_text())
    assert st["state"] == "failed" and "no_such_option" in st["error"] and "accepted" in st["error"]
    assert grid.main(["report", str(out)]) == 0
    assert "Not (yet) complete" in (out / "report" / "report.md").read_text()


@pytest.mark.parametrize(
    "text, message",
    [
        ("[base]\nrounds = [", "not valid TOML"),
        ("[base]\nno_such_key = 1\n", "unknown grid key 'no_such_key'"),
        ("[axes]\nno_such_axis = [1, 2]\n", "unknown grid key 'no_such_axis'"),
        ("[bases]\n", "unknown section [bases]"),
        ("[axes]\nalgorithm = ['fedbpt', 'fedsgd']\n", "unknown algorithm 'fedsgd'"),
        ("[base]\npartition = 'dirichlet'\n", "partition 'dirichlet'"),
        ("[base]\nperturb_rate = 0.0\n", "perturb = false"),
        ("[axes]\nserver_variant = ['reference', 'papr']\n", "unknown server_variant 'papr'"),
        ("[axes]\nseed = [0, 1]\n[report]\npairs = [['s0', 'manul']]\n", "names 'manul', not an axis label"),
    ],
)
def test_bad_grid_files_are_clear_errors(tmp_path, capsys, text, message):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    assert grid.main(["run", str(p), "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_bad_json_and_filters(tmp_path, capsys):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    assert grid.main(["run", str(p), "--dry-run"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    p.write_text(json.dumps({"axes": {"seed": [0, 1]}}))
    assert grid.main(["run", str(p), "--dry-run", "--only", "colour=red"]) == 2
    assert "unknown key 'colour'" in capsys.readouterr().err
    assert grid.main(["run", str(p), "--dry-run", "--only", "seed=1"]) == 0
    assert "2 runs, 1 selected" in capsys.readouterr().out


def test_report_figures_from_either_metrics_layout():
    """Today's metrics.json (best by test) and one with dev evaluations and run()'s own selection fields."""
    old = {
        "evals": [{"round": 0, "accuracy": 0.5}, {"round": 1, "accuracy": 0.7}, {"round": 2, "accuracy": 0.6}],
        "best_accuracy": 0.7,
        "best_round": 1,
    }
    f = report.run_figures(old)
    assert (f["initial"], f["final"], f["best_on_test"]) == (0.5, 0.6, 0.7) and "dev_selected" not in f
    new = {
        "evals": [
            {"round": 0, "accuracy": 0.5, "dev_accuracy": 0.6},
            {"round": 1, "accuracy": 0.7, "dev_accuracy": 0.6},  # tie on dev: the earlier round wins
            {"round": 2, "accuracy": 0.55, "dev_accuracy": float("nan")},
        ],
        "best_test_reference": 0.7,
    }
    f = report.run_figures(new)
    assert (f["final"], f["dev_selected"], f["dev_selected_round"], f["best_on_test"]) == (0.55, 0.5, 0, 0.7)
    assert f["dev_selected_dev"] == 0.6
    f = report.run_figures(
        {
            **new,
            "selection_rule": "dev accuracy, ties to the earliest round",
            "selected_round": 1,
            "selected_test_accuracy": 0.7,
        }
    )
    assert (f["dev_selected"], f["dev_selected_round"]) == (0.7, 1)  # run()'s own selection when it recorded one
    assert f["dev_selected_dev"] == 0.6


def test_paired_differences_p_values_and_the_power_effect():
    from scipy import stats as sst

    from fedbpt_jax import stats

    a = {0: 0.80, 1: 0.82, 2: 0.84}
    b = {0: 0.78, 1: 0.81, 2: 0.80, 3: 0.5}  # seed 3 has no partner: left out
    p = comparisons.paired(a, b)
    assert p["seeds"] == [0, 1, 2] and p["per_seed"] == pytest.approx([0.02, 0.01, 0.04])
    sd = float(__import__("numpy").std([0.02, 0.01, 0.04], ddof=1))
    assert p["std"] == pytest.approx(sd) and p["se"] == pytest.approx(sd / 3**0.5)
    assert p["ci95_halfwidth"] == pytest.approx(4.302653 * sd / 3**0.5, rel=1e-5)
    assert p["p"] == pytest.approx(sst.ttest_1samp([0.02, 0.01, 0.04], 0.0).pvalue)
    # 80 % power at n = 3 needs about 5.65 standard errors, not 2
    assert p["power80_effect"] == pytest.approx(5.6535 * sd / 3**0.5, rel=1e-3)
    stats.adjust([p])
    assert p["verdict"] == "inconclusive" and p["p_holm"] == p["p"]  # p = 0.10: a family of one
    q = comparisons.paired({0: 0.80, 1: 0.81, 2: 0.82}, {0: 0.78, 1: 0.789, 2: 0.798})
    r = comparisons.paired({0: 0.80, 1: 0.82, 2: 0.81}, {0: 0.78, 1: 0.807, 2: 0.783})  # diffs .02, .013, .027
    null = comparisons.paired({0: 0.80, 1: 0.82, 2: 0.81}, {0: 0.79, 1: 0.83, 2: 0.805})
    stats.adjust([q, r, null])
    assert q["p"] < 0.05 / 3 and q["verdict"] == "A > B"  # survives Holm's factor 3
    # p = 0.038: below 0.05 alone, not after Holm's factor 2 for the second smallest of three
    assert 0.025 < r["p"] < 0.05 and r["p_holm"] >= 0.05 and r["verdict"] == "A > B unadjusted only"
    assert null["verdict"] == "inconclusive"
    s = comparisons.paired({0: 0.8, 1: 0.7}, {0: 0.7, 1: 0.8})
    stats.adjust([s])
    assert s["verdict"] == "no difference"
    one = comparisons.paired({0: 0.8}, {0: 0.7})
    stats.adjust([one])
    assert one["verdict"] == "n/a (one seed)" and one["p_holm"] is None


def test_a_run_finished_in_another_grid_is_copied_not_recomputed(tmp_path, capsys):
    a, b = tmp_path / "grid_a", tmp_path / "grid_b"
    assert grid.main(["run", str(_grid_file(tmp_path, 1)), "--out", str(a)]) == 0
    fedbpt_a = next(a.glob("fedbpt_s0-*"))
    # Another grid whose FedBPT point has the same settings under another label, plus a new point.
    other = (
        BASE.replace('name = "tiny"', 'name = "tiny_b"')
        .replace(
            '[{{ label = "fedbpt", algorithm = "fedbpt" }}, {{ label = "manual", algorithm = "manual" }}]',
            '[{{ label = "rp0.5", algorithm = "fedbpt" }}, {{ label = "rp0", algorithm = "fedbpt", perturb = false }}]',
        )
        .replace('pairs = [["fedbpt", "manual"]]', 'pairs = [["rp0.5", "rp0"]]')
    )
    gb = _grid_file(tmp_path, 1, name="b.toml", text=other)
    capsys.readouterr()
    assert grid.main(["run", str(gb), "--out", str(b), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would copy the finished" in out and "rp0_s0-" in out
    assert ": run (1 rounds; time left unknown: no finished run like it here or beside)" in out
    assert not b.exists() or not list(b.glob("rp0.5_s0-*"))
    assert grid.main(["run", str(gb), "--out", str(b), "--dry-run", "--no-reuse"]) == 0
    assert "would copy" not in capsys.readouterr().out

    assert grid.main(["run", str(gb), "--out", str(b)]) == 0
    assert capsys.readouterr().out.count("copied the finished") == 1
    copied = next(b.glob("rp0.5_s0-*"))
    assert copied.name.split("-")[-1] == fedbpt_a.name.split("-")[-1]
    cfg = json.loads((copied / "config.json").read_text())
    assert cfg["grid"] == "tiny_b" and cfg["labels"]["method"] == "rp0.5"
    assert cfg["copied_from"].startswith(f"grid_a/{fedbpt_a.name}")
    for f in ("metrics.json", "status.json"):
        assert (copied / f).read_text() == (fedbpt_a / f).read_text()
    assert (copied / "ckpt").is_dir() and not list(b.glob("*.copying"))
    # The new point was computed, and the report groups both.
    assert json.loads((next(b.glob("rp0_s0-*")) / "status.json").read_text())["state"] == "finished"


def test_a_run_that_differs_only_in_a_setting_its_algorithm_ignores_is_copied(tmp_path, capsys):
    """Centralized BBT pools every client's examples and the manual prompt never trains: across partitions
    their runs are copied, and the copies equal runs computed from scratch (to float rounding of the summed
    training losses, whose order the partition sets): what makes copying them right."""
    text = (
        BASE.replace(
            "seed = [0]",
            'seed = [0]\nsplit = [{{ label = "noniid", partition = "dirichlet:1.0" }}, '
            '{{ label = "iid", partition = "iid" }}]',
        )
        .replace('{{ label = "fedbpt", algorithm = "fedbpt" }}', '{{ label = "cbbt", algorithm = "centralized_bbt" }}')
        .replace('pairs = [["fedbpt", "manual"]]', 'pairs = [["cbbt", "manual"]]')
    )
    g = _grid_file(tmp_path, 2, name="eq.toml", text=text)
    a, b = tmp_path / "grid_eq", tmp_path / "grid_fresh"
    capsys.readouterr()
    assert grid.main(["run", str(g), "--out", str(a)]) == 0
    out = capsys.readouterr().out
    assert out.count("copied the finished") == 2 and out.count(": finished in") == 2
    assert grid.main(["run", str(g), "--out", str(b), "--no-reuse"]) == 0
    for method in ("cbbt", "manual"):
        (copy,) = a.glob(f"iid_{method}_s0-*")
        (fresh,) = b.glob(f"iid_{method}_s0-*")
        assert copy.name == fresh.name  # the copy carries its own run id
        cfg = json.loads((copy / "config.json").read_text())
        assert cfg["settings"]["partition"] == "iid" and cfg["copied_settings"] == {"partition": "dirichlet:1.0"}
        assert cfg["copied_from"].startswith(f"grid_eq/noniid_{method}_s0-") and "does not read" in cfg["copied_from"]
        assert "train_counts" not in cfg["data"] and cfg["run_id"] == fresh.name.split("-")[-1]
        m_copy = _strip_seconds(json.loads((copy / "metrics.json").read_text()))
        m_fresh = _strip_seconds(json.loads((fresh / "metrics.json").read_text()))
        # The same evaluations; the training losses agree to float rounding (the pooled examples' order). The
        # cost figures are the source's: the pooled batch is padded to the partition's largest client.
        assert m_copy["evals"] == m_fresh["evals"]
        for rc, rf in zip(m_copy["rounds"], m_fresh["rounds"], strict=True):
            assert rc.keys() == rf.keys()
            for k in set(rc) - set(grid.PARTITION_COST_KEYS):
                if isinstance(rc[k], float):
                    assert rc[k] == pytest.approx(rf[k], rel=1e-5, abs=1e-7), k
                else:
                    assert rc[k] == rf[k], k
    # FedBPT reads the partition: nothing is copied across partitions for it.
    fed = text.replace('{{ label = "cbbt", algorithm = "centralized_bbt" }}, ', "").replace(
        '{{ label = "manual", algorithm = "manual" }}', '{{ label = "fedbpt", algorithm = "fedbpt" }}'
    )
    fed = fed.replace('pairs = [["cbbt", "manual"]]', "pairs = []")
    capsys.readouterr()
    assert (
        grid.main(["run", str(_grid_file(tmp_path, 2, name="fed.toml", text=fed)), "--out", str(a), "--dry-run"]) == 0
    )
    assert "would copy" not in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted((PATH.parent / "grids").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_grids_are_valid(path):
    """Every grid file in experiments/grids parses (report pairs naming declared labels included), expands
    to distinct runs, and its settings and algorithm options pass the checks a run makes."""
    g = grid.load_grid(path)
    runs = grid.expand(g)
    assert runs, path
    for r in runs:
        grid.check_settings(r["settings"])
        grid.algorithm_options(r["settings"]["algorithm"], r["settings"]["algorithm_options"])
        grid.identify(r)
    assert len({r["run_id"] for r in runs}) == len(runs), "two runs with the same settings"


def test_where_a_run_ran_is_named_with_its_precision():
    cfg = {"resolved": {"precision": "float32"}, "environment": {"backend": "cpu", "device": "cpu"}}
    assert comparisons.run_precision(cfg) == "float32"
    assert (
        comparisons.run_precision({"resolved": {"precision": "bfloat16"}}) == "bfloat16"
    )  # older runs: no environment
    gpu = {
        "resolved": {"precision": "float32"},
        "environment": {"backend": "gpu", "device": "NVIDIA H200", "matmul_precision": "highest"},
    }
    assert comparisons.run_precision(gpu) == "float32 (NVIDIA H200, matmul highest)"
    # Seeds of one configuration from two machines: the group names both.
    runs = [
        {
            "dir": f"r{i}",
            "grid": "g",
            "labels": {"method": "m", "seed": str(i)},
            "settings": {"seed": i, "x": 1},
            "dev_selection": True,
            "precision": p,
        }
        for i, p in enumerate(["float32", "float32 (NVIDIA H200, matmul highest)"])
    ]
    (g,) = comparisons.group_runs(runs)
    assert g["precision"] == "float32 + float32 (NVIDIA H200, matmul highest)"
    # A pair of configurations from two machines names both.
    runs[1]["labels"] = {"method": "n", "seed": "0"}
    runs[1]["settings"] = {"seed": 0, "x": 2}
    groups = comparisons.group_runs(runs)
    (pair,) = comparisons.pair_groups(groups, [["m", "n"]])
    assert pair["precision"] == "float32 + float32 (NVIDIA H200, matmul highest)"


def test_the_commit_comes_from_the_environment_where_git_cannot_tell(monkeypatch):
    import subprocess

    def no_repo(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 128, stdout="", stderr="fatal: not a git repository")

    monkeypatch.setattr(subprocess, "run", no_repo)
    monkeypatch.delenv("FEDBPT_JAX_COMMIT", raising=False)
    assert grid._read_commit() is None
    monkeypatch.setenv("FEDBPT_JAX_COMMIT", "0123abc")
    assert grid._read_commit() == "0123abc"

    def no_git(cmd, **kw):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert grid._read_commit() == "0123abc"


def test_runs_in_worker_processes_equal_runs_one_after_another(tmp_path, capsys):
    g = _grid_file(tmp_path, 2)
    serial, workers = tmp_path / "serial", tmp_path / "workers"
    assert grid.main(["run", str(g), "--out", str(serial)]) == 0
    capsys.readouterr()
    assert grid.main(["run", str(g), "--out", str(workers), "--jobs", "2", "--no-reuse"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("started in a worker process") == 2 and "2 finished now" in printed
    names = sorted(d.name for d in serial.iterdir() if d.is_dir())
    assert names == sorted(d.name for d in workers.iterdir() if d.is_dir())
    for n in names:
        a = json.loads((serial / n / "metrics.json").read_text())
        b = json.loads((workers / n / "metrics.json").read_text())
        assert _strip_seconds(a) == _strip_seconds(b)
    # One run by its folder name; unknown names and a worker count below 1 are errors naming the value.
    fedbpt = next(n for n in names if n.startswith("fedbpt_"))
    assert grid.main(["run", str(g), "--out", str(serial), "--run", fedbpt, "--dry-run"]) == 0
    assert "1 selected" in capsys.readouterr().out
    assert grid.main(["run", str(g), "--out", str(serial), "--run", "nope-123"]) == 2
    assert "--run nope-123: no such run" in capsys.readouterr().err
    assert grid.main(["run", str(g), "--out", str(serial), "--jobs", "0"]) == 2
    assert "--jobs 0: expected a positive number" in capsys.readouterr().err


def test_stop_after_rounds_and_restart_every_give_the_numbers_of_one_process(tmp_path, capfd):
    """``--stop-after-rounds`` stops a run at a checkpoint (state "stopped", not finished) and the next call
    resumes it; ``--restart-every`` runs each run in fresh processes of that many rounds until it is
    finished. Both give the uninterrupted run's numbers, bit for bit."""
    g, only = _grid_file(tmp_path, 3), ["--only", "method=fedbpt"]
    straight, stopped, restarted = tmp_path / "straight", tmp_path / "stopped", tmp_path / "restarted"
    assert grid.main(["run", str(g), "--out", str(straight), *only]) == 0
    (ref,) = straight.glob("fedbpt_s0-*")
    want = _strip_seconds(json.loads((ref / "metrics.json").read_text()))
    capfd.readouterr()

    assert grid.main(["run", str(g), "--out", str(stopped), "--no-reuse", "--stop-after-rounds", "2", *only]) == 0
    printed = capfd.readouterr().out
    assert "stopped after round 2 (--stop-after-rounds 2)" in printed and "1 stopped to resume later" in printed
    (run,) = stopped.glob("fedbpt_s0-*")
    assert json.loads((run / "status.json").read_text())["state"] == "stopped"
    assert [e["round"] for e in json.loads((run / "metrics.json").read_text())["evals"]] == [0, 1, 2]
    assert grid.main(["run", str(g), "--out", str(stopped), "--no-reuse", *only]) == 0
    assert "resuming after round 2" in capfd.readouterr().out
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert _strip_seconds(json.loads((run / "metrics.json").read_text())) == want

    assert grid.main(["run", str(g), "--out", str(restarted), "--no-reuse", "--restart-every", "2", *only]) == 0
    printed = capfd.readouterr().out
    assert "stopped after round 2; continuing in a fresh process (--restart-every 2)" in printed
    assert "resuming after round 2" in printed and "1 finished now" in printed
    (run,) = restarted.glob("fedbpt_s0-*")
    assert _strip_seconds(json.loads((run / "metrics.json").read_text())) == want
    cfg = json.loads((run / "config.json").read_text())
    assert [(x["from_round"], x["to_round"]) for x in cfg["earlier_segments"]] == [(0, 2)]

    for flag in ("--restart-every", "--stop-after-rounds"):
        assert grid.main(["run", str(g), "--out", str(restarted), flag, "0"]) == 2
        assert f"{flag} 0: expected a positive number of rounds" in capfd.readouterr().err


def test_runs_that_differ_only_in_seed_share_one_algorithm_object(tmp_path, monkeypatch, capsys):
    import fedbpt_jax as fb
    import fedbpt_jax.federated as fl

    made = []
    real = fl.make

    def counting(name, *a, **kw):
        made.append(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(fl, "make", counting)
    monkeypatch.setattr(fb, "make", counting)
    monkeypatch.setattr(grid, "CONTEXT", grid.Context())
    g = _grid_file(tmp_path, 1, text=BASE.replace("seed = [0]", "seed = [0, 1]"))
    assert grid.main(["run", str(g), "--out", str(tmp_path / "out")]) == 0
    assert "4 finished now" in capsys.readouterr().out
    # one object per configuration (FedBPT, the manual prompt), made once for both seeds: none made and discarded
    assert sorted(made) == ["fedbpt", "manual"]


def test_the_cpu_is_named_from_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t\t: fpu sse avx2 fma avx512_bf16 avx512f\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(info if p == "/proc/cpuinfo" else p, *a, **k))
    assert machine.cpu_model() == "Example CPU 9000"
    assert machine.cpu_flags() == "avx2 fma avx512f avx512_bf16"  # the relevant ones, in a fixed order
    info.write_text("processor\t: 0\n")
    assert machine.cpu_flags() == ""


def test_fed_config_table_reaches_fedconfig_and_names_bad_keys():
    base = dict(grid.SETTINGS, model="tiny")
    assert grid_spec.fed_config_extra(dict(base, fed_config={"server_ranking": "random", "norm_clip": True})) == {
        "server_ranking": "random",
        "norm_clip": True,
    }
    with pytest.raises(grid.GridError, match="'num_clients' is a grid setting"):
        grid_spec.fed_config_extra(dict(base, fed_config={"num_clients": 3}))
    with pytest.raises(grid.GridError, match="'bogus' is not a FedConfig field"):
        grid_spec.fed_config_extra(dict(base, fed_config={"bogus": 1}))
    with pytest.raises(grid.GridError, match="server_ranking 'best'"):
        grid.check_settings(dict(base, fed_config={"server_ranking": "best"}))
    # an empty table keeps the run ids of grids written before it; a non-empty one changes them
    assert grid.digest(base) == grid.digest({k: v for k, v in base.items() if k != "fed_config"})
    assert grid.digest(dict(base, fed_config={"server_ranking": "random"})) != grid.digest(base)


GOLDEN_IDS = json.loads((Path(__file__).parent / "golden" / "grid_run_ids.json").read_text())


@pytest.mark.parametrize("name", sorted(GOLDEN_IDS))
def test_run_ids_of_the_shipped_grids_never_change(name):
    """A run's folder name (labels and the hash of what it computes) is how a grid finds its finished and
    interrupted runs: every shipped grid file expands to the folders it had when this file was written, in the
    same order, whatever the driver's code becomes (a refactor that changed them would rerun finished grids)."""
    g = grid.load_grid(PATH.parent / "grids" / name)
    runs = grid.expand(g)
    for r in runs:
        grid.identify(r)
    assert [r["dirname"] for r in runs] == GOLDEN_IDS[name]


def test_committed_result_folders_are_found_by_their_grid_files():
    """Every committed run folder of a shipped grid is one its grid file expands to (same id, same name)."""
    results = PATH.parent / "results"
    stale = {"manual_s0-78b1e5c437"}  # sst2_noniid: a run of an earlier version of that grid file, kept
    checked = 0
    for name, dirnames in GOLDEN_IDS.items():
        gname = grid.load_grid(PATH.parent / "grids" / name)["name"]
        for cfg in sorted((results / f"grid_{gname}").glob("*/config.json")):
            if cfg.parent.name in stale:
                continue
            assert cfg.parent.name in dirnames, cfg.parent
            assert json.loads(cfg.read_text())["run_id"] == cfg.parent.name.rsplit("-", 1)[1]
            checked += 1
    assert checked >= 100


def test_every_simulate_option_is_a_grid_setting_or_spelled_by_the_grid():
    """The grid's settings are the run options: every option of ``fedbpt-jax simulate`` is a setting by the same
    name with the CLI's default, except the few a grid spells its own way or decides per run."""
    from fedbpt_jax.cli_options import options

    for o in options("simulate"):
        assert o.dest in grid.SETTINGS or o.dest in grid_spec.NOT_GRID_SETTINGS, o.dest
        if o.dest in grid_spec.ADDED_SETTINGS:
            assert grid.SETTINGS[o.dest] == o.default
    ns = grid.run_options(dict(grid.SETTINGS, partition="iid", server_variant="paper", test_size=None), "decoder")
    assert (ns.alpha, ns.server, ns.test_size, ns.layout) == (0.0, "paper", 0, grid_spec.GRID_LAYOUT)
    ns = grid.run_options(dict(grid.SETTINGS, partition="dirichlet:0.5", fed_config={"norm_clip": True}), "encoder")
    assert (ns.alpha, ns.norm_clip, ns.layout) == (0.5, True, None)


def test_options_that_came_with_the_cli_hash_only_away_from_their_default():
    base = dict(grid.SETTINGS, model="tiny")
    # a FedConfig field on its own is the same run as in the fed_config table
    assert grid.digest(dict(base, norm_clip=True)) == grid.digest(dict(base, fed_config={"norm_clip": True}))
    assert grid.digest(dict(base, norm_clip=True)) != grid.digest(base)
    assert grid.digest(dict(base, sampling="uniform")) == grid.digest(base)  # the default
    assert grid.digest(dict(base, template="Review: {text}")) != grid.digest(base)
    assert grid.digest(dict(base, eval_chunk=8, keep_clean_cache="off")) == grid.digest(base)  # no number changes
    with pytest.raises(grid.GridError, match="sigma_schedule is set twice"):
        grid.check_settings(dict(base, sigma_schedule="clamp", fed_config={"sigma_schedule": "none"}))
    with pytest.raises(grid.GridError, match="sampling"):
        grid.check_settings(dict(base, sampling="sometimes"))


def test_a_longer_grid_continues_a_shorter_grid_s_run_from_its_checkpoint(tmp_path, capsys):
    """Rounds are not in a run id: a grid that asks for more rounds than a run beside it reached copies that run,
    checkpoints included, and resumes it; the result is the uninterrupted run's, bit for bit."""
    short, long, straight = tmp_path / "g" / "short", tmp_path / "g" / "long", tmp_path / "straight"
    only = ["--only", "method=fedbpt"]
    assert grid.main(["run", str(_grid_file(tmp_path, 1)), "--out", str(short), *only]) == 0
    assert grid.main(["run", str(_grid_file(tmp_path, 2)), "--out", str(straight), "--no-reuse", *only]) == 0
    capsys.readouterr()
    g2 = _grid_file(tmp_path, 2)
    assert grid.main(["run", str(g2), "--out", str(long), "--dry-run", *only]) == 0
    assert "would continue" in capsys.readouterr().out and not long.exists()
    assert grid.main(["run", str(g2), "--out", str(long), *only]) == 0
    printed = capsys.readouterr().out
    assert "continuing" in printed and "(stopped at round 1)" in printed and "resuming after round 1" in printed
    (run,) = long.glob("fedbpt_s0-*")
    (ref,) = straight.glob("fedbpt_s0-*")
    assert run.name == ref.name
    ran = json.loads((run / "metrics.json").read_text())
    assert _strip_seconds(ran) == _strip_seconds(json.loads((ref / "metrics.json").read_text()))
    assert json.loads((run / "config.json").read_text())["settings"]["rounds"] == 2
    # the shorter grid's run is left as it was
    assert [
        e["round"] for e in json.loads((next(short.glob("fedbpt_s0-*")) / "metrics.json").read_text())["evals"]
    ] == [0, 1]


def test_one_label_in_two_grids_pools_and_is_shown_with_its_grid():
    """Across grids a method keeps its label (the pooled table matches on it; no '(dev)' suffix), the tables and
    plots name the grid; within one grid, configurations that differ only in dev selection are told apart."""

    def run(grid, method, seed, dev=True, acc=0.8):
        return {
            "dir": f"{grid}-{method}-{seed}-{dev}",
            "grid": grid,
            "labels": {"method": method, "seed": str(seed)},
            "settings": {"seed": seed, "task": grid, "algorithm": method},
            "dev_selection": dev,
            "precision": "float32",
            "final": acc,
        }

    runs = [
        run(g, m, s, acc=0.8 + 0.01 * s + (0.02 if m == "a" else 0)) for g in ("g1", "g2") for m in "ab" for s in (0, 1)
    ]
    groups = comparisons.group_runs(runs)
    assert sorted(g["label"] for g in groups) == ["a", "a", "b", "b"]
    assert sorted(g["display"] for g in groups) == ["a [g1]", "a [g2]", "b [g1]", "b [g2]"]
    pairs = comparisons.pair_groups(groups, [["a", "b"]])
    (pool,) = comparisons.pooled(pairs)
    assert (pool["a"], pool["b"]) == ("a", "b") and pool["figures"]["final"]["n"] == 4
    assert pool["grids"] == ["g1", "g2"]
    assert pool["figures"]["final"]["mean"] == pytest.approx(0.02)
    from fedbpt_jax import stats

    stats.adjust(comparisons.family(pairs))
    stats.adjust(comparisons.family([pool]))
    md = comparisons.markdown([], pairs, [], "t", [pool])
    assert "| g1 | a | b |" in md and "| g2 | a | b |" in md and "(dev)" not in md
    # One grid, the same method with and without a dev set: two configurations, told apart.
    one = comparisons.group_runs([run("g1", "a", 0), run("g1", "a", 0, dev=False)])
    assert sorted(g["display"] for g in one) == ["a (dev)", "a (no dev)"]
    # ... and where one grid has both, the label is told apart in every grid, so that like pools with like.
    groups = comparisons.group_runs([*runs, run("g1", "b", 0, dev=False), run("g1", "b", 1, dev=False)])
    assert sorted(g["display"] for g in groups) == [
        "a [g1]",
        "a [g2]",
        "b (dev) [g1]",
        "b (dev) [g2]",
        "b (no dev) [g1]",
    ]
    (pool,) = comparisons.pooled(comparisons.pair_groups(groups, [["a", "b"]]))
    assert (pool["a"], pool["b"]) == ("a", "b (dev)") and pool["figures"]["final"]["n"] == 4


def _grid_run(root, method, seed, shares, accs, grid_name="g"):
    """A grid run folder as ``grid.py run`` writes one: evaluations at rounds 0..len(accs)-1 with these test
    accuracies and largest one-label shares (two labels)."""
    d = root / f"{method}_s{seed}-x"
    d.mkdir(parents=True)
    rounds = len(accs) - 1
    cfg = {
        "grid": grid_name,
        "labels": {"method": method, "seed": f"s{seed}"},
        "settings": {"seed": seed, "rounds": rounds, "algorithm": method, "task": "sst2"},
        "resolved": {"dev_selection": False, "precision": "float32"},
    }
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "status.json").write_text(json.dumps({"state": "finished"}))
    evals = [{"round": r, "accuracy": a, "pred_dist": [s, 1 - s]} for r, (a, s) in enumerate(zip(accs, shares))]
    (d / "metrics.json").write_text(json.dumps({"rounds": [], "evals": evals}))
    return d


def test_declared_label_bias_pairs_and_the_late_collapse_reading(tmp_path):
    """A grid file's label_bias_pairs are tested on the final round's largest one-label share (their own Holm
    family) with the drift counts beside; its late_collapse rule reads each complete run; both only appear where
    declared, and a bad declaration is a clear error."""
    root = tmp_path / "grid_g"
    flat = [0.5] * 5
    for seed, drift in ((0, 0.97), (1, 0.90), (2, 0.88)):
        _grid_run(root, "fedbpt", seed, [0.5, 0.6, 0.7, 0.8, drift], [0.8, 0.8, 0.8, 0.75, 0.6])
        _grid_run(root, "fix", seed, flat[:-1] + [0.5 + 0.01 * seed], [0.8, 0.8, 0.81, 0.82, 0.83])
    meta = {
        "name": "g",
        "pairs": [["fix", "fedbpt"]],
        "label_bias_pairs": [["fix", "fedbpt"]],
        "late_collapse": {"after_round": 2, "share": 0.85, "accuracy_floor": 0.79},
        "declared": {"pairs": [["fix", "fedbpt"]], "label_bias_pairs": [["fix", "fedbpt"]]},
    }
    (root / "grid.json").write_text(json.dumps(meta))
    rep = comparisons.write_grid_report([root])
    (bias,) = rep["label_bias_pairs"]
    d = bias["figures"]["final_label_share"]
    assert d["per_seed"] == pytest.approx([0.5 - 0.97, 0.51 - 0.90, 0.52 - 0.88])
    assert d["p_holm"] == pytest.approx(d["p"]) and d["verdict"] == "A less biased"
    assert bias["drifted"] == {"a": [0, 3], "b": [3, 3]} and bias["declared"] == "yes"
    assert bias["figures"]["peak_label_share"]["mean"] == pytest.approx(d["mean"])
    late = {(r["label"], r["seed"]): r for r in rep["late_collapse"]["g"]["runs"]}
    assert late[("fedbpt", 0)]["collapses"] and late[("fedbpt", 0)]["why"] == ["one label", "below the floor"]
    assert late[("fedbpt", 0)]["first_round_at_share"] == 4 and late[("fedbpt", 0)]["peak_share_after"] == 0.97
    assert late[("fix", 1)]["collapses"] is False and late[("fix", 1)]["peak_round_after"] == 4
    md = (root / "report" / "report.md").read_text()
    assert "## Label bias (declared label-bias pairs)" in md and "| fix | fedbpt | 3 |" in md
    assert "## Late collapse (the declared reading)" in md and "collapses late (one label, below the floor)" in md
    # Not declared: neither section, and report.json has neither key (older grids' reports stay as they were).
    meta2 = {k: v for k, v in meta.items() if k not in ("label_bias_pairs", "late_collapse")}
    (root / "grid.json").write_text(json.dumps(meta2))
    rep = comparisons.write_grid_report([root])
    assert "label_bias_pairs" not in rep and "late_collapse" not in rep
    assert "Label bias" not in (root / "report" / "report.md").read_text()
    # A final evaluation without predictions has no final share; the reading ignores rounds up to after_round.
    assert comparisons.label_shares({"evals": [{"round": 0, "pred_dist": [0.6, 0.4]}, {"round": 1}]}) == {
        "final_label_share": None,
        "label_share_by_round": [[0, 0.6]],
    }


@pytest.mark.parametrize(
    "report_text, message",
    [
        ('label_bias_pairs = [["fedbpt", "nope"]]', "label_bias_pairs: ['fedbpt', 'nope'] names 'nope'"),
        ("late_collapse = { after_round = 15, share = 0.85 }", "a table with exactly the keys"),
        ("late_collapse = { after_round = -1, share = 0.85, accuracy_floor = 0.79 }", "after_round must be"),
        ("late_collapse = { after_round = 15, share = 85, accuracy_floor = 0.79 }", "share must be a fraction"),
        ("bias_pairs = []", "unknown key 'bias_pairs' in [report]; accepted: ['pairs', 'label_bias_pairs'"),
    ],
)
def test_bad_label_bias_declarations_are_clear_errors(tmp_path, capsys, report_text, message):
    g = _grid_file(tmp_path, 1, text=BASE + report_text.replace("{", "{{").replace("}", "}}") + "\n")
    assert grid.main(["run", str(g), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def _timed_run(folder: Path, method: str, seed: int, task: str, seconds: float, rounds=15, from_round=0, **extra):
    d = folder / f"{method}_s{seed}-{task}"
    d.mkdir(parents=True)
    settings = {"algorithm": method, "task": task, "seed": seed, "rounds": rounds, "layout": "before"}
    cfg = {"labels": {"method": method, "seed": f"s{seed}"}, "settings": settings, "environment": {"cpu": "CPU X"}}
    (d / "config.json").write_text(json.dumps({**cfg, **extra}))
    st = {"state": "finished", "seconds": seconds, "rounds": rounds, "from_round": from_round}
    (d / "status.json").write_text(json.dumps(st))
    return d


def test_dry_run_estimates_the_compute_left_from_runs_like_each(tmp_path):
    here, beside = tmp_path / "grid_mr", tmp_path / "grid_sst2"
    _timed_run(here, "fedbpt", 10, "mr", 15 * 300)
    _timed_run(here, "fedbpt", 11, "mr", 10 * 500, from_round=5)  # resumed: 10 rounds timed, 500 s each
    _timed_run(here, "manual", 10, "mr", 30)  # evaluation only: not in the ratio between grids
    _timed_run(here, "fedavg", 12, "mr", 1.0, copied_from="elsewhere")  # a copy: its time is not a measurement
    _timed_run(beside, "fedbpt", 10, "sst2", 15 * 200)
    _timed_run(beside, "manual", 10, "sst2", 15)
    _timed_run(beside, "fedavg", 10, "sst2", 15 * 100)

    def run(method, seed, rounds=15):
        labels = {"method": method, "seed": f"s{seed}"}
        settings = {"algorithm": method, "task": "mr", "seed": seed, "rounds": rounds, "layout": "before"}
        return {"labels": labels, "settings": settings, "dirname": f"{method}_s{seed}-new"}

    # The same configuration finished here: the median of its rounds' costs (300 and 500 s), rounds left.
    seconds, basis = grid.estimate_left(here, run("fedbpt", 12), last=5)
    assert seconds == pytest.approx(10 * 400) and "2 finished run(s) like it, 400 s a round, CPU X" in basis
    # Only beside: that grid's cost scaled by the two grids' ratio over the shared configurations (FedBPT:
    # 400 / 200; the manual prompt left out), naming the settings that differ.
    seconds, basis = grid.estimate_left(here, run("fedavg", 12), last=0)
    assert seconds == pytest.approx(15 * 100 * 2.0)
    assert "grid_sst2 (task differ)" in basis and "x 2.00" in basis and "1 configuration(s)" in basis
    # Nothing like it anywhere: unknown, said so; its own rounds so far when it has some.
    assert grid.estimate_left(here, run("fedprompt", 12), last=0) == (None, "no finished run like it here or beside")
    own = here / "fedprompt_s12-new"
    own.mkdir()
    (own / "rounds.csv").write_text("round,seconds\n1,90\n2,110\n3,100\n")
    seconds, basis = grid.estimate_left(here, run("fedprompt", 12), last=3)
    assert seconds == pytest.approx(12 * 100) and "its own 3 round(s)" in basis
    # The manual prompt runs again from round 0 (it keeps no checkpoint).
    assert grid.estimate_left(here, run("manual", 12), last=3)[0] == pytest.approx(15 * 2)
    assert grid._duration(59 * 60) == "59 min" and grid._duration(3 * 3600 + 5 * 60) == "3 h 05 min"
