"""RoBERTa/BERT masked-LM encoder in Flax linen (the paper's RoBERTa-large backbone).

Architecture (both families): embeddings = LayerNorm(word + position + token type); ``num_layers``
post-LN transformer layers (self-attention → add → LayerNorm, FFN → add → LayerNorm); MLM head = dense →
gelu → LayerNorm → tied word-embedding decoder + per-token bias. The two families differ only in
positions (RoBERTa: ``pad_id + 1 + index among non-pad tokens``, pads at ``pad_id``; BERT: ``0 … T-1``)
and in the head activation (RoBERTa: exact gelu always; BERT: ``hidden_act``).

The layers are one ``nn.scan`` over stacked parameters (leading axis = layer), so a 24-layer model
compiles as fast as a one-layer one.

Parameters are the linen variable dict ``{"params": {...}}``, always passed as an argument: kernels
and embedding tables in the config's ``compute_dtype``, LayerNorm and bias vectors in float32 (see
:mod:`fedbpt_jax.models.precision`). All functions below are pure and unbatched over the population: vmap ``label_logits`` over
``prompt`` to score a CMA-ES population in one forward pass.

Example::

    from fedbpt_jax.models import encoder, hf
    d = hf.resolve("roberta-large")
    config = encoder.config_from_hf(hf.load_config(d))
    params = encoder.params_from_hf(config, hf.read_safetensors(d))      # LM bias zeroed (BBT)
    scores = jax.vmap(lambda p: encoder.label_logits(config, params, batch, spec, p))(prompts)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..types import ScoringSpec, TokenBatch
from . import precision

FAMILIES = ("roberta", "bert")
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")
DTYPES = precision.COMPUTE_DTYPES
MODES = ("add", "cat")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Static shape of a RoBERTa/BERT encoder (hashable; validated on construction).

    Attributes:
      family: ``"roberta"`` or ``"bert"``: decides the position scheme (see :attr:`position_offset`) and
        the MLM-head activation.
      vocab_size, hidden_size, num_layers, num_heads, intermediate_size: the usual sizes
        (``hidden_size`` divisible by ``num_heads``).
      max_position_embeddings: rows of the position table (RoBERTa: includes the ``pad_id + 1`` offset).
      type_vocab_size: rows of the token-type table (RoBERTa 1, BERT 2).
      layer_norm_eps: LayerNorm epsilon (RoBERTa 1e-5, BERT 1e-12).
      pad_token_id: id of the padding token.
      hidden_act: FFN activation, one of :data:`ACTIVATIONS` (``"gelu"`` is the exact erf form).
      compute_dtype: ``"float32"`` or ``"bfloat16"``: the dtype kernels and embedding tables are stored
        in and matmuls take as inputs (always accumulating in float32); LayerNorm, softmax, the residual
        stream and the returned logits are float32 either way.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    hidden_act: str = "gelu"
    compute_dtype: str = "float32"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"EncoderConfig.family={self.family!r}; accepted values: {FAMILIES}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"EncoderConfig.hidden_act={self.hidden_act!r}; accepted values: {ACTIVATIONS}")
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"EncoderConfig.compute_dtype={self.compute_dtype!r}; accepted values: {DTYPES}")
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EncoderConfig.{name}={value!r}; accepted values: integers >= 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"EncoderConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}; accepted values: multiples of num_heads"
            )
        if not (isinstance(self.pad_token_id, (int, np.integer)) and 0 <= self.pad_token_id < self.vocab_size):
            raise ValueError(
                f"EncoderConfig.pad_token_id={self.pad_token_id!r}; accepted values: integers in "
                f"[0, vocab_size={self.vocab_size})"
            )
        if not (isinstance(self.layer_norm_eps, (float, int)) and self.layer_norm_eps > 0):
            raise ValueError(f"EncoderConfig.layer_norm_eps={self.layer_norm_eps!r}; accepted values: floats > 0")
        if self.position_offset >= self.max_position_embeddings:
            raise ValueError(
                f"EncoderConfig.max_position_embeddings={self.max_position_embeddings} leaves no room "
                f"after the RoBERTa position offset {self.position_offset}; accepted values: "
                f"> pad_token_id + 1"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_offset(self) -> int:
        """Position id of the first real token: ``pad_token_id + 1`` for RoBERTa (its positions count only
        non-pad tokens and pads sit at ``pad_token_id``), ``0`` for BERT (positions ``0 … T-1``)."""
        return self.pad_token_id + 1 if self.family == "roberta" else 0

    @property
    def max_seq_len(self) -> int:
        """Longest input the position table allows (514 - 2 = 512 for roberta-large)."""
        return self.max_position_embeddings - self.position_offset


def config_from_hf(hf_config: Any, *, compute_dtype: str = "float32") -> EncoderConfig:
    """Build an :class:`EncoderConfig` from a ``transformers`` RobertaConfig / BertConfig (or a dict).

    Raises:
      ValueError: unknown ``model_type`` or an unsupported setting (non-absolute position embeddings,
        decoder/cross-attention configs).
    """
    get = hf_config.get if isinstance(hf_config, Mapping) else lambda k, d=None: getattr(hf_config, k, d)
    model_type = get("model_type")
    family = {"roberta": "roberta", "xlm-roberta": "roberta", "camembert": "roberta", "bert": "bert"}.get(model_type)
    if family is None:
        raise ValueError(
            f"config model_type={model_type!r} is not an encoder family fedbpt-jax supports; accepted "
            "values: 'roberta', 'xlm-roberta', 'camembert' (family 'roberta') and 'bert' (family 'bert')"
        )
    pos_type = get("position_embedding_type", "absolute") or "absolute"
    if pos_type != "absolute":
        raise ValueError(f"config position_embedding_type={pos_type!r}; accepted values: 'absolute'")
    if get("add_cross_attention", False):
        raise ValueError("config add_cross_attention=True; accepted values: False (encoder-only models)")
    pad = get("pad_token_id")
    return EncoderConfig(
        family=family,
        vocab_size=int(get("vocab_size")),
        hidden_size=int(get("hidden_size")),
        num_layers=int(get("num_hidden_layers")),
        num_heads=int(get("num_attention_heads")),
        intermediate_size=int(get("intermediate_size")),
        max_position_embeddings=int(get("max_position_embeddings")),
        type_vocab_size=int(get("type_vocab_size", 2)),
        layer_norm_eps=float(get("layer_norm_eps", 1e-12)),
        pad_token_id=int(pad if pad is not None else (1 if family == "roberta" else 0)),
        hidden_act=str(get("hidden_act", "gelu")),
        compute_dtype=compute_dtype,
    )


# --------------------------------------------------------------------------------------------------
# Linen modules
# --------------------------------------------------------------------------------------------------


def _activation(name: str):
    return {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "relu": jax.nn.relu,
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
    }[name]


def _init():
    return nn.initializers.normal(stddev=0.02)


def _layer_norm(eps: float, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm computed in float32 (HF weight → scale, bias → bias); callers pass float32 inputs."""
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, name=name)


