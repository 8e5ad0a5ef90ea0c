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
    monkeypatch.setattr(fb.models, "load", lambda name: tiny_lm)
    rc = cli.main(["simulate", "--task", "sst2", "--clients", "4", "--per-round", "2", "--rounds", "2",
                   "--shots", "4", "--d", "8", "--n-prompt", "2", "--population", "4", "--local-generations", "2",
                   "--test-size", "24", "--no-progress", "--results-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert re.search(r"per round: \d+ model forward calls over local batches, [0-9.]+ TFLOP", out), out
    m = re.search(r"z=0: ([0-9.]+)\s+final \(round 2\): ([0-9.]+)\s+best: ([0-9.]+)", out)
    assert m, out
    z0, final, best = map(float, m.groups())
    assert best >= max(z0, final)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [e["round"] for e in metrics["evals"]] == [0, 1, 2]
    rows = (tmp_path / "rounds.csv").read_text().splitlines()
    assert rows[0].startswith("round,") and len(rows) == 3
    assert "bytes_up_per_client" in rows[0]


def test_cli_bbt_end_to_end(tiny_lm, monkeypatch, capsys):
    monkeypatch.setattr(fb.models, "load", lambda name: tiny_lm)
    rc = cli.main(["bbt", "--task", "sst2", "--shots", "4", "--d", "8", "--n-prompt", "2", "--population", "4",
                   "--generations", "4", "--eval-every", "2", "--test-size", "16", "--no-progress"])
    assert rc == 0
    assert re.search(r"z=0: [0-9.]+\s+BBT: [0-9.]+", capsys.readouterr().out)


def test_cli_bad_input_is_a_clear_error(capsys):
    rc = cli.main(["simulate", "--model", "no-such-model", "--no-progress"])
    assert rc == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


def test_readme_quickstart_runs(tiny_lm):
    """The README quickstart's calls, with the tiny model in place of SmolLM2."""
    lm = tiny_lm
    fed = fb.data.federated("sst2", lm.tokenizer, lm.kind, num_clients=4, shots_per_class=4, alpha=1.0,
                            n_prompt=2, test_size=16)
    cfg = fb.FedConfig(num_clients=4, clients_per_round=4, population_size=4, local_generations=2,
                       intrinsic_dim=8, n_prompt_tokens=2)
    algo = fb.fedbpt(cfg, lm)
    model = fb.ModelInputs.build(jax.random.key(0), lm, cfg)
    hp = fb.HParams(sigma0=1.0, perturb_rate=0.5)
    data = fb.FederatedData.from_host(fed)
    state = algo.init(jax.random.key(1), hp)
    state, metrics = jax.jit(algo.round)(jax.random.key(2), state, data, hp, model)
    assert int(state.round) == 1 and np.isfinite(float(metrics["client_loss"]))
    carry, history = fb.run(algo, jax.random.key(1), data, fed.test, lm, model, hp=hp,
                            num_rounds=2, progress=False)
    assert len(history.rounds) == 2 and np.isfinite(history.rounds[-1]["client_loss"])
    assert int(carry.rounds_done) == 2


def test_experiment_script_runs_on_a_tiny_config(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "compare_algorithms.py"
    spec = importlib.util.spec_from_file_location("compare_algorithms", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--tiny", "--algorithms", "manual,fedbpt", "--splits", "noniid", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["results"]) == {"manual/noniid", "fedbpt/noniid"}
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
