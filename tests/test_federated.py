"""The federated engine: compile-once runs, scale, dropouts, non-finite fitness, determinism, resume,
bad input, accounting, the baselines, sharding over 8 devices and a two-process run. Most tests share
configuration A (N = 10,000, K = 8; see ``federated_setup``) so the round compiles once per process.

The sharded (8 forced CPU devices) and multi-host (two processes on 127.0.0.1) runs need a fresh
process each (the device count and ``jax.distributed`` must be set before JAX starts): a module
fixture starts them in the background when the module starts, so they compile while the other tests
run; the last two tests collect them (hard timeouts: they can never hang the suite).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import federated_setup as fs
from fedbpt_jax import federated as fl
from fedbpt_jax import objective, testing
from fedbpt_jax.checkpoint import CheckpointMismatch
from fedbpt_jax.federated import algorithms as algs
from fedbpt_jax.federated.core import ModelInputs
from fedbpt_jax.models import decoder


def _leaves_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(fl.host(a))
    lb, tb = jax.tree_util.tree_flatten(fl.host(b))
    assert ta == tb
    return all(np.array_equal(x, y, equal_nan=True) for x, y in zip(la, lb))


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


# ------------------------------------------------------------------------------------------------
# Compile once, scale, accounting
# ------------------------------------------------------------------------------------------------
def test_run_compiles_once_scales_to_10000_clients_and_accounts_flops():
    """N = 10,000 held, K = 8 per round; the second run call (and every segment) reuses the compiled
    segment; the per-round accounting (bytes, calls, FLOPs) is the hand-computed one."""
    names = ("fedbpt", "fedbpt/eval")
    with testing.count_compiles() as first:
        carry, hist = fs.run_a(0, num_rounds=2)  # 2 segments of E = 1 round
    # At most one trace/compile for both segments (none if an earlier test compiled this configuration).
    assert all(first.traces[n] <= 1 for n in names) and first.compiles["fedbpt"] <= 1, (first.traces, first.compiles)
    t0 = time.perf_counter()
    with testing.count_compiles() as second:
        carry2, hist2 = fs.run_a(5, num_rounds=2)  # second call, other key: no retrace, no recompile
    steady = time.perf_counter() - t0
    assert not second.traces and not second.compiles, (second.traces, second.compiles)
    assert fl.trace_count("fedbpt") >= 1 and fl.compile_count("fedbpt") >= 1  # the process-wide counters
    print(
        f"\nN=10,000 K=8 tiny decoder: steady run of 2 rounds + 3 evals {steady:.3f} s; "
        f"round seconds {[round(r['seconds'], 4) for r in hist2.rounds]}"
    )

    # Only the K sampled clients' CMA-ES states exist: the carried state has no client axis.
    shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(carry.state)}
    assert max(len(s) for s in shapes) <= 2 and (fs.D_A, fs.D_A) in shapes and all(fs.N_A not in s for s in shapes)
    assert int(carry.state.round) == 2 and len(hist.rounds) == 2 and [e["round"] for e in hist.evals] == [0, 1, 2]
    assert np.all(np.isfinite(np.asarray(carry.state.server.mean)))

    # Reference-compatibility figure = the first evaluation with the highest test accuracy; without a
    # dev set nothing is selected: the "selected" round is the last one.
    accs = [e["accuracy"] for e in hist.evals]
    assert float(carry.best_test_reference) == pytest.approx(max(accs))
    assert int(carry.best_test_reference_round) == hist.evals[int(np.argmax(accs))]["round"]
    assert int(carry.selected_round) == 2 and float(carry.selected_test_accuracy) == pytest.approx(accs[-1])

    # Accounting: FedBPT with perturbation: (I·λ + 1) clean + as many perturbed calls per client, and
    # two prefix-cache passes (clean once, perturbed once per round).
    cfg, lm = fs.config_a(), fs.tiny_lm()
    calls = 2 * (cfg.local_generations * cfg.population_size + 1)
    n = cfg.n_prompt_tokens
    fpe = decoder.flops_per_example(lm.config, n + 2, fs.SEQ + n + 2)
    prefix = decoder.flops_per_example(lm.config, fs.SEQ, fs.SEQ, num_labels=0)  # the prefix pass reads no logits
    for row in hist.rounds:
        k = row["active_clients"]
        assert k == fs.K_A
        assert row["forward_calls"] == calls * k
        assert row["model_flops"] == pytest.approx(k * fs.EXAMPLES * (calls * fpe + 2 * prefix), rel=1e-9)
        assert row["bytes_up_per_client"] == 4 * (cfg.intrinsic_dim + 1 + cfg.local_generations)
        assert row["fedavg_full_model_bytes_per_client"] == 4 * lm.num_params()
        assert row["bytes_up_per_client"] < row["fedavg_full_model_bytes_per_client"]
        assert row["nonfinite_fitness"] == 0
    assert hist.evals[0]["eval_flops"] > 0


def _count_eqns(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for sub in _subs(eqn):
            n += _count_eqns(sub)
    return n


def _subs(eqn):
    out = []
    for v in eqn.params.values():
        for x in v if isinstance(v, (list, tuple)) else [v]:
            if hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
                out.append(x.jaxpr)
            elif hasattr(x, "eqns"):
                out.append(x)
    return out


def _eigh_outside_cond(jaxpr, inside=False) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "eigh" and not inside:
            n += 1
        for sub in _subs(eqn):
            n += _eigh_outside_cond(sub, inside or eqn.primitive.name == "cond")
    return n


def _round_jaxpr(algo, n):
    data = fs.make_data(n)
    hp = fl.HParams().validate()
    state = algo.init(jax.random.key(0), hp)
    return jax.make_jaxpr(algo.round)(jax.random.key(1), state, data, hp, fs.model()).jaxpr


def test_round_program_size_does_not_grow_with_clients_and_eigh_is_lazy():
    """The traced round has the same number of operations for (N=10, K=2) and (N=10,000, K=8): nothing
    unrolls over clients. Every eigh sits inside a cond (the lazy eigendecomposition), for FedBPT,
    FedAvg-BBT and centralized BBT: none runs unconditionally per generation."""
    lm = fs.tiny_lm()
    small = _round_jaxpr(fl.fedbpt(fs.config_a(num_clients=10, clients_per_round=2), lm), 10)
    big = _round_jaxpr(fs.algo_a(), fs.N_A)
    assert _count_eqns(small) == _count_eqns(big) > 100
    assert _eigh_outside_cond(big) == 0
    cfg = fs.config_a(num_clients=10, clients_per_round=2)
    for make in (fl.fedavg_bbt, fl.centralized_bbt):
        jx = _round_jaxpr(make(cfg, lm), 10)
        assert _eigh_outside_cond(jx) == 0, make.__name__


# ------------------------------------------------------------------------------------------------
# Determinism, resume, checkpoints
# ------------------------------------------------------------------------------------------------
def test_same_key_same_numbers_other_key_other_numbers():
    c1, h1 = fs.run_a(0, num_rounds=2)
    c2, h2 = fs.run_a(0, num_rounds=2)
    c3, h3 = fs.run_a(1, num_rounds=2)
    assert _leaves_equal(c1, c2) and _strip(h1.rounds) == _strip(h2.rounds) and h1.evals == h2.evals
    assert not np.allclose(np.asarray(c1.state.server.mean), np.asarray(c3.state.server.mean))
    assert _strip(h1.rounds) != _strip(h3.rounds)


def test_resume_is_bit_identical_and_results_are_written(tmp_path):
    full_c, full_h = fs.run_a(0, num_rounds=3, results_dir=tmp_path / "full")
    ck = tmp_path / "ckpt"
    part_c, part_h = fs.run_a(0, num_rounds=3, checkpoint_dir=ck, stop_after=1)
    assert int(part_c.rounds_done) == 1 and len(part_h.rounds) == 1
    with testing.count_compiles() as counts:
        res_c, res_h = fs.run_a(0, num_rounds=3, checkpoint_dir=ck, results_dir=tmp_path / "resumed")
    assert not counts.traces["fedbpt"] and not counts.compiles["fedbpt"]  # resuming reuses the program
    assert _leaves_equal(res_c, full_c)
    assert _strip(res_h.rounds) == _strip(full_h.rounds) and res_h.evals == full_h.evals
    for d in ("full", "resumed"):
        js = json.loads((tmp_path / d / "metrics.json").read_text())
        assert len(js["rounds"]) == 3 and js["best_test_reference_round"] == int(full_c.best_test_reference_round)
        assert js["selected_round"] == 3 and js["final_test_accuracy"] == full_h.evals[-1]["accuracy"]
        assert (tmp_path / d / "rounds.csv").read_text().count("\n") == 4
        assert not list((tmp_path / d).glob(".*.tmp"))
    # Another configuration in the same directory: a clear error naming the differing value.
    # A refused resume leaves the results folder's config.json as the finished run wrote it.
    # A resumed run's record says which rounds an earlier process computed: here all 3, by a process that left
    # no config.json (provenance unknown); resumed again, the record carries the same stretch forward.
    first = {"run": "the first"}
    fs.run_a(0, num_rounds=3, checkpoint_dir=ck, results_dir=tmp_path / "resumed", run_config=first)
    first = {**first, "earlier_segments": [{"from_round": 0, "to_round": 3}]}
    assert json.loads((tmp_path / "resumed" / "config.json").read_text()) == first
    fs.run_a(0, num_rounds=3, checkpoint_dir=ck, results_dir=tmp_path / "resumed", run_config={"run": "the first"})
    assert json.loads((tmp_path / "resumed" / "config.json").read_text()) == first
    with pytest.raises(CheckpointMismatch, match=r"HParams\.perturb_rate: checkpoint 0\.5, this run 0\.3"):
        fs.run_a(
            0,
            num_rounds=3,
            checkpoint_dir=ck,
            hp=fl.HParams(perturb_rate=0.3),
            results_dir=tmp_path / "resumed",
            run_config={"run": "the refused one"},
        )
    assert json.loads((tmp_path / "resumed" / "config.json").read_text()) == first
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert metrics["planned_rounds"] == 3 and metrics["rounds_reached"] == 3 and metrics["complete"] is True
    # Another test set (size or content) or other label words: another run, named in words.
    test = fs.test_set()
    with pytest.raises(CheckpointMismatch, match="the test examples .*: not the checkpoint's"):
        fl.run(
            fs.algo_a(),
            jax.random.key(0),
            fs.data_a(),
            test.take(np.arange(8)),
            fs.tiny_lm(),
            fs.model(),
            num_rounds=3,
            eval_chunk=16,
            checkpoint_dir=ck,
            progress=False,
        )
    relabelled = fs.data_a().replace(spec=fs.data_a().spec.replace(label_ids=fs.data_a().spec.label_ids[::-1]))
    with pytest.raises(CheckpointMismatch, match="the scoring .*: not the checkpoint's"):
        fs.run_a(0, num_rounds=3, checkpoint_dir=ck, data=relabelled)
    other = fl.fedbpt(fs.config_a(population_size=5), fs.tiny_lm())
    with pytest.raises(CheckpointMismatch, match=r"FedConfig\.population_size: checkpoint 4, this run 5"):
        fl.run(
            other,
            jax.random.key(0),
            fs.data_a(),
            fs.test_set(),
            fs.tiny_lm(),
            fs.model(),
            num_rounds=3,
            checkpoint_dir=ck,
            progress=False,
        )
    with pytest.raises(CheckpointMismatch, match=r"the run's key \(--seed\): not the checkpoint's") as err:
        fs.run_a(7, num_rounds=3, checkpoint_dir=ck)
    assert "[" not in str(err.value).split("is from another configuration")[1]  # no raw key integers
    # Another prompt start (the prompt at z = 0) is another run too.
    started = fs.model().replace(start=jnp.full((fs.config_a().n_prompt_tokens, fs.tiny_lm().hidden_size), 0.1))
    with pytest.raises(CheckpointMismatch, match="the prompt start: not the checkpoint's"):
        fs.run_a(0, num_rounds=3, checkpoint_dir=ck, model_inputs=started)


# ------------------------------------------------------------------------------------------------
# Dropouts and non-finite fitness
# ------------------------------------------------------------------------------------------------
def test_all_clients_dropped_leaves_state_unchanged():
    hp = fl.HParams(dropout_rate=1.0)
    carry, hist = fs.run_a(0, num_rounds=1, hp=hp)
    init = fs.algo_a().init(None, hp.validate())
    assert _leaves_equal(carry.state.server, init.server)  # σ, mean, C, paths and counters
    assert int(carry.state.round) == 1  # only the round counter moved
    row = hist.rounds[0]
    assert row["active_clients"] == 0 and row["num_active"] == 0 and row["forward_calls"] == 0
    assert row["model_flops"] == 0
    assert not any(isinstance(v, float) and np.isnan(v) for v in row.values()), row
    assert all(np.isfinite(e["loss"]) for e in hist.evals)


def test_dropped_client_contributes_nothing():
    """Changing the data of a sampled-but-dropped client does not change the round at all."""
    hp = fl.HParams(dropout_rate=0.5)
    data = fs.data_a()
    for seed in range(20):
        carry, hist = fs.run_a(seed, num_rounds=1, hp=hp)
        clients = hist.rounds[0]["clients"]  # the round reports who was sampled and who took part
        active = np.array([c["active"] for c in clients])
        if 0 < active.sum() < fs.K_A:
            break
    else:
        pytest.fail("no key with a partial dropout")
    dropped = np.array([c["index"] for c in clients])[~active]
    assert hist.rounds[0]["active_clients"] == int(active.sum())
    rng = np.random.default_rng(3)
    ids = np.asarray(data.train.input_ids).copy()
    ids[dropped] = rng.integers(3, fs.VOCAB - 1, size=ids[dropped].shape) * (ids[dropped] > 0)
    changed = data.replace(train=data.train.replace(input_ids=jnp.asarray(ids)))
    carry2, hist2 = fs.run_a(seed, num_rounds=1, hp=hp, data=changed)
    assert _leaves_equal(carry.state, carry2.state)
    assert _strip(hist.rounds) == _strip(hist2.rounds)


def test_nonfinite_fitness_ranks_worst_is_counted_and_never_poisons_the_server():
    """Clients whose text holds a token with a NaN embedding get NaN logits (every candidate); the
    server state stays finite and the metrics count the non-finite fitnesses."""
    lm, pid = fs.tiny_lm(), fs.poison_id()
    params = jax.tree_util.tree_map(lambda x: x, lm.params)
    emb = decoder.word_embeddings(params)
    poisoned_emb = emb.at[pid].set(jnp.nan)
    params = jax.tree_util.tree_map(lambda x: poisoned_emb if x is emb else x, params)
    assert np.isnan(np.asarray(decoder.word_embeddings(params))[pid]).all()
    train, counts = fs.host_data()
    ids = train.input_ids.copy()
    ids[::2, :, -1] = pid  # even clients: last token poisoned
    data = fs.make_data(train=train.replace(input_ids=ids), counts=counts)
    carry, hist = fs.run_a(0, num_rounds=2, data=data, model_inputs=ModelInputs(params, fs.model().projection))
    server = fl.host(carry.state.server)
    for leaf in (server.mean, server.std, server.C, server.B, server.D, server.p_std, server.p_c):
        assert np.all(np.isfinite(leaf))
    assert sum(r["nonfinite_fitness"] for r in hist.rounds) > 0
    assert sum(r["num_nonfinite"] for r in hist.rounds) > 0  # poisoned uploads left out
    assert any(r["num_active"] > 0 for r in hist.rounds)  # clean clients still moved the server
    assert not np.allclose(server.mean, 0)
    assert all(np.isfinite(e["loss"]) for e in hist.evals)


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the value, raised before anything compiles
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(clients_per_round=11), r"K=11.*num_clients=10"),
        (dict(population_size=1), r"population_size must be >= 2, got 1"),
        (dict(intrinsic_dim=0), r"intrinsic_dim \(d\) must be >= 1, got 0"),
        (dict(local_generations=0), r"local_generations must be >= 1, got 0"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        fs.config_a(num_clients=10, **{**dict(clients_per_round=2), **kw})


@pytest.mark.parametrize(
    "hp, match",
    [
        (fl.HParams(perturb_rate=1.5), r"perturb_rate must be a finite value in \[0, 1\], got 1.5"),
        (fl.HParams(perturb_rate=-0.1), r"perturb_rate must be a finite value in \[0, 1\], got -0.1"),
        (fl.HParams(perturb_rate=float("nan")), r"perturb_rate must be a finite value in \[0, 1\], got nan"),
        (fl.HParams(dropout_rate=2.0), r"dropout_rate must be a finite value in \[0, 1\], got 2.0"),
        (fl.HParams(sigma0=0.0), r"sigma0 must be a finite value in \[1e-06, 1000\], got 0.0"),
        (fl.HParams(sigma0=1e30), r"sigma0 must be a finite value in \[1e-06, 1000\], got 1e\+30"),
        (fl.HParams(sigma0=1e20), r"sigma0 must be a finite value in \[1e-06, 1000\], got 1e\+20"),
        (fl.HParams(sigma0=1e-30), r"sigma0 must be a finite value in \[1e-06, 1000\], got 1e-30"),
        (fl.HParams(sigma0=float("inf")), r"sigma0 must be a finite value in \[1e-06, 1000\], got inf"),
        (fl.HParams(sigma0=float("nan")), r"sigma0 must be a finite value in \[1e-06, 1000\], got nan"),
        (fl.HParams(learning_rate=float("inf")), r"learning_rate must be a finite value in \[1e-08, 100\], got inf"),
        (fl.HParams(learning_rate=-1.0), r"learning_rate must be a finite value in \[1e-08, 100\], got -1.0"),
    ],
)
@pytest.mark.parametrize("make", [fl.fedbpt, fl.fedavg_bbt, fl.centralized_bbt, fl.fedprompt, fl.manual_prompt])
def test_bad_hparams_rejected_at_init_and_validate(hp, match, make):
    """Non-finite or absurd hyperparameters fail at ``algo.init`` (the API path), not only in the CLI."""
    with pytest.raises(ValueError, match=match):
        hp.validate()
    algo = make(fs.config_a(num_clients=10, clients_per_round=2), fs.tiny_lm())
    with pytest.raises(ValueError, match=match):
        algo.init(jax.random.key(0), hp)


def test_init_under_vmap_skips_the_host_check_and_good_values_pass():
    """A sweep vmaps ``init`` over traced hyperparameters: no host check there; concrete good values pass."""
    algo = fs.algo_a()
    hps = fl.HParams(
        sigma0=jnp.asarray([0.5, 1.0, 2.0]),
        perturb_rate=jnp.asarray([0.0, 0.5, 1.0]),
        dropout_rate=jnp.zeros(3),
        learning_rate=jnp.full(3, 0.1),
    )
    states = jax.vmap(lambda h: algo.init(None, h))(hps)
    np.testing.assert_allclose(np.asarray(states.server.std), [0.5, 1.0, 2.0])
    assert float(algo.init(None, fl.HParams(sigma0=1e-6, perturb_rate=1.0)).server.std) == pytest.approx(1e-6)
    with pytest.raises(ValueError, match=r"sigma0 must be a finite value .* got 5000.0"):
        algo.init(None, fl.HParams(sigma0=jnp.asarray([1.0, 5000.0])))


def _small(n=10, counts=None, **cfg):
    algo = fl.fedbpt(fs.config_a(num_clients=cfg.pop("num_clients", n), clients_per_round=2, **cfg), fs.tiny_lm())
    return algo, fs.make_data(n, counts=counts)


def _run_small(algo, data, test=None, **kw):
    kw.setdefault("num_rounds", 2)
    return fl.run(
        algo,
        jax.random.key(0),
        data,
        fs.test_set() if test is None else test,
        fs.tiny_lm(),
        fs.model(),
        progress=False,
        **kw,
    )


def test_bad_run_input():
    algo, data = _small()
    with pytest.raises(ValueError, match=r"num_rounds \(3\) must be a positive multiple of eval_every \(2\)"):
        _run_small(algo, data, num_rounds=3, eval_every=2)
    with pytest.raises(ValueError, match=r"num_rounds must be a positive integer, got 0"):
        _run_small(algo, data, num_rounds=0)
    with pytest.raises(ValueError, match=r"stop_after \(1\) must be a non-negative multiple of eval_every \(2\)"):
        _run_small(algo, data, num_rounds=4, eval_every=2, stop_after=1)
    with pytest.raises(ValueError, match=r"data holds 12 clients but the config says num_clients=10"):
        _run_small(algo, fs.make_data(12))
    counts = np.full(10, fs.EXAMPLES)
    counts[[3, 7]] = 0
    with pytest.raises(ValueError, match=r"2 client\(s\) have no training examples \(e.g. clients \[3, 7\]"):
        _run_small(algo, fs.make_data(10, counts=counts))
    bad = data.replace(counts=data.counts.at[4].set(fs.EXAMPLES + 1))
    with pytest.raises(ValueError, match=r"client 4 has counts=5 examples but the padded width is E=4"):
        _run_small(algo, bad)
    bad = data.replace(counts=data.counts.at[5].set(2))
    with pytest.raises(ValueError, match=r"client 5: counts says 2 examples but its example_mask has 4"):
        _run_small(algo, bad)
    bad = data.replace(train=data.train.replace(labels=data.train.labels.at[1, 0].set(2)))
    with pytest.raises(ValueError, match=r"a training label is 2, outside \[0, 2\)"):
        _run_small(algo, bad)
    bad = data.replace(train=data.train.replace(input_ids=data.train.input_ids.at[0, 0, -1].set(fs.VOCAB)))
    with pytest.raises(ValueError, match=rf"token id is {fs.VOCAB}, outside the model's vocabulary \[0, {fs.VOCAB}\)"):
        _run_small(algo, bad)
    test = fs.test_set()
    with pytest.raises(ValueError, match=r"the test set has no examples"):
        _run_small(algo, data, test=test.replace(example_mask=np.zeros_like(test.example_mask)))
    with pytest.raises(ValueError, match=r"a test label is 5, outside \[0, 2\)"):
        _run_small(algo, data, test=test.replace(labels=np.full_like(test.labels, 5)))
    with pytest.raises(ValueError, match=r"mesh needs an axis named 'clients'"):
        mesh = jax.make_mesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
        jax.jit(lambda x: fl.core.constrain_clients(x, mesh))(jnp.ones(2))


def test_distributed_helpers_validate_and_mesh_is_auto():
    mesh = fl.client_mesh()
    assert mesh.axis_names == ("clients",) and mesh.devices.size == len(jax.devices())
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\), got 2"):
        fl.init_distributed("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match=r"num_processes must be >= 1, got 0"):
        fl.init_distributed("127.0.0.1:1234", 0, 0)
    with pytest.raises(ValueError, match=r"coordinator must be 'host:port', got 'localhost'"):
        fl.init_distributed("localhost", 2, 0)


# ------------------------------------------------------------------------------------------------
# Baselines (small configuration: N = 4 clients, all sampled)
# ------------------------------------------------------------------------------------------------
def _cfg_b(**kw):
    return fs.config_a(num_clients=4, clients_per_round=4, **kw)


def _learnable_data(n=4, counts=None):
    """A learnable synthetic task: 75 % of the labels are 1, so a prompt can lower the loss."""
    train, counts = fs.host_data(n, seed=2, counts=counts)
    labels = (np.random.default_rng(4).random(train.labels.shape) < 0.75).astype(np.int32)
    return fs.make_data(n, train=train.replace(labels=labels), counts=counts)


def test_manual_prompt_equals_scoring_the_start_prompt():
    """The manual baseline deploys FedBPT's z = 0 prompt: with the default "zeros" start, n zero vectors
    (not the bare template: that is a different prompt for a decoder)."""
    lm = fs.tiny_lm()
    algo = fl.manual_prompt(_cfg_b(), lm)
    carry, hist = fl.run(
        algo,
        jax.random.key(0),
        _learnable_data(),
        fs.test_set(),
        lm,
        fs.model(),
        num_rounds=1,
        eval_chunk=16,
        progress=False,
    )
    scorer = objective.make_scorer(lm, _cfg_b().layout, n_prompt_tokens=2)
    chunks = jax.tree_util.tree_map(jnp.asarray, objective.chunk_examples(fs.test_set(), 16))
    logits = objective.evaluate_logits(scorer, lm.params, chunks, fs.spec(), jnp.zeros((2, lm.hidden_size)))
    want = objective.classification_metrics(logits, chunks.labels, chunks.example_mask)
    for ev in hist.evals:
        assert ev["accuracy"] == pytest.approx(float(want["accuracy"]), abs=1e-6)
        assert ev["loss"] == pytest.approx(float(want["loss"]), rel=1e-5)
    assert hist.rounds[0]["forward_calls"] == 0 and hist.rounds[0]["bytes_up_per_client"] == 0


def test_fedprompt_lowers_the_training_loss():
    lm = fs.tiny_lm()
    algo = fl.fedprompt(_cfg_b(local_generations=3), lm)
    carry, hist = fl.run(
        algo,
        jax.random.key(0),
        _learnable_data(),
        fs.test_set(),
        lm,
        fs.model(),
        num_rounds=4,
        hp=fl.HParams(learning_rate=0.05),
        eval_every=4,
        eval_chunk=16,
        progress=False,
    )
    losses = [r["client_loss"] for r in hist.rounds]
    assert losses[-1] < losses[0] - 0.02, losses
    assert np.all(np.isfinite(np.asarray(carry.state.prompt))) and not np.allclose(np.asarray(carry.state.prompt), 0)
    assert hist.rounds[0]["weight_total"] == 4 * fs.EXAMPLES


def test_fedavg_bbt_weights_follow_example_counts(monkeypatch):
    original = algs.aggregation.fedavg_aggregate

    def spy(state, client_states, weights, mask=None):
        new, metrics = original(state, client_states, weights, mask)
        return new, {**metrics, "spy_weights": weights, "spy_means": client_states.mean}

    monkeypatch.setattr(algs.aggregation, "fedavg_aggregate", spy)
    lm = fs.tiny_lm()
    algo = fl.fedavg_bbt(_cfg_b(), lm)
    counts = np.array([1, 2, 3, 4], np.int32)
    data = _learnable_data(counts=counts)
    hp = fl.HParams().validate()
    state = algo.init(jax.random.key(0), hp)
    new, m = jax.jit(algo.round_detailed)(jax.random.key(3), state, data, hp, fs.model())
    idx = m["clients"]["index"]  # which clients the round sampled
    np.testing.assert_array_equal(np.asarray(m["spy_weights"]), counts[np.asarray(idx)].astype(np.float32))
    w = counts[np.asarray(idx)] / counts.sum()
    np.testing.assert_allclose(np.asarray(new.server.mean), w @ np.asarray(m["spy_means"]), rtol=1e-5, atol=1e-6)
    assert float(m["weight_total"]) == counts.sum()
    assert not np.allclose(np.asarray(new.server.mean), np.asarray(m["spy_means"]).mean(0), atol=1e-4)


@pytest.mark.parametrize("make", [fl.fedbpt, fl.fedavg_bbt])
def test_shared_eigen_fast_path_equals_general_client_path(monkeypatch, make):
    """Configuration B never re-decomposes within I = 2 (gap 1.66), so the round runs the fast client path
    (shared B, D; FedBPT without the client covariance update). Forcing the general path (per-client
    lazy eigen check, full updates) gives the same server state and metrics."""
    lm, data, hp = fs.tiny_lm(), _learnable_data(), fl.HParams().validate()
    cfg = _cfg_b()
    assert not algs.strategy.eigen_refresh_due(cfg.population_size, cfg.intrinsic_dim, cfg.local_generations)

    def one_round():
        algo = make(cfg, lm)
        state = algo.init(jax.random.key(0), hp)
        return jax.jit(algo.round)(jax.random.key(3), state, data, hp, fs.model())

    fast, m_fast = one_round()
    monkeypatch.setattr(algs.strategy, "eigen_refresh_due", lambda *a: True)
    slow, m_slow = one_round()
    for name in ("mean", "std", "C", "p_std", "p_c"):
        np.testing.assert_allclose(
            np.asarray(getattr(fast.server, name)),
            np.asarray(getattr(slow.server, name)),
            rtol=1e-5,
            atol=1e-6,
            err_msg=name,
        )
    np.testing.assert_allclose(float(m_fast["client_loss"]), float(m_slow["client_loss"]), rtol=1e-5)
    assert not np.allclose(np.asarray(fast.server.mean), 0)


def test_centralized_bbt_pools_all_clients():
    """Centralized BBT sees the union of the clients' data: reordering the clients does not change it."""
    lm = fs.tiny_lm()
    algo = fl.centralized_bbt(_cfg_b(), lm)
    data = _learnable_data()
    perm = np.array([2, 0, 3, 1])
    shuffled = data.replace(train=jax.tree_util.tree_map(lambda a: a[perm], data.train), counts=data.counts[perm])
    runs = [
        fl.run(
            algo,
            jax.random.key(0),
            d,
            fs.test_set(),
            lm,
            fs.model(),
            num_rounds=2,
            eval_every=2,
            eval_chunk=16,
            progress=False,
        )
        for d in (data, shuffled)
    ]
    (c1, h1), (c2, h2) = runs
    np.testing.assert_allclose(np.asarray(c1.state.es.mean), np.asarray(c2.state.es.mean), rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(c1.state.es.mean), 0)
    assert h1.rounds[0]["examples_per_call"] == 4 * fs.EXAMPLES and h1.rounds[0]["active_clients"] == 1
    assert int(c1.state.es.generation_counter) == 2 * algo.config.local_generations  # one continuous run


