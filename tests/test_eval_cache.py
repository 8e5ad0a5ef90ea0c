"""The test set's prefix cache, kept for a whole run, gives the same evaluations as recomputing it."""

import jax
import jax.numpy as jnp
import numpy as np

from fedbpt_jax import federated as fl
from fedbpt_jax import prompt, testing
from fedbpt_jax.federated.core import FederatedData, ModelInputs


def test_cached_eval_prefix_equals_recomputed():
    lm = testing.tiny_decoder(0, num_layers=1)
    n = 4
    train = testing.random_batch(0, 3, 10, 256, leading=(n,))
    data = FederatedData(
        train=jax.tree_util.tree_map(jnp.asarray, train),
        counts=jnp.full((n,), 3, jnp.int32),
        spec=testing.random_spec(256),
    )
    test = testing.random_batch(1, 20, 10, 256)
    cfg = fl.FedConfig(
        num_clients=n,
        clients_per_round=2,
        population_size=4,
        local_generations=2,
        intrinsic_dim=8,
        n_prompt_tokens=2,
        layout="after",  # the prefix cache's layout
    )
    model = ModelInputs(
        lm.params, prompt.make_projection(jax.random.key(1), lm.input_embeddings(), intrinsic_dim=8, n_prompt_tokens=2)
    )
    algo = fl.make("fedbpt", cfg, lm)
    runs = [
        fl.run(
            algo,
            jax.random.key(0),
            data,
            test,
            lm,
            model,
            num_rounds=2,
            progress=False,
            eval_chunk=8,
            cache_eval_prefix=flag,
        )[1]
        for flag in (True, False)
    ]
    cached, plain = ([(e["accuracy"], e["loss"]) for e in h.evals] for h in runs)
    np.testing.assert_allclose(cached, plain, rtol=1e-5, atol=1e-6)
    assert runs[0].evals[0]["eval_flops"] < runs[1].evals[0]["eval_flops"]


def test_bbt_evaluator_prepared_once_equals_recomputed():
    from fedbpt_jax import bbt, objective

    lm = testing.tiny_decoder(0, num_layers=1)
    batch = testing.random_batch(2, 13, 10, 256)
    spec = testing.random_spec(256)
    scorer = objective.make_scorer(lm, "after", n_prompt_tokens=2)
    cached = bbt.Evaluator(lm, scorer, batch, spec, chunk=4)
    plain = bbt.Evaluator(lm, scorer, batch, spec, chunk=4, cache_budget=0)
    assert cached.prepared and not plain.prepared
    A = prompt.make_projection(jax.random.key(1), lm.input_embeddings(), intrinsic_dim=8, n_prompt_tokens=2)
    for z in (jnp.zeros(8), jax.random.normal(jax.random.key(3), (8,))):
        a, b = cached.metrics(A, z), plain.metrics(A, z)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