class Embeddings(nn.Module):
    """word + position + token-type embeddings, then LayerNorm (no dropout: inference only)."""

    config: EncoderConfig

    def setup(self):
        c = self.config
        self.word_embeddings = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=_init())
        self.position_embeddings = nn.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=_init())
        self.token_type_embeddings = nn.Embed(c.type_vocab_size, c.hidden_size, embedding_init=_init())
        self.layer_norm = _layer_norm(c.layer_norm_eps)

    def __call__(self, input_ids, token_type_ids):
        c = self.config
        if c.family == "roberta":
            # Positions count only non-pad tokens, from pad_id + 1; pads get pad_id (fairseq convention).
            real = (input_ids != c.pad_token_id).astype(jnp.int32)
            positions = jnp.cumsum(real, axis=-1) * real + c.pad_token_id
        else:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        f32 = lambda e: e.astype(jnp.float32)  # noqa: E731  (tables may be stored in bfloat16)
        h = f32(self.word_embeddings(input_ids)) + f32(self.position_embeddings(positions))
        h = h + f32(self.token_type_embeddings(token_type_ids))
        return self.layer_norm(h)


def _dense(config: EncoderConfig, features: int, name: str | None = None) -> nn.Dense:
    """Inputs and kernel in the compute dtype, float32 accumulation and result; the bias (stored in float32)
    is rounded to the compute dtype and added in float32, explicitly (:func:`precision.promote_to_f32_bias`)."""
    return nn.Dense(
        features,
        dtype=jnp.dtype(config.compute_dtype),
        kernel_init=_init(),
        dot_general=precision.f32_accumulating_dot_general,
        promote_dtype=precision.promote_to_f32_bias,
        name=name,
    )