# ------------------------------------------------------------------------------------------------
# Sharded over 8 devices, and two processes (subprocess workers started at module start)
# ------------------------------------------------------------------------------------------------
WORKER = str(Path(__file__).with_name("federated_worker.py"))
SHARDED_TEST = "test_sharded_over_8_devices_matches_one_device"
MULTIHOST_TEST = "test_two_processes_match_single_process"
WORKER_TIMEOUT_S = 300


def _env(xla_flags: str = "") -> dict:
    env = dict(os.environ)
    # Optimisation level 0 compiles about a third faster here; results still agree to rounding.
    env.update(
        JAX_PLATFORMS="cpu",
        OPENBLAS_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        XLA_FLAGS=f"--xla_backend_optimization_level=0 {xla_flags}".strip(),
    )
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Job:
    """Worker processes with logs in files (no pipe to fill) and a deadline."""

    def __init__(self, folder: Path, argvs: list[list[str]], env: dict):
        self.out = folder / "result.json"
        self.logs = [folder / f"log{i}.txt" for i in range(len(argvs))]
        self.deadline = time.monotonic() + WORKER_TIMEOUT_S
        self.procs = []
        for argv, log in zip(argvs, self.logs):
            with open(log, "w") as f:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, WORKER, *argv, str(self.out)], stdout=f, stderr=subprocess.STDOUT, env=env
                    )
                )

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def result(self) -> dict:
        try:
            for p in self.procs:
                p.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"worker timed out after {WORKER_TIMEOUT_S} s:\n" + self._tail())
        assert all(p.returncode == 0 for p in self.procs), self._tail()
        return json.loads(self.out.read_text())

    def _tail(self) -> str:
        return "\n----\n".join(log.read_text()[-3000:] for log in self.logs)


