"""Losses, perturbation, fitness forms, population scoring and the projection A."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedbpt_jax import objective, prompt, testing


def test_ce_and_hinge_match_hand_computation():
    logits = jnp.array([[2.0, 0.0], [0.5, 1.5], [0.0, 0.0]])
    labels = jnp.array([0, 0, 1])
    ce = objective.per_example_loss(logits, labels, "ce")
    expected = [np.log(1 + np.exp(-2.0)), np.log(np.exp(0.5) + np.exp(1.5)) - 0.5, np.log(2.0)]
    np.testing.assert_allclose(ce, expected, rtol=1e-6)
    hinge = objective.per_example_loss(logits, labels, "hinge")
    # Σ_{j≠y} max(0, s_j − s_y + 2)
    np.testing.assert_allclose(hinge, [0.0, 3.0, 2.0], rtol=1e-6)
    acc = objective.per_example_loss(logits, labels, "accuracy")
    np.testing.assert_allclose(acc, [-1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="unknown loss 'mse'"):
        objective.per_example_loss(logits, labels, "mse")


def test_fitness_forms_differ_and_respect_mask():
    clean = jnp.array([1.0, 3.0, 100.0])
    pert = jnp.array([2.0, 1.0, 1.0])
    mask = jnp.array([1.0, 1.0, 0.0])
    np.testing.assert_allclose(objective.fitness(clean, None, mask), 2.0)
    np.testing.assert_allclose(objective.fitness(clean, pert, mask, "ratio_of_means"), 2.0 / 1.5)
    np.testing.assert_allclose(objective.fitness(clean, pert, mask, "mean_of_ratios"), (0.5 + 3.0) / 2)
    with pytest.raises(ValueError, match="unknown fitness form"):
        objective.fitness(clean, pert, mask, "sum")


def test_perturbation_rate_pads_and_exemption():
    spec = testing.random_spec(500)
    b = testing.random_batch(0, 64, 32, 500)
    ids = np.asarray(b.input_ids)
    ids[:, -1] = 1  # an exempt id at the last (always real) position
    b = b.replace(input_ids=ids)
    out = objective.perturb(jax.random.key(0), b, 0.3, spec)
    changed = np.asarray(out.input_ids) != ids
    real = np.asarray(b.attention_mask) > 0
    assert not changed[~real].any(), "padding must never be perturbed"
    frac = changed[real].mean()
    assert 0.25 < frac < 0.35, frac  # replaced w.p. 0.3 (a redraw of the same id is rare)
    assert changed[:, -1].any(), "the reference replaces special tokens too"
    kept = objective.perturb(jax.random.key(0), b, 0.3, spec, exempt_special=True)
    assert (np.asarray(kept.input_ids)[:, -1] == 1).all()
    np.testing.assert_array_equal(objective.perturb(jax.random.key(0), b, 0.0, spec).input_ids, ids)
    again = objective.perturb(jax.random.key(0), b, 0.3, spec)
    np.testing.assert_array_equal(out.input_ids, again.input_ids)
    other = objective.perturb(jax.random.key(1), b, 0.3, spec)
    assert (np.asarray(other.input_ids) != np.asarray(out.input_ids)).any()


def test_perturbation_vmaps_over_clients():
    spec = testing.random_spec(300)
    b = testing.random_batch(0, 4, 8, 300, leading=(3,))
    keys = jax.random.split(jax.random.key(0), 3)
    batched = jax.vmap(lambda k, x: objective.perturb(k, x, 0.5, spec))(keys, b)
    for i in range(3):
        one = objective.perturb(keys[i], jax.tree_util.tree_map(lambda a: a[i], b), 0.5, spec)
        np.testing.assert_array_equal(batched.input_ids[i], one.input_ids)


def test_projection_scale_follows_bbt():
    emb = jax.random.normal(jax.random.key(0), (1000, 32)) * 0.05
    A = prompt.make_projection(jax.random.key(1), emb, intrinsic_dim=50, n_prompt_tokens=10)
    assert A.shape == (50, 320)
    expected = float(jnp.std(emb)) / np.sqrt(50)
    assert abs(float(jnp.std(A)) / expected - 1) < 0.02
    U = prompt.make_projection(jax.random.key(1), emb, intrinsic_dim=50, n_prompt_tokens=10, kind="uniform")
    assert float(jnp.max(jnp.abs(U))) <= 1 / np.sqrt(50)
    z = jnp.ones((3, 50))
    assert prompt.to_prompt(A, z, 32).shape == (3, 10, 32)
    with pytest.raises(ValueError, match="unknown projection kind 'gauss'"):
        prompt.make_projection(jax.random.key(1), emb, intrinsic_dim=5, n_prompt_tokens=1, kind="gauss")
    with pytest.raises(ValueError, match="intrinsic_dim must be >= 1"):
        prompt.make_projection(jax.random.key(1), emb, intrinsic_dim=0, n_prompt_tokens=1)


@pytest.mark.parametrize("kind,layout", [("decoder", "after"), ("decoder", "before"), ("encoder", "add")])
def test_population_scoring_equals_loop_and_chunks(kind, layout):
    lm = testing.tiny_decoder(0) if kind == "decoder" else testing.tiny_encoder(0)
    b = testing.random_batch(0, 6, 16, 256, kind=kind)
    if kind == "encoder":
        b = b.replace(input_ids=np.where(b.attention_mask > 0, b.input_ids, 1))
    spec = testing.random_spec(256)
    sc = objective.make_scorer(lm, layout, n_prompt_tokens=3)
    prompts = jax.random.normal(jax.random.key(0), (5, 3, 64)) * 0.02
    ctx = jax.jit(sc.prepare)(lm.params, b, spec)
    pop = jax.jit(objective.population_logits, static_argnums=0, static_argnames="chunk_size")
    batched = pop(sc, lm.params, ctx, spec, prompts)
    one = jax.jit(sc.logits)
    loop = jnp.stack([one(lm.params, ctx, spec, p) for p in prompts])
    np.testing.assert_allclose(batched, loop, rtol=1e-5, atol=1e-5)
    chunked = pop(sc, lm.params, ctx, spec, prompts, chunk_size=2)
    np.testing.assert_allclose(chunked, batched, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(batched[0] - batched[1]).max()) > 0  # the prompt matters


def test_prefix_cache_scorer_equals_uncached():
    lm = testing.tiny_decoder(1)
    b = testing.random_batch(1, 5, 20, 256, min_len=3)
    spec = testing.random_spec(256, cue_len=3)
    cached = objective.make_scorer(lm, "after", n_prompt_tokens=4)
    plain = objective.make_scorer(lm, "after", use_cache=False, n_prompt_tokens=4)
    prompts = jax.random.normal(jax.random.key(0), (3, 4, 64)) * 0.05
    pop = jax.jit(objective.population_logits, static_argnums=0)
    a = pop(cached, lm.params, jax.jit(cached.prepare)(lm.params, b, spec), spec, prompts)
    c = pop(plain, lm.params, plain.prepare(lm.params, b, spec), spec, prompts)
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)


def test_unknown_layout_is_an_error():
    with pytest.raises(ValueError, match="unknown decoder layout 'add'"):
        objective.make_scorer(testing.tiny_decoder(0), "add")
    with pytest.raises(ValueError, match="unknown encoder layout 'after'"):
        objective.make_scorer(testing.tiny_encoder(0), "after")
