"""Sweeps of seeds × hyperparameters as one compiled program: each lane equals the unbatched ``run``, one
compilation per lane count, dev selection never picks a non-finite evaluation, results files and table,
the bad inputs, lanes sharded over two (forced CPU) devices, and the ``sweep`` command's parser."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import federated_setup as fs
from fedbpt_jax import checkpoint, prompt, testing
from fedbpt_jax import federated as fl

# d = 32: lanes and runs agree to ~1e-7 over these 4 rounds (measured). With d = 8 they drift apart from
# round 2 on (client losses 1e-4 relative, then other accuracies): the batched program rounds differently
# and CMA-ES's ranking amplifies it, as the sharded-vs-single-device tests also see (federated_setup.D_A).
ROUNDS, EVERY, D = 4, 2, 32


@functools.lru_cache(maxsize=None)
def algo():
    cfg = fl.FedConfig(
        num_clients=4, clients_per_round=2, population_size=4, local_generations=2, intrinsic_dim=D, n_prompt_tokens=2
    )
    return fl.fedbpt(cfg, fs.tiny_lm())


@functools.lru_cache(maxsize=None)
def data():
    return fs.make_data(4)


@functools.lru_cache(maxsize=None)
def model():
    lm = fs.tiny_lm()
    a = prompt.make_projection(jax.random.key(1), lm.input_embeddings(), intrinsic_dim=D, n_prompt_tokens=2)
    return fl.ModelInputs(lm.params, a)


@functools.lru_cache(maxsize=None)
def dev_set():
    t = testing.random_batch(2, 12, fs.SEQ, fs.VOCAB - 1)
    pid = fs.poison_id()
    return t.replace(input_ids=np.where(t.input_ids == pid, pid - 1, t.input_ids))


def do_sweep(seeds, hp=None, **kw):
    kw = {"num_rounds": ROUNDS, "eval_every": EVERY, "dev": dev_set(), "eval_chunk": 16, **kw}
    return fl.sweep(algo(), data(), fs.test_set(), fs.tiny_lm(), kw.pop("model", model()), seeds=seeds, hp=hp, **kw)


@functools.lru_cache(maxsize=None)
def sweep_2x2():
    """2 seeds × 2 points (zipped), L = 4 lanes."""
    # (perturb_rate 0 would make every fitness clean/perturbed = 1 up to rounding: a rounding-decided search)
    return do_sweep([0, 1], {"sigma0": [0.5, 1.0], "perturb_rate": [0.3, 0.6]})


def test_each_lane_equals_the_unbatched_run():
    res = sweep_2x2()
    assert [(r["seed"], r["hparams"]["sigma0"], r["hparams"]["perturb_rate"]) for r in res.lanes] == [
        (0, 0.5, 0.3),
        (1, 0.5, 0.3),
        (0, 1.0, 0.6),
        (1, 1.0, 0.6),
    ]
    assert res.eval_rounds == [0, 2, 4] and res.swept == ["sigma0", "perturb_rate"]
    for lane in res.lanes:
        hp = fl.HParams(**lane["hparams"])
        carry, hist = fl.run(
            algo(),
            jax.random.key(lane["seed"]),
            data(),
            fs.test_set(),
            fs.tiny_lm(),
            model(),
            num_rounds=ROUNDS,
            eval_every=EVERY,
            hp=hp,
            dev=dev_set(),
            eval_chunk=16,
            progress=False,
            log_clients=False,
        )
        s = fl.summarize(hist, carry)
        np.testing.assert_allclose(lane["test_accuracy"], [e["accuracy"] for e in hist.evals], atol=1e-6)
        np.testing.assert_allclose(lane["dev_accuracy"], [e["dev_accuracy"] for e in hist.evals], atol=1e-6)
        np.testing.assert_allclose(lane["test_loss"], [e["loss"] for e in hist.evals], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(lane["z_norm"], [e["z_norm"] for e in hist.evals], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(lane["rounds"]["sigma"], [r["sigma"] for r in hist.rounds], rtol=1e-4)
        np.testing.assert_allclose(
            lane["rounds"]["client_loss"], [r["client_loss"] for r in hist.rounds], rtol=1e-4, atol=1e-5
        )
        assert lane["selected_round"] == s["selected_round"]
        assert lane["selected_test_accuracy"] == pytest.approx(s["selected_test_accuracy"], abs=1e-6)
        assert lane["selected_dev_accuracy"] == pytest.approx(s["selected_dev_accuracy"], abs=1e-6)
        assert lane["final_test_accuracy"] == pytest.approx(s["final_test_accuracy"], abs=1e-6)
        assert lane["best_test_reference"] == pytest.approx(s["best_test_reference"], abs=1e-6)
        assert lane["nonfinite_evals"] == s["nonfinite_evals"] == 0
        i = lane["lane"]
        np.testing.assert_allclose(
            res.carry.state.server.mean[i], np.asarray(carry.state.server.mean), rtol=1e-4, atol=1e-4
        )
        assert res.carry.state.server.std[i] == pytest.approx(float(carry.state.server.std), rel=1e-4)
    # the two points really differ (σ₀ reaches the lanes): their first-round σ differ
    assert res.lanes[0]["rounds"]["sigma"][0] != res.lanes[2]["rounds"]["sigma"][0]


def test_summary_is_mean_and_std_over_seeds_and_results_round_trip(tmp_path):
    res = sweep_2x2()
    assert [s["hparams"] for s in res.summary] == [
        {"sigma0": 0.5, "perturb_rate": 0.3},
        {"sigma0": 1.0, "perturb_rate": 0.6},
    ]
    for s in res.summary:
        vals = [r["selected_test_accuracy"] for r in res.lanes if r["point"] == s["point"]]
        assert s["selected_test_accuracy"]["n"] == 2 and s["seeds"] == [0, 1]
        assert s["selected_test_accuracy"]["mean"] == pytest.approx(np.mean(vals))
        assert s["selected_test_accuracy"]["std"] == pytest.approx(np.std(vals, ddof=1))
    table = res.markdown()
    assert table.splitlines()[0].startswith("| sigma0 | perturb_rate | seeds | final test acc |")
    assert len(table.splitlines()) == 2 + 2 and "| 0.5 | 0.3 | 2 |" in table
    path = res.write(tmp_path / "out" / "sweep.json")
    back = checkpoint.read_json(path)
    assert back == json.loads(res.to_json()) and back["kind"] == "sweep" and len(back["lanes"]) == 4
    assert back["lanes"][3]["rounds"]["sigma"] == pytest.approx(res.lanes[3]["rounds"]["sigma"])
    assert [p.name for p in path.parent.iterdir()] == ["sweep.json"]  # no temporary file left
    assert res.lane(1, sigma0=1.0)["lane"] == 3
    with pytest.raises(KeyError, match="no lane with seed 7"):
        res.lane(7)


def test_one_compilation_per_lane_count():
    """The same lane count with other seeds, other values or another S × H split reuses the compiled
    program; a new lane count compiles exactly once more."""
    sweep_2x2()  # L = 4 compiled
    with testing.count_compiles() as same:
        do_sweep([3, 4], {"sigma0": [0.7, 2.0], "dropout_rate": [0.0, 0.5]})  # other seeds, fields, values
        do_sweep([5], {"sigma0": [0.5, 1.0], "perturb_rate": [0.1, 0.9]}, grid=True)  # S = 1, H = 4 (grid)
        do_sweep([0, 1, 2, 3])  # S = 4, H = 1
    assert not same.traces and not same.compiles, (same.traces, same.compiles)
    with testing.count_compiles() as other:
        res = do_sweep([0, 1, 2], {"sigma0": [1.0]})  # L = 3: once more
        do_sweep([4, 5, 6], {"sigma0": [0.5]})
    assert other.traces["sweep/fedbpt"] == 1 and other.compiles["sweep/fedbpt"] == 1, (other.traces, other.compiles)
    assert not other.traces["fedbpt"]  # run()'s own counters are left alone
    assert len(res.lanes) == 3 and [s["selected_test_accuracy"]["n"] for s in res.summary] == [3]


def test_dev_selection_never_picks_a_nonfinite_evaluation():
    """A dev set whose every example holds a token with a NaN embedding: every evaluation's dev accuracy is
    NaN, nothing is ever selected, the test curve stays finite, and the summary counts no value."""
    lm, pid = fs.tiny_lm(), fs.poison_id()
    emb = lm.input_embeddings()
    params = jax.tree_util.tree_map(lambda x: x.at[pid].set(jnp.nan) if x is emb else x, lm.params)
    poisoned = model().replace(params=params)
    dev = dev_set()
    ids = np.asarray(dev.input_ids).copy()
    ids[:, -1] = pid
    res = do_sweep([0, 1], {"sigma0": [0.5, 1.0]}, dev=dev.replace(input_ids=ids), model=poisoned)
    for lane in res.lanes:
        assert all(np.isnan(lane["dev_accuracy"])) and all(np.isfinite(lane["test_accuracy"]))
        assert lane["selected_round"] is None and lane["selected_test_accuracy"] is None
        assert lane["nonfinite_evals"] == len(res.eval_rounds)
    assert all(s["selected_test_accuracy"]["n"] == 0 for s in res.summary)
    assert "n/a" in res.markdown()
    assert '"nan"' in res.to_json()  # NaN kept, strict JSON


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(seeds=[]), "seeds is empty"),
        (dict(seeds=[0, 0]), r"distinct.*\[0\]"),
        (dict(seeds=[0.5]), "seeds must be integers, got 0.5"),
        (dict(seeds=[0, 2**32]), r"seed 4294967296 is outside 0\.\.4294967295 .*would repeat seed 0"),
        (dict(seeds=[-1]), r"seed -1 is outside 0\.\.4294967295"),
        (dict(seeds="01"), "list of integers"),
        (dict(hp={"sigma": [1.0]}), r"unknown hyperparameter\(s\) \['sigma'\]; accepted: \['sigma0'"),
        (
            dict(hp={"sigma0": [0.5, 1.0], "perturb_rate": [0.1, 0.2, 0.3]}),
            r"different lengths \(sigma0: 2, perturb_rate: 3\).*grid=True",
        ),
        (dict(hp={"sigma0": []}), "'sigma0' has an empty list"),
        (dict(hp={"sigma0": ["big"]}), "'big' is not a number"),
        (dict(hp={"sigma0": [1.0, 1e30]}), r"point 1 \{'sigma0': 1e\+30\}: sigma0 must be a finite value in"),
        (dict(hp={"perturb_rate": [0.5, 0.5]}), "given twice"),
        (dict(num_rounds=3), "multiple of eval_every"),
        (dict(eval_every=0), "eval_every must be a positive integer, got 0"),
    ],
)
def test_bad_input_is_refused_before_compiling(kw, match):
    kw = {"seeds": [0], **kw}
    with testing.count_compiles() as counts, pytest.raises(ValueError, match=match):
        do_sweep(**kw)
    assert not counts.traces


@pytest.mark.parametrize(
    "name", ["fedbpt", "fedavg_bbt", "fedavg_bbt_perturbed", "centralized_bbt", "manual", "fedprompt"]
)
def test_each_algorithm_declares_the_hyperparameters_its_round_reads(name):
    """A round from init with each field changed alone equals the unchanged round exactly where the
    algorithm declares it does not read that field (so a sweep over it is refused, and over the others not)."""
    a = fl.make(name, algo().config, fs.tiny_lm())
    assert a.spec.hparams == fl.hparams_read(name, algo().config)
    base = fl.HParams(sigma0=1.0, perturb_rate=0.5, dropout_rate=0.0, learning_rate=0.3)
    other = {"sigma0": 0.5, "perturb_rate": 0.2, "dropout_rate": 1.0, "learning_rate": 0.01}
    key, d, m = jax.random.key(3), data(), model()
    step = jax.jit(lambda hp: a.round(key, a.init(key, hp), d, hp, m))
    ref = jax.tree_util.tree_leaves(step(base.validate()))
    reads = []
    for field, value in other.items():
        out = jax.tree_util.tree_leaves(step(base.replace(**{field: value}).validate()))
        if not all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True) for x, y in zip(ref, out)):
            reads.append(field)
    assert tuple(reads) == a.spec.hparams
    unread = [f for f in other if f not in reads]
    if unread:
        with pytest.raises(ValueError, match=f"{unread[0]}: {a.name} never reads it"):
            fl.sweep(
                a, data(), fs.test_set(), fs.tiny_lm(), model(), seeds=[0], num_rounds=2, hp={unread[0]: [0.1, 0.2]}
            )


def test_memory_floor_counts_the_inputs_and_the_largest_product():
    from fedbpt_jax.federated.lanes import memory_floor

    def f(x, y):
        return jax.lax.scan(lambda c, _: (c @ y, None), x, None, length=3)[0].sum()

    traced = jax.jit(f).trace(jnp.ones((4, 8)), jnp.ones((8, 8)))
    assert memory_floor(traced.jaxpr) == ((32 + 64) * 4, 32 * 4)  # the product inside the scan is found


def test_a_sweep_larger_than_memory_is_refused_before_compiling(monkeypatch):
    from fedbpt_jax.federated import lanes as sweep_mod

    monkeypatch.setattr(sweep_mod, "available_memory", lambda device=None: 1000)
    with testing.count_compiles() as counts, pytest.raises(ValueError) as err:
        do_sweep([0, 1, 2], {"sigma0": [0.5, 1.0]})
    msg = str(err.value)
    assert "a sweep of 6 lanes needs at least" in msg and "0.0 GiB are available" in msg, msg
    assert "accepted: at most about 0 lanes" in msg and "\n" not in msg
    assert not counts.compiles
    # the floor is a floor: it never refuses what fits (the 2x2 sweep above ran on this machine)
    monkeypatch.undo()
    assert sweep_mod.available_memory() > 0


def test_bad_mesh_and_data_are_refused():
    with pytest.raises(ValueError, match="axis named 'lanes'"):
        do_sweep([0], mesh=fl.client_mesh())
    with pytest.raises(ValueError, match="built with a client mesh"):
        fl.sweep(
            fl.fedbpt(algo().config, fs.tiny_lm(), mesh=fl.client_mesh()),
            data(),
            fs.test_set(),
            fs.tiny_lm(),
            model(),
            seeds=[0],
            num_rounds=2,
        )
    with pytest.raises(ValueError, match="data holds 10 clients but the config says num_clients=4"):
        fl.sweep(algo(), fs.make_data(10), fs.test_set(), fs.tiny_lm(), model(), seeds=[0], num_rounds=2)


def test_grid_is_the_cartesian_product():
    points = fl.hp_points({"sigma0": [0.5, 1.0], "perturb_rate": [0.0, 0.25, 0.5]}, grid=True)
    assert [(p["sigma0"], p["perturb_rate"]) for p in points] == [
        (0.5, 0.0),
        (0.5, 0.25),
        (0.5, 0.5),
        (1.0, 0.0),
        (1.0, 0.25),
        (1.0, 0.5),
    ]
    assert all(p["dropout_rate"] == 0.0 and p["learning_rate"] == pytest.approx(0.3) for p in points)
    base = fl.hp_points(None, base=fl.HParams(sigma0=2.0))
    assert len(base) == 1 and base[0]["sigma0"] == 2.0


_SHARDED = """
import os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, {tests!r})
import fedbpt_jax, jax, numpy as np
import test_sweep as t
from fedbpt_jax import federated as fl
assert len(jax.devices()) == 2
hp = {{"sigma0": [0.5, 1.0, 2.0]}}
one = t.do_sweep([0], hp)
two = t.do_sweep([0], hp, mesh=fl.lane_mesh())      # 3 lanes over 2 devices: padded to 4
print(json.dumps({{"one": [l["test_accuracy"] for l in one.lanes], "two": [l["test_accuracy"] for l in two.lanes],
                  "mean_one": one.carry.state.server.mean.tolist(), "mean_two": two.carry.state.server.mean.tolist()}}))