@pytest.fixture(scope="module", autouse=True)
def workers(request, tmp_path_factory):
    selected = {item.name for item in request.session.items}
    jobs = {}
    if SHARDED_TEST in selected:
        folder = tmp_path_factory.mktemp("sharded")
        jobs["sharded"] = _Job(folder, [["sharded"]], _env("--xla_force_host_platform_device_count=8"))
    if MULTIHOST_TEST in selected:
        folder, port = tmp_path_factory.mktemp("multihost"), str(_free_port())
        jobs["multihost"] = _Job(folder, [["multihost", port, str(i)] for i in range(2)], _env())
    yield jobs
    for job in jobs.values():
        job.kill()


@pytest.mark.slow
def test_sharded_over_8_devices_matches_one_device(workers):
    """Configuration A with the client axis sharded over 8 CPU devices (and over 3: K = 8 and N = 10,000
    not divisible) reproduces the single-device run to rounding."""
    got = workers["sharded"].result()
    assert got["devices"] == 8
    assert got["round_constrains_clients"]
    assert got["data_sharding"] == ["clients"]  # N = 10,000 = 8 · 1250
    assert got["uneven_data_sharding"] == []  # 10,000 % 3 != 0: replicated
    assert got["carry_sharding"] in ([], [None])  # results come back replicated
    assert got["resume_identical"] and got["segment_compiles"] == 1  # sharded checkpoint round trip
    want = fs.reference_summary(0, 2)
    fs.assert_summaries_close(got["mesh8"], want)
    fs.assert_summaries_close(got["mesh3"], want)


