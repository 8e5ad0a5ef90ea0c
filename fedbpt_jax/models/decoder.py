"""Llama-family causal decoder (SmolLM2, Llama-2) in Flax linen: config, layers, trunk and uncached scoring.

Its caches (the text-prefix cache of layout "after", the packed prompt cache of layout "before") are
:mod:`fedbpt_jax.models.decoder_cache`; loading Hugging Face checkpoints is :mod:`fedbpt_jax.models.decoder_hf`.

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
    scores = label_logits(cfg, params, batch, spec, prompt, layout="after")   # [B, C]
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
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
    and decoding run :func:`trunk` on the same tree, which prunes the last layer and indexes the cache
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


def empty_past(config: DecoderConfig, batch: int) -> tuple[jax.Array, jax.Array]:
    shape = (config.num_layers, batch, 0, config.num_kv_heads, config.head_dim)
    dt = jnp.dtype(config.compute_dtype)
    return jnp.zeros(shape, dt), jnp.zeros(shape, dt)


def keeps_float32(path: tuple[str, ...]) -> bool:
    # RMSNorm scales and projection biases; every other leaf is a matrix or an embedding table
    return path[-1] in ("scale", "bias")


def cast_params(config: DecoderConfig, params) -> dict:
    """``params`` in the storage dtypes of ``config.compute_dtype`` (matrices and embeddings in that
    dtype, norm scales and biases float32)."""
    return precision.cast_tree(params, config.compute_dtype, keeps_float32)


def init_params(config: DecoderConfig, key: jax.Array) -> dict:
    """Random parameters (normal(0.02) weights, unit norms) in the tree :func:`fedbpt_jax.models.decoder_hf.params_from_hf` builds,
    stored as ``config.compute_dtype`` asks (:func:`cast_params`)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    past_k, past_v = empty_past(config, 1)

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


def trunk(
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
        past_k, past_v = empty_past(config, embeds.shape[0])
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


def token_positions(mask: jax.Array) -> jax.Array:
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


def suffix_embeds(params, batch_size: int, spec: ScoringSpec, prompt: jax.Array | None) -> jax.Array:
    """``[B, n + Tc, H]``: the soft prompt (if any) followed by the cue tokens, for every example."""
    parts = []
    if prompt is not None:
        parts.append(prompt.astype(jnp.float32))
    parts.append(embed(params, jnp.asarray(spec.cue_ids, jnp.int32)))
    suffix = jnp.concatenate(parts, axis=0)
    return jnp.broadcast_to(suffix[None], (batch_size, *suffix.shape))


def label_rows_logits(config, params, hidden_last: jax.Array, spec: ScoringSpec) -> jax.Array:
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
    suffix = suffix_embeds(params, b, spec, None if layout == "before" else prompt)
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
    hidden, _ = trunk(config, params, embeds, token_positions(mask), mask, last_only=True)
    return label_rows_logits(config, params, hidden[:, -1], spec)


def lead_ids(spec: ScoringSpec) -> jax.Array:
    """``[Tl]`` int32: the fixed instruction before the prompt (``spec.lead_ids``; empty when there is none)."""
    lead = getattr(spec, "lead_ids", None)
    return jnp.zeros((0,), jnp.int32) if lead is None else jnp.asarray(lead, jnp.int32).reshape(-1)


def logits(config: DecoderConfig, params, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Full-vocabulary logits ``[B, T, V]`` (tests and generation only; scoring never needs them)."""
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    hidden, _ = trunk(config, params, embed(params, ids), token_positions(mask), mask)
    return precision.dense(hidden, output_embedding(config, params).T, config.compute_dtype)


def greedy_next_token(
    config: DecoderConfig, params, input_ids: jax.Array, attention_mask: jax.Array | None = None
) -> jax.Array:
    """``[B]`` argmax next token after each (left-padded) row."""
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    hidden, _ = trunk(config, params, embed(params, ids), token_positions(mask), mask, last_only=True)
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


__all__ = [
    "LAYOUTS",
    "DecoderConfig",
    "RMSNorm",
    "apply_rope",
    "Attention",
    "MLP",
    "DecoderLayer",
    "LlamaDecoder",
    "BiasedDense",
    "init_params",
    "trunk",
    "token_positions",
    "suffix_embeds",
    "label_rows_logits",
    "keeps_float32",
    "empty_past",
    "word_embeddings",
    "output_embedding",
    "label_logits",
    "lead_ids",
    "logits",
    "greedy_next_token",
    "greedy_generate",
    "embed",
    "cast_params",
    "matmul_params_per_token",
    "kv_params_per_layer",
    "flops_per_example",
]
