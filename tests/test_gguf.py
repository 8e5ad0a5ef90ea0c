"""GGUF loading on small files the tests write themselves (gguf.GGUFWriter), without the 98 MB asset.

* A tiny random Llama written in F32 and in Q8_0 loads with the project's loader to the source weights
  (exactly, resp. to Q8_0's rounding) and the same logits, through the converted cache and without it.
* A Llama-2-style SentencePiece vocabulary (``tokenizer.ggml.model = "llama"``: pieces, scores, token
  types) gives a tokenizer that encodes like ``sentencepiece`` itself: the reference ids of
  tests/fixtures/spm_tiny_reference.json (scripts/make_spm_fixture.py).
* Unsupported tokenizer models and architectures are clear errors naming the value and what is accepted.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest

from fedbpt_jax import models
from fedbpt_jax.models import decoder as dec
from fedbpt_jax.models import decoder_hf
from fedbpt_jax.models import gguf as gguf_loader

FIXTURES = Path(__file__).parent / "fixtures"
SPM = json.loads((FIXTURES / "spm_tiny_reference.json").read_text())

# A tiny Llama over the SentencePiece vocabulary; widths are multiples of 32 (the Q8_0 block); GGUF stores
# the epsilon as float32, so it is one that float32 holds exactly.
CONFIG = dec.DecoderConfig(
    vocab_size=len(SPM["tokens"]),
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    intermediate_size=96,
    rope_theta=10000.0,
    rms_norm_eps=2.0**-17,
    tie_word_embeddings=False,
    max_position_embeddings=128,
    bos_token_id=SPM["bos_id"],
    eos_token_id=SPM["eos_id"],
)

logits_fn = jax.jit(dec.logits, static_argnums=0)


def _source_tensors(config: dec.DecoderConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random HF-named float32 tensors for ``config`` (norm scales around 1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in decoder_hf.expected_hf_shapes(config).items():
        if name.endswith("norm.weight"):
            out[name] = (1.0 + 0.3 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return out


def _gguf_name(hf_name: str) -> str:
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, i, *rest = hf_name.split(".")
    suffix = ".".join(rest[:-1])
    short = {v: k for k, v in gguf_loader._LAYER_NAMES.items()}[suffix]
    return f"blk.{i}.{short}.weight"


def write_gguf(
    path: Path,
    tensors: dict[str, np.ndarray] | None = None,
    *,
    qtype=None,
    arch: str = "llama",
    tokenizer_model: str = "llama",
    config: dec.DecoderConfig = CONFIG,
    add_bos: bool = True,
) -> Path:
    """A GGUF file as llama.cpp's converter writes one: metadata, SentencePiece vocabulary, Q/K rows in
    llama.cpp's order, matrices in ``qtype`` (None: F32), norms always F32."""
    c = config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list(SPM["tokens"])
    w.add_token_scores(SPM["scores"])
    w.add_token_types(SPM["token_types"])
    w.add_unk_token_id(SPM["unk_id"])
    w.add_bos_token_id(SPM["bos_id"])
    w.add_eos_token_id(SPM["eos_id"])
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(False)
    for name, value in (tensors or {}).items():
        value = np.asarray(value, np.float32)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = c.num_heads if "q_proj" in name else c.num_kv_heads
            value = gguf_loader.permute_rows(value, heads)
        if qtype is None or value.ndim == 1:
            w.add_tensor(_gguf_name(name), value)
        else:
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def source():
    return _source_tensors(CONFIG)


@pytest.fixture(scope="module")
def written(tmp_path_factory, source):
    root = tmp_path_factory.mktemp("gguf")
    return {
        "F32": write_gguf(root / "tiny-f32.gguf", source),
        "Q8_0": write_gguf(root / "tiny-q8_0.gguf", source, qtype=gguf.GGMLQuantizationType.Q8_0),
    }