@pytest.mark.slow
def test_two_processes_match_single_process(workers):
    """Two processes (jax.distributed on 127.0.0.1, gloo CPU collectives), each holding only its half of
    the clients, reproduce the single-process run to rounding."""
    got = workers["multihost"].result()
    assert got["processes"] == 2
    fs.assert_summaries_close(got["summary"], fs.reference_summary(0, 2))


# ------------------------------------------------------------------------------------------------
# Clean prefix caches kept across rounds
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["fedbpt", "fedavg_bbt_perturbed"])
def test_kept_clean_context_gives_the_same_run_with_one_prefix_pass_less(which):
    """Keeping each client's clean text-prefix cache across rounds changes no number (to float rounding)
    and saves one prefix pass per active client per round; the memory estimate is the kept bytes."""
    n, k = 6, 3
    lm = fs.tiny_lm()
    cfg = fs.config_a(num_clients=n, clients_per_round=k)
    algo = fl.fedbpt(cfg, lm) if which == "fedbpt" else fl.fedavg_bbt(cfg, lm, perturb=True)
    data = fs.make_data(n)
    kw = dict(num_rounds=2, eval_chunk=16, progress=False)
    runs = {
        keep: fl.run(algo, jax.random.key(4), data, fs.test_set(), lm, fs.model(), keep_clean_context=keep, **kw)
        for keep in (False, True, None)
    }
    (c0, h0), (c1, h1), (_c2, h2) = runs[False], runs[True], runs[None]
    np.testing.assert_allclose(np.asarray(c1.state.server.mean), np.asarray(c0.state.server.mean), rtol=1e-4, atol=1e-5)
    assert [e["accuracy"] for e in h1.evals] == [e["accuracy"] for e in h0.evals]
    for a, b in zip(h0.rounds, h1.rounds):
        assert b["prefix_passes"] == a["prefix_passes"] - k
        assert b["model_flops"] < a["model_flops"]
        np.testing.assert_allclose(b["client_loss"], a["client_loss"], rtol=1e-4)
    # auto: 2 rounds × K = 3 ≥ N = 6 and a few KB: kept.
    assert [r["prefix_passes"] for r in h2.rounds] == [r["prefix_passes"] for r in h1.rounds]
    scorer = objective.make_scorer(lm, cfg.layout, n_prompt_tokens=cfg.n_prompt_tokens)
    kept = fl.with_clean_context(data, scorer, lm.params)
    got = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(kept.clean_context))
    assert fl.clean_context_bytes(scorer, lm.params, data) == got > 0


