"""The one cost model: each scorer's FLOP count against XLA's own count of the compiled pass.

Stated tolerance: XLA's ``cost_analysis()["flops"]`` of one scorer call is between 1.0x and 1.25x the
scorer's count, for both backbones and every layout. XLA counts every elementwise operation too
(norms, softmax, RoPE, activations, masks), which the cost model leaves out, so it may only be higher;
an over-count in the model (as the encoder's full-vocabulary head once was) shows as a ratio below 1.
One-layer models: XLA counts the body of a scanned loop once, not once per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from fedbpt_jax import objective
from fedbpt_jax.models import decoder as dec
from fedbpt_jax.models import encoder
from fedbpt_jax.types import ScoringSpec, TokenBatch

B, T, N_PROMPT, CUE, C = 4, 24, 5, 3, 2
LOW, HIGH = 1.0, 1.25


def _batch(t: int) -> TokenBatch:
    ids = jnp.ones((B, t), jnp.int32)
    return TokenBatch(
        input_ids=ids,
        attention_mask=jnp.ones_like(ids),
        answer_pos=jnp.full((B,), t // 2, jnp.int32),
        labels=jnp.zeros((B,), jnp.int32),
        example_mask=jnp.ones((B,), jnp.float32),
    )


def _spec(cue: int) -> ScoringSpec:
    return ScoringSpec(
        label_ids=jnp.arange(C, dtype=jnp.int32),
        cue_ids=jnp.arange(cue, dtype=jnp.int32),
        exempt_ids=jnp.full((1,), -1, jnp.int32),
        vocab_size=0,
    )


def _xla_flops(fn, *args) -> float:
    return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


DECODER = dec.DecoderConfig(
    vocab_size=500, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=192
)
ENCODER = encoder.EncoderConfig(
    "roberta",
    vocab_size=500,
    hidden_size=64,
    num_layers=1,
    num_heads=4,
    intermediate_size=256,
    max_position_embeddings=64,
)


@pytest.mark.parametrize(
    "layout,use_cache,packing",
    [
        ("after", True, None),
        ("after", False, None),
        ("before", False, None),
        ("before", True, None),
        ("before", True, (2, 30, CUE)),  # packed: 2 rows of 30 positions instead of 4 of T + cue
    ],
)
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_decoder_scorer_flops_match_xla(layout, use_cache, packing, compute_dtype):
    import dataclasses

    cfg = dataclasses.replace(DECODER, compute_dtype=compute_dtype)
    params = jax.eval_shape(lambda: dec.init_params(cfg, jax.random.key(0)))
    sc = objective.scorer_for("decoder", cfg, layout, use_cache=use_cache, n_prompt_tokens=N_PROMPT)
    batch, spec = _batch(T).replace(packing=packing), _spec(CUE)
    prompt = jax.ShapeDtypeStruct((N_PROMPT, cfg.hidden_size), jnp.float32)
    ctx = jax.eval_shape(sc.prepare, params, batch, spec)
    cost = sc.cost(T, CUE, C, packing, 0, B)
    ratio = _xla_flops(lambda p, c, pr: sc.logits(p, c, spec, pr), params, ctx, prompt) / cost.call(B)
    assert LOW <= ratio <= HIGH, ratio
    if packing is not None:  # the packed rows compute less than the padded ones
        assert cost.forward < sc.cost(T, CUE, C, None, 0, B).forward
    if sc.caches_prefix:
        ratio = _xla_flops(sc.prepare, params, batch, spec) / (B * cost.prepare)
        assert LOW <= ratio <= HIGH, ratio
    else:
        assert cost.prepare == 0.0


@pytest.mark.parametrize("layout", ["add", "cat"])
def test_encoder_scorer_flops_match_xla(layout):
    params = jax.eval_shape(lambda: encoder.init_params(ENCODER, jax.random.key(0)))
    sc = objective.scorer_for("encoder", ENCODER, layout, n_prompt_tokens=N_PROMPT)
    batch, spec = _batch(T), _spec(0)
    prompt = jax.ShapeDtypeStruct((N_PROMPT, ENCODER.hidden_size), jnp.float32)
    cost = sc.cost(T, 0, C)
    ratio = _xla_flops(lambda p, b, pr: sc.logits(p, b, spec, pr), params, batch, prompt) / (B * cost.forward)
    assert LOW <= ratio <= HIGH, ratio
    assert cost.prepare == 0.0
    # the full-vocabulary head at every position is not what scoring computes
    full = encoder.flops_per_example(ENCODER, T + (N_PROMPT if layout == "cat" else 0), n_prompt=0)
    assert full > 1.3 * cost.forward


def test_scorer_is_cached_and_rejects_layouts_the_backbone_lacks():
    a = objective.scorer_for("decoder", DECODER, "after", n_prompt_tokens=3)
    assert a is objective.scorer_for("decoder", DECODER, "after", n_prompt_tokens=3)
    assert a.flops_per_example(T, CUE, C) == a.cost(T, CUE, C).forward
    with pytest.raises(ValueError, match="unknown decoder layout 'cat'; accepted: \\('before', 'after'\\)"):
        objective.scorer_for("decoder", DECODER, "cat")
    with pytest.raises(ValueError, match="unknown encoder layout 'after'; accepted: \\('add', 'cat'\\)"):
        objective.scorer_for("encoder", ENCODER, "after")
    with pytest.raises(ValueError, match="unknown model kind 'rnn'"):
        objective.scorer_for("rnn", DECODER)
