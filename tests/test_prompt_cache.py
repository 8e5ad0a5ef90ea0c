"""Layout "before" made fast: the per-candidate prompt cache and the texts packed by length.

Stated tolerance: the cached scorer's label logits equal the uncached computation (every row in full at the
padded length) to 2e-5 absolute in float32 (the same sums in another order) and to 0.1 absolute (logits of
magnitude ~1) in bfloat16, where the cached keys/values and the packed rows' matmuls round differently.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedbpt_jax import objective, testing
from fedbpt_jax.models import decoder as dec
from fedbpt_jax.models import decoder_cache
from fedbpt_jax.types import ScoringSpec, TokenBatch

CFG = dec.DecoderConfig(
    vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64
)
TOL = {"float32": 2e-5, "bfloat16": 0.1}


def _batch(seed: int, clients: int, examples: int, t: int, min_len: int = 1, cue_len: int = 2) -> TokenBatch:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, t + 1, size=(clients, examples))
    ids = np.zeros((clients, examples, t), np.int32)
    mask = np.zeros_like(ids)
    for c in range(clients):
        for e in range(examples):
            n = lengths[c, e]
            ids[c, e, t - n :] = rng.integers(3, CFG.vocab_size, size=n)
            mask[c, e, t - n :] = 1
    example_mask = np.ones((clients, examples), np.float32)
    example_mask[0, -1] = 0  # a padding row (a copy, never scored): not computed
    return TokenBatch(
        input_ids=ids,
        attention_mask=mask,
        answer_pos=np.full((clients, examples), t - 1, np.int32),
        labels=rng.integers(0, 2, size=(clients, examples)).astype(np.int32),
        example_mask=example_mask,
        packing=decoder_cache.packing_for(mask, example_mask, cue_len=cue_len, key_cost=1000.0),
    )


def _spec(lead=None, cue=(12, 13)) -> ScoringSpec:
    return ScoringSpec(
        label_ids=jnp.asarray([10, 11], jnp.int32),
        cue_ids=jnp.asarray(cue, jnp.int32),
        exempt_ids=jnp.asarray([-1], jnp.int32),
        lead_ids=None if lead is None else jnp.asarray(lead, jnp.int32),
        vocab_size=CFG.vocab_size,
    )


def _client(batch: TokenBatch, c: int) -> TokenBatch:
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a[c]), batch)


uncached = jax.jit(dec.label_logits, static_argnums=(0, 5))
packed_logits = jax.jit(decoder_cache.label_logits_packed, static_argnums=0)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("lead", [None, (5, 6, 7)])
def test_packed_prompt_cache_equals_uncached_layout_before(compute_dtype, lead):
    cfg = dataclasses.replace(CFG, compute_dtype=compute_dtype)
    params = dec.init_params(cfg, jax.random.key(0))
    batch, spec = _batch(0, 3, 7, 12), _spec(lead)
    prompt = 0.1 * jax.random.normal(jax.random.key(1), (5, cfg.hidden_size))
    for c in range(3):
        b = _client(batch, c)
        packed = decoder_cache.pack_texts(b, spec)
        assert packed.ids.size < b.input_ids.size + 7 * 2  # real tokens only
        real = np.asarray(b.example_mask) > 0  # a padding row's logits are not computed
        for p in (prompt, None):
            want = uncached(cfg, params, b, spec, p, "before")
            got = packed_logits(cfg, params, packed, spec, p)
            np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=TOL[compute_dtype], rtol=0)
    # the prompt matters, and a different prompt gives different logits through the cache
    b = _client(batch, 0)
    a = packed_logits(cfg, params, decoder_cache.pack_texts(b, spec), spec, prompt)
    z = packed_logits(cfg, params, decoder_cache.pack_texts(b, spec), spec, -prompt)
    assert float(jnp.max(jnp.abs(a - z))) > 1e-4


def test_scorer_with_and_without_the_prompt_cache_agree_and_pair_copies():
    params = dec.init_params(CFG, jax.random.key(0))
    batch, spec = _batch(1, 2, 6, 10), _spec((5, 6))
    prompts = 0.1 * jax.random.normal(jax.random.key(2), (4, 3, CFG.hidden_size))
    cached = objective.scorer_for("decoder", CFG, "before", n_prompt_tokens=3)
    plain = objective.scorer_for("decoder", CFG, "before", n_prompt_tokens=3, cache="none")
    assert (cached.cache, plain.cache) == ("prompt", "none")
    pop = jax.jit(objective.population_logits, static_argnums=0)
    b = _client(batch, 1)
    pert = objective.perturb(jax.random.key(3), b, 0.5, spec)
    assert pert.packing == b.packing  # a perturbed copy keeps the packing
    got = pop(cached, params, cached.prepare(params, b, spec), spec, prompts)
    want = pop(plain, params, plain.prepare(params, b, spec), spec, prompts)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)
    # clean and perturbed copies in one pass (one prompt pass per candidate) = two separate calls
    paired = objective.stack_contexts(cached.prepare(params, b, spec), cached.prepare(params, pert, spec))
    fit, loss = jax.jit(objective.population_fitness_paired, static_argnums=0)(cached, params, paired, b, spec, prompts)
    fit2, loss2 = jax.jit(objective.population_fitness, static_argnums=0)(
        plain, params, plain.prepare(params, b, spec), plain.prepare(params, pert, spec), b, spec, prompts
    )
    np.testing.assert_allclose(np.asarray(fit), np.asarray(fit2), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(loss), np.asarray(loss2), rtol=1e-5)


def test_prefix_cache_puts_the_lead_before_the_text():
    params = dec.init_params(CFG, jax.random.key(4))
    b, spec = _client(_batch(2, 1, 5, 9), 0), _spec((8, 9, 10, 11))
    prompt = 0.1 * jax.random.normal(jax.random.key(5), (2, CFG.hidden_size))
    want = uncached(CFG, params, b, spec, prompt, "after")
    got = decoder_cache.label_logits_cached(CFG, params, decoder_cache.prefix_cache(CFG, params, b, spec), spec, prompt)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)
    no_lead = uncached(CFG, params, b, _spec(None), prompt, "after")
    assert float(jnp.max(jnp.abs(no_lead - want))) > 1e-4  # the lead is read


def test_pack_texts_places_every_real_token_once_at_its_position():
    b, spec = _client(_batch(5, 1, 9, 20, cue_len=3), 0), _spec(cue=(12, 13, 14))
    b = b.replace(example_mask=jnp.ones(9, jnp.float32), packing=None)  # every row real
    lengths = np.asarray(b.attention_mask).sum(-1)
    for packing in [decoder_cache.packing_for(b.attention_mask, cue_len=3, key_cost=k) for k in (4.0, 1e6)] + [None]:
        p = decoder_cache.pack_texts(b, spec, packing)
        ids, mask, seg, pos = (np.asarray(x) for x in (p.ids, p.mask, p.segments, p.seg_pos))
        assert mask.sum() == lengths.sum() + 9 * 3  # every real token and every cue, once
        for e in range(9):
            sel = seg == np.asarray(jnp.argsort(-jnp.asarray(lengths), stable=True)).tolist().index(e)
            want = np.asarray(b.input_ids[e])[-lengths[e] :].tolist() + [12, 13, 14]
            assert ids[sel].tolist() == want and pos[sel].tolist() == list(range(lengths[e] + 3))
            r, c = divmod(int(p.ends[e]), ids.shape[1])
            assert ids[r, c] == 14 and seg[r, c] >= 0 and pos[r, c] == lengths[e] + 2
    wide = decoder_cache.packing_for(b.attention_mask, cue_len=3, key_cost=1e6)
    assert wide[:2] == (1, lengths.sum() + 27)  # keys nearly free: one row, no waste
    with pytest.raises(ValueError, match="made for a cue of 3 token.*the spec's cue has 2"):
        decoder_cache.pack_texts(b, _spec(cue=(12, 13)), wide)


def test_packing_holds_for_sampled_clients_and_a_pooled_batch():
    batch = _batch(3, 6, 5, 16)
    rows, width, _ = batch.packing
    lengths = decoder_cache.example_lengths(batch.attention_mask, batch.example_mask)
    for subset in ([0], [2, 5], [1, 3, 4]):
        assert decoder_cache._row_loads(lengths[subset], 2, rows).max() <= width
    params = dec.init_params(CFG, jax.random.key(0))
    sc = objective.scorer_for("decoder", CFG, "before", n_prompt_tokens=2)
    jb = jax.tree_util.tree_map(jnp.asarray, batch)
    prompt = 0.1 * jax.random.normal(jax.random.key(1), (2, CFG.hidden_size))
    pooled = sc.logits(params, objective.prepare_pooled(sc, params, jb, _spec()), _spec(), prompt)
    flat = objective.flatten_clients(jb)
    assert flat.packing is None
    plain = objective.scorer_for("decoder", CFG, "before", n_prompt_tokens=2, cache="none")
    want = plain.logits(params, flat, _spec(), prompt)
    real = np.asarray(flat.example_mask) > 0
    np.testing.assert_allclose(np.asarray(pooled)[real], np.asarray(want)[real], atol=2e-5, rtol=0)
    chunks = objective.chunk_examples(_client(batch, 1), 2, by_length=True, cue_len=2)
    assert chunks.packing[2] == 2 and chunks.input_ids.shape[:2] == (3, 2)


def test_cost_model_counts_the_prompt_pass_once_per_candidate():
    sc = objective.scorer_for("decoder", CFG, "before", n_prompt_tokens=10)
    c = sc.cost(24, 3, 2, (2, 30, 3), 4, 4)
    assert c.per_prompt == dec.flops_per_example(CFG, 10, 14, 0)
    assert c.call(4) == 4 * c.forward + c.per_prompt
    assert c.forward < sc.cost(24, 3, 2, None, 4, 4).forward  # 2 rows of 30 < 4 rows of 27
    assert decoder_cache.prompt_cache_bytes(CFG, 10, 4) == 14 * 3 * 2 * 2 * 8 * 4


def test_cache_where_it_cannot_apply_is_a_one_line_error():
    with pytest.raises(ValueError, match="scorer cache 'prompt' cannot apply to decoder layout 'after'.*accepted"):
        objective.scorer_for("decoder", CFG, "after", cache="prompt")
    with pytest.raises(ValueError, match="scorer cache 'prefix' cannot apply to decoder layout 'before'"):
        objective.scorer_for("decoder", CFG, "before", cache="prefix")
    enc = testing.tiny_encoder(0)
    with pytest.raises(ValueError, match="scorer cache 'prompt' is for decoders.*accepted 'auto' or 'none'"):
        objective.make_scorer(enc, None, cache="prompt")
    with pytest.raises(ValueError, match="unknown scorer cache 'fast'"):
        objective.scorer_for("decoder", CFG, "before", cache="fast")


def test_decoder_default_layout_is_before():
    assert objective.scorer_for("decoder", CFG).layout == "before"
    assert objective.scorer_for("decoder", CFG).cache == "prompt"
    assert objective.scorer_for("decoder", CFG, "after").cache == "prefix"