def test_kept_clean_context_auto_off_when_it_does_not_pay_and_refused_where_unused():
    lm = fs.tiny_lm()
    # N = 10,000, K = 8, 1 round: preparing every client once would cost 1,250 rounds' worth of prefix passes.
    _, h = fs.run_a(0, num_rounds=1)
    assert h.rounds[0]["prefix_passes"] == fs.K_A * algs.fedbpt(fs.config_a(), lm).cost.prefix_passes
    cfg = fs.config_a(num_clients=4, clients_per_round=2)
    with pytest.raises(ValueError, match=r"keep_clean_context=True: algorithm 'fedprompt' does not use it"):
        fl.run(
            fl.fedprompt(cfg, lm),
            jax.random.key(0),
            fs.make_data(4),
            fs.test_set(),
            lm,
            fs.model(),
            num_rounds=1,
            progress=False,
            keep_clean_context=True,
        )
    before = fl.fedbpt(fs.config_a(num_clients=4, clients_per_round=2, layout="before"), lm)
    with pytest.raises(ValueError, match="no prefix cache"):
        fl.run(
            before,
            jax.random.key(0),
            fs.make_data(4),
            fs.test_set(),
            lm,
            fs.model(),
            num_rounds=1,
            progress=False,
            keep_clean_context=True,
        )


