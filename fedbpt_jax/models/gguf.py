"""GGUF (llama.cpp) checkpoints -> :class:`~fedbpt_jax.models.decoder.DecoderConfig`, params, tokenizer.

Used for the embedded default model, SmolLM2-135M-Instruct as a Q4_1 GGUF (see
:mod:`fedbpt_jax.assets`). Everything comes from the one file: the config from the ``llama.*``
metadata, the weights dequantized to float32 with ``gguf.quants.dequantize``, and the tokenizer from
``tokenizer.ggml.*`` as a ``transformers.PreTrainedTokenizerFast``: GPT-2 style byte-level BPE
(``tokenizer.ggml.model = "gpt2"``: SmolLM2, Llama-3) or SentencePiece BPE (``"llama"``: Llama-2 and
its family, rebuilt from the pieces, scores and token types).

**Q/K row order.** llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` within each head
so that RoPE rotates adjacent pairs ``(x[2i], x[2i+1])``. This loader *un-permutes* them back to the
Hugging Face order and returns ``rope_interleaved=False``: every loader (HF safetensors or GGUF) then
yields the same parameter tree with the same RoPE form. ``load_gguf(..., rope_interleaved=True)``
returns the rows as llama.cpp stores them with the interleaved rotation instead (same outputs).

**Cache.** Dequantizing takes seconds, so the first load writes the converted model (the param tree
as safetensors, one file per compute dtype, ``params-float32.safetensors`` /
``params-bfloat16.safetensors``, each written once when first asked for; the config as JSON; the
tokenizer files) to a directory under ``fedbpt_jax.assets.cache_dir() / "converted"``, keyed by the GGUF
file's name, size and mtime and by :data:`CONVERSION_VERSION`. The directory is written to a temporary
directory and renamed into place, and a second precision's file is written to a temporary file and
renamed, so a half-written cache is never read; later loads read only that directory. A bfloat16 copy
is cast from the dequantized float32 values (the GGUF's quantized blocks are no more exact than that).

Example::

    from fedbpt_jax import assets
    from fedbpt_jax.models import gguf
    config, params, tokenizer = gguf.load_gguf(assets.fetch("smollm2-135m-instruct-gguf"))
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from . import decoder, decoder_hf, precision

#: Bump when the conversion changes: old cache entries are then ignored.
CONVERSION_VERSION = 3

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")
SUPPORTED_PRE_TOKENIZERS = ("smollm", "gpt2", "gpt-2", "default")

# GGUF token types (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


# ----------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------
def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def hf_tensor_name(gguf_name: str) -> str | None:
    """llama.cpp tensor name -> HF Llama name (``None`` for tensors this model does not use)."""
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.weight"
    return None


def config_from_gguf(reader) -> decoder.DecoderConfig:
    """:class:`DecoderConfig` from the ``general.*``/``llama.*``/``tokenizer.ggml.*`` metadata (HF Q/K order)."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF general.architecture={arch!r} is not supported; accepted: {SUPPORTED_ARCHITECTURES}")
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ValueError(f"GGUF {arch}.rope.scaling.type={scaling!r} is not supported; accepted: 'none'")

    def req(key):
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return value

    hidden = int(req("embedding_length"))
    heads = int(req("attention.head_count"))
    head_dim = _field(reader, f"{arch}.rope.dimension_count") or _field(reader, f"{arch}.attention.key_length")
    vocab = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    ids = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    return decoder.DecoderConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_layers=int(req("block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv") or heads),
        head_dim=int(head_dim or hidden // heads),
        intermediate_size=int(req("feed_forward_length")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(req("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        rope_interleaved=False,
        bos_token_id=None if ids["bos"] is None else int(ids["bos"]),
        eos_token_id=None if ids["eos"] is None else int(ids["eos"]),
        pad_token_id=None if ids["padding"] is None else int(ids["padding"]),
    )


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------
def unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order -> HF order: within each head, row ``2i + a`` becomes ``a * D/2 + i``."""
    rows = weight.shape[0]
    d = rows // num_heads
    return weight.reshape(num_heads, d // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """HF Q/K row order -> llama.cpp's (inverse of :func:`unpermute_rows`)."""
    rows = weight.shape[0]
    d = rows // num_heads
    return weight.reshape(num_heads, 2, d // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_tensors_from_gguf(reader, config: decoder.DecoderConfig) -> dict[str, np.ndarray]:
    """Every used tensor dequantized to float32 under its HF name, Q/K rows in HF order."""
    from gguf.quants import dequantize

    out: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            continue
        try:
            w = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        except (NotImplementedError, ValueError, KeyError) as err:
            kind = getattr(tensor.tensor_type, "name", tensor.tensor_type)
            raise ValueError(
                f"GGUF tensor {tensor.name!r} has type {kind}, which this loader cannot dequantize to float32 "
                f"or cast to bfloat16 ({type(err).__name__}: {err}); accepted: F32, F16, BF16 and the "
                "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K-Q6_K, the IQ and TQ types and MXFP4 (what gguf.quants.dequantize implements)"
            ) from err
        if name.endswith("q_proj.weight"):
            w = unpermute_rows(w, config.num_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rows(w, config.num_kv_heads)
        out[name] = w
    return out


def to_interleaved(config: decoder.DecoderConfig, params: dict) -> tuple[decoder.DecoderConfig, dict]:
    """HF-order params -> llama.cpp Q/K order with ``rope_interleaved=True`` (identical outputs)."""
    import jax.numpy as jnp

    def perm(kernel, heads):  # kernel [L, H, N*D]: rows of the HF weight are the last axis here
        k = np.asarray(kernel)
        return jnp.asarray(np.stack([permute_rows(k[i].T, heads).T for i in range(k.shape[0])]))

    attn = dict(params["layers"]["self_attn"])
    attn["q_proj"] = {"kernel": perm(attn["q_proj"]["kernel"], config.num_heads)}
    attn["k_proj"] = {"kernel": perm(attn["k_proj"]["kernel"], config.num_kv_heads)}
    layers = dict(params["layers"], self_attn=attn)
    return dataclasses.replace(config, rope_interleaved=True), dict(params, layers=layers)


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------
def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece BPE encoding with these pieces and scores.

    SentencePiece BPE (and llama.cpp's SPM tokenizer) repeatedly joins the adjacent pair whose
    concatenation is a normal piece with the highest score (leftmost first on ties). A BPE model whose
    merges are every split ``(left, right)`` of every normal piece, ranked by the score of the piece,
    does the same. Control, unknown, unused and byte pieces are never the result of a merge.
    """
    index = {t: i for i, t in enumerate(tokens)}
    merges = []
    for i, (piece, score) in enumerate(zip(tokens, scores)):
        if types[i] not in (_NORMAL, _USER_DEFINED) or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in index and right in index:
                merges.append((-float(score), i, index[left], index[right], left, right))
    merges.sort()
    return [(m[4], m[5]) for m in merges]


def _spm_tokenizer(reader, tokens: list[str], types: list[int]):
    """A ``tokenizers.Tokenizer`` for a SentencePiece vocabulary (``tokenizer.ggml.model = "llama"``)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = _field(reader, "tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ValueError(
            f"GGUF tokenizer.ggml.model='llama' needs tokenizer.ggml.scores with one score per token "
            f"({len(tokens)}); got {None if scores is None else len(scores)}"
        )
    merges = _field(reader, "tokenizer.ggml.merges", None)
    merges = [tuple(m.split(" ", 1)) for m in merges] if merges else spm_merges(tokens, scores, types)
    unk = _field(reader, "tokenizer.ggml.unknown_token_id")
    if unk is None:
        unk = next((i for i, t in enumerate(types) if t == _UNKNOWN), None)
    byte_fallback = any(t == _BYTE for t in types)
    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=merges,
            unk_token=None if unk is None else tokens[int(unk)],
            fuse_unk=True,
            byte_fallback=byte_fallback,
        )
    )
    # SentencePiece's add_dummy_prefix (llama.cpp: add_space_prefix, default true) and its whitespace
    # symbol; no pre-tokenizer: merges may cross nothing but what the pieces allow.
    steps = [normalizers.Replace(" ", "\u2581")]
    if _field(reader, "tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    parts = [decoders.Replace("\u2581", " ")]
    if byte_fallback:
        parts.append(decoders.ByteFallback())
    parts.append(decoders.Fuse())
    if _field(reader, "tokenizer.ggml.add_space_prefix", True):
        parts.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(parts)
    return tok


def _bpe_tokenizer(reader, tokens: list[str]):
    """A ``tokenizers.Tokenizer`` for a GPT-2 style byte-level BPE (``tokenizer.ggml.model = "gpt2"``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in SUPPORTED_PRE_TOKENIZERS:
        raise ValueError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported; accepted: {SUPPORTED_PRE_TOKENIZERS}")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    tok = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False)
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    return tok


def tokenizer_from_gguf(reader):
    """``transformers.PreTrainedTokenizerFast`` from ``tokenizer.ggml.*``.

    ``tokenizer.ggml.model = "gpt2"``: byte-level BPE from the tokens and merges. Pre-tokenizer
    ``"smollm"``: every digit on its own, then GPT-2's ByteLevel regex; ``"gpt2"``: ByteLevel only.

    ``"llama"`` (Llama-2 family): SentencePiece BPE from the tokens, their scores and token types
    (:func:`spm_merges`; the file's merges when it has any): spaces become ``▁``, a ``▁`` is prepended
    unless ``tokenizer.ggml.add_space_prefix`` is false, characters outside the vocabulary fall back to
    the ``<0xNN>`` byte tokens when the vocabulary has them (else the unknown token), and decoding
    reverses all of it. The encodings equal SentencePiece's own (tests/test_gguf.py).

    Either way: control tokens become special added tokens, user-defined ones plain added tokens; BOS
    (EOS) is added only when ``tokenizer.ggml.add_bos_token`` (``add_eos_token``) is true (false for
    SmolLM2, true for Llama-2).

    Raises:
      ValueError: another ``tokenizer.ggml.model`` (``"bert"``, ``"t5"``, ``"rwkv"``, …) or
        ``tokenizer.ggml.pre``, named with what is accepted.
    """
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    kind = _field(reader, "tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZER_MODELS:
        raise ValueError(
            f"GGUF tokenizer.ggml.model={kind!r} is not supported; accepted: {SUPPORTED_TOKENIZER_MODELS} "
            "(byte-level BPE and SentencePiece BPE). Load the model from its Hugging Face checkpoint directory "
            "(config.json, tokenizer files, *.safetensors) instead"
        )
    raw_tokens = _field(reader, "tokenizer.ggml.tokens")
    if not raw_tokens:
        raise ValueError("GGUF metadata lacks tokenizer.ggml.tokens")
    tokens = [str(t) for t in raw_tokens]
    types = list(_field(reader, "tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    tok = _spm_tokenizer(reader, tokens, types) if kind == "llama" else _bpe_tokenizer(reader, tokens)

    special = lambda key: _field(reader, f"tokenizer.ggml.{key}_token_id")  # noqa: E731
    name_of = lambda i: None if i is None else tokens[int(i)]  # noqa: E731
    bos, eos, unk, pad = (special(k) for k in ("bos", "eos", "unknown", "padding"))
    post = [processors.ByteLevel(trim_offsets=False)] if kind == "gpt2" else []
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        pre_, post_ = ([f"{tokens[bos]}"] if add_bos else []), ([f"{tokens[eos]}"] if add_eos else [])
        single = " ".join(pre_ + ["$A"] + post_)
        pair = " ".join(pre_ + ["$A"] + post_ + pre_ + ["$B"] + post_)
        ids = {i for i, on in ((bos, add_bos), (eos, add_eos)) if on}
        post.append(
            processors.TemplateProcessing(
                single=single, pair=pair, special_tokens=[(tokens[int(i)], int(i)) for i in sorted(ids)]
            )
        )
    if post:
        tok.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    )

    kwargs = dict(bos_token=name_of(bos), eos_token=name_of(eos), unk_token=name_of(unk), pad_token=name_of(pad))
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    template = _field(reader, "tokenizer.chat_template")
    if template:
        kwargs["chat_template"] = template
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kwargs)


# ----------------------------------------------------------------------------------------------
# Loading with a converted cache
# ----------------------------------------------------------------------------------------------
def flatten_params(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """``{"layers.self_attn.q_proj.kernel": array, ...}`` (dots join the tree path)."""
    flat: dict[str, np.ndarray] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, name + "."))
        else:
            flat[name] = np.asarray(value)
    return flat


def unflatten_params(flat: dict[str, np.ndarray]) -> dict:
    """Inverse of :func:`flatten_params`."""
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def converted_dir(path: str | Path) -> Path:
    """Where the converted HF-layout copy of GGUF file ``path`` lives (keyed by name, size, mtime)."""
    from .. import assets

    st = Path(path).stat()
    return assets.cache_dir() / "converted" / f"{Path(path).stem}-{st.st_size}-{st.st_mtime_ns}-v{CONVERSION_VERSION}"


def params_file(compute_dtype: str) -> str:
    """Name of a converted cache's param file for ``compute_dtype``."""
    return f"params-{compute_dtype}.safetensors"


def _save_params(params: dict, path: Path, source: str) -> None:
    from safetensors.numpy import save_file

    save_file(flatten_params(params), str(path), metadata={"source": source})


def convert_gguf(path: str | Path, target: str | Path, *, compute_dtype: str = "float32") -> None:
    """Converts GGUF file ``path`` into cache directory ``target`` (written to a temp dir, then renamed).

    ``target`` holds :func:`params_file` ``(compute_dtype)`` (the param tree in that precision,
    flattened with :func:`flatten_params`: already stacked and transposed, so reading it back is a plain
    copy), ``decoder_config.json`` (the :class:`DecoderConfig` fields, float32) and the tokenizer files.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    config = config_from_gguf(reader)
    tokenizer = tokenizer_from_gguf(reader)
    params = decoder_hf.params_from_hf(
        dataclasses.replace(config, compute_dtype=compute_dtype), hf_tensors_from_gguf(reader, config)
    )
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        _save_params(params, tmp / params_file(compute_dtype), Path(path).name)
        (tmp / "decoder_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1) + "\n")
        tokenizer.save_pretrained(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: its copy is as good as ours
            if not (target / "decoder_config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _add_precision(target: Path, compute_dtype: str) -> None:
    """Writes ``target``'s param file for ``compute_dtype`` cast from one it already has (atomic rename)."""
    from safetensors.numpy import load_file

    have = [d for d in precision.COMPUTE_DTYPES if (target / params_file(d)).is_file()]
    if not have:
        raise FileNotFoundError(f"converted cache {str(target)!r} holds no param file")
    config = decoder.DecoderConfig(
        **{**json.loads((target / "decoder_config.json").read_text()), "compute_dtype": compute_dtype}
    )
    params = decoder.cast_params(config, unflatten_params(load_file(str(target / params_file(have[0])))))
    fd, tmp = tempfile.mkstemp(prefix=params_file(compute_dtype) + ".tmp-", dir=target)
    os.close(fd)
    try:
        _save_params(params, Path(tmp), target.name)
        os.replace(tmp, target / params_file(compute_dtype))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_converted(target: Path, compute_dtype: str = "float32"):
    import jax
    from safetensors.numpy import load_file
    from transformers import PreTrainedTokenizerFast

    config = decoder.DecoderConfig(
        **{**json.loads((target / "decoder_config.json").read_text()), "compute_dtype": compute_dtype}
    )
    flat = load_file(str(target / params_file(compute_dtype)))
    params = jax.tree_util.tree_map(jax.device_put, unflatten_params(flat))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(target), local_files_only=True)
    return config, params, tokenizer


def load_gguf(
    path: str | Path, *, rope_interleaved: bool = False, use_cache: bool = True, compute_dtype: str = "float32"
):
    """Loads a llama-architecture GGUF file.

    Args:
      path: the ``.gguf`` file.
      rope_interleaved: return Q/K rows in llama.cpp's order with the interleaved RoPE form instead of
        the default HF order with rotate-half (the outputs are the same).
      use_cache: read/write the converted copy under ``assets.cache_dir()/converted`` (one file per
        compute dtype); with ``False`` everything is converted in memory from the GGUF file.
      compute_dtype: ``"float32"`` or ``"bfloat16"`` (see :mod:`fedbpt_jax.models.precision`).

    Returns:
      ``(DecoderConfig, params, tokenizer)`` with a ``transformers.PreTrainedTokenizerFast`` built from
      the GGUF metadata (chat template included when present).

    Raises:
      ValueError: an unsupported architecture, tokenizer or RoPE scaling (named with what is accepted).
    """
    precision.check(compute_dtype)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    if use_cache:
        target = converted_dir(path)
        if not (target / "decoder_config.json").is_file():
            convert_gguf(path, target, compute_dtype=compute_dtype)
        elif not (target / params_file(compute_dtype)).is_file():
            _add_precision(target, compute_dtype)
        config, params, tokenizer = _load_converted(target, compute_dtype)
    else:
        import gguf

        reader = gguf.GGUFReader(str(path))
        config = dataclasses.replace(config_from_gguf(reader), compute_dtype=compute_dtype)
        params = decoder_hf.params_from_hf(config, hf_tensors_from_gguf(reader, config))
        tokenizer = tokenizer_from_gguf(reader)
    if rope_interleaved:
        config, params = to_interleaved(config, params)
    return config, params, tokenizer


__all__ = [
    "CONVERSION_VERSION",
    "load_gguf",
    "convert_gguf",
    "params_file",
    "converted_dir",
    "config_from_gguf",
    "tokenizer_from_gguf",
    "hf_tensors_from_gguf",
    "hf_tensor_name",
    "spm_merges",
    "flatten_params",
    "unflatten_params",
    "unpermute_rows",
    "permute_rows",
    "to_interleaved",
]