class Layer(nn.Module):
    """One post-LN transformer layer; signature fits ``nn.scan`` (carry = hidden states)."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, h, mask_bias):
        c = self.config
        dense = lambda n, name: _dense(c, n, name)  # noqa: E731
        cd = c.compute_dtype
        B, T, _ = h.shape
        split = lambda x: x.reshape(B, T, c.num_heads, c.head_dim)  # noqa: E731
        q = split(dense(c.hidden_size, "query")(h))
        k = split(dense(c.hidden_size, "key")(h))
        v = split(dense(c.hidden_size, "value")(h))
        scores = precision.einsum("bqnd,bknd->bnqk", q, k, cd) / math.sqrt(c.head_dim)
        probs = jax.nn.softmax(scores + mask_bias, axis=-1)
        ctx = precision.einsum("bnqk,bknd->bqnd", probs, v, cd).reshape(B, T, c.hidden_size)
        h = _layer_norm(c.layer_norm_eps, "attention_layer_norm")(dense(c.hidden_size, "attention_output")(ctx) + h)
        ffn = _activation(c.hidden_act)(dense(c.intermediate_size, "intermediate")(h))
        h = _layer_norm(c.layer_norm_eps, "output_layer_norm")(dense(c.hidden_size, "output")(ffn) + h)
        return h, None


class MLMHead(nn.Module):
    """dense → gelu → LayerNorm, then the decoder tied to the word embeddings, plus a bias ``[V]``.

    The bias is a parameter; BBT zeroes it (see :func:`params_from_hf`'s ``zero_lm_bias``); a freshly
    initialised head has it at zero.
    """

    config: EncoderConfig

    def setup(self):
        c = self.config
        self.dense = _dense(c, c.hidden_size)
        self.layer_norm = _layer_norm(c.layer_norm_eps)
        self.bias = self.param("bias", nn.initializers.zeros, (c.vocab_size,))

    def __call__(self, h, table, rows=None):
        """Logits of hidden states ``[..., H]`` against ``table`` ``[V, H]`` (all rows, or ``rows`` only)."""
        c = self.config
        # RobertaLMHead hard-codes exact gelu; BERT's head uses hidden_act.
        act = _activation("gelu" if c.family == "roberta" else c.hidden_act)
        x = self.layer_norm(act(self.dense(h)))
        bias = self.bias.astype(jnp.float32)
        if rows is not None:
            table, bias = table[rows], bias[rows]
            return x @ table.T.astype(jnp.float32) + bias  # C rows: float32 throughout
        return precision.dense(x, table.T, self.config.compute_dtype) + bias


class Encoder(nn.Module):
    """RoBERTa/BERT masked LM. ``__call__`` gives full MLM logits; the methods expose the pieces that
    :func:`label_logits` recombines (embed → optional prompt → encode → head at the mask only).
    A parameter tree without ``lm_head`` binds too, for the head-free methods ``embed``/``encode``.
    """

    config: EncoderConfig

    def setup(self):
        c = self.config
        self.embeddings = Embeddings(c)
        self.layers = nn.scan(
            Layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast,
            length=c.num_layers,
        )(c)
        self.lm_head = MLMHead(c)

    def embed(self, input_ids, token_type_ids):
        return self.embeddings(input_ids, token_type_ids)

    def encode(self, h, attention_mask):
        # Additive mask bias in float32; HF uses the dtype's minimum too.
        mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        h, _ = self.layers(h.astype(jnp.float32), mask_bias)
        return h

    def head(self, h, rows=None):
        """MLM logits of hidden states ``[..., H]``: all ``V`` rows, or only vocabulary ``rows``."""
        return self.lm_head(h, self.embeddings.word_embeddings.embedding, rows)

    def __call__(self, input_ids, attention_mask, token_type_ids=None):
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        return self.head(self.encode(self.embed(input_ids, token_type_ids), attention_mask))


# --------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------


def init_params(config: EncoderConfig, key: jax.Array) -> dict:
    """Random parameters (BERT-style N(0, 0.02) init, LayerNorm 1/0, LM bias 0): for tests and
    benchmarks at real shapes without a checkpoint."""
    ids = jnp.zeros((1, 2), jnp.int32)
    return cast_params(config, Encoder(config).init(key, ids, jnp.ones_like(ids)))


def cast_params(config: EncoderConfig, params) -> dict:
    """``params`` in the storage dtypes of ``config.compute_dtype``: kernels and embedding tables in that
    dtype, LayerNorm scales and every bias in float32."""
    return precision.cast_tree(params, config.compute_dtype, lambda path: path[-1] in ("scale", "bias"))


def word_embeddings(params) -> jax.Array:
    """``[V, H]`` input word-embedding matrix (also the tied output embedding)."""
    return params["params"]["embeddings"]["word_embeddings"]["embedding"]


def has_mlm_head(params) -> bool:
    """False for checkpoints without the masked-LM head (e.g. sentence-transformers' ``BertModel``)."""
    return "lm_head" in params["params"]


def _require_head(params, what: str) -> None:
    if not has_mlm_head(params):
        raise ValueError(
            f"{what} needs the masked-LM head, but these parameters were loaded from a checkpoint without "
            "one (a bare RobertaModel/BertModel, e.g. a sentence-transformers model). Use a *ForMaskedLM "
            "checkpoint (e.g. roberta-large) for scoring; hidden_states() works without the head."
        )


def hidden_states(config: EncoderConfig, params, input_ids, attention_mask, token_type_ids=None) -> jax.Array:
    """Final-layer hidden states ``[B, T, H]`` (float32). Works with or without the MLM head."""
    if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)

    def fn(module, ids, mask, types):
        return module.encode(module.embed(ids, types), mask)

    return nn.apply(fn, Encoder(config))(params, input_ids, attention_mask, token_type_ids)


def logits(config: EncoderConfig, params, input_ids, attention_mask, token_type_ids=None) -> jax.Array:
    """Full MLM logits ``[B, T, V]`` over every position (for tests; scoring uses :func:`label_logits`)."""
    _require_head(params, "logits()")
    return Encoder(config).apply(params, input_ids, attention_mask, token_type_ids)


def label_logits(
    config: EncoderConfig,
    params,
    batch: TokenBatch,
    spec: ScoringSpec,
    prompt: jax.Array | None,
    mode: str = "add",
    prompt_start: int = 1,
) -> jax.Array:
    """Label-word logits at the ``<mask>`` position of each example, with a soft prompt: ``[B, C]``.

    Unbatched over the population: ``jax.vmap`` over ``prompt`` scores a whole CMA-ES population in one
    forward pass. Only the ``C`` label-word rows of the output embedding are used, at one position per
    example: never the full vocabulary over all positions.

    Args:
      config: the encoder's static config.
      params: parameter tree (with the MLM head).
      batch: ``TokenBatch`` with ``input_ids``/``attention_mask`` ``[B, T]`` and ``answer_pos`` ``[B]``
        (index of ``<mask>`` in ``input_ids``).
      spec: ``ScoringSpec``; ``spec.label_ids`` ``[C]`` are the verbalizer's vocabulary rows.
      prompt: ``[n, H]`` soft prompt (``A z`` of BBT), or None for no prompt.
      mode: ``"add"`` (BBT default): the prompt is *added* to the embedding output (after the embedding
        LayerNorm) at positions ``prompt_start … prompt_start + n - 1``, where the input carries
        placeholder tokens; every other position gets nothing added. ``"cat"``: the prompt is
        concatenated in front of the embedding output (no position embedding of its own), the attention
        mask is extended with ones and the ``<mask>`` position shifted by ``n``.
      prompt_start: first prompted position in ``"add"`` mode (1: right after ``<s>``/``[CLS]``).

    Returns:
      ``[B, C]`` float32 logits.

    Example::

        fn = lambda p: label_logits(config, params, batch, spec, p)
        scores = jax.vmap(fn)(population_prompts)      # [P, B, C]
    """
    if mode not in MODES:
        raise ValueError(f"label_logits mode={mode!r}; accepted values: {MODES}")
    _require_head(params, "label_logits()")
    ids, mask, pos = batch.input_ids, batch.attention_mask, batch.answer_pos
    if prompt is not None:
        prompt = jnp.asarray(prompt)
        if prompt.ndim != 2 or prompt.shape[1] != config.hidden_size:
            raise ValueError(
                f"prompt has shape {tuple(prompt.shape)}; expected [n, hidden_size={config.hidden_size}] "
                "(vmap over the population axis)"
            )
        n = prompt.shape[0]
        if mode == "add" and not 0 <= prompt_start <= ids.shape[-1] - n:
            raise ValueError(
                f"prompt of {n} tokens from prompt_start={prompt_start} does not fit in sequences of "
                f"length {ids.shape[-1]}"
            )

    def fn(module: Encoder):
        h = module.embed(ids, jnp.zeros_like(ids))  # [B, T, H]
        m, p = mask, pos
        if prompt is not None:
            pr = prompt.astype(jnp.float32)
            if mode == "add":
                h = h.at[:, prompt_start : prompt_start + pr.shape[0]].add(pr)
            else:
                h = jnp.concatenate([jnp.broadcast_to(pr, (h.shape[0],) + pr.shape), h], axis=1)
                m = jnp.concatenate([jnp.ones((m.shape[0], pr.shape[0]), m.dtype), m], axis=1)
                p = p + pr.shape[0]
        h = module.encode(h, m)
        at_mask = jnp.take_along_axis(h, p[:, None, None].astype(jnp.int32), axis=1)[:, 0]  # [B, H]
        return module.head(at_mask, spec.label_ids)

    return nn.apply(fn, Encoder(config))(params)


def flops_per_example(
    config: EncoderConfig,
    seq_len: int,
    *,
    n_prompt: int = 0,
    mode: str = "add",
    num_labels: int | None = None,
) -> int:
    """Forward-pass FLOPs of one example (2 per multiply-add; matmuls only, which dominate).

    Args:
      seq_len: tokens of the input (``T``).
      n_prompt: soft-prompt length; in ``"cat"`` mode it lengthens the sequence, in ``"add"`` mode the
        placeholders are already part of ``seq_len``.
      mode: ``"add"`` or ``"cat"``.
      num_labels: ``C`` for :func:`label_logits` (head at one position, ``C`` vocabulary rows); None for
        the full-vocabulary head at every position (:func:`logits`).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; accepted values: {MODES}")
    c = config
    t = seq_len + (n_prompt if mode == "cat" else 0)
    h, i = c.hidden_size, c.intermediate_size
    per_layer = 2 * t * h * (4 * h)  # Q, K, V and output projections
    per_layer += 2 * 2 * t * t * h  # scores and probs @ V over all heads
    per_layer += 2 * 2 * t * h * i  # FFN in and out
    if num_labels is None:
        head = t * (2 * h * h + 2 * h * c.vocab_size)
    else:
        head = 2 * h * h + 2 * h * num_labels
    return int(c.num_layers * per_layer + head)


# --------------------------------------------------------------------------------------------------
# HF checkpoint → params
# --------------------------------------------------------------------------------------------------

_PREFIX = {"roberta": "roberta.", "bert": "bert."}


def _ln_names(base: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (f"{base}.weight", f"{base}.gamma"), (f"{base}.bias", f"{base}.beta")


class _TensorReader:
    """Reads HF tensors by name, checking each shape; collects the missing and the misshapen ones (every one,
    for one error at the end: :meth:`check_fits`)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], hidden: int):
        self.tensors, self.h = tensors, hidden
        self.missing: list[str] = []
        self.bad: list[str] = []

    def get(self, names: str | tuple[str, ...], shape: tuple[int, ...], transpose: bool = False, required=True):
        names = (names,) if isinstance(names, str) else names
        for name in names:
            if name in self.tensors:
                x = np.asarray(self.tensors[name])
                if tuple(x.shape) != shape:
                    self.bad.append(f"{name}: shape {tuple(x.shape)}, expected {shape}")
                    return np.zeros(shape[::-1] if transpose else shape, np.float32)
                return x.T if transpose else x
        if required:
            self.missing.append(names[0])
        return None

    def dense(self, base: str, n_in: int, n_out: int, required=True):
        w = self.get(f"{base}.weight", (n_out, n_in), transpose=True, required=required)
        b = self.get(f"{base}.bias", (n_out,), required=required)
        return None if w is None or b is None else {"kernel": w, "bias": b}

    def layer_norm(self, base: str, required=True):
        w_names, b_names = _ln_names(base)
        w, b = self.get(w_names, (self.h,), required=required), self.get(b_names, (self.h,), required=required)
        return None if w is None or b is None else {"scale": w, "bias": b}

    def check_fits(self, c: EncoderConfig) -> None:
        """Raises ``ValueError`` naming every misshapen and missing tensor, if there is any."""
        if not (self.missing or self.bad):
            return
        problems = []
        if self.bad:
            problems.append("tensors whose shape does not match the config:\n  " + "\n  ".join(self.bad))
        if self.missing:
            problems.append(f"missing tensors ({len(self.missing)}):\n  " + "\n  ".join(self.missing))
        raise ValueError(
            f"checkpoint does not fit EncoderConfig(family={c.family!r}, hidden_size={c.hidden_size}, "
            f"num_layers={c.num_layers}, vocab_size={c.vocab_size}):\n" + "\n".join(problems)
        )