def test_data_built_for_another_prompt_length_or_context_is_refused_at_the_api():
    """The API checks what the CLI checks: data built for another n_prompt, or too long for the model's
    context, are an error naming both values before anything compiles."""
    lm = fs.tiny_lm()
    cfg = fs.config_a(num_clients=4, clients_per_round=2)
    data = fs.make_data(4)
    wrong = data.replace(spec=data.spec.replace(n_prompt=3))
    with pytest.raises(ValueError, match=r"built for n_prompt=3 prompt tokens but the config says n_prompt_tokens=2"):
        fl.run(
            fl.fedbpt(cfg, lm), jax.random.key(0), wrong, fs.test_set(), lm, fs.model(), num_rounds=1, progress=False
        )
    fl.validate_data(data.replace(spec=data.spec.replace(n_prompt=2)), cfg)  # the matching length passes
    t = int(data.train.input_ids.shape[-1])
    with pytest.raises(
        ValueError,
        match=rf"prompt \(2\) \+ text part \({t}\) \+ cue \(2\) = {t + 4} tokens, more "
        rf"than the model's context of {t + 3}",
    ):
        fl.validate_data(data, cfg, kind="decoder", context=t + 3)
    fl.validate_data(data, cfg, kind="decoder", context=t + 4)


def test_projection_alpha_is_named_apart_from_the_dirichlet_alpha():
    with pytest.raises(ValueError, match="projection_alpha must be finite and > 0, got 0.0"):
        fs.config_a(projection_alpha=0.0)
    assert not hasattr(fs.config_a(), "alpha")
    # A checkpoint's description keeps the field's earlier name, so runs saved before the rename resume.

    from fedbpt_jax.federated import identity

    lm = fs.tiny_lm()
    desc = identity.describe(
        fl.fedbpt(fs.config_a(), lm), fl.HParams(), 1, np.zeros(2, np.uint32), fs.data_a(), lm, fs.model()
    )
    assert "config.alpha" in desc and "config.projection_alpha" not in desc
