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
from fedbpt_jax.data.batches import federated_batches
from fedbpt_jax.models import decoder as dec
from fedbpt_jax.types import ScoringSpec, TokenBatch

CFG = dec.DecoderConfig(
    vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64
)
TOL = {"float32": 2e-5, "bfloat16": 0.1}


def _batch(seed: int, clients: int, examples: int, t: int, min_len: int = 1) -> TokenBatch:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, t + 1, size=(clients, examples))
    ids = np.zeros((clients, examples, t), np.int32)
    mask = np.zeros_like(ids)
    for c in range(clients):
        for e in range(examples):
            n = lengths[c, e]
            ids[c, e, t - n :] = rng.integers(3, CFG.vocab_size, size=n)
            mask[c, e, t - n :] = 1
    return TokenBatch(
        input_ids=ids,
        attention_mask=mask,
        answer_pos=np.full((clients, examples), t - 1, np.int32),
        labels=rng.integers(0, 2, size=(clients, examples)).astype(np.int32),
        example_mask=np.ones((clients, examples), np.float32),
        widths=dec.slot_widths(mask),
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
packed_logits = jax.jit(dec.label_logits_packed, static_argnums=0)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("lead", [None, (5, 6, 7)])
def test_packed_prompt_cache_equals_uncached_layout_before(compute_dtype, lead):
    cfg = dataclasses.replace(CFG, compute_dtype=compute_dtype)
    params = dec.init_params(cfg, jax.random.key(0))
    batch, spec = _batch(0, 3, 7, 12), _spec(lead)
    prompt = 0.1 * jax.random.normal(jax.random.key(1), (5, cfg.hidden_size))
    for c in range(3):
        b = _client(batch, c)
        packed = dec.pack_texts(b, spec)
        assert packed.ids.size < b.input_ids.size + 7 * 2  # trimmed to the slot widths
        for p in (prompt, None):
            want = uncached(cfg, params, b, spec, p, "before")
            got = packed_logits(cfg, params, packed, spec, p)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL[compute_dtype], rtol=0)
    # the prompt matters, and a different prompt gives different logits through the cache
    b = _client(batch, 0)
    a = packed_logits(cfg, params, dec.pack_texts(b, spec), spec, prompt)
    z = packed_logits(cfg, params, dec.pack_texts(b, spec), spec, -prompt)
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
    assert pert.widths == b.widths  # a perturbed copy keeps the length profile
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
    got = dec.label_logits_cached(CFG, params, dec.prefix_cache(CFG, params, b, spec), spec, prompt)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)
    no_lead = uncached(CFG, params, b, _spec(None), prompt, "after")
    assert float(jnp.max(jnp.abs(no_lead - want))) > 1e-4  # the lead is read


def test_packing_plan_places_every_token_once():
    widths, t, tc = (20, 14, 9, 9, 6, 3, 1), 24, 3
    narrow = dec.packing_plan(widths, t, tc, key_cost=4.0)  # wide rows dear: the longest slot sets the width
    assert narrow.width == widths[0] + tc and narrow.rows < len(widths)  # short examples share rows
    wide = dec.packing_plan(widths, t, tc, key_cost=1e6)  # keys nearly free: one row, no waste
    assert wide.rows == 1 and wide.width == sum(widths) + len(widths) * tc
    for plan in (narrow, wide):
        _check_plan(plan, widths, t, tc)
    with pytest.raises(ValueError, match="non-increasing"):
        dec.packing_plan((3, 5), 8, 1)


def _check_plan(plan, widths, t, tc):
    real = plan.src[plan.src < len(widths) * t]
    assert len(real) == sum(widths) and len(set(real.tolist())) == len(real)
    for j, w in enumerate(widths):
        r, col = divmod(int(plan.ends[j]), plan.width)
        assert plan.segments[r, col] == j
        assert plan.src[r, col] == len(widths) * t + tc - 1  # the cue's last token ends every slot
        assert (plan.segments == j).sum() == w + tc


def test_slot_widths_hold_for_sampled_clients_and_pooled_data():
    batch = _batch(3, 6, 5, 16)
    lengths = np.asarray(batch.attention_mask).sum(-1)
    for subset in ([0], [2, 5], [1, 3, 4]):
        sorted_len = -np.sort(-lengths[subset], axis=-1)
        assert np.all(sorted_len <= np.asarray(batch.widths)[None])
    flat = objective.flatten_clients(jax.tree_util.tree_map(jnp.asarray, batch))
    assert len(flat.widths) == 30
    assert np.all(-np.sort(-lengths.reshape(-1)) <= np.asarray(flat.widths))
    fed, _ = federated_batches(_client(batch, 0), [np.arange(3), np.arange(3, 5)])
    assert fed.widths == dec.slot_widths(fed.attention_mask)


def test_cost_model_counts_the_prompt_pass_once_per_candidate():
    sc = objective.scorer_for("decoder", CFG, "before", n_prompt_tokens=10)
    c = sc.cost(24, 3, 2, (24, 12, 6, 3), 4)
    assert c.per_prompt == dec.flops_per_example(CFG, 10, 14, 0)
    assert c.call(4) == 4 * c.forward + c.per_prompt
    assert sc.cost(24, 3, 2, (24, 12, 6, 3)).forward < sc.cost(24, 3, 2).forward  # packed < padded
    assert dec.prompt_cache_bytes(CFG, 10, 4) == 14 * 3 * 2 * 2 * 8 * 4


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
