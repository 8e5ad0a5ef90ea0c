"""The driver's pieces, each alone (no segment is compiled here): option checks, the run's keys, the
initial carry, the evaluation-prefix decision and sets, the history rows, the compile counter."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import federated_setup as fs
from fedbpt_jax import federated as fl
from fedbpt_jax import objective, testing
from fedbpt_jax.federated import algorithms as algs  # noqa: E402
from fedbpt_jax.federated import core, counters, driver, evaluation, records  # noqa: E402


def _algo():
    cfg = fl.FedConfig(
        num_clients=4, clients_per_round=2, population_size=4, local_generations=2, intrinsic_dim=8, n_prompt_tokens=2
    )
    return fl.fedbpt(cfg, fs.tiny_lm())


def _options(**kw):
    base = dict(
        num_rounds=4, eval_every=2, checkpoint_every=1, eval_chunk=8, stop_after=None, save_uploads=None, mesh=None
    )
    base.update(kw)
    return base


def test_check_options_names_the_bad_option():
    algo = _algo()
    assert driver._check_options(algo, **_options()) is None
    with pytest.raises(ValueError, match="eval_chunk must be a positive integer"):
        driver._check_options(algo, **_options(eval_chunk=0))
    with pytest.raises(ValueError, match="multiple of eval_every"):
        driver._check_options(algo, **_options(num_rounds=3))
    with pytest.raises(ValueError, match="stop_after"):
        driver._check_options(algo, **_options(stop_after=1))
    with pytest.raises(ValueError, match="no client uploads"):
        driver._check_options(fl.centralized_bbt(algo.config, fs.tiny_lm()), **_options(save_uploads="x"))


def test_algorithm_declares_what_run_checks_not_its_name():
    """``run`` reads the spec's declared properties, not the algorithm's name: a renamed FedBPT keeps its
    uploads and clean contexts, FedBPT with ``uploads=False`` loses them, and the messages name the property
    and the built-in algorithms that declare it."""
    algo = _algo()
    assert len(fl.FederatedAlgorithm._fields) == 5 and algo.spec.uploads and algo.uses_clean_context
    assert (algo.config, algo.cost, algo.mesh, algo.scorer) == (
        algo.spec.config,
        algo.spec.cost,
        None,
        algo.spec.scorer,
    )
    renamed = algo._replace(name="my_algorithm")
    assert driver._check_options(renamed, **_options(save_uploads="x")) is None
    silent = algo._replace(spec=dataclasses.replace(algo.spec, uploads=False))
    with pytest.raises(
        ValueError,
        match=r"algorithm 'fedbpt' has no client uploads to save \(its spec.uploads is "
        r"False\); .*built in: \['fedavg_bbt', 'fedavg_bbt_perturbed', 'fedbpt'\]",
    ):
        driver._check_options(silent, **_options(save_uploads="x"))
    lm = fs.tiny_lm()
    declared = {
        name: (a.uploads, a.uses_clean_context)
        for name, a in ((n, fl.make(n, algo.config, lm)) for n in sorted(fl.ALGORITHMS))
    }
    assert declared == {
        "centralized_bbt": (False, False),
        "fedavg_bbt": (True, True),
        "fedavg_bbt_perturbed": (True, True),
        "fedbpt": (True, True),
        "fedprompt": (False, False),
        "manual": (False, False),
    }
    assert algs.declaring("uses_clean_context") == ["fedavg_bbt", "fedavg_bbt_perturbed", "fedbpt"]
    with pytest.raises(ValueError, match="unknown declared property 'uplods'"):
        algs.declaring("uplods")


def test_gather_takes_the_sampled_clients_rows_and_keeps_none():
    data = fs.make_data(4)
    idx = jnp.asarray([2, 0])
    batch, counts = core.gather_clients(data, idx)
    np.testing.assert_array_equal(np.asarray(batch.input_ids), np.asarray(data.train.input_ids)[[2, 0]])
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(data.counts)[[2, 0]])
    assert core.gather(None, idx) is None
    ctx = {"k": jnp.arange(8.0).reshape(4, 2)}
    np.testing.assert_array_equal(np.asarray(core.gather(ctx, idx)["k"]), [[4.0, 5.0], [0.0, 1.0]])


def test_run_keys_typed_and_raw_agree_with_round_key():
    key = jax.random.key(4)
    k_init, k_data, impl = driver.run_keys(key)
    _, raw_data, raw_impl = driver.run_keys(jax.random.key_data(key))
    np.testing.assert_array_equal(np.asarray(k_data), np.asarray(raw_data))
    assert str(impl) == str(raw_impl)
    rounds = jax.random.wrap_key_data(k_data, impl=impl)
    np.testing.assert_array_equal(
        np.asarray(jax.random.key_data(jax.random.fold_in(rounds, 3))),
        np.asarray(jax.random.key_data(fl.round_key(key, 3))),
    )
    assert not np.array_equal(np.asarray(jax.random.key_data(k_init)), np.asarray(k_data))


def test_initial_carry_selects_nothing():
    algo = _algo()
    carry = driver.initial_carry(algo, jax.random.key(0), fl.HParams().validate(), fs.tiny_lm().hidden_size)
    assert int(carry.selected_round) == -1 and int(carry.rounds_done) == 0
    assert carry.selected_prompt.shape == (2, fs.tiny_lm().hidden_size)
    assert float(carry.best_test_reference) == -1.0


def test_eval_prefix_cache_asks_the_scorer_and_the_budget():
    lm = fs.tiny_lm()
    chunks = objective.chunk_examples(fs.test_set(), 8)
    cached = objective.make_scorer(lm, "after", n_prompt_tokens=2)
    plain = objective.make_scorer(lm, "after", n_prompt_tokens=2, use_cache=False)
    assert cached.caches_prefix and not plain.caches_prefix
    assert evaluation.decide_eval_prefix_cache(cached, lm.params, chunks, None, fs.spec(), None, 1 << 30)
    with pytest.warns(UserWarning, match=r"prefix caches need .* GiB, more than eval_cache_budget \(0.00 GiB\)"):
        assert not evaluation.decide_eval_prefix_cache(
            cached, lm.params, chunks, None, fs.spec(), None, 0
        )  # over the budget
    assert not evaluation.decide_eval_prefix_cache(
        plain, lm.params, chunks, None, fs.spec(), True, 1 << 30
    )  # nothing to cache
    sets = evaluation.eval_sets(cached, lm, fs.model(), chunks, chunks, fs.spec(), cache_prefix=True)
    assert sets.test.prepared and sets.dev.prepared
    plain_sets = evaluation.eval_sets(plain, lm, fs.model(), chunks, None, fs.spec(), cache_prefix=False)
    assert plain_sets.dev is None and set(plain_sets.flops) == {"eval_flops"}
    assert sets.flops["eval_flops"] < plain_sets.flops["eval_flops"]  # the prefix pass is not repeated
    row = sets.row(2, {"accuracy": np.float32(0.5), "pred_dist": np.array([0.25, 0.75], np.float32)})
    assert row == {"round": 2, "accuracy": 0.5, "pred_dist": [0.25, 0.75], **sets.flops}


def test_round_rows_account_for_the_active_clients():
    algo = _algo()
    cost = {"examples_per_call": 4, "prefix_passes": 2, "flops_per_client": 10.0}
    metrics = {
        "client_loss": np.array([0.5, 0.25], np.float32),
        "sigma": np.array([1.0, 0.5], np.float32),
        "active_clients": np.array([2, 0], np.int32),
        "clients": {
            "index": np.array([[0, 3], [1, 2]], np.int32),
            "active": np.array([[True, True], [False, False]]),
            "fitness": np.array([[0.1, np.nan], [np.nan, np.nan]], np.float32),
        },
    }
    rows = records.round_rows(metrics, 5, algo, cost, seconds=0.5)
    assert [r["round"] for r in rows] == [5, 6]
    assert rows[0]["forward_calls"] == 2 * algo.cost.forward_calls and rows[1]["forward_calls"] == 0
    assert rows[0]["prefix_passes"] == 4 and rows[0]["model_flops"] == 20.0 and rows[1]["model_flops"] == 0.0
    assert rows[0]["bytes_up_per_client"] == algo.cost.comm.up_per_client and rows[0]["seconds"] == 0.5
    assert rows[0]["clients"][1] == {"index": 3, "active": True, "fitness": None}
    assert "clients" in metrics  # the caller's dict is left as it was


def test_count_compiles_is_a_block_counter():
    with testing.count_compiles() as counts:
        counters.TRACE_COUNTS["test_counter"] += 1
        assert counts.traces["test_counter"] == 1  # live inside the block
    counters.TRACE_COUNTS["test_counter"] += 1
    assert counts.traces["test_counter"] == 1 and not counts.compiles  # frozen after it
    assert fl.trace_count("test_counter") >= 2


def test_sample_round_reports_sampled_and_dropped_clients():
    data = fs.make_data(4, counts=(4, 0, 3, 2))
    cfg = fl.FedConfig(num_clients=4, clients_per_round=3, population_size=4, local_generations=2, intrinsic_dim=8)
    s = core.sample_round(jax.random.key(0), data, fl.HParams(dropout_rate=0.0).validate(), cfg)
    assert sorted(np.asarray(s.index).tolist()) == [0, 2, 3]  # the empty client is never sampled
    assert np.asarray(s.active).all() and s.batch.input_ids.shape[:2] == (3, fs.EXAMPLES)
    gone = core.sample_round(jax.random.key(0), data, fl.HParams(dropout_rate=1.0).validate(), cfg)
    np.testing.assert_array_equal(np.asarray(gone.index), np.asarray(s.index))  # dropouts do not change who is sampled
    assert not np.asarray(gone.active).any()
    assert jnp.shape(s.keys)[0] == 3
