"""Llama-family causal decoder (SmolLM2, Llama-2) in Flax linen, with a reusable text-prefix cache.

The model takes *embeddings*, not ids, so a soft prompt enters the sequence as ``[n, H]`` vectors.
Everything here is a pure function of ``(config, params, inputs)``: params are an argument (never a
closure), every function is jittable, and scoring functions are unbatched over the population, so a
caller ``vmap``s them over candidate prompts.

Parameter tree (the layer axis ``L`` is stacked because the layers run under ``nn.scan``; weight
matrices and embeddings in the config's ``compute_dtype``, norm scales float32, see
:mod:`fedbpt_jax.models.precision`)::

    embed_tokens/embedding                 [V, H]
    layers/input_layernorm/scale           [L, H]
    layers/self_attn/{q,k,v,o}_proj/kernel [L, H, Nq*D] / [L, H, Nkv*D] / [L, H, Nkv*D] / [L, Nq*D, H]
    layers/post_attention_layernorm/scale  [L, H]
    layers/mlp/{gate,up}_proj/kernel       [L, H, F];  layers/mlp/down_proj/kernel [L, F, H]
    norm/scale                             [H]
    lm_head/embedding                      [V, H]   (only when the head is not tied to embed_tokens)

Q/K weights are in Hugging Face row order (RoPE in the rotate-half form). ``rope_interleaved=True``
switches to the pair rotation ``(x[2i], x[2i+1])`` that llama.cpp's row-permuted Q/K weights need;
:mod:`fedbpt_jax.models.gguf` un-permutes instead, so every loader yields the same tree.

Padding: positions are ``cumsum(mask) - 1`` and padded keys are masked out of attention, so a
left-padded row (or a row padded in the middle, as in layout "before") gives exactly the result of
the unpadded sequence.

Example::

    cfg = DecoderConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=8, intermediate_size=64)
    params = init_params(cfg, jax.random.key(0))
    cache = prefix_cache(cfg, params, batch)                       # text part, once
    scores = jax.vmap(lambda p: label_logits_cached(cfg, params, cache, spec, p))(prompts)  # [P, B, C]
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ..types import ScoringSpec, TokenBatch
from . import precision

LAYOUTS = ("before", "after")

# Additive attention-mask bias, a finite "minus infinity": score + bias rounds to the bias itself for any
# score below ~1e22, so rows whose keys are all masked (left-pad queries) get a uniform softmax instead of
# NaN, and NaN can never leak into valid rows through 0 * NaN.
_MASK_BIAS = -1e30


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Static shape and numeric constants of a Llama-style decoder (hashable: a jit static argument).

    Attributes:
      vocab_size: rows of the (input and output) embedding, ``V``.
      hidden_size: model width ``H``.
      num_layers: number of transformer blocks ``L``.
      num_heads: query heads ``Nq``.
      num_kv_heads: key/value heads ``Nkv`` (grouped-query attention; divides ``num_heads``).
      head_dim: per-head width ``D`` (even; need not equal ``H / Nq``).
      intermediate_size: SwiGLU hidden width ``F``.
      rope_theta: RoPE base.
      rms_norm_eps: RMSNorm epsilon.
      tie_word_embeddings: the output head reuses ``embed_tokens`` (no ``lm_head`` parameter).
      max_position_embeddings: longest sequence the checkpoint was trained for (informational).
      rope_interleaved: rotate pairs ``(x[2i], x[2i+1])`` (Q/K rows as stored in GGUF files) instead
        of HF's rotate-half pairs ``(x[i], x[i + D/2])``.
      qkv_bias: the query, key and value projections add a bias (Qwen2); the output projection and the
        MLP never do. Biases are stored in float32.
      bos_token_id / eos_token_id / pad_token_id: special ids (``None`` if the checkpoint has none).
      compute_dtype: ``"float32"`` or ``"bfloat16"``: the dtype weight matrices, embeddings and cached
        keys/values are stored in and matmuls take as inputs (always accumulating in float32); the
        residual stream, norms, softmax and logits are float32 either way
        (:mod:`fedbpt_jax.models.precision`).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 2048
    rope_interleaved: bool = False
    qkv_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    compute_dtype: str = "float32"

    def __post_init__(self):
        precision.check(self.compute_dtype)
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"DecoderConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"DecoderConfig.num_kv_heads must divide num_heads; got num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads} (accepted: any divisor of {self.num_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"DecoderConfig.head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not value > 0:
                raise ValueError(f"DecoderConfig.{name} must be a positive number, got {value!r}")
        for name in ("tie_word_embeddings", "rope_interleaved", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DecoderConfig.{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"DecoderConfig.{name} must be None or an integer in [0, {self.vocab_size}), got {value!r}"
                )

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads


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


# ----------------------------------------------------------------------------------------------
# Linen modules
# ----------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x = x.astype(jnp.float32)
        mean_sq = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(mean_sq + self.eps) * scale


def apply_rope(x: jax.Array, positions: jax.Array, theta: float, interleaved: bool) -> jax.Array:
    """Rotary position embedding of ``x [B, S, N, D]`` at integer ``positions [B, S]``.

    Frequency ``k`` (``0 <= k < D/2``) rotates the pair ``(x[k], x[k + D/2])`` (rotate-half, HF order)
    or ``(x[2k], x[2k+1])`` (interleaved, llama.cpp order) by ``position * theta^(-2k/D)``.
    """
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # [D/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    if interleaved:
        pairs = x.reshape(*x.shape[:-1], d // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        return jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(x.shape)
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def _dense(config: DecoderConfig, features: int, name: str, bias: bool = False) -> nn.Module:
    """A projection: inputs and kernel in the compute dtype, float32 accumulation and result; with
    ``bias``, a float32 bias added to the float32 result (:class:`BiasedDense`)."""
    if bias:
        return BiasedDense(features, config.compute_dtype, name=name)
    return nn.Dense(
        features,
        use_bias=False,
        dtype=jnp.dtype(config.compute_dtype),
        dot_general=precision.f32_accumulating_dot_general,
        name=name,
    )


class BiasedDense(nn.Module):
    """``x @ kernel + bias`` with the parameters of ``nn.Dense`` (``kernel [in, out]``, ``bias [out]``):
    the matmul takes the compute dtype and accumulates in float32, the bias stays float32 and is added to
    the float32 result (``nn.Dense`` would first round it to the compute dtype)."""

    features: int
    compute_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        dt = jnp.dtype(self.compute_dtype)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.normal(0.02), (self.features,), jnp.float32)
        y = precision.f32_accumulating_dot_general(x.astype(dt), kernel.astype(dt), (((x.ndim - 1,), (0,)), ((), ())))
        return y + bias


class Attention(nn.Module):
    """Grouped-query causal self-attention over ``[past keys, new keys]``."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x, positions, key_valid, past_k, past_v, last_only: bool = False, segments=None):
        """``last_only``: keys/values for every new position, queries (and the output) for the last only.

        ``past_k``/``past_v`` are ``[B, Tp, Nkv, D]`` (each row its own past; ``key_valid [B, Tp + S]``
        masks past and new keys) or ``[Tp, Nkv, D]``: one past **shared by every row** (a per-candidate
        prompt cache), all of it valid, scored against every row's queries in one GEMM without being
        broadcast to the rows; ``key_valid [B, S]`` then masks the new keys only. ``segments [B, S]``
        (optional) packs several sequences into one row: a query attends to the new keys of its own
        segment only (and to the whole past).
        """
        c = self.config
        b, s, _ = x.shape
        sq = 1 if last_only else s
        dense = lambda n, name: _dense(c, n, name)  # noqa: E731
        cd = c.compute_dtype
        qkv = lambda n, name: _dense(c, n, name, c.qkv_bias)  # noqa: E731
        q = qkv(c.num_heads * c.head_dim, "q_proj")(x[:, s - sq :]).reshape(b, sq, c.num_heads, c.head_dim)
        k = qkv(c.num_kv_heads * c.head_dim, "k_proj")(x).reshape(b, s, c.num_kv_heads, c.head_dim)
        v = qkv(c.num_kv_heads * c.head_dim, "v_proj")(x).reshape(b, s, c.num_kv_heads, c.head_dim)
        q = apply_rope(q, positions[:, s - sq :], c.rope_theta, c.rope_interleaved)
        # Keys/values leave the layer (and enter a prefix cache) in the compute dtype: they only ever
        # feed a matmul that takes that dtype.
        k = apply_rope(k, positions, c.rope_theta, c.rope_interleaved).astype(cd)
        v = v.astype(cd)

        shared_past = past_k.ndim == 3
        tp = past_k.shape[-3]
        valid = key_valid.astype(bool)
        valid_new = valid if shared_past else valid[:, tp:]
        nkv, g, hd = c.num_kv_heads, c.num_groups, c.head_dim
        # Query head h uses key/value head h // groups (HF's repeat_kv order), without repeating K/V.
        # Heads-major layout [B, Nkv, G·Sq, D] for queries and [B, Nkv, T, D] for keys/values: every
        # product below is then a batched GEMM in the order XLA's dot emits (no transposed copies of
        # the score tensors).
        qh = jnp.transpose(q.reshape(b, sq, nkv, g, hd), (0, 2, 3, 1, 4)).reshape(b, nkv, g * sq, hd)
        qh = qh / math.sqrt(hd)
        heads = lambda t: jnp.transpose(t, (0, 2, 1, 3))  # noqa: E731  [B, T, Nkv, D] -> [B, Nkv, T, D]
        # Past and new keys are scored as two blocks that share one softmax (common max and
        # denominator) and are never concatenated: under a vmap over candidate prompts the shared
        # (unbatched) past K/V is never broadcast to the population, and no concatenated score tensor,
        # masked copy or slice of the probabilities is materialised. Masks are additive biases.
        causal = jnp.arange(s)[None, :] <= jnp.arange(s - sq, s)[:, None]  # query i is new position s - sq + i
        causal = jnp.tile(causal, (g, 1))  # rows: (group, query)
        allowed = causal[None] & valid_new[:, None, :]  # [B, G·Sq, S]
        if segments is not None:
            seg_q = jnp.tile(segments[:, s - sq :], (1, g))  # [B, G·Sq], rows (group, query)
            allowed = allowed & (seg_q[:, :, None] == segments[:, None, :])
        bias_new = jnp.where(allowed, 0.0, _MASK_BIAS)[:, None]  # [B, 1, G·Sq, S]
        s_new = precision.einsum("bkqd,bktd->bkqt", qh, heads(k), cd) + bias_new  # [B, Nkv, G·Sq, S]
        m = jnp.max(s_new, axis=-1, keepdims=True)
        if tp and shared_past:  # one past for every row: all valid, no mask
            s_past = precision.einsum("bkqd,tkd->bkqt", qh, past_k, cd)  # [B, Nkv, G·Sq, Tp]
            m = jnp.maximum(m, jnp.max(s_past, axis=-1, keepdims=True))
        elif tp:
            bias_past = jnp.where(valid[:, None, None, :tp], 0.0, _MASK_BIAS)  # [B, 1, 1, Tp]
            s_past = precision.einsum("bkqd,bktd->bkqt", qh, heads(past_k), cd) + bias_past  # [B, Nkv, G·Sq, Tp]
            m = jnp.maximum(m, jnp.max(s_past, axis=-1, keepdims=True))
        m = jax.lax.stop_gradient(m)
        e_new = jnp.exp(s_new - m)
        denom = jnp.sum(e_new, axis=-1, keepdims=True)
        out = precision.einsum("bkqt,bktd->bkqd", e_new, heads(v), cd)
        if tp:
            e_past = jnp.exp(s_past - m)
            denom = denom + jnp.sum(e_past, axis=-1, keepdims=True)
            if shared_past:
                out = out + precision.einsum("bkqt,tkd->bkqd", e_past, past_v, cd)
            else:
                out = out + precision.einsum("bkqt,bktd->bkqd", e_past, heads(past_v), cd)
        out = (out / denom).reshape(b, nkv, g, sq, hd)
        out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, sq, c.num_heads * hd)
        return dense(c.hidden_size, "o_proj")(out), k, v


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = _dense(c, c.intermediate_size, "gate_proj")(x)
        up = _dense(c, c.intermediate_size, "up_proj")(x)
        return _dense(c, c.hidden_size, "down_proj")(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """One pre-norm block: the residual stream in and out, plus this layer's past K/V (and its new K/V
    when ``collect_kv``)."""

    config: DecoderConfig
    collect_kv: bool = False

    @nn.compact
    def __call__(self, x, past_k, past_v, positions, key_valid, last_only: bool = False, segments=None):
        """``last_only``: the block's output is computed for the last position only (the other rows of
        the returned residual stream are its input, unchanged); keys/values cover every position.
        ``segments``: packed rows (see :class:`Attention`)."""
        c = self.config
        h = RMSNorm(c.rms_norm_eps, name="input_layernorm")(x)
        attn, k, v = Attention(c, name="self_attn")(h, positions, key_valid, past_k, past_v, last_only, segments)
        rest, x = (x[:, :-1], x[:, -1:]) if last_only else (None, x)
        x = x + attn
        x = x + MLP(c, name="mlp")(RMSNorm(c.rms_norm_eps, name="post_attention_layernorm")(x))
        if last_only:
            x = jnp.concatenate([rest, x], axis=1)
        return x, ((k, v) if self.collect_kv else None)


class LlamaDecoder(nn.Module):
    """The transformer trunk as a linen module: it defines the parameter tree (:func:`init_params`) and
    is a plain reference forward (every layer in full, past K/V scanned over). Scoring, the prefix cache
    and decoding run :func:`_trunk` on the same tree, which prunes the last layer and indexes the cache
    per layer.

    ``__call__(embeds [B,S,H], positions [B,S], key_valid [B,Tp+S], past_k/past_v [L,B,Tp,Nkv,D])``
    returns ``(hidden [B,S,H], (k, v) [L,B,S,Nkv,D] or None)``. Token embedding and the output head
    are plain gathers/matmuls on the param tree (see :func:`word_embeddings`, :func:`output_embedding`).
    """

    config: DecoderConfig
    collect_kv: bool = False

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=nn.initializers.normal(0.02))
        self.layers = nn.scan(
            DecoderLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, 0, nn.broadcast, nn.broadcast),
            length=c.num_layers,
        )(c, self.collect_kv)
        self.norm = RMSNorm(c.rms_norm_eps)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=nn.initializers.normal(0.02))

    def __call__(self, embeds, positions, key_valid, past_k, past_v):
        x, kv = self.layers(embeds, past_k, past_v, positions, key_valid)
        return self.norm(x), kv

    def init_all(self, ids, positions, key_valid, past_k, past_v):
        """Touches every parameter (for :func:`init_params`)."""
        hidden, _ = self(self.embed_tokens(ids), positions, key_valid, past_k, past_v)
        head = self.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        return head.attend(hidden)


