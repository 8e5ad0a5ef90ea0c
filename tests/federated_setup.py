"""Shared tiny set-up of the federated tests (imported by the test modules and by the subprocess worker).

One configuration ("A") serves most tests, so the process compiles its round once: N = 10,000 clients
held as padded arrays, K = 8 sampled per round, a 1-layer tiny decoder. Every function here is
deterministic; results that several tests compare against are cached per process.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fedbpt_jax import federated as fl
from fedbpt_jax import prompt, testing
from fedbpt_jax.federated.core import FederatedData, ModelInputs

VOCAB, SEQ, EXAMPLES = 128, 8, 4
N_A, K_A = 10_000, 8
# d = 32: the clients' lazy eigendecomposition (gap 1.66 tells) does not run within I = 2 generations, as
# in the paper's setting (gap 18.8 > I = 8); so sharded and single-device runs can agree to rounding.
D_A = 32


@functools.lru_cache(maxsize=None)
def tiny_lm():
    return testing.tiny_decoder(
        0, vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64
    )


@functools.lru_cache(maxsize=None)
def spec():
    return testing.random_spec(VOCAB, cue_len=2)


def poison_id() -> int:
    """A token id that is neither a label word nor part of the cue (its embedding row can be poisoned)."""
    s = spec()
    used = set(np.asarray(s.label_ids).tolist()) | set(np.asarray(s.cue_ids).tolist())
    return max(i for i in range(3, VOCAB) if i not in used)


def config_a(**kw) -> fl.FedConfig:
    base = dict(
        num_clients=N_A,
        clients_per_round=K_A,
        population_size=4,
        local_generations=2,
        intrinsic_dim=D_A,
        n_prompt_tokens=2,
        # These tests were written for (and count the passes of) the prefix cache, layout "after"'s; the
        # default layout ("before", the prompt cache) has tests of its own (test_prompt_cache.py, the golden
        # case "fedbpt_prompt_before") and is named where a test here runs it.
        layout="after",
    )
    base.update(kw)
    return fl.FedConfig(**base)


def host_data(n: int = N_A, seed: int = 0, counts=None):
    """Numpy client data ``[n, E, T]`` (no poison token) and counts (default: all E)."""
    train = testing.random_batch(seed, EXAMPLES, SEQ, VOCAB - 1, leading=(n,))
    pid = poison_id()
    ids = np.where(train.input_ids == pid, pid - 1, train.input_ids)
    train = train.replace(input_ids=ids)
    if counts is None:
        counts = np.full((n,), EXAMPLES, np.int32)
    counts = np.asarray(counts, np.int32)
    mask = (np.arange(EXAMPLES)[None, :] < counts[:, None]).astype(np.float32)
    train = train.replace(example_mask=mask)
    return train, counts


def make_data(n: int = N_A, seed: int = 0, counts=None, train=None) -> FederatedData:
    if train is None:
        train, counts = host_data(n, seed, counts)
    elif counts is None:
        counts = np.full((n,), EXAMPLES, np.int32)
    return FederatedData(
        train=jax.tree_util.tree_map(jnp.asarray, train), counts=jnp.asarray(counts, jnp.int32), spec=spec()
    )


@functools.lru_cache(maxsize=None)
def data_a() -> FederatedData:
    return make_data()


@functools.lru_cache(maxsize=None)
def test_set():
    t = testing.random_batch(1, 16, SEQ, VOCAB - 1)
    pid = poison_id()
    return t.replace(input_ids=np.where(t.input_ids == pid, pid - 1, t.input_ids))


@functools.lru_cache(maxsize=None)
def model() -> ModelInputs:
    lm = tiny_lm()
    a = prompt.make_projection(jax.random.key(1), lm.input_embeddings(), intrinsic_dim=D_A, n_prompt_tokens=2)
    return ModelInputs(lm.params, a)


@functools.lru_cache(maxsize=None)
def algo_a():
    """Built once per process: every run() of it reuses one compiled segment."""
    return fl.fedbpt(config_a(), tiny_lm())


def run_a(seed: int = 0, num_rounds: int = 2, *, mesh=None, data=None, model_inputs=None, hp=None, **kw):
    algo = algo_a() if mesh is None else fl.fedbpt(config_a(), tiny_lm(), mesh=mesh)
    return fl.run(
        algo,
        jax.random.key(seed),
        data_a() if data is None else data,
        test_set(),
        tiny_lm(),
        model() if model_inputs is None else model_inputs,
        num_rounds=num_rounds,
        hp=fl.HParams() if hp is None else hp,
        eval_chunk=16,
        progress=False,
        **kw,
    )


def summary(carry, history) -> dict:
    """What the sharded / multi-host runs are compared on (JSON-friendly)."""
    c = fl.host(carry)
    s = c.state.server
    return {
        "mean": np.asarray(s.mean).tolist(),
        "sigma": float(s.std),
        "C_diag": np.diag(s.C).tolist(),
        "best_test_reference": float(c.best_test_reference),
        "selected_round": int(c.selected_round),
        "round": int(c.state.round),
        "rounds": [{k: v for k, v in r.items() if k not in ("seconds", "clients")} for r in history.rounds],
        "clients": [r.get("clients") for r in history.rounds],
        "evals": history.evals,
    }


@functools.lru_cache(maxsize=None)
def reference_summary(seed: int = 0, num_rounds: int = 2) -> dict:
    """Single-device result of configuration A (what the sharded runs must reproduce)."""
    return summary(*run_a(seed, num_rounds))


def assert_summaries_close(got: dict, want: dict, *, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    np.testing.assert_allclose(got["mean"], want["mean"], rtol=rtol, atol=atol)
    np.testing.assert_allclose(got["sigma"], want["sigma"], rtol=rtol, atol=atol)
    np.testing.assert_allclose(got["C_diag"], want["C_diag"], rtol=rtol, atol=atol)
    assert got["round"] == want["round"]
    assert len(got["rounds"]) == len(want["rounds"])
    for g, w in zip(got["rounds"], want["rounds"]):
        assert g.keys() == w.keys()
        for k in w:
            np.testing.assert_allclose(g[k], w[k], rtol=rtol, atol=atol, err_msg=f"round {w['round']} {k}")
    for g, w in zip(got["evals"], want["evals"]):
        np.testing.assert_allclose(g["loss"], w["loss"], rtol=rtol, atol=atol)
    for g, w in zip(got["clients"], want["clients"]):
        assert [c["index"] for c in g] == [c["index"] for c in w]
        np.testing.assert_allclose([c["fitness"] for c in g], [c["fitness"] for c in w], rtol=rtol, atol=atol)
        np.testing.assert_allclose([c["weight"] for c in g], [c["weight"] for c in w], rtol=rtol, atol=atol)
