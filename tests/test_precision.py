"""Precision policy: bfloat16 storage and matmul inputs with float32 accumulation, for both backbones.

Stated bound: on the tiny Llama and RoBERTa fixtures, bfloat16 logits differ from the float32 ones by at
most 2 % of the largest float32 logit (measured: 1.0 % tied Llama, 0.7 % untied, 0.4 % RoBERTa), and
the argmax over label words agrees.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fedbpt_jax import models, objective
from fedbpt_jax.models import decoder as dec
from fedbpt_jax.models import decoder_cache, decoder_hf, encoder, gguf, hf, precision
from fedbpt_jax.types import ScoringSpec, TokenBatch

FIXTURES = Path(__file__).parent / "fixtures"
BOUND = 0.02  # max |bf16 - f32| / max |f32| over all logits

logits_dec = jax.jit(dec.logits, static_argnums=0)


def _bf16(config):
    return dataclasses.replace(config, compute_dtype="bfloat16")


def _ids(vocab: int, shape=(3, 12), seed=0):
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


@pytest.mark.parametrize("name", ["decoder_tiny_tied", "decoder_tiny_untied"])
def test_decoder_bf16_logits_within_bound(name):
    config, params = decoder_hf.load_hf_decoder(FIXTURES / name)
    cb = _bf16(config)
    pb = dec.cast_params(cb, params)
    ids = _ids(90)
    ref = np.asarray(logits_dec(config, params, ids))
    got = np.asarray(logits_dec(cb, pb, ids))
    assert got.dtype == np.float32
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert 0 < err < BOUND, err  # > 0: bf16 really ran
    assert np.mean(np.argmax(got, -1) == np.argmax(ref, -1)) > 0.9


def test_encoder_bf16_logits_within_bound():
    config = encoder.config_from_hf(hf.load_config(FIXTURES / "encoder_roberta"))
    params = encoder.params_from_hf(config, hf.read_safetensors(FIXTURES / "encoder_roberta"), zero_lm_bias=False)
    inputs = dict(np.load(FIXTURES / "encoder_roberta" / "inputs.npz"))
    cb = _bf16(config)
    pb = encoder.cast_params(cb, params)
    ref = np.asarray(encoder.logits(config, params, inputs["input_ids"], inputs["attention_mask"]))
    got = np.asarray(encoder.logits(cb, pb, inputs["input_ids"], inputs["attention_mask"]))
    assert got.dtype == np.float32
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert 0 < err < BOUND, err


def test_storage_dtypes_follow_the_policy():
    config, params = decoder_hf.load_hf_decoder(FIXTURES / "decoder_tiny_untied", compute_dtype="bfloat16")
    assert config.compute_dtype == "bfloat16"
    assert params["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    assert params["lm_head"]["embedding"].dtype == jnp.bfloat16
    assert params["layers"]["mlp"]["down_proj"]["kernel"].dtype == jnp.bfloat16
    assert params["layers"]["input_layernorm"]["scale"].dtype == jnp.float32
    assert params["norm"]["scale"].dtype == jnp.float32
    assert precision.tree_bytes(params) < 0.55 * precision.tree_bytes(
        decoder_hf.load_hf_decoder(FIXTURES / "decoder_tiny_untied")[1]
    )
    ecfg = _bf16(
        encoder.EncoderConfig(
            "roberta",
            vocab_size=50,
            hidden_size=8,
            num_layers=1,
            num_heads=2,
            intermediate_size=16,
            max_position_embeddings=20,
        )
    )
    ep = encoder.init_params(ecfg, jax.random.key(0))["params"]
    assert ep["layers"]["query"]["kernel"].dtype == jnp.bfloat16
    assert ep["layers"]["query"]["bias"].dtype == jnp.float32
    assert ep["embeddings"]["word_embeddings"]["embedding"].dtype == jnp.bfloat16
    assert ep["embeddings"]["layer_norm"]["scale"].dtype == jnp.float32


def test_bf16_checkpoint_loads_without_float32_round_trip(tmp_path):
    """A bfloat16 safetensors checkpoint loaded for bfloat16 compute keeps its exact bits."""
    from safetensors.numpy import save_file

    src = FIXTURES / "decoder_tiny_tied"
    tensors = hf.read_safetensors(src)
    bf = {k: np.asarray(v, np.float32).astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    save_file(bf, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    raw = hf.read_safetensors(tmp_path, keep_bf16=True)
    assert raw["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
    config, params = decoder_hf.load_hf_decoder(tmp_path, compute_dtype="bfloat16")
    emb = np.asarray(params["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(emb.view(np.uint16), bf["model.embed_tokens.weight"].view(np.uint16))
    # float32 compute widens the same bits exactly
    _, p32 = decoder_hf.load_hf_decoder(tmp_path)
    np.testing.assert_array_equal(np.asarray(p32["embed_tokens"]["embedding"]), emb.astype(np.float32))


def test_bf16_prefix_cache_matches_uncached_and_is_stored_in_bf16():
    config, params = decoder_hf.load_hf_decoder(FIXTURES / "decoder_tiny_tied")
    cb = _bf16(config)
    pb = dec.cast_params(cb, params)
    ids = _ids(90, (2, 7))
    batch = TokenBatch(
        input_ids=jnp.asarray(ids),
        attention_mask=jnp.ones_like(ids),
        answer_pos=jnp.full((2,), 6, jnp.int32),
        labels=jnp.zeros((2,), jnp.int32),
        example_mask=jnp.ones((2,), jnp.float32),
    )
    spec = ScoringSpec(
        label_ids=jnp.asarray([3, 11], jnp.int32),
        cue_ids=jnp.asarray([5, 8], jnp.int32),
        exempt_ids=jnp.full((1,), -1, jnp.int32),
        vocab_size=0,
    )
    prompt = 0.02 * jax.random.normal(jax.random.key(1), (4, config.hidden_size))
    cache = jax.jit(decoder_cache.prefix_cache, static_argnums=0)(cb, pb, batch)
    assert cache.k.dtype == jnp.bfloat16 and cache.v.dtype == jnp.bfloat16
    cached = jax.jit(decoder_cache.label_logits_cached, static_argnums=0)(cb, pb, cache, spec, prompt)
    full = jax.jit(dec.label_logits, static_argnums=(0, 5))(cb, pb, batch, spec, prompt, "after")
    ref = jax.jit(dec.label_logits, static_argnums=(0, 5))(config, params, batch, spec, prompt, "after")
    assert cached.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=2e-2)
    assert np.abs(np.asarray(cached) - np.asarray(ref)).max() < BOUND * np.abs(np.asarray(ref)).max() + 1e-3


def test_population_fitness_ranking_survives_bf16():
    """On the tiny model the ranking that CMA-ES sees is nearly unchanged by bfloat16."""
    config, params = decoder_hf.load_hf_decoder(FIXTURES / "decoder_tiny_tied")
    cb = _bf16(config)
    pb = dec.cast_params(cb, params)
    ids = _ids(90, (6, 9), seed=3)
    batch = TokenBatch(
        input_ids=jnp.asarray(ids),
        attention_mask=jnp.ones_like(ids),
        answer_pos=jnp.full((6,), 8, jnp.int32),
        labels=jnp.asarray([0, 1, 0, 1, 1, 0], jnp.int32),
        example_mask=jnp.ones((6,), jnp.float32),
    )
    spec = ScoringSpec(
        label_ids=jnp.asarray([3, 11], jnp.int32),
        cue_ids=jnp.asarray([5], jnp.int32),
        exempt_ids=jnp.full((1,), -1, jnp.int32),
        vocab_size=0,
    )
    prompts = 0.5 * jax.random.normal(jax.random.key(2), (20, 3, config.hidden_size))

    def fit(cfg, p):
        sc = objective.scorer_for("decoder", cfg, "after", n_prompt_tokens=3)
        f = jax.jit(
            lambda p, pr: objective.population_fitness(sc, p, sc.prepare(p, batch, spec), None, batch, spec, pr)[0]
        )
        return np.asarray(f(p, prompts))

    a, b = fit(config, params), fit(cb, pb)
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    rho = np.corrcoef(rank(a), rank(b))[0, 1]
    assert rho > 0.95, rho


# ---------------------------------------------------------------- policy resolution and bad input


def test_resolve_and_bad_names(monkeypatch):
    assert precision.resolve("float32") == "float32"
    assert precision.resolve("bfloat16") == "bfloat16"
    assert precision.resolve("auto", backend="gpu") == "bfloat16"
    assert precision.resolve("auto", backend="tpu") == "bfloat16"
    monkeypatch.setattr(precision, "cpu_prefers_bf16", lambda: False)
    assert precision.resolve("auto", backend="cpu") == "float32"
    monkeypatch.setattr(precision, "cpu_prefers_bf16", lambda: True)
    assert precision.resolve("auto", backend="cpu") == "bfloat16"
    monkeypatch.setenv(precision.ENV_OVERRIDE, "float32")
    assert precision.resolve("auto", backend="cpu") == "float32"
    monkeypatch.setenv(precision.ENV_OVERRIDE, "fp8")
    with pytest.raises(ValueError, match="'fp8'.*accepted"):
        precision.resolve("auto", backend="cpu")
    with pytest.raises(
        ValueError, match="unknown compute_dtype 'float16'; accepted: \\('auto', 'float32', 'bfloat16'\\)"
    ):
        precision.resolve("float16")
    with pytest.raises(ValueError, match="'half'.*accepted"):
        models.load("smollm2-135m-instruct", compute_dtype="half")
    with pytest.raises(ValueError, match="'fp16'.*accepted"):
        dec.DecoderConfig(
            vocab_size=10,
            hidden_size=8,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            head_dim=4,
            intermediate_size=8,
            compute_dtype="fp16",
        )
    with pytest.raises(ValueError, match="compute_dtype='int8'; accepted"):
        encoder.EncoderConfig(
            "bert",
            vocab_size=10,
            hidden_size=4,
            num_layers=1,
            num_heads=2,
            intermediate_size=8,
            max_position_embeddings=8,
            pad_token_id=0,
            compute_dtype="int8",
        )


def test_matmul_rates_measures_both():
    r = precision.matmul_rates(64, 32, 48, 1)
    assert set(r) == {"float32", "bfloat16"} and all(v > 0 for v in r.values())


def test_gguf_unsupported_quant_type_is_named():
    from gguf import GGMLQuantizationType

    class Tensor:
        name = "blk.0.attn_q.weight"
        tensor_type = GGMLQuantizationType.Q8_K
        data = np.zeros(292, np.uint8)

    class Reader:
        tensors = [Tensor()]

    config = dec.DecoderConfig(
        vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=8
    )
    with pytest.raises(ValueError, match="'blk.0.attn_q.weight' has type Q8_K.*accepted: F32, F16, BF16"):
        gguf.hf_tensors_from_gguf(Reader(), config)


def test_converted_cache_stores_each_precision_once(tmp_path):
    """A second precision is cast from the cached one and written once; the first file is untouched."""
    config, params = decoder_hf.load_hf_decoder(FIXTURES / "decoder_tiny_tied")
    target = tmp_path / "conv"
    target.mkdir()
    gguf._save_params(params, target / gguf.params_file("float32"), "x")
    (target / "decoder_config.json").write_text(json.dumps(dataclasses.asdict(config)))
    before = (target / gguf.params_file("float32")).stat().st_mtime_ns
    gguf._add_precision(target, "bfloat16")
    files = sorted(p.name for p in target.iterdir())
    assert files == ["decoder_config.json", "params-bfloat16.safetensors", "params-float32.safetensors"]
    assert (target / gguf.params_file("float32")).stat().st_mtime_ns == before
    from safetensors.numpy import load_file

    flat = load_file(str(target / gguf.params_file("bfloat16")))
    assert flat["embed_tokens.embedding"].dtype == ml_dtypes.bfloat16
    assert flat["norm.scale"].dtype == np.float32
    assert (target / gguf.params_file("bfloat16")).stat().st_size < 0.6 * (
        target / gguf.params_file("float32")
    ).stat().st_size


def test_dense_bias_promotion_is_explicit_and_changes_no_number():
    """The encoder's Dense (bf16 inputs and kernel, float32 accumulation, float32-stored bias) adds its bias
    explicitly in float32 (:func:`precision.promote_to_f32_bias`): it runs under strict dtype promotion,
    where flax's default (a bfloat16 bias added to the float32 result) is an error, and gives the default's
    numbers bit for bit (the bias rounded to bfloat16, then widened exactly)."""
    import flax.linen as nn

    x = jax.random.normal(jax.random.key(0), (3, 5), jnp.float32)
    params = {
        "params": {
            "kernel": jax.random.normal(jax.random.key(1), (5, 4), jnp.float32).astype(jnp.bfloat16),
            "bias": jnp.asarray([0.1, -1.0 / 3, 7.001, 1e-3], jnp.float32),
        }
    }
    kw = dict(dtype=jnp.bfloat16, dot_general=precision.f32_accumulating_dot_general)
    default = nn.Dense(4, **kw)
    explicit = nn.Dense(4, promote_dtype=precision.promote_to_f32_bias, **kw)
    with jax.numpy_dtype_promotion("strict"):
        with pytest.raises(jax.dtypes.TypePromotionError, match="no available implicit dtype promotion"):
            default.apply(params, x)
        got = explicit.apply(params, x)
    with jax.numpy_dtype_promotion("standard"):
        want = default.apply(params, x)
    assert got.dtype == want.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    bias_bf16 = np.asarray(params["params"]["bias"].astype(jnp.bfloat16).astype(jnp.float32))
    assert not np.array_equal(bias_bf16, np.asarray(params["params"]["bias"]))  # the rounding is visible
