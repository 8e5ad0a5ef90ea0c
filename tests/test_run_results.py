"""What a run reports must not lie: dev-set model selection (ties earliest, non-finite never selected),
the reference-compatibility best-on-test figure, per-client diagnostics, saved uploads that replay the
server step, non-finite warnings; the comparable baselines (FedAvg-BBT with perturbation, FedPrompt's
learning rate picked on dev, one BBT) and the optional stabilisers. Tiny decoder, N = K = 4 clients.
"""

from __future__ import annotations

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import federated_setup as fs
from fedbpt_jax import aggregation, bbt, objective
from fedbpt_jax import federated as fl
from fedbpt_jax.federated import driver, evaluation  # noqa: E402
from fedbpt_jax.federated.core import ModelInputs
from fedbpt_jax.models import decoder

COUNTS = np.array([1, 2, 3, 4], np.int32)


def _cfg(**kw):
    return fs.config_a(num_clients=4, clients_per_round=4, **kw)


def _data(counts=COUNTS, train=None):
    """75 % of the labels are 1 (a prompt can learn the bias); client k holds counts[k] examples."""
    if train is None:
        train, counts = fs.host_data(4, seed=2, counts=counts)
    labels = (np.random.default_rng(4).random(train.labels.shape) < 0.75).astype(np.int32)
    return fs.make_data(4, train=train.replace(labels=labels), counts=counts)


def _flipped(batch):
    """A dev set whose accuracy is 1 − the test accuracy (binary labels flipped): dev-best = test-worst."""
    return batch.replace(labels=1 - np.asarray(batch.labels))


def _run(algo, *, data=None, test=None, model=None, num_rounds=3, **kw):
    return fl.run(
        algo,
        jax.random.key(0),
        _data() if data is None else data,
        fs.test_set() if test is None else test,
        fs.tiny_lm(),
        fs.model() if model is None else model,
        num_rounds=num_rounds,
        eval_chunk=16,
        progress=False,
        **kw,
    )


def _poisoned_params():
    lm, pid = fs.tiny_lm(), fs.poison_id()
    emb = decoder.word_embeddings(lm.params)
    poisoned = emb.at[pid].set(jnp.nan)
    return jax.tree_util.tree_map(lambda x: poisoned if x is emb else x, lm.params)


# ------------------------------------------------------------------------------------------------
# Model selection on dev
# ------------------------------------------------------------------------------------------------
def test_selection_is_on_dev_and_best_on_test_is_only_a_reference_figure(tmp_path):
    algo = fl.fedbpt(_cfg(), fs.tiny_lm())
    test = fs.test_set()
    hp = fl.HParams(sigma0=3.0)
    carry, hist = _run(algo, dev=_flipped(test), num_rounds=4, hp=hp, results_dir=tmp_path)
    test_acc = np.array([e["accuracy"] for e in hist.evals])
    dev_acc = np.array([e["dev_accuracy"] for e in hist.evals])
    np.testing.assert_allclose(dev_acc, 1 - test_acc, atol=1e-6)
    assert len(set(test_acc.tolist())) > 1, "the prompt must move for this test to mean anything"
    sel, ref = int(np.argmax(dev_acc)), int(np.argmax(test_acc))  # argmax: the earliest maximum
    assert sel != ref  # dev picks what test would not
    assert int(carry.selected_round) == hist.evals[sel]["round"]
    assert float(carry.selected_dev_accuracy) == pytest.approx(dev_acc[sel])
    assert float(carry.selected_test_accuracy) == pytest.approx(test_acc[sel])
    assert int(carry.best_test_reference_round) == hist.evals[ref]["round"]
    assert float(carry.best_test_reference) == pytest.approx(test_acc[ref])
    # The selected prompt is the global prompt of the selected round (re-run to that round).
    if sel > 0:
        short, _ = _run(algo, dev=_flipped(test), num_rounds=sel, hp=hp)
        want = algo.global_prompt(short.state, fs.model())
        np.testing.assert_allclose(np.asarray(carry.selected_prompt), np.asarray(want), rtol=1e-6)
    js = json.loads((tmp_path / "metrics.json").read_text())
    assert js["selection_rule"].startswith("dev accuracy")
    assert js["selected_round"] == hist.evals[sel]["round"] and js["final_round"] == 4
    assert js["selected_test_accuracy"] == pytest.approx(test_acc[sel])
    assert js["final_test_accuracy"] == pytest.approx(test_acc[-1])
    assert js["initial_test_accuracy"] == pytest.approx(test_acc[0])
    assert js["best_test_reference"] == pytest.approx(test_acc[ref])
    assert "best_accuracy" not in js and "best_round" not in js  # no unlabelled "best" any more


