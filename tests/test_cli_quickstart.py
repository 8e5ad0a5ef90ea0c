"""End-to-end use as a user would: the CLI's two commands and the README quickstart, on a tiny model
(the real-weights path is the integration tests' and the README main command's job)."""

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

import fedbpt_jax as fb
from fedbpt_jax import cli, testing
from tokenizers_util import chatml_tokenizer


@pytest.fixture(scope="module")
def tiny_lm():
    return testing.tiny_decoder(0, num_layers=1, tokenizer=chatml_tokenizer())


def test_cli_simulate_end_to_end(tiny_lm, monkeypatch, tmp_path, capsys):
    asked = {}
    monkeypatch.setattr(fb.models, "load", lambda name, **kw: asked.update(kw) or tiny_lm)
    rc = cli.main(
        [
            "simulate",
            "--task",
            "rotten_tomatoes",
            "--clients",
            "4",
            "--per-round",
            "2",
            "--rounds",
            "2",
            "--compute-dtype",
            "float32",
            "--shots",
            "4",
            "--d",
            "8",
            "--n-prompt",
            "2",
            "--population",
            "4",
            "--local-generations",
            "2",
            "--test-size",
            "24",
            "--no-progress",
            "--results-dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and asked == {"compute_dtype": "float32"}
    assert re.search(r"per round: \d+ model forward calls over local batches, [0-9.]+ TFLOP", out), out
    m = re.search(
        r"bare template \(no prompt tokens\): ([0-9.]+)\s+"
        r"manual prompt \(z=0, the prompt start\): ([0-9.]+)\s+final \(round 2\): ([0-9.]+)\s+"
        r"dev-selected \(round (\d), dev ([0-9.]+)\): ([0-9.]+)",
        out,
    )
    assert m, out
    manual, z0, final, sel_round, sel_dev, sel_test = map(float, m.groups())
    ref = re.search(
        r"reference-compatibility figure \(best test accuracy over rounds, selected on test: optimistic\): "
        r"([0-9.]+) \(round (\d)\)",
        out,
    )
    assert ref, out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    evals = metrics["evals"]
    assert [e["round"] for e in evals] == [0, 1, 2]
    # The dev-selected round is the first with the highest dev accuracy; its test accuracy is what is printed.
    dev = [e["dev_accuracy"] for e in evals]
    assert sel_round == int(np.argmax(dev)) and metrics["selected_round"] == sel_round
    assert sel_test == pytest.approx(evals[int(sel_round)]["accuracy"], abs=1e-4)
    assert sel_dev == pytest.approx(max(dev), abs=1e-4)
    assert final == pytest.approx(evals[-1]["accuracy"], abs=1e-4) and z0 == pytest.approx(
        evals[0]["accuracy"], abs=1e-4
    )
    assert float(ref.group(1)) == pytest.approx(max(e["accuracy"] for e in evals), abs=1e-4)
    assert metrics["best_test_reference"] == pytest.approx(float(ref.group(1)), abs=1e-4)
    assert 0.0 <= manual <= 1.0
    rows = (tmp_path / "rounds.csv").read_text().splitlines()
    assert rows[0].startswith("round,") and len(rows) == 3
    assert (
        "bytes_up_per_client" in rows[0] and "single_class_clients" in rows[0] and "clients" not in rows[0].split(",")
    )
    assert len(metrics["rounds"][0]["clients"]) == 2


SMALL = [
    "--task",
    "rotten_tomatoes",
    "--clients",
    "4",
    "--rounds",
    "2",
    "--shots",
    "4",
    "--d",
    "8",
    "--n-prompt",
    "2",
    "--population",
    "4",
    "--local-generations",
    "2",
    "--test-size",
    "16",
    "--no-progress",
]


def test_cli_baseline_and_stabiliser_flags(tiny_lm, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(fb.models, "load", lambda name, **kw: tiny_lm)
    rc = cli.main(
        [
            "simulate",
            *SMALL,
            "--algorithm",
            "fedavg_bbt",
            "--fedavg-perturb",
            "--norm-clip",
            "--sigma-schedule",
            "clamp",
            "--save-uploads",
            str(tmp_path / "up"),
            "--results-dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "fedavg_bbt_perturbed:" in out, out
    rows = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert [r["norm_threshold"] for r in rows] == [16.0, 17.0]  # 15, +1 per round while ‖z‖ < 20
    assert all(r["sigma"] <= 1.0 for r in rows) and all(r["perturbed_loss_mean"] > 0 for r in rows)
    u = fb.load_uploads(tmp_path / "up")
    assert u["mean"].shape == (2, 4, 8)


def test_cli_eval_cache_budget_reaches_the_run(tiny_lm, monkeypatch, capsys):
    """--eval-cache-gb is run's eval_cache_budget: at 0 the test and dev prefix caches cannot fit, and the run
    says so (and still evaluates, recomputing the text); at the default 2 GiB the tiny sets fit, no warning."""
    import warnings

    monkeypatch.setattr(fb.models, "load", lambda name, **kw: tiny_lm)
    with pytest.warns(UserWarning, match=r"prefix caches need [0-9.]+ GiB, more than eval_cache_budget \(0.00 GiB\)"):
        assert cli.main(["simulate", *SMALL, "--layout", "after", "--rounds", "1", "--eval-cache-gb", "0"]) == 0
    with warnings.catch_warnings():  # the prefix caches are layout "after"'s (the default layout has none)
        warnings.filterwarnings("error", message=".*eval_cache_budget")
        assert cli.main(["simulate", *SMALL, "--layout", "after", "--rounds", "1"]) == 0
        assert cli.main(["simulate", *SMALL, "--rounds", "1", "--eval-cache-gb", "0"]) == 0
    assert "final (round 1)" in capsys.readouterr().out


def test_cli_tunes_fedprompt_learning_rate_on_dev(tiny_lm, monkeypatch, capsys):
    monkeypatch.setattr(fb.models, "load", lambda name, **kw: tiny_lm)
    rc = cli.main(["simulate", *SMALL, "--algorithm", "fedprompt", "--tune-lr", "--lr-grid", "0.001,0.1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    m = re.search(r"learning rate on dev: 0.001: ([0-9.]+)  0.1: ([0-9.]+)  -> ([0-9.]+)", out)
    assert m, out
    a, b, picked = map(float, m.groups())
    assert picked == (0.001 if a >= b else 0.1)
    assert cli.main(["simulate", *SMALL, "--tune-lr"]) == 2
    assert "--tune-lr picks FedPrompt's learning rate" in capsys.readouterr().err


def test_cli_bbt_end_to_end(tiny_lm, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(fb.models, "load", lambda name, **kw: tiny_lm)
    from fedbpt_jax import bbt

    # a run that fails leaves no config.json describing results that were never written
    real_tune = bbt.tune
    monkeypatch.setattr(bbt, "tune", lambda *a, **k: (_ for _ in ()).throw(ValueError("tune failed")))
    short = ["bbt", "--task", "rotten_tomatoes", "--shots", "4", "--d", "8", "--n-prompt", "2", "--no-progress"]
    assert cli.main([*short, "--results-dir", str(tmp_path / "failed")]) == 2
    assert "tune failed" in capsys.readouterr().err and not (tmp_path / "failed" / "config.json").exists()
    monkeypatch.setattr(bbt, "tune", real_tune)
    rc = cli.main(
        [
            "bbt",
            "--results-dir",
            str(tmp_path / "done"),
            "--task",
            "rotten_tomatoes",
            "--shots",
            "4",
            "--d",
            "8",
            "--n-prompt",
            "2",
            "--population",
            "4",
            "--generations",
            "4",
            "--eval-every",
            "2",
            "--test-size",
            "16",
            "--no-progress",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert re.search(
        r"bare template \(no prompt tokens\): [0-9.]+\s+manual prompt \(z=0\): [0-9.]+\s+"
        r"final \(generation 4\): [0-9.]+\s+"
        r"BBT dev-selected \(generation [24], dev [0-9.]+\): [0-9.]+",
        out,
    ), out
    written = json.loads((tmp_path / "done" / "bbt.json").read_text())
    assert written["selected_generation"] in (2, 4)
    assert json.loads((tmp_path / "done" / "config.json").read_text())["resolved"]["bbt_config"]["num_generations"] == 4


def test_cli_bad_input_is_a_clear_error(capsys):
    rc = cli.main(["simulate", "--model", "no-such-model", "--no-progress"])
    assert rc == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["simulate", "--sigma0", "1e30"], r"sigma0 must be a finite value in \[1e-06, 1000\], got 1e\+30"),
        (["simulate", "--sigma0", "inf"], r"sigma0 must be a finite value in \[1e-06, 1000\], got inf"),
        (["simulate", "--sigma0", "1e-30"], r"sigma0 must be a finite value in \[1e-06, 1000\], got 1e-30"),
        (["simulate", "--perturb-rate", "nan"], r"perturb_rate must be a finite value in \[0, 1\], got nan"),
        (["bbt", "--sigma0", "1e20"], r"sigma0 must be a finite value in \[1e-06, 1000\], got 1e\+20"),
    ],
)
def test_cli_absurd_hyperparameters_fail_before_running(argv, match, capsys, monkeypatch):
    def no_load(name, **kw):
        raise AssertionError("the model must not be loaded for a bad hyperparameter")

    monkeypatch.setattr(fb.models, "load", no_load)
    assert cli.main([*argv, "--no-progress"]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_readme_quickstart_runs(tiny_lm):
    """The README quickstart's calls, with the tiny model in place of SmolLM2."""
    lm = tiny_lm
    fed = fb.data.federated(
        "rotten_tomatoes", lm.tokenizer, lm.kind, num_clients=4, shots_per_class=4, alpha=1.0, n_prompt=2, test_size=16
    )
    cfg = fb.FedConfig(
        num_clients=4, clients_per_round=4, population_size=4, local_generations=2, intrinsic_dim=8, n_prompt_tokens=2
    )
    algo = fb.fedbpt(cfg, lm)
    model = fb.ModelInputs.build(jax.random.key(0), lm, cfg)
    hp = fb.HParams(sigma0=1.0, perturb_rate=0.5)
    data = fb.FederatedData.from_host(fed)
    state = algo.init(jax.random.key(1), hp)
    state, metrics = jax.jit(algo.round)(jax.random.key(2), state, data, hp, model)
    assert int(state.round) == 1 and np.isfinite(float(metrics["client_loss"]))
    carry, history = fb.run(
        algo, jax.random.key(1), data, fed.test, lm, model, hp=hp, dev=fed.dev, num_rounds=2, progress=False
    )
    assert len(history.rounds) == 2 and np.isfinite(history.rounds[-1]["client_loss"])
    assert int(carry.rounds_done) == 2
    s = fb.summarize(history, carry)
    assert s["selected_round"] in (0, 1, 2) and s["final_round"] == 2


def test_experiment_script_runs_on_a_tiny_config(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "compare_algorithms.py"
    spec = importlib.util.spec_from_file_location("compare_algorithms", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (
        mod.main(
            [
                "--tiny",
                "--task",
                "rotten_tomatoes",
                "--algorithms",
                "manual,fedbpt",
                "--splits",
                "noniid",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["results"]) == {"manual/noniid", "fedbpt/noniid"}
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