"""


def test_lanes_sharded_over_two_devices_match_one_device():
    code = _SHARDED.format(tests=str(Path(__file__).parent))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["two"]) == 3
    np.testing.assert_allclose(out["two"], out["one"], atol=1e-6)
    np.testing.assert_allclose(out["mean_two"], out["mean_one"], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# The command (fedbpt_jax.sweep_cli: main(argv) without the word "sweep")
# ------------------------------------------------------------------------------------------------
def test_cli_hp_parsing():
    from fedbpt_jax import cli, sweep_cli

    assert sweep_cli.parse_hp(["sigma0=0.5,1.0", "perturb-rate=0.3"]) == {"sigma0": [0.5, 1.0], "perturb_rate": [0.3]}
    assert sweep_cli.parse_hp(None) == {}
    for bad, says in (
        ("sigma0", "NAME=V1,V2"),
        ("sigma=1", "unknown hyperparameter 'sigma'"),
        ("sigma0=a,b", "numbers separated by commas"),
        ("sigma0=", "no values"),
    ):
        with pytest.raises(cli.CliError, match=says):
            sweep_cli.parse_hp([bad])
    with pytest.raises(cli.CliError, match="given twice"):
        sweep_cli.parse_hp(["sigma0=1", "sigma0=2"])


@pytest.mark.parametrize(
    "argv, says",
    [
        (
            ["--hp", "sigma0=0.5,1.0", "--hp", "perturb_rate=0.1,0.2,0.3"],
            "different lengths (sigma0: 2, perturb_rate: 3)",
        ),
        (["--hp", "sigma0=0.5,2000"], "sigma0 must be a finite value in [1e-06, 1000], got 2000.0"),
        (["--hp", "lr=0.1"], "unknown hyperparameter 'lr'"),
        (["--seeds", "0,0"], "seeds must be distinct"),
        (["--seeds", "0,4294967296"], "seed 4294967296 is outside 0..4294967295"),
        (["--seed", "-1"], "--seed -1: accepted: an integer 0..4294967295"),
        (["--rounds", "3", "--eval-every", "2"], "--rounds 3: accepted: a positive multiple of --eval-every (2)"),
        (
            ["--algorithm", "fedbpt", "--hp", "learning_rate=0.1,0.01"],
            "learning_rate: fedbpt never reads it, so every lane would be the same run; accepted for fedbpt: "
            "sigma0, perturb_rate, dropout_rate",
        ),
        (
            ["--algorithm", "fedavg_bbt", "--hp", "perturb_rate=0.3,0.6"],
            "perturb_rate: fedavg_bbt never reads it",
        ),
        (["--algorithm", "manual", "--hp", "sigma0=0.5,1"], "accepted for manual: none"),
    ],
)
def test_cli_bad_input_is_one_line_before_the_model_loads(argv, says, monkeypatch, capsys):
    import fedbpt_jax as fb
    from fedbpt_jax import sweep_cli

    monkeypatch.setattr(fb.models, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    assert sweep_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and says in err, err


def test_cli_runs_a_grid_and_writes_its_results(tmp_path, monkeypatch, capsys):
    import fedbpt_jax as fb
    from fedbpt_jax import sweep_cli
    from tokenizers_util import chatml_tokenizer

    lm = testing.tiny_decoder(0, num_layers=1, tokenizer=chatml_tokenizer())
    monkeypatch.setattr(fb.models, "load", lambda *a, **k: lm)
    out = tmp_path / "res"
    argv = [
        "--seeds",
        "0,1",
        "--hp",
        "sigma0=0.5,1.0",
        "--hp",
        "perturb_rate=0.3",
        "--grid",
        "--clients",
        "4",
        "--per-round",
        "2",
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
        "1",
        "--test-size",
        "8",
        "--prompt-start",
        "zeros",
        "--results-dir",
        str(out),
    ]
    # a sweep that fails leaves no config.json describing results that were never written
    real_sweep = fb.federated.sweep
    monkeypatch.setattr(fb.federated, "sweep", lambda *a, **k: (_ for _ in ()).throw(ValueError("no memory")))
    assert sweep_cli.main(argv) == 2 and "no memory" in capsys.readouterr().err
    assert not (out / "config.json").exists() and not (out / "sweep.json").exists()
    monkeypatch.setattr(fb.federated, "sweep", real_sweep)
    assert sweep_cli.main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert (
        "2 seed(s) x 2 hyperparameter point(s) = 4 lanes" in printed and "| sigma0 | perturb_rate | seeds |" in printed
    )
    res = checkpoint.read_json(out / "sweep.json")
    assert [(r["seed"], r["hparams"]["sigma0"]) for r in res["lanes"]] == [(0, 0.5), (1, 0.5), (0, 1.0), (1, 1.0)]
    assert all(r["hparams"]["perturb_rate"] == 0.3 for r in res["lanes"]) and res["eval_rounds"] == [0, 1, 2]
    assert (out / "sweep.md").read_text() in printed and (out / "config.json").exists()
    assert sweep_cli.main(argv) == 2 and "already holds a sweep" in capsys.readouterr().err  # never silently replaced
    first = checkpoint.read_json(out / "config.json")["args"]
    seen = {}
    monkeypatch.setattr(sweep_cli, "cmd_sweep", lambda args: seen.update(vars(args)) or 0)
    assert sweep_cli.main(["--config", str(out / "config.json"), "--results-dir", str(tmp_path / "again")]) == 0
    same = lambda d: {k: v for k, v in d.items() if k not in ("results_dir", "config")}  # noqa: E731
    assert same(seen) == same(first)
    # the main command finds the sweep command in the file (it lives in its own module)
    from fedbpt_jax import cli

    seen.clear()
    assert cli.main(["--config", str(out / "config.json"), "--results-dir", str(tmp_path / "again")]) == 0
    assert same(seen) == same(first)


def test_cli_options_are_derived_and_a_config_file_sets_them(tmp_path, monkeypatch, capsys):
    """Every FedConfig/HParams field is a sweep option (derived, as for simulate), and a --config file sets
    options and the swept hyperparameters (a mapping), with the command line overriding it."""
    import dataclasses

    import fedbpt_jax as fb
    from fedbpt_jax import sweep_cli

    parser = sweep_cli.build_parser()
    dests = {a.dest for a in parser._actions}
    from fedbpt_jax.cli_options import RENAMES

    for cls in (fl.FedConfig, fl.HParams):
        for f in dataclasses.fields(cls):
            if f.name not in ("clients_per_round", "n_prompt_tokens"):  # the CLI resolves these itself
                assert RENAMES.get(f.name, f.name) in dests, f.name
    cfg = tmp_path / "sweep.toml"
    cfg.write_text('seeds = "0,1"\nrounds = 4\nclients = 3\n[hp]\nsigma0 = [0.5, 1.0]\n')
    seen = {}

    def fake(args):
        seen.update(vars(args))
        return 0

    monkeypatch.setattr(sweep_cli, "cmd_sweep", fake)
    assert sweep_cli.main(["--config", str(cfg), "--rounds", "2"]) == 0
    assert seen["seeds"] == "0,1" and seen["rounds"] == 2 and seen["clients"] == 3
    assert sweep_cli.parse_hp(seen["hp"]) == {"sigma0": [0.5, 1.0]}
    cfg.write_text("rounds = 4\nclient = 3\n")
    monkeypatch.setattr(fb.models, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    assert sweep_cli.main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'client'" in err and "'clients'" in err, err


def test_a_sweep_holds_its_results_folder(tmp_path, monkeypatch):
    """While a sweep runs, its folder is claimed: a run or another sweep there is refused."""
    from fedbpt_jax import sweep_cli
    from fedbpt_jax.federated import records

    out = tmp_path / "sweep"
    held = []

    def body(args, checked):
        with pytest.raises(records.FolderInUse, match="in use by another run"):
            with records.claim(out):
                pass
        held.append(True)
        return 0

    monkeypatch.setattr(sweep_cli, "_sweep", body)
    args = sweep_cli.build_parser().parse_args(["--seeds", "0,1", "--results-dir", str(out)])
    assert sweep_cli.cmd_sweep(args) == 0 and held == [True]
    with records.claim(out):  # released afterwards
        pass