def test_select_rule_ties_earliest_and_never_non_finite():
    n, h = 2, 3
    carry = fl.RunCarry(
        state=None,
        selected_round=jnp.asarray(-1, jnp.int32),
        selected_dev_accuracy=jnp.asarray(-1.0),
        selected_test_accuracy=jnp.asarray(-1.0),
        selected_prompt=jnp.zeros((n, h)),
        best_test_reference=jnp.asarray(-1.0),
        best_test_reference_round=jnp.asarray(-1, jnp.int32),
        rounds_done=jnp.asarray(0),
    )
    nan = float("nan")
    steps = [  # (round, dev accuracy, test accuracy, prompt finite)
        (0, 0.5, 0.6, True),
        (1, 0.7, 0.5, True),
        (2, 0.7, 0.9, True),  # tie on dev: round 1 stays
        (3, nan, 0.95, True),  # NaN dev: never selected
        (4, 0.9, 0.1, False),  # NaN prompt: never anything
        (5, 0.95, nan, True),  # NaN test: a broken prompt
    ]
    for r, dev, test, finite in steps:
        p = jnp.full((n, h), float(r) if finite else nan)
        ev = {"accuracy": jnp.asarray(test), "dev_accuracy": jnp.asarray(dev)}
        carry = evaluation.select(carry, ev, p, jnp.asarray(r), n, h)
    assert int(carry.selected_round) == 1
    assert float(carry.selected_dev_accuracy) == pytest.approx(0.7)
    assert float(carry.selected_test_accuracy) == pytest.approx(0.5)
    np.testing.assert_array_equal(np.asarray(carry.selected_prompt), 1.0)
    assert int(carry.best_test_reference_round) == 3 and float(carry.best_test_reference) == pytest.approx(0.95)


def test_non_finite_evaluations_are_nan_never_selected_and_warned():
    """A test example whose logits are NaN makes the evaluation NaN (not "class 0"), it is never selected,
    and the run warns; the dev evaluations stay finite."""
    params = _poisoned_params()
    test = fs.test_set()
    ids = np.asarray(test.input_ids).copy()
    ids[3, -1] = fs.poison_id()
    bad_test = test.replace(input_ids=ids)
    algo = fl.fedbpt(_cfg(), fs.tiny_lm())
    with pytest.warns(RuntimeWarning, match=r"3 evaluation\(s\) had non-finite logits"):
        carry, hist = _run(
            algo, test=bad_test, dev=test, num_rounds=2, model=ModelInputs(params, fs.model().projection)
        )
    for e in hist.evals:
        assert np.isnan(e["accuracy"]) and np.isnan(e["loss"]) and e["nonfinite_examples"] == 1
        assert np.isfinite(e["dev_accuracy"]) and sum(e["dev_pred_dist"]) == pytest.approx(1.0)
    s = fl.summarize(hist, carry)
    assert s["selected_round"] is None and s["best_test_reference"] is None and s["nonfinite_evals"] == 3