def _mlm_head_names(family: str) -> tuple[str, str, tuple[str, str]]:
    """The MLM head's dense and layer-norm bases and its bias names (``family``'s HF names)."""
    if family == "roberta":
        return "lm_head.dense", "lm_head.layer_norm", ("lm_head.bias", "lm_head.decoder.bias")
    t = "cls.predictions.transform"
    return f"{t}.dense", f"{t}.LayerNorm", ("cls.predictions.bias", "cls.predictions.decoder.bias")


def params_from_hf(config: EncoderConfig, tensors: Mapping[str, np.ndarray], *, zero_lm_bias: bool = True) -> dict:
    """Map HF tensor names to this module's parameter tree (jax arrays in the storage dtypes of
    ``config.compute_dtype``, see :func:`cast_params`; bfloat16 tensors read with
    ``read_safetensors(keep_bf16=True)`` are never widened to float32 for bfloat16 compute).

    Accepts ``roberta.*`` + ``lm_head.*`` (RobertaForMaskedLM), ``bert.*`` + ``cls.predictions.*``
    (BertForMaskedLM/BertForPreTraining), and checkpoints without the model prefix
    (``embeddings.word_embeddings.weight`` …, e.g. sentence-transformers' BertModel): those have no MLM
    head, which is allowed; :func:`label_logits` and :func:`logits` then raise. Pooler, NSP and other
    extra tensors are ignored. LayerNorm ``gamma``/``beta`` (old BERT names) are accepted.

    Args:
      config: the encoder config the tensors must match.
      tensors: ``{HF name: array}`` as returned by :func:`fedbpt_jax.models.hf.read_safetensors`.
      zero_lm_bias: set the LM-head bias to zero, as BBT does after loading RoBERTa (its label-word
        scores then come from the hidden state alone). True by default; pass False to reproduce HF's
        logits exactly.

    Raises:
      ValueError: a tensor whose shape does not match the config (names the tensor, its shape and the
        expected shape), or missing tensors (lists all of them).
    """
    c = config
    h, inter, L = c.hidden_size, c.intermediate_size, c.num_layers
    prefix = _PREFIX[c.family]
    if not any(k.startswith(prefix) for k in tensors) and any(k.startswith("embeddings.") for k in tensors):
        prefix = ""
    reader = _TensorReader(tensors, h)
    get, dense, layer_norm = reader.get, reader.dense, reader.layer_norm
    e = f"{prefix}embeddings"
    embeddings = {
        "word_embeddings": {"embedding": get(f"{e}.word_embeddings.weight", (c.vocab_size, h))},
        "position_embeddings": {"embedding": get(f"{e}.position_embeddings.weight", (c.max_position_embeddings, h))},
        "token_type_embeddings": {"embedding": get(f"{e}.token_type_embeddings.weight", (c.type_vocab_size, h))},
        "layer_norm": layer_norm(f"{e}.LayerNorm"),
    }
    per_layer = []
    for i in range(L):
        base = f"{prefix}encoder.layer.{i}"
        per_layer.append(
            {
                "query": dense(f"{base}.attention.self.query", h, h),
                "key": dense(f"{base}.attention.self.key", h, h),
                "value": dense(f"{base}.attention.self.value", h, h),
                "attention_output": dense(f"{base}.attention.output.dense", h, h),
                "attention_layer_norm": layer_norm(f"{base}.attention.output.LayerNorm"),
                "intermediate": dense(f"{base}.intermediate.dense", h, inter),
                "output": dense(f"{base}.output.dense", inter, h),
                "output_layer_norm": layer_norm(f"{base}.output.LayerNorm"),
            }
        )

    # MLM head: required when any of its tensors is present, optional for bare encoder checkpoints.
    head_dense, head_ln, head_bias = _mlm_head_names(c.family)
    head_prefix = head_dense.split(".")[0] + "."
    head_present = any(k.startswith(head_prefix) for k in tensors)
    head = bias = None
    if head_present:
        head = {"dense": dense(head_dense, h, h), "layer_norm": layer_norm(head_ln)}
        bias = get(head_bias, (c.vocab_size,))

    reader.check_fits(c)

    layers = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *per_layer)
    p: dict[str, Any] = {"embeddings": embeddings, "layers": layers}
    if head_present:
        head["bias"] = np.zeros_like(bias) if zero_lm_bias else bias
        p["lm_head"] = head
    return cast_params(config, {"params": jax.tree_util.tree_map(jnp.asarray, p)})
