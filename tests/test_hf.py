"""Checkpoint reading (fedbpt_jax.models.hf): safetensors single/sharded/bf16, resolve, config, tokenizer."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.flax import save_file as save_flax
from safetensors.numpy import save_file as save_numpy

from fedbpt_jax.models import hf

FIXTURES = Path(__file__).parent / "fixtures"
ROBERTA = FIXTURES / "encoder_roberta"
BERT_SHARDED = FIXTURES / "encoder_bert_sharded"


def test_read_single_file():
    tensors = hf.read_safetensors(ROBERTA)
    assert tensors["roberta.embeddings.word_embeddings.weight"].shape == (200, 64)
    assert tensors["roberta.encoder.layer.1.output.dense.weight"].shape == (64, 128)
    assert all(t.dtype == np.float32 for t in tensors.values())
    assert len(tensors) == 5 + 16 * 2 + 5  # embeddings, 2 layers, MLM head


def test_read_sharded_bf16_checkpoint():
    index = json.loads((BERT_SHARDED / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1, "fixture should be sharded"
    tensors = hf.read_safetensors(BERT_SHARDED)
    assert set(tensors) == set(index)
    for name, t in tensors.items():
        assert t.dtype == np.float32, name
        # bf16 → f32 widening is exact: the low 16 bits are all zero.
        assert not np.any(t.view(np.uint32) & 0xFFFF), name
    # Same numbers as safetensors' own bf16 reader (flax backend).
    from safetensors.flax import load_file

    shard = BERT_SHARDED / index["bert.embeddings.word_embeddings.weight"]
    ref = load_file(str(shard))["bert.embeddings.word_embeddings.weight"]
    assert ref.dtype == jnp.bfloat16
    np.testing.assert_array_equal(tensors["bert.embeddings.word_embeddings.weight"], np.asarray(ref, np.float32))


def test_bf16_special_values_and_mixed_dtypes(tmp_path):
    special = np.array([0.0, -0.0, 1.0, -2.5, np.inf, -np.inf, 1e-40, 3.0e38, 65504.0], np.float32)
    save_flax(
        {"b": jnp.asarray(special, jnp.bfloat16).reshape(3, 3), "f": jnp.arange(4, dtype=jnp.float16)},
        str(tmp_path / "model.safetensors"),
    )
    out = hf.read_safetensors(tmp_path)
    expected = np.asarray(jnp.asarray(special, jnp.bfloat16).astype(jnp.float32)).reshape(3, 3)
    np.testing.assert_array_equal(out["b"], expected)
    assert np.signbit(out["b"].ravel()[1])  # -0.0 keeps its sign
    assert out["f"].dtype == np.float16 and out["f"].tolist() == [0, 1, 2, 3]
    # NaN survives too.
    save_flax({"n": jnp.asarray([np.nan], jnp.bfloat16)}, str(tmp_path / "model.safetensors"))
    assert np.isnan(hf.read_safetensors(tmp_path)["n"][0])


def test_unindexed_multiple_files(tmp_path):
    save_numpy({"a": np.ones(2, np.float32)}, str(tmp_path / "part-a.safetensors"))
    save_numpy({"b": np.zeros(3, np.int64)}, str(tmp_path / "part-b.safetensors"))
    out = hf.read_safetensors(tmp_path)
    assert set(out) == {"a", "b"} and out["b"].dtype == np.int64


def test_torch_checkpoint_is_refused_clearly(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin.*not supported|\.bin.*not supported"):
        hf.read_safetensors(tmp_path)


def test_missing_shard_is_reported(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-1.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-1.safetensors"):
        hf.read_safetensors(tmp_path)


def test_resolve_local_directory_and_bad_paths(tmp_path):
    assert hf.resolve(ROBERTA) == ROBERTA
    assert hf.resolve(str(ROBERTA)) == ROBERTA
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.resolve(tmp_path)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file"):
        hf.resolve(tmp_path / "f.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.resolve(str(tmp_path / "no" / "such" / "dir"))


def test_resolve_hub_id_offline_error(monkeypatch):
    import huggingface_hub

    calls = {}

    def fake_download(repo_id, allow_patterns=None, **kw):
        calls["repo_id"], calls["allow"] = repo_id, allow_patterns
        raise huggingface_hub.errors.LocalEntryNotFoundError("no connection and no cached snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(OSError) as err:
        hf.resolve("FacebookAI/roberta-large")
    msg = str(err.value)
    assert "FacebookAI/roberta-large" in msg and "local directory" in msg and "embedded default" in msg
    assert calls["repo_id"] == "FacebookAI/roberta-large"
    assert "*.safetensors" in calls["allow"] and not any("bin" in p for p in calls["allow"])


def test_resolve_hub_id_uses_download(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tmp_path))
    assert hf.resolve("roberta-large") == tmp_path


def test_load_config_and_tokenizer():
    config = hf.load_config(ROBERTA)
    assert config.model_type == "roberta" and config.hidden_size == 64
    tok = hf.load_tokenizer(FIXTURES / "encoder_tokenizer")
    assert tok.is_fast
    assert tok("it was great", add_special_tokens=False)["input_ids"] == [5, 6, 7]
    assert tok.mask_token_id == 3 and tok.pad_token_id == 1


@pytest.mark.parametrize("model_type", ["gpt_neox", "my_own_arch"])
def test_unsupported_model_type_is_named(tmp_path, model_type):
    """A type transformers knows (gpt_neox) and one it does not: both named, with what is accepted,
    before any weights or tokenizer are read."""
    from fedbpt_jax import models

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": 8}))
    with pytest.raises(
        ValueError,
        match=rf"unsupported model_type '{model_type}'; accepted encoders "
        r"\('roberta', .*decoders \('llama', .*'qwen2'\)",
    ):
        models.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match=r"config.json' has no model_type; accepted encoders"):
        models.load(str(tmp_path))