def _empty_past(config: DecoderConfig, batch: int) -> tuple[jax.Array, jax.Array]:
    shape = (config.num_layers, batch, 0, config.num_kv_heads, config.head_dim)
    dt = jnp.dtype(config.compute_dtype)
    return jnp.zeros(shape, dt), jnp.zeros(shape, dt)


def _keeps_float32(path: tuple[str, ...]) -> bool:
    # RMSNorm scales and projection biases; every other leaf is a matrix or an embedding table
    return path[-1] in ("scale", "bias")


def cast_params(config: DecoderConfig, params) -> dict:
    """``params`` in the storage dtypes of ``config.compute_dtype`` (matrices and embeddings in that
    dtype, norm scales and biases float32)."""
    return precision.cast_tree(params, config.compute_dtype, _keeps_float32)


def init_params(config: DecoderConfig, key: jax.Array) -> dict:
    """Random parameters (normal(0.02) weights, unit norms) in the tree :func:`params_from_hf` builds,
    stored as ``config.compute_dtype`` asks (:func:`cast_params`)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    past_k, past_v = _empty_past(config, 1)

    @jax.jit  # eager init of a scanned module dispatches op by op (seconds even for tiny configs)
    def init(key):
        return LlamaDecoder(config).init(
            key,
            ids,
            jnp.zeros((1, 2), jnp.int32),
            jnp.ones((1, 2), jnp.int32),
            past_k,
            past_v,
            method=LlamaDecoder.init_all,
        )["params"]

    return dict(cast_params(config, init(key)))


def _trunk(
    config,
    params,
    embeds,
    positions,
    key_valid,
    past_k=None,
    past_v=None,
    collect_kv=False,
    last_only=False,
    segments=None,
):
    """The decoder trunk on the stacked parameter tree, as a ``lax.scan`` over layers.

    ``last_only=True``: the caller reads the final hidden state at the last position only (label
    scoring, the prefix cache's ``last_hidden``, greedy decoding), so the *last* layer computes its
    keys/values for every position (they are what a cache keeps) but queries, attention output and MLP
    for the last position alone; the other rows of the returned hidden states are then not the model's
    (they hold the last layer's input). Earlier layers run in full. The switch is a ``lax.cond`` on the
    layer index inside the scan, so it stays one compiled layer body (and a cond, not a select, under
    vmaps over candidates or clients).

    ``past_k``/``past_v``: ``[L, B, Tp, Nkv, D]`` per-row pasts, or ``[L, Tp, Nkv, D]`` one past shared
    by every row (see :class:`Attention`); ``segments [B, S]``: packed rows.
    """
    if past_k is None:
        past_k, past_v = _empty_past(config, embeds.shape[0])
    layer = DecoderLayer(config, collect_kv)
    num_layers = config.num_layers

    def body(x, xs):
        p, i = xs
        # The past keys/values are indexed per layer rather than scanned over: under vmaps over clients
        # (whose scans move batched constants to the front) a scanned [L, ...] cache would first be
        # transposed to layer-major as a whole, a full copy of every client's cache.
        pk = jax.lax.dynamic_index_in_dim(past_k, i, axis=0, keepdims=False)
        pv = jax.lax.dynamic_index_in_dim(past_v, i, axis=0, keepdims=False)

        def run(last):
            return lambda x: layer.apply({"params": p}, x, pk, pv, positions, key_valid, last, segments)

        if not last_only or num_layers == 1:
            return run(last_only)(x)
        return jax.lax.cond(i == num_layers - 1, run(True), run(False), x)

    x, kv = jax.lax.scan(body, embeds, (params["layers"], jnp.arange(num_layers)))
    return RMSNorm(config.rms_norm_eps).apply({"params": params["norm"]}, x), kv


def _positions(mask: jax.Array) -> jax.Array:
    """Position of each real token = number of real tokens before it (pads get a harmless 0)."""
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


# ----------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------
def word_embeddings(params) -> jax.Array:
    """``[V, H]`` input embedding matrix (in its storage dtype)."""
    return params["embed_tokens"]["embedding"]


def embed(params, ids: jax.Array) -> jax.Array:
    """Input embeddings of token ``ids`` as float32 (the residual stream's dtype)."""
    return word_embeddings(params)[ids].astype(jnp.float32)


def output_embedding(config: DecoderConfig, params) -> jax.Array:
    """``[V, H]`` output head rows (the input embedding when tied)."""
    if config.tie_word_embeddings:
        return params["embed_tokens"]["embedding"]
    return params["lm_head"]["embedding"]


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown decoder layout {layout!r}; accepted: {LAYOUTS}")


def _suffix_embeds(params, batch_size: int, spec: ScoringSpec, prompt: jax.Array | None) -> jax.Array:
    """``[B, n + Tc, H]``: the soft prompt (if any) followed by the cue tokens, for every example."""
    parts = []
    if prompt is not None:
        parts.append(prompt.astype(jnp.float32))
    parts.append(embed(params, jnp.asarray(spec.cue_ids, jnp.int32)))
    suffix = jnp.concatenate(parts, axis=0)
    return jnp.broadcast_to(suffix[None], (batch_size, *suffix.shape))


def _label_rows_logits(config, params, hidden_last: jax.Array, spec: ScoringSpec) -> jax.Array:
    rows = output_embedding(config, params)[jnp.asarray(spec.label_ids, jnp.int32)]  # [C, H]
    return hidden_last.astype(jnp.float32) @ rows.astype(jnp.float32).T  # float32: C rows only


def label_logits(
    config: DecoderConfig,
    params,
    batch: TokenBatch,
    spec: ScoringSpec,
    prompt: jax.Array | None,
    layout: str,
) -> jax.Array:
    """Label-word logits at the last position: ``[B, C]``, every token of every row computed (the
    reference computation the cached scorers are tested against).

    The sequence is ``[lead, prompt, text, cue]`` (layout ``"before"``, the paper's) or ``[lead, text,
    prompt, cue]`` (``"after"``); ``spec.lead_ids [Tl]`` is a fixed instruction before everything (empty
    for most templates), ``batch.input_ids [B, T]`` the left-padded text, ``spec.cue_ids [Tc]`` the
    shared answer cue, ``prompt [n, H]`` soft-prompt embeddings or ``None``. Only the rows
    ``spec.label_ids`` of the output embedding are projected, only at the last position.
    """
    _check_layout(layout)
    ids = jnp.asarray(batch.input_ids, jnp.int32)
    text_mask = jnp.asarray(batch.attention_mask, jnp.int32)
    b = ids.shape[0]
    text = embed(params, ids)
    suffix = _suffix_embeds(params, b, spec, None if layout == "before" else prompt)
    parts, masks = [text, suffix], [text_mask, jnp.ones(suffix.shape[:2], jnp.int32)]
    if layout == "before" and prompt is not None:
        pre = jnp.broadcast_to(prompt.astype(jnp.float32)[None], (b, *prompt.shape))
        parts.insert(0, pre)
        masks.insert(0, jnp.ones(pre.shape[:2], jnp.int32))
    lead = lead_ids(spec)
    if lead.shape[0]:
        parts.insert(0, jnp.broadcast_to(embed(params, lead)[None], (b, lead.shape[0], text.shape[-1])))
        masks.insert(0, jnp.ones((b, lead.shape[0]), jnp.int32))
    embeds = jnp.concatenate(parts, axis=1)
    mask = jnp.concatenate(masks, axis=1)
    hidden, _ = _trunk(config, params, embeds, _positions(mask), mask, last_only=True)
    return _label_rows_logits(config, params, hidden[:, -1], spec)


@flax.struct.dataclass
class PrefixCache:
    """Keys/values of the text part, computed once and shared by every candidate prompt.

    Attributes:
      k, v: ``[L, B, T, Nkv, D]`` per-layer keys (after RoPE) and values of the left-padded text.
      mask: ``[B, T]`` int32, 1 for real tokens.
      lengths: ``[B]`` int32 real tokens per row (the position of the first suffix token).
      last_hidden: ``[B, H]`` final-normed hidden state at the last text position (the answer when
        there is neither prompt nor cue).
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    lengths: jax.Array
    last_hidden: jax.Array


def prefix_cache(config: DecoderConfig, params, batch: TokenBatch, spec: ScoringSpec | None = None) -> PrefixCache:
    """Runs ``[lead, text]`` once and keeps its per-layer K/V (see :func:`label_logits_cached`); the lead
    is ``spec.lead_ids`` (none without a spec)."""
    ids = jnp.asarray(batch.input_ids, jnp.int32)
    mask = jnp.asarray(batch.attention_mask, jnp.int32)
    lead = lead_ids(spec) if spec is not None else jnp.zeros((0,), jnp.int32)
    if lead.shape[0]:
        ids = jnp.concatenate([jnp.broadcast_to(lead[None], (ids.shape[0], lead.shape[0])), ids], axis=1)
        mask = jnp.concatenate([jnp.ones((ids.shape[0], lead.shape[0]), jnp.int32), mask], axis=1)
    hidden, (k, v) = _trunk(config, params, embed(params, ids), _positions(mask), mask, collect_kv=True, last_only=True)
    return PrefixCache(k=k, v=v, mask=mask, lengths=jnp.sum(mask, axis=-1), last_hidden=hidden[:, -1])


def label_logits_cached(
    config: DecoderConfig, params, cache: PrefixCache, spec: ScoringSpec, prompt: jax.Array | None
) -> jax.Array:
    """``label_logits(..., layout="after")`` from a :class:`PrefixCache`: ``[B, C]``.

    Only the ``n + Tc`` suffix tokens (prompt, then cue) run through the model; they attend to the
    cached text keys. ``vmap`` over ``prompt`` with the cache unbatched shares the cache across the
    population.
    """
    b = cache.mask.shape[0]
    suffix = _suffix_embeds(params, b, spec, prompt)
    s = suffix.shape[1]
    if s == 0:
        return _label_rows_logits(config, params, cache.last_hidden, spec)
    positions = cache.lengths[:, None] + jnp.arange(s)[None, :]
    key_valid = jnp.concatenate([cache.mask, jnp.ones((b, s), jnp.int32)], axis=1)
    hidden, _ = _trunk(config, params, suffix, positions, key_valid, cache.k, cache.v, last_only=True)
    return _label_rows_logits(config, params, hidden[:, -1], spec)


def lead_ids(spec: ScoringSpec) -> jax.Array:
    """``[Tl]`` int32: the fixed instruction before the prompt (``spec.lead_ids``; empty when there is none)."""
    lead = getattr(spec, "lead_ids", None)
    return jnp.zeros((0,), jnp.int32) if lead is None else jnp.asarray(lead, jnp.int32).reshape(-1)


def prompt_kv(
    config: DecoderConfig, params, spec: ScoringSpec, prompt: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Keys/values ``[L, Tl + n, Nkv, D]`` of ``[lead, prompt]``: the per-candidate prompt cache of layout "before".

    They depend on the candidate (and on the fixed lead before it), not on the example: every example's
    text and cue attend to them (:func:`label_logits_packed`). The lead's own keys/values do not depend
    on the candidate either, so under a ``vmap`` over candidates (and over clients) its pass stays
    unbatched: computed once for all of them.
    """
    lead = lead_ids(spec)
    tl = lead.shape[0]
    empty = jnp.zeros((config.num_layers, 0, config.num_kv_heads, config.head_dim), jnp.dtype(config.compute_dtype))
    if tl:
        ones = jnp.ones((1, tl), jnp.int32)
        _, (lk, lv) = _trunk(
            config, params, embed(params, lead)[None], _positions(ones), ones, collect_kv=True, last_only=True
        )
        lk, lv = lk[:, 0], lv[:, 0]
    else:
        lk, lv = empty, empty
    if prompt is None:
        return lk, lv
    n = prompt.shape[0]
    positions = (tl + jnp.arange(n, dtype=jnp.int32))[None]
    _, (k, v) = _trunk(
        config,
        params,
        prompt.astype(jnp.float32)[None],
        positions,
        jnp.ones((1, tl + n), jnp.int32),
        lk[:, None],
        lv[:, None],
        collect_kv=True,
        last_only=True,
    )
    return jnp.concatenate([lk, k[:, 0]], axis=1), jnp.concatenate([lv, v[:, 0]], axis=1)


# ----------------------------------------------------------------------------------------------
# Layout "before", fast: texts packed by length, one prompt cache per candidate
# ----------------------------------------------------------------------------------------------
def example_lengths(attention_mask, example_mask=None) -> np.ndarray:
    """Real tokens per example ``[..., E]`` (numpy; host side); 0 for an example whose ``example_mask`` is 0
    (a padding row, never scored: the packed layout does not compute it)."""
    lengths = np.asarray(attention_mask).sum(-1)
    if example_mask is not None:
        lengths = np.where(np.asarray(example_mask) > 0, lengths, 0)
    return lengths.astype(np.int64)


def _row_loads(lengths: np.ndarray, cue_len: int, rows: int) -> np.ndarray:
    """``[G, rows]`` positions each row takes when a group's examples, sorted by length (longest first,
    stably), are dealt round-robin to ``rows`` rows, each real example with its cue (as :func:`pack_texts`)."""
    g, e = lengths.shape
    order = np.argsort(-lengths, axis=-1, kind="stable")
    sizes = np.take_along_axis(lengths, order, axis=-1)
    sizes = np.where(sizes > 0, sizes + cue_len, 0)
    pad = -e % rows
    sizes = np.concatenate([sizes, np.zeros((g, pad), sizes.dtype)], axis=-1)
    return sizes.reshape(g, -1, rows).sum(axis=1)


def key_cost_ratio(config: DecoderConfig) -> float:
    """How many attention keys cost as much as one token's matmuls (per layer): what makes a wider packed
    row dearer (each of its positions scores every position of the row)."""
    c = config
    return 2 * (matmul_params_per_token(c) // c.num_layers) / (4 * c.num_heads * c.head_dim)


def packing_for(
    attention_mask, example_mask=None, *, cue_len: int, key_cost: float = 2048.0, past: int = 0
) -> tuple[int, int, int]:
    """The static packing ``(rows, width, cue_len)`` of left-padded examples ``[..., E, T]`` (numpy; host
    side): :attr:`TokenBatch.packing`.

    Every group (the leading axes: clients, chunks) sorts its real examples by length and deals them
    round-robin to ``rows`` rows, each example followed by its cue; ``width`` is the longest row over all
    groups, so any subset of the groups (sampled clients) and any perturbed copy fits it. ``rows`` is chosen
    for the least estimated work ``rows · W · (1 + (W + past) / key_cost)`` (:func:`key_cost_ratio`).
    """
    lengths = example_lengths(attention_mask, example_mask)
    e = lengths.shape[-1]
    lengths = lengths.reshape(-1, e)
    best = None
    for rows in range(1, e + 1):
        width = max(int(_row_loads(lengths, int(cue_len), rows).max()) if lengths.size else 1, 1)
        work = rows * width * (1.0 + (width + past) / float(key_cost))
        if best is None or work < best[0]:
            best = (work, rows, width)
    return best[1], best[2], int(cue_len)


@flax.struct.dataclass
class PackedText:
    """The prepared context of layout "before" (prompt-independent): a client's real examples sorted by
    length and packed into rows, each text followed by its own copy of the cue.

    Attributes:
      ids: ``[R, W]`` int32 token ids (pad where ``mask`` is 0).
      mask: ``[R, W]`` int32, 1 for real text and cue tokens.
      seg_pos: ``[R, W]`` int32 position within its example (text, then cue).
      segments: ``[R, W]`` int32 the example each position belongs to (``-1``: unused).
      ends: ``[E]`` int32 flat index ``r·W + c`` of each example's last position (its cue's last token), in
        the batch's own example order (0 for an example that is not computed: ``example_mask`` 0).
    """

    ids: jax.Array
    mask: jax.Array
    seg_pos: jax.Array
    segments: jax.Array
    ends: jax.Array


def pack_texts(batch: TokenBatch, spec: ScoringSpec, packing: tuple[int, int] | None = None) -> PackedText:
    """Packs one batch's examples ``[E, T]`` (left-padded) into ``[R, W]`` rows of real tokens (jittable).

    The examples are sorted by real length, longest first (an example with ``example_mask`` 0 counts as
    empty and is left out), and dealt round-robin to the ``R`` rows; in its row each takes its real tokens
    then the cue, one after the other. ``packing``: ``(R, W, Tc)``, by default ``batch.packing``
    (:func:`packing_for`); without one each example gets a row of ``T + Tc`` (no trimming; the prompt is
    still computed once per candidate).

    Raises:
      ValueError: the packing was made for another cue length than ``spec``'s (its rows could be too short).
    """
    ids = jnp.asarray(batch.input_ids, jnp.int32)
    mask = jnp.asarray(batch.attention_mask, jnp.int32)
    e, t = ids.shape
    cue = jnp.asarray(spec.cue_ids, jnp.int32)
    tc = cue.shape[0]
    packing = packing if packing is not None else getattr(batch, "packing", None)
    if packing is not None and int(packing[2]) != tc:
        raise ValueError(
            f"the batch's packing {tuple(packing)} was made for a cue of {packing[2]} token(s), the spec's cue has "
            f"{tc}; accepted: a packing from packing_for(..., cue_len={tc}), or none (batch.replace(packing=None))"
        )
    rows, width = (int(packing[0]), int(packing[1])) if packing is not None else (e, t + tc)
    lengths = jnp.sum(mask, axis=-1) * (jnp.asarray(batch.example_mask) > 0).astype(jnp.int32)
    perm = jnp.argsort(-lengths, stable=True)  # rank j holds example perm[j]
    ls = lengths[perm]
    sizes = jnp.where(ls > 0, ls + tc, 0)
    pad = -e % rows
    grid = jnp.concatenate([sizes, jnp.zeros((pad,), sizes.dtype)]).reshape(-1, rows)  # [k, r]: rank k·R + r
    offsets = (jnp.cumsum(grid, axis=0) - grid).reshape(-1)[:e]  # where rank j starts in its row
    row_of = jnp.arange(e) % rows
    # Each position's rank: mark every example's first position, then carry the mark along the row.
    marks = jnp.zeros((rows, width + 1), jnp.int32)
    marks = marks.at[row_of, jnp.where(sizes > 0, offsets, width)].max(jnp.arange(e, dtype=jnp.int32) + 1)
    rank = jax.lax.cummax(marks[:, :width], axis=1) - 1  # [R, W]; -1 before the first example
    r_safe = jnp.maximum(rank, 0)
    local = jnp.arange(width)[None, :] - offsets[r_safe]
    valid = (rank >= 0) & (local < sizes[r_safe])
    in_text = local < ls[r_safe]
    src = perm[r_safe]
    text_col = jnp.clip(t - ls[r_safe] + local, 0, t - 1)
    cue_col = jnp.clip(local - ls[r_safe], 0, max(tc - 1, 0))
    tok = jnp.where(in_text, ids[src, text_col], cue[cue_col] if tc else 0)
    ends_sorted = row_of * width + offsets + sizes - 1
    ends = jnp.zeros((e,), jnp.int32).at[perm].set(jnp.where(sizes > 0, ends_sorted, 0).astype(jnp.int32))
    return PackedText(
        ids=jnp.where(valid, tok, 0).astype(jnp.int32),
        mask=valid.astype(jnp.int32),
        seg_pos=jnp.where(valid, local, 0).astype(jnp.int32),
        segments=jnp.where(valid, rank, -1).astype(jnp.int32),
        ends=ends,
    )


def prompt_cache_bytes(config: DecoderConfig, n_prompt: int, lead_len: int = 0) -> int:
    """Bytes of one candidate's prompt cache (:func:`prompt_kv`): keys and values of ``lead + n`` positions in
    every layer, in the compute dtype. A vmapped population of ``P`` candidates for ``K`` clients holds
    ``K · P`` of them at once (SmolLM2 in float32: 46 KB a position, 2.3 MB for 50 prompt tokens)."""
    c = config
    per_position = c.num_layers * 2 * c.num_kv_heads * c.head_dim * jnp.dtype(c.compute_dtype).itemsize
    return int((lead_len + n_prompt) * per_position)


def label_logits_packed(
    config: DecoderConfig, params, packed: PackedText, spec: ScoringSpec, prompt: jax.Array | None
) -> jax.Array:
    """``label_logits(..., layout="before")`` from :func:`pack_texts`: ``[E, C]`` (or ``[..., E, C]`` for
    stacked copies ``[..., R, W]``, e.g. a clean and a perturbed one, which then share one prompt pass).

    The candidate's ``[lead, prompt]`` keys/values are computed once (:func:`prompt_kv`); the packed texts
    and cues run as rows that attend to them as a shared past and to their own segment causally, at the
    positions the uncached sequence gives them. Only real tokens (to each slot's width) are computed.
    """
    pk, pv = prompt_kv(config, params, spec, prompt)
    lead = pk.shape[1]
    lead_shape = packed.ids.shape[:-2]
    r, w = packed.ids.shape[-2:]
    flat = lambda a: a.reshape(-1, w)  # noqa: E731  copies' rows side by side
    copies = int(np.prod(lead_shape)) if lead_shape else 1
    emb = embed(params, flat(packed.ids))
    hidden, _ = _trunk(
        config, params, emb, lead + flat(packed.seg_pos), flat(packed.mask), pk, pv, segments=flat(packed.segments)
    )
    ends = packed.ends.reshape(copies, -1) + (jnp.arange(copies, dtype=jnp.int32) * (r * w))[:, None]
    h = hidden.reshape(-1, hidden.shape[-1])[ends.reshape(-1)]
    out = _label_rows_logits(config, params, h, spec)
    return out.reshape(*lead_shape, packed.ends.shape[-1], out.shape[-1])


def logits(config: DecoderConfig, params, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Full-vocabulary logits ``[B, T, V]`` (tests and generation only; scoring never needs them)."""
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    hidden, _ = _trunk(config, params, embed(params, ids), _positions(mask), mask)
    return precision.dense(hidden, output_embedding(config, params).T, config.compute_dtype)


def greedy_next_token(
    config: DecoderConfig, params, input_ids: jax.Array, attention_mask: jax.Array | None = None
) -> jax.Array:
    """``[B]`` argmax next token after each (left-padded) row."""
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    hidden, _ = _trunk(config, params, embed(params, ids), _positions(mask), mask, last_only=True)
    scores = precision.dense(hidden[:, -1], output_embedding(config, params).T, config.compute_dtype)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def greedy_generate(config: DecoderConfig, params, input_ids, num_tokens: int) -> np.ndarray:
    """Host loop of :func:`greedy_next_token` on one unpadded sequence ``[T]`` (slow; for checks)."""
    ids = list(np.asarray(input_ids).tolist())
    step = jax.jit(greedy_next_token, static_argnums=0)
    for _ in range(num_tokens):
        ids.append(int(step(config, params, jnp.asarray([ids]))[0]))
    return np.asarray(ids[len(ids) - num_tokens :], np.int32)


# ----------------------------------------------------------------------------------------------
# FLOP accounting
# ----------------------------------------------------------------------------------------------
def matmul_params_per_token(config: DecoderConfig) -> int:
    """Weights every token multiplies by in the trunk (projections + MLP; no embedding, no head)."""
    c = config
    attn = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_layers * (attn + mlp)


def kv_params_per_layer(config: DecoderConfig) -> int:
    """Weights of one layer's key and value projections (what the last layer still runs for every token)."""
    return 2 * config.hidden_size * config.num_kv_heads * config.head_dim


def flops_per_example(
    config: DecoderConfig, num_query_tokens: int, num_keys: int, num_labels: int = 2, *, last_only: bool = True
) -> float:
    """Forward FLOPs to score one example: ``num_query_tokens`` new tokens, the last attending ``num_keys``.

    Earlier query tokens attend causally fewer keys (query ``i`` of ``Q`` sees ``num_keys - Q + 1 + i``).
    Uncached scoring: ``Q = K = total length``. Cached (layout "after"): ``Q = n + Tc``,
    ``K = T + n + Tc``. The head projects ``num_labels`` rows at the last position only.
    ``last_only`` (what scoring and the prefix cache run): the last layer computes keys/values for
    every query token but the rest of the block for the last one only.
    """
    q, k = int(num_query_tokens), int(num_keys)
    if q < 0 or k < q:
        raise ValueError(f"need 0 <= num_query_tokens <= num_keys, got {q} and {k}")
    c = config
    per_layer = matmul_params_per_token(c) // c.num_layers
    attn = 4 * c.num_heads * c.head_dim  # per (query, key) pair: scores + weighted values
    total_keys = q * (k - q) + q * (q + 1) / 2
    pruned = last_only and q > 0
    full_layers = c.num_layers - 1 if pruned else c.num_layers
    flops = full_layers * (2 * per_layer * q + attn * total_keys)
    if pruned:
        kv = kv_params_per_layer(c)
        flops += 2 * kv * q + 2 * (per_layer - kv) + attn * k
    return float(flops + 2 * c.hidden_size * num_labels)


# ----------------------------------------------------------------------------------------------
# Loading Hugging Face checkpoints
# ----------------------------------------------------------------------------------------------
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
        load = f32 if _keeps_float32(path) else mat
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
    "LAYOUTS",
    "DecoderConfig",
    "config_from_hf",
    "RMSNorm",
    "apply_rope",
    "Attention",
    "MLP",
    "DecoderLayer",
    "LlamaDecoder",
    "BiasedDense",
    "init_params",
    "word_embeddings",
    "output_embedding",
    "label_logits",
    "PrefixCache",
    "prefix_cache",
    "lead_ids",
    "prompt_kv",
    "example_lengths",
    "packing_for",
    "key_cost_ratio",
    "PackedText",
    "pack_texts",
    "label_logits_packed",
    "prompt_cache_bytes",
    "label_logits_cached",
    "logits",
    "greedy_next_token",
    "greedy_generate",
    "embed",
    "cast_params",
    "matmul_params_per_token",
    "kv_params_per_layer",
    "flops_per_example",
    "expected_hf_shapes",
    "params_from_hf",
    "load_hf_decoder",
]