def _q8_0_bound(w: np.ndarray) -> np.ndarray:
    """Per-element bound of Q8_0's rounding: half a step of the element's 32-block (d = max|x| / 127,
    stored as float16), plus the float16 rounding of d times the largest code."""
    blocks = np.abs(w.reshape(*w.shape[:-1], -1, 32)).max(axis=-1, keepdims=True) / 127.0
    bound = blocks * (0.5 + 127 * 2.0**-11) + 1e-7
    return np.broadcast_to(bound, (*w.shape[:-1], w.shape[-1] // 32, 32)).reshape(w.shape)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("use_cache", [False, True])
def test_written_gguf_round_trip(written, source, qtype, use_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDBPT_JAX_CACHE", str(tmp_path / "cache"))
    config, params, tokenizer = gguf_loader.load_gguf(written[qtype], use_cache=use_cache)
    assert config == CONFIG
    assert len(tokenizer) == CONFIG.vocab_size
    if use_cache:
        assert (gguf_loader.converted_dir(written[qtype]) / "params-float32.safetensors").is_file()
        config2, params2, _ = gguf_loader.load_gguf(written[qtype])  # read back from the cache
        assert config2 == config
        jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
    expected = decoder_hf.params_from_hf(CONFIG, source)
    flat_got = gguf_loader.flatten_params(params)
    flat_src = gguf_loader.flatten_params(expected)
    assert sorted(flat_got) == sorted(flat_src)
    for name, want in flat_src.items():
        got = flat_got[name]
        assert got.shape == want.shape and got.dtype == np.float32, name
        if qtype == "F32" or name.endswith("scale"):
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            # the kernels are stored transposed ([in, out]); Q8_0 blocks run along the HF rows' last axis
            hf_view = np.swapaxes(want, -1, -2) if name.endswith("kernel") else want
            err = np.abs(np.swapaxes(got, -1, -2) - hf_view) if name.endswith("kernel") else np.abs(got - want)
            bound = _q8_0_bound(hf_view)
            assert np.all(err <= bound), (name, float((err - bound).max()))
            assert err.max() > 0, name  # really quantized
    ids = np.asarray([[5, 17, 9, 33, 61, 8, 12, 40], [7, 3, 90, 80, 4, 100, 200, 300]], np.int32)
    ref = np.asarray(logits_fn(CONFIG, expected, ids))
    out = np.asarray(logits_fn(config, params, ids))
    if qtype == "F32":
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    else:
        assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
        assert np.abs(out - ref).max() > 0


def test_written_gguf_loads_through_models_load(written, source, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDBPT_JAX_CACHE", str(tmp_path / "cache"))
    lm = models.load(str(written["F32"]))
    assert lm.kind == "decoder" and lm.config == CONFIG
    ids = np.asarray([[1, 50, 60, 70]], np.int32)
    np.testing.assert_allclose(
        np.asarray(logits_fn(lm.config, lm.params, ids)),
        np.asarray(logits_fn(CONFIG, decoder_hf.params_from_hf(CONFIG, source), ids)),
        atol=1e-5,
        rtol=0,
    )


# ----------------------------------------------------------------------------------------------
# SentencePiece (Llama-2 family) tokenizer from the GGUF metadata
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory):
    path = write_gguf(tmp_path_factory.mktemp("spm") / "vocab.gguf")
    return gguf_loader.tokenizer_from_gguf(gguf.GGUFReader(str(path)))


@pytest.mark.parametrize("record", SPM["records"], ids=lambda r: repr(r["text"])[:24])
def test_spm_tokenizer_encodes_like_sentencepiece(spm_tokenizer, record):
    ids = spm_tokenizer(record["text"], add_special_tokens=False)["input_ids"]
    assert ids == record["ids"], (spm_tokenizer.convert_ids_to_tokens(ids), record["ids"])
    assert spm_tokenizer.decode(ids) == record["decoded"]


def test_spm_tokenizer_specials_bytes_and_bos(spm_tokenizer):
    tokens = SPM["tokens"]
    text = "naïve 🙂 film"
    ids = spm_tokenizer(text)["input_ids"]
    assert ids[0] == SPM["bos_id"] and ids[1:] == spm_tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = spm_tokenizer.convert_ids_to_tokens(ids)
    assert "<0xF0>" in pieces and "<0x9F>" in pieces  # 🙂 is not a piece: its UTF-8 bytes are
    assert pieces[1].startswith("\u2581")  # SentencePiece's dummy prefix
    assert spm_tokenizer.bos_token == tokens[SPM["bos_id"]] and spm_tokenizer.eos_token == tokens[SPM["eos_id"]]
    assert spm_tokenizer.unk_token == tokens[SPM["unk_id"]]
    # control tokens in text are single special tokens
    assert spm_tokenizer("</s>", add_special_tokens=False)["input_ids"] == [SPM["eos_id"]]


def test_spm_merges_follow_the_scores():
    tokens = ["<unk>", "a", "b", "c", "ab", "bc", "abc"]
    scores = [0.0, -10.0, -10.0, -10.0, -1.0, -2.0, -3.0]
    types = [2, 1, 1, 1, 1, 1, 1]
    merges = gguf_loader.spm_merges(tokens, scores, types)
    # highest score first; "abc" can be made from "ab"+"c" or "a"+"bc"
    assert merges[:2] == [("a", "b"), ("b", "c")] and set(merges[2:]) == {("ab", "c"), ("a", "bc")}


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["bert", "t5", "rwkv"])
def test_unsupported_tokenizer_model_is_named(tmp_path, model):
    path = write_gguf(tmp_path / "bad-tokenizer.gguf", tokenizer_model=model)
    with pytest.raises(
        ValueError,
        match=rf"tokenizer.ggml.model='{model}' is not supported; accepted: "
        r"\('gpt2', 'llama'\).*Hugging Face checkpoint directory",
    ):
        gguf_loader.tokenizer_from_gguf(gguf.GGUFReader(str(path)))


def test_unsupported_architecture_is_named(tmp_path):
    path = write_gguf(tmp_path / "bad-arch.gguf", arch="falcon")
    with pytest.raises(ValueError, match=r"general.architecture='falcon' is not supported; accepted: \('llama',\)"):
        gguf_loader.load_gguf(path, use_cache=False)
