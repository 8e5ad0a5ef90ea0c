"""Loading Hugging Face Llama-family checkpoints into :mod:`fedbpt_jax.models.decoder`'s config and parameter tree."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from . import decoder
from .decoder import DecoderConfig


def _first_id(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return int(value)


def config_from_hf(hf_config: Any, *, rope_interleaved: bool = False, compute_dtype: str = "float32") -> DecoderConfig:
    """:class:`DecoderConfig` from a ``transformers`` Llama-like config (``AutoConfig``; no torch).

    Accepts transformers 4.x (``rope_theta`` attribute) and 5.x (``rope_parameters`` dict) configs.
    ``model_type="qwen2"`` sets ``qkv_bias=True`` (Qwen2's query/key/value projections always carry a
    bias, which its config does not mention).

    Raises:
      ValueError: a feature this implementation does not have (Llama's ``attention_bias``/``mlp_bias``,
        another activation, RoPE scaling, sliding-window attention), named with what is accepted.
    """
    get = lambda name, default=None: getattr(hf_config, name, default)  # noqa: E731
    act = get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act={act!r} is not supported; accepted: 'silu' (SwiGLU)")
    for flag in ("attention_bias", "mlp_bias"):
        if get(flag, False):
            raise ValueError(f"{flag}=True is not supported; accepted: False (Llama has no biases)")
    if get("sliding_window", None) and get("use_sliding_window", True):
        raise ValueError("sliding-window attention is not supported; accepted: sliding_window=None")
    rope = get("rope_parameters", None) or {}
    scaling = get("rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", None)) or scaling.get("rope_type", scaling.get("type", None))
    if rope_type not in (None, "default"):
        raise ValueError(f"RoPE scaling {rope_type!r} is not supported; accepted: 'default' (no scaling)")
    theta = rope.get("rope_theta", None) or get("rope_theta", None) or 10000.0
    num_heads = int(get("num_attention_heads"))
    num_kv = get("num_key_value_heads", None) or num_heads
    head_dim = get("head_dim", None) or int(get("hidden_size")) // num_heads
    return DecoderConfig(
        vocab_size=int(get("vocab_size")),
        hidden_size=int(get("hidden_size")),
        num_layers=int(get("num_hidden_layers")),
        num_heads=num_heads,
        num_kv_heads=int(num_kv),
        head_dim=int(head_dim),
        intermediate_size=int(get("intermediate_size")),
        rope_theta=float(theta),
        rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        max_position_embeddings=int(get("max_position_embeddings", 2048) or 2048),
        rope_interleaved=rope_interleaved,
        qkv_bias=get("model_type", None) == "qwen2",
        bos_token_id=_first_id(get("bos_token_id")),
        eos_token_id=_first_id(get("eos_token_id")),
        pad_token_id=_first_id(get("pad_token_id")),
        compute_dtype=compute_dtype,
    )


_LAYER_TENSORS = {
    # HF name suffix: (path in the layer subtree, transpose?, expected shape as a function of config)
    "input_layernorm.weight": (("input_layernorm", "scale"), False, lambda c: (c.hidden_size,)),
    "post_attention_layernorm.weight": (("post_attention_layernorm", "scale"), False, lambda c: (c.hidden_size,)),
    "self_attn.q_proj.weight": (
        ("self_attn", "q_proj", "kernel"),
        True,
        lambda c: (c.num_heads * c.head_dim, c.hidden_size),
    ),
    "self_attn.k_proj.weight": (
        ("self_attn", "k_proj", "kernel"),
        True,
        lambda c: (c.num_kv_heads * c.head_dim, c.hidden_size),
    ),
    "self_attn.v_proj.weight": (
        ("self_attn", "v_proj", "kernel"),
        True,
        lambda c: (c.num_kv_heads * c.head_dim, c.hidden_size),
    ),
    "self_attn.o_proj.weight": (
        ("self_attn", "o_proj", "kernel"),
        True,
        lambda c: (c.hidden_size, c.num_heads * c.head_dim),
    ),
    "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), True, lambda c: (c.intermediate_size, c.hidden_size)),
    "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), True, lambda c: (c.intermediate_size, c.hidden_size)),
    "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), True, lambda c: (c.hidden_size, c.intermediate_size)),
}


_QKV_BIASES = {
    # Qwen2 (config.qkv_bias): HF name suffix -> (path, transpose?, shape)
    "self_attn.q_proj.bias": (("self_attn", "q_proj", "bias"), False, lambda c: (c.num_heads * c.head_dim,)),
    "self_attn.k_proj.bias": (("self_attn", "k_proj", "bias"), False, lambda c: (c.num_kv_heads * c.head_dim,)),
    "self_attn.v_proj.bias": (("self_attn", "v_proj", "bias"), False, lambda c: (c.num_kv_heads * c.head_dim,)),
}


def _layer_tensors(config: DecoderConfig) -> dict:
    return {**_LAYER_TENSORS, **_QKV_BIASES} if config.qkv_bias else _LAYER_TENSORS


def expected_hf_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape (``[out, in]`` for linear weights) that ``config`` requires."""
    c = config
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    for i in range(c.num_layers):
        for suffix, (_, _, shape) in _layer_tensors(c).items():
            shapes[f"model.layers.{i}.{suffix}"] = shape(c)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    return shapes


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def params_from_hf(config: DecoderConfig, tensors: Mapping[str, np.ndarray]) -> dict:
    """Param tree from HF Llama tensors (``model.embed_tokens.weight``, ``model.layers.N.…``, ``lm_head.weight``).

    Linear weights are transposed (HF ``[out, in]`` -> linen ``[in, out]``), layers stacked; matrices and
    embeddings are stored in ``config.compute_dtype`` (a bfloat16 checkpoint loaded for bfloat16
    compute is never widened to float32 on the way), norm scales and Qwen2's q/k/v biases in float32.
    ``lm_head.weight`` is ignored
    when the head is tied; rotary ``inv_freq`` buffers of old checkpoints are ignored.

    Raises:
      ValueError: missing tensors (all listed), a tensor whose shape does not match the config (name,
        shape and expected shape), or bias tensors the config has no place for.
    """
    expected = expected_hf_shapes(config)
    missing = [name for name in expected if name not in tensors]
    if missing:
        shown = missing if len(missing) <= 20 else missing[:20] + [f"... ({len(missing) - 20} more)"]
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s) the config requires: {shown}")
    for name, shape in expected.items():
        got = tuple(np.shape(tensors[name]))
        if got != shape:
            raise ValueError(f"tensor {name!r} has shape {got}, expected {shape} for this config")
    known = set(expected) | {"lm_head.weight"}
    unknown = [n for n in tensors if n not in known and not n.endswith("rotary_emb.inv_freq")]
    biases = [n for n in unknown if n.endswith(".bias")]
    if biases:  # dropping them would silently give wrong logits
        raise ValueError(
            f"checkpoint has {len(biases)} bias tensor(s) this config has no place for: {biases[:6]}; accepted: "
            "the q/k/v projection biases of model_type 'qwen2' (qkv_bias=True); Llama-family models have no biases"
        )
    if unknown:
        warnings.warn(f"ignoring {len(unknown)} unexpected tensor(s): {unknown[:10]}", stacklevel=2)

    store = np.dtype(jnp.dtype(config.compute_dtype))
    f32 = lambda name: np.asarray(tensors[name], dtype=np.float32)  # noqa: E731
    mat = lambda name: np.asarray(tensors[name], dtype=store)  # noqa: E731
    params: dict = {
        "embed_tokens": {"embedding": mat("model.embed_tokens.weight")},
        "norm": {"scale": f32("model.norm.weight")},
    }
    layers: dict = {}
    for suffix, (path, transpose, _) in _layer_tensors(config).items():
        load = f32 if decoder.keeps_float32(path) else mat
        per_layer = [load(f"model.layers.{i}.{suffix}") for i in range(config.num_layers)]
        _set(layers, path, np.stack([w.T for w in per_layer] if transpose else per_layer))  # one copy
    params["layers"] = layers
    if not config.tie_word_embeddings:
        params["lm_head"] = {"embedding": mat("lm_head.weight")}
    return jax.tree_util.tree_map(jax.device_put, params)  # device_put: no per-shape compiled copy


def load_hf_decoder(directory: str | Path, *, compute_dtype: str = "float32") -> tuple[DecoderConfig, dict]:
    """``(config, params)`` from a local HF checkpoint directory (config.json + safetensors, sharded or not)."""
    from . import hf

    config = config_from_hf(hf.load_config(directory), compute_dtype=compute_dtype)
    return config, params_from_hf(config, hf.read_safetensors(directory, keep_bf16=compute_dtype == "bfloat16"))


__all__ = [
    "config_from_hf",
    "expected_hf_shapes",
    "params_from_hf",
    "load_hf_decoder",
]