def test_run_where_every_fitness_is_non_finite_says_so(tmp_path):
    """Every client's text holds the poisoned token: every fitness is NaN, the server never moves; the run
    warns and the results say so. The global prompt stays z = 0, so dev ties every round: round 0 is kept."""
    params = _poisoned_params()
    train, counts = fs.host_data(4, seed=2, counts=COUNTS)
    ids = train.input_ids.copy()
    ids[:, :, -1] = fs.poison_id()
    data = _data(train=train.replace(input_ids=ids), counts=counts)
    algo = fl.fedbpt(_cfg(), fs.tiny_lm())
    with pytest.warns(RuntimeWarning, match=r"every active client's fitness was non-finite in every round"):
        carry, hist = _run(
            algo,
            data=data,
            dev=fs.test_set(),
            num_rounds=2,
            results_dir=tmp_path,
            model=ModelInputs(params, fs.model().projection),
        )
    assert all(r["all_fitness_nonfinite"] == 1 and r["num_active"] == 0 for r in hist.rounds)
    np.testing.assert_array_equal(np.asarray(carry.state.server.mean), 0)
    assert int(carry.selected_round) == 0  # ties to the earliest round
    js = json.loads((tmp_path / "metrics.json").read_text())
    assert js["fitness_all_nonfinite"] is True and js["fitness_all_nonfinite_rounds"] == 2
    assert all(c["fitness"] is None and not c["usable"] for r in js["rounds"] for c in r["clients"])


