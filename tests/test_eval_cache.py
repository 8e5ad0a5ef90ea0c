"""The test set's prefix cache, kept for a whole run, gives the same evaluations as recomputing it."""
import jax
import jax.numpy as jnp
import numpy as np

from fedbpt_jax import federated as fl, prompt, testing
from fedbpt_jax.federated.core import FederatedData, ModelInputs


def test_cached_eval_prefix_equals_recomputed():
    lm = testing.tiny_decoder(0, num_layers=1)
    n = 4
    train = testing.random_batch(0, 3, 10, 256, leading=(n,))
    data = FederatedData(train=jax.tree_util.tree_map(jnp.asarray, train), counts=jnp.full((n,), 3, jnp.int32),
                         spec=testing.random_spec(256))
    test = testing.random_batch(1, 20, 10, 256)
    cfg = fl.FedConfig(num_clients=n, clients_per_round=2, population_size=4, local_generations=2,
                       intrinsic_dim=8, n_prompt_tokens=2)
    model = ModelInputs(lm.params, prompt.make_projection(jax.random.key(1), lm.input_embeddings(),
                                                          intrinsic_dim=8, n_prompt_tokens=2))
    algo = fl.make("fedbpt", cfg, lm)
    runs = [fl.run(algo, jax.random.key(0), data, test, lm, model, num_rounds=2, progress=False,
                   eval_chunk=8, cache_eval_prefix=flag)[1] for flag in (True, False)]
    cached, plain = ([(e["accuracy"], e["loss"]) for e in h.evals] for h in runs)
    np.testing.assert_allclose(cached, plain, rtol=1e-5, atol=1e-6)
    assert runs[0].evals[0]["eval_flops"] < runs[1].evals[0]["eval_flops"]