# ------------------------------------------------------------------------------------------------
# Per-client diagnostics and saved uploads
# ------------------------------------------------------------------------------------------------
def test_per_client_diagnostics_and_saved_uploads_replay_the_server(tmp_path):
    algo = fl.fedbpt(_cfg(), fs.tiny_lm())
    data = _data()
    up_dir = tmp_path / "uploads"
    carry, hist = _run(algo, data=data, dev=fs.test_set(), num_rounds=2, results_dir=tmp_path, save_uploads=up_dir)
    labels, mask = np.asarray(data.train.labels), np.asarray(data.train.example_mask)
    for row in hist.rounds:
        clients = row["clients"]
        assert sorted(c["index"] for c in clients) == [0, 1, 2, 3]
        for c in clients:
            k = c["index"]
            assert c["examples"] == COUNTS[k]
            assert c["label_counts"] == np.bincount(labels[k][mask[k] > 0], minlength=2).tolist()
            # ratio-of-means fitness = clean loss / perturbed loss, both reported
            assert c["fitness"] == pytest.approx(c["loss"] / c["perturbed_loss"], rel=1e-5)
        ranks = sorted(clients, key=lambda c: c["rank"])
        assert [c["rank"] for c in ranks] == [0, 1, 2, 3]
        assert [c["fitness"] for c in ranks] == sorted(c["fitness"] for c in clients)  # rank 0 = best
        weights = [c["weight"] for c in ranks]
        assert sum(weights) == pytest.approx(1.0) and weights == sorted(weights, reverse=True)
        assert sum(c["repaired"] for c in clients) == row["num_repaired"]
        single = [c for c in clients if sum(x > 0 for x in c["label_counts"]) == 1]
        assert row["single_class_clients"] == len(single)
        assert row["single_class_weight"] == pytest.approx(sum(c["weight"] for c in single), abs=1e-6)
        assert row["top_weight"] == pytest.approx(max(weights))
    # Evaluations: ‖z‖ of the global mean, prompt norm relative to the median token norm, predictions.
    ev = hist.evals[-1]
    z = np.asarray(carry.state.server.mean)
    assert ev["z_norm"] == pytest.approx(np.linalg.norm(z), rel=1e-5)
    p = np.asarray(algo.global_prompt(carry.state, fs.model()))
    ratio = np.linalg.norm(p, axis=-1).mean() / fl.median_token_norm(fs.tiny_lm())
    assert ev["prompt_norm_ratio"] == pytest.approx(ratio, rel=1e-5)
    assert len(ev["pred_dist"]) == 2 and sum(ev["pred_dist"]) == pytest.approx(1.0)
    assert hist.evals[0]["z_norm"] == 0.0
    # CSV: the summaries only; JSON: everything.
    with open(tmp_path / "rounds.csv") as f:
        header = next(csv.reader(f))
    assert {
        "single_class_clients",
        "single_class_weight",
        "top_weight",
        "perturbed_loss_mean",
        "z_norm",
        "all_fitness_nonfinite",
    } <= set(header) and "clients" not in header
    js = json.loads((tmp_path / "metrics.json").read_text())
    assert js["rounds"][0]["clients"] == hist.rounds[0]["clients"]
    # The saved uploads replay round 1's server step exactly.
    u = fl.load_uploads(up_dir)
    assert u["round"].tolist() == [1, 2] and u["mean"].shape == (2, 4, fs.D_A) and u["sigmas"].shape == (2, 4, 2)
    init = algo.init(None, fl.HParams().validate())
    np.testing.assert_array_equal(u["server_mean"][0], np.asarray(init.server.mean))
    replay, _ = aggregation.server_update(
        init.server,
        jnp.asarray(u["mean"][0]),
        jnp.asarray(u["fitness"][0]),
        jnp.asarray(u["sigmas"][0]),
        jnp.asarray(u["active"][0]),
        local_population=algo.config.population_size,
    )
    one, _ = _run(algo, data=data, dev=fs.test_set(), num_rounds=1)
    np.testing.assert_allclose(np.asarray(replay.mean), np.asarray(one.state.server.mean), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(u["server_mean"][1], np.asarray(one.state.server.mean))
    with pytest.raises(ValueError, match=r"save_uploads: algorithm 'fedprompt' has no client uploads"):
        _run(fl.fedprompt(_cfg(), fs.tiny_lm()), num_rounds=1, save_uploads=up_dir)


def test_scan_returns_no_d_length_vectors_unless_uploads_are_saved():
    """What leaves the scan is per-client scalars and label counts; the d-length uploads only on request."""
    algo = fl.fedbpt(_cfg(), fs.tiny_lm())
    hp = fl.HParams().validate()
    lm = fs.tiny_lm()
    scorer = objective.make_scorer(lm, None, n_prompt_tokens=2)
    chunks = jax.tree_util.tree_map(jnp.asarray, objective.chunk_examples(fs.test_set(), 16))
    evalset = evaluation.EvalSet(chunks, chunks.labels, chunks.example_mask)
    carry = fl.RunCarry(
        state=algo.init(None, hp),
        selected_round=jnp.asarray(-1),
        selected_dev_accuracy=jnp.asarray(-1.0),
        selected_test_accuracy=jnp.asarray(-1.0),
        selected_prompt=jnp.zeros((2, lm.hidden_size)),
        best_test_reference=jnp.asarray(-1.0),
        best_test_reference_round=jnp.asarray(-1),
        rounds_done=jnp.asarray(0, jnp.int32),
    )
    key_data = jax.random.key_data(jax.random.key(0))
    shapes = {}
    for keep in (False, True):
        seg = driver.make_segment(algo, scorer, 2, 2, lm.hidden_size, keep_uploads=keep)
        _, metrics, _ = jax.eval_shape(seg, key_data, carry, _data(), hp, fs.model(), evalset, None, jnp.asarray(1.0))
        shapes[keep] = {
            "/".join(str(getattr(k, "key", k)) for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(metrics)[0]
        }
    assert all(fs.D_A not in s for s in shapes[False].values()), shapes[False]
    assert max(int(np.prod(s)) for s in shapes[False].values()) <= 2 * 4 * 2  # [E, K, C] label counts
    assert shapes[True]["uploads/mean"] == (2, 4, fs.D_A)


# ------------------------------------------------------------------------------------------------
# Comparable baselines
# ------------------------------------------------------------------------------------------------
def test_fedavg_bbt_with_and_without_perturbation():
    lm = fs.tiny_lm()
    plain, pert = fl.fedavg_bbt(_cfg(), lm), fl.fedavg_bbt(_cfg(), lm, perturb=True)
    assert plain.name == "fedavg_bbt" and pert.name == "fedavg_bbt_perturbed"
    assert fl.make("fedavg_bbt_perturbed", _cfg(), lm).name == "fedavg_bbt_perturbed"
    assert pert.cost.forward_calls == 2 * plain.cost.forward_calls
    assert pert.cost.prefix_passes == 2 and plain.cost.prefix_passes == 1
    data, hp = _data(), fl.HParams().validate()
    out = {}
    for algo in (plain, pert):
        state = algo.init(None, hp)
        out[algo.name] = jax.jit(algo.round_detailed)(jax.random.key(3), state, data, hp, fs.model())
        # algo.round: the same round, scalar metrics only (as benchmarks and plain jit(algo.round) expect)
        _, scalars = jax.jit(algo.round)(jax.random.key(3), state, data, hp, fs.model())
        assert all(np.ndim(v) == 0 for v in scalars.values()) and "clients" not in scalars
        np.testing.assert_allclose(float(scalars["client_loss"]), float(out[algo.name][1]["client_loss"]), rtol=1e-6)
    _, m_plain = out["fedavg_bbt"]
    _, m_pert = out["fedavg_bbt_perturbed"]
    c_plain, c_pert = m_plain["clients"], m_pert["clients"]
    np.testing.assert_allclose(np.asarray(c_plain["fitness"]), np.asarray(c_plain["loss"]), rtol=1e-6)  # default
    assert np.all(np.isnan(np.asarray(c_plain["perturbed_loss"]))) and "perturbed_loss_mean" not in m_plain
    np.testing.assert_allclose(
        np.asarray(c_pert["fitness"]), np.asarray(c_pert["loss"]) / np.asarray(c_pert["perturbed_loss"]), rtol=1e-5
    )
    assert float(m_pert["perturbed_loss_mean"]) > 0
    # Same aggregation rule (example-count weights), different local searches.
    np.testing.assert_allclose(np.asarray(c_pert["weight"]), COUNTS / COUNTS.sum(), rtol=1e-6)
    assert not np.allclose(
        np.asarray(out["fedavg_bbt"][0].server.mean), np.asarray(out["fedavg_bbt_perturbed"][0].server.mean)
    )


def test_fedprompt_learning_rate_is_picked_on_dev():
    """One sweep over the rates, each lane what run() with that rate computes on dev (its only evaluation
    set: tune_learning_rate takes no test set)."""
    lm = fs.tiny_lm()
    algo = fl.fedprompt(_cfg(), lm)
    dev = _flipped(fs.test_set())
    key = jax.random.key(0)
    lr, table = fl.tune_learning_rate(algo, key, _data(), dev, lm, fs.model(), num_rounds=2, grid=(0.001, 0.3))
    assert [r["learning_rate"] for r in table] == [0.001, 0.3]
    for row in table:
        _, hist = fl.run(
            algo, key, _data(), dev, lm, fs.model(), num_rounds=2, hp=fl.HParams(learning_rate=row["learning_rate"])
        )
        accs = [e["accuracy"] for e in hist.evals]
        assert row["dev_accuracy"] == pytest.approx(max(accs), abs=1e-6)
        assert row["dev_round"] == hist.evals[accs.index(max(accs))]["round"]
        assert row["final_dev_accuracy"] == pytest.approx(accs[-1], abs=1e-6)
    best = max(range(2), key=lambda i: (table[i]["dev_accuracy"], -i))
    assert lr == table[best]["learning_rate"]
    assert fl.LR_GRID == (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
    with pytest.raises(ValueError, match="learning_rate: fedbpt never reads it"):
        fl.tune_learning_rate(fl.fedbpt(_cfg(), lm), key, _data(), dev, lm, fs.model(), num_rounds=2)


def test_bbt_tune_drives_the_same_cma_es_as_centralized_bbt():
    """fb.bbt's generations equal centralized_bbt's round on the same key and data (one BBT)."""
    lm = fs.tiny_lm()
    cfg = _cfg()
    data = _data(counts=np.full(4, fs.EXAMPLES))
    algo = fl.centralized_bbt(cfg, lm)
    hp = fl.HParams().validate()
    key = jax.random.key(5)
    state, _ = jax.jit(algo.round)(key, algo.init(None, hp), data, hp, fs.model())
    bcfg = bbt.BBTConfig(
        intrinsic_dim=cfg.intrinsic_dim,
        n_prompt_tokens=2,
        population_size=cfg.population_size,
        num_generations=cfg.local_generations,
        layout=cfg.layout,
    )
    b0, es_params = bbt.init(None, bcfg)
    np.testing.assert_array_equal(np.asarray(b0.es.C), np.asarray(algo.init(None, hp).es.C))
    flat = objective.flatten_clients(data.train)
    scorer = objective.make_scorer(lm, cfg.layout, n_prompt_tokens=2)
    ctx = scorer.prepare(lm.params, flat, data.spec)
    b1, hist = jax.jit(
        lambda k, s: bbt.run_generations(
            k,
            s,
            es_params,
            lm.params,
            fs.model().projection,
            ctx,
            flat,
            data.spec,
            config=bcfg,
            scorer=scorer,
            hidden_size=lm.hidden_size,
            num_generations=cfg.local_generations,
        )
    )(key, b0)
    np.testing.assert_allclose(np.asarray(b1.es.mean), np.asarray(state.es.mean), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(b1.es.std), float(state.es.std), rtol=1e-6)
    assert not np.allclose(np.asarray(b1.es.mean), 0)
    assert not hasattr(bbt, "make_strategy")  # no second (stock evosax) flavour


# ------------------------------------------------------------------------------------------------
# Optional stabilisers (off by default)
# ------------------------------------------------------------------------------------------------
def test_stabilisers_norm_clip_and_sigma_clamp(tmp_path):
    """norm_clip: τ starts at the threshold and grows by 1 each round whose broadcast ‖z‖ is below the
    upper bound; every upload (and so the global mean) has ‖z‖ ≤ τ. sigma_schedule="clamp": the broadcast
    σ never rises and stops at the floor. Off by default: the default config has neither."""
    assert not fl.FedConfig().norm_clip and fl.FedConfig().sigma_schedule == "none"
    lm = fs.tiny_lm()
    cfg = _cfg(norm_clip=True, norm_clip_threshold=0.5, norm_clip_upper=1.2, sigma_schedule="clamp", sigma_floor=0.9)
    algo = fl.fedbpt(cfg, lm)
    up_dir = tmp_path / "u"
    carry, hist = _run(algo, num_rounds=4, save_uploads=up_dir)
    u = fl.load_uploads(up_dir)
    taus = [r["norm_threshold"] for r in hist.rounds]
    z_prev = [0.0] + [r["z_norm"] for r in hist.rounds[:-1]]
    tau = 0.5
    for t, zp in zip(taus, z_prev):
        tau = tau + 1 if zp < 1.2 else tau
        assert t == pytest.approx(tau)
    assert taus[0] == pytest.approx(1.5) and taus[-1] < 0.5 + len(taus)  # it stopped growing at some round
    for r, t in enumerate(taus):
        assert np.all(np.linalg.norm(u["mean"][r], axis=-1) <= t * (1 + 1e-5))
        assert hist.rounds[r]["z_norm"] <= t * (1 + 1e-5)
    sig = [1.0] + [r["sigma"] for r in hist.rounds]
    assert all(b <= a + 1e-7 for a, b in zip(sig, sig[1:])) and min(sig) >= 0.9 - 1e-7
    assert sig[-1] == pytest.approx(0.9)  # the floor was reached
    plain, plain_hist = _run(fl.fedbpt(_cfg(), lm), num_rounds=4)
    assert plain_hist.rounds[-1]["sigma"] < 0.9 and "norm_threshold" not in plain_hist.rounds[0]
    with pytest.raises(ValueError, match=r"unknown sigma_schedule 'decay'"):
        _cfg(sigma_schedule="decay")
    with pytest.raises(ValueError, match=r"norm_clip_threshold must be finite and > 0, got nan"):
        _cfg(norm_clip_threshold=float("nan"))
