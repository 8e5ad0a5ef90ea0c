"""Soft prompt parameterisation: the fixed random projection ``A`` and ``z → A z``.

BBT/FedBPT optimise a low-dimensional ``z ∈ R^d`` (d = 500); the soft prompt is ``p = A z`` reshaped to
``[n_prompt, H]``. We store ``A`` as ``[d, n_prompt·H]`` so that a whole population ``Z [P, d]`` maps to
prompts with one matmul ``Z @ A``.

``A`` is built as BBT builds it ("normal", the default): i.i.d. N(0, s²) with
``s = α · σ̂_E / (√d · σ)``, σ̂_E the standard deviation of *all* entries of the model's input word
embedding matrix, α = ``alpha`` and σ = ``sigma`` (both 1 by default; the embedding mean is computed
but not used, as in the reference). The "uniform" option reproduces the reference's fallback, PyTorch's
default ``Linear`` init U(−1/√d, 1/√d).

The soft prompt is ``p = start + A z`` (:func:`to_prompt`): the *prompt start* (:func:`build_start`) is
what the prompt is at z = 0 — n zero vectors (``"zeros"``, the default), the embeddings of real tokens
(ids or a phrase), or a user array — and the manual-prompt baseline deploys that same prompt. It is a
``[n, H]`` array carried in :class:`~fedbpt_jax.federated.ModelInputs` (a jit argument, as A is).

The paper says the server creates and distributes A; the reference code regenerates it on every
client from a shared seed. Both give the same matrix for the same key; in the simulator A is built once
from a named key and passed as an argument (never a closure) to every jitted function.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PROJECTIONS = ("normal", "uniform")


def embedding_std(embeddings: jax.Array) -> jax.Array:
    """σ̂_E: the standard deviation of all entries of the word-embedding matrix ``[V, H]``."""
    return jnp.std(embeddings.astype(jnp.float32))


def make_projection(
    key: jax.Array,
    embeddings: jax.Array,
    *,
    intrinsic_dim: int,
    n_prompt_tokens: int,
    kind: str = "normal",
    alpha: float = 1.0,
    sigma: float = 1.0,
) -> jax.Array:
    """Builds the random projection ``A`` as ``[d, n_prompt·H]``.

    Args:
      key: the projection's own named key.
      embeddings: ``[V, H]`` input word embeddings of the backbone (for σ̂_E).
      intrinsic_dim: d, the dimension CMA-ES searches (500 in the paper).
      n_prompt_tokens: n, the soft prompt's length in tokens (50 in the paper).
      kind: ``"normal"`` (BBT default) or ``"uniform"``.
      alpha, sigma: BBT's α and σ in ``s = α σ̂_E / (√d σ)``.

    Example:
      >>> A = make_projection(jax.random.key(0), jnp.ones((10, 4)) * jnp.arange(4),
      ...                     intrinsic_dim=3, n_prompt_tokens=2)
      >>> A.shape
      (3, 8)
    """
    if intrinsic_dim < 1:
        raise ValueError(f"intrinsic_dim must be >= 1, got {intrinsic_dim}")
    if n_prompt_tokens < 1:
        raise ValueError(f"n_prompt_tokens must be >= 1, got {n_prompt_tokens}")
    if kind not in PROJECTIONS:
        raise ValueError(f"unknown projection kind {kind!r}; accepted: {PROJECTIONS}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    hidden = embeddings.shape[-1]
    shape = (intrinsic_dim, n_prompt_tokens * hidden)
    if kind == "normal":
        scale = alpha * embedding_std(embeddings) / (jnp.sqrt(intrinsic_dim) * sigma)
        return scale * jax.random.normal(key, shape, jnp.float32)
    bound = 1.0 / jnp.sqrt(intrinsic_dim)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def to_prompt(projection: jax.Array, z: jax.Array, hidden_size: int, start: jax.Array | None = None) -> jax.Array:
    """Maps ``z [..., d]`` to soft prompts ``[..., n_prompt, H]``: ``p = start + A z``.

    ``start`` is the ``[n, H]`` prompt start (:func:`build_start`; ``None`` means zeros, ``p = A z``),
    so z = 0 gives exactly the start prompt.
    """
    flat = z.astype(projection.dtype) @ projection
    p = flat.reshape(*z.shape[:-1], -1, hidden_size)
    return p if start is None else p + start.astype(p.dtype)


def start_prompt(start: jax.Array | None, n_prompt_tokens: int, hidden_size: int) -> jax.Array:
    """The prompt at z = 0, ``[n, H]``: ``start``, or zeros when there is none (the manual baseline)."""
    if start is None:
        return jnp.zeros((n_prompt_tokens, hidden_size), jnp.float32)
    return start.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Prompt start: what the soft prompt is at z = 0
# ----------------------------------------------------------------------------------------------
#: The reference code's prompt slots: the tokens of vocabulary ids 1000…1049 (50 tokens). The reference
#: decodes them with Llama-2's tokenizer and re-tokenizes the text; here the model's own ids are used as they are.
REFERENCE_START_IDS = tuple(range(1000, 1050))

START_FORMS = (
    "zeros",
    "reference",
    "tokens:<id>,<id>,...",
    "phrase:<text>",
    "<file>.npy",
    "a [n, H] array",
    "a sequence of token ids",
)


class PromptStart(NamedTuple):
    """A parsed prompt-start option.

    Attributes:
      kind: ``"zeros"``, ``"tokens"``, ``"phrase"`` or ``"array"``.
      value: None (zeros), a tuple of token ids, the phrase, or a float32 numpy array ``[n, H]``.
    """

    kind: str
    value: Any = None

    def describe(self) -> str:
        """A short JSON-friendly description (arrays by shape only)."""
        if self.kind == "zeros":
            return "zeros"
        if self.kind == "tokens":
            return "tokens:" + ",".join(str(i) for i in self.value)
        if self.kind == "phrase":
            return "phrase:" + self.value
        return f"array{list(self.value.shape)}"


def parse_start(start) -> PromptStart:
    """Parses a prompt-start option (see :func:`build_start` for what each means).

    Accepted: ``None`` or ``"zeros"``; ``"reference"`` (ids 1000…1049, the reference code's 50 prompt
    slots); ``"tokens:1000,1001"`` (token ids); ``"phrase:<text>"`` (the
    text's tokens, leading space significant); a path to a ``.npy`` file holding ``[n, H]`` floats; an
    array ``[n, H]``; a sequence of ints (token ids); a :class:`PromptStart`.

    Raises:
      ValueError: naming the value and the accepted forms.
    """
    import numpy as np

    if isinstance(start, PromptStart):
        return start
    if start is None:
        return PromptStart("zeros")
    if isinstance(start, str):
        head, sep, rest = start.partition(":")
        if start.strip().lower() == "zeros":
            return PromptStart("zeros")
        if start.strip().lower() == "reference":
            return PromptStart("tokens", REFERENCE_START_IDS)
        if sep and head.strip().lower() == "tokens":
            try:
                ids = tuple(int(t) for t in rest.replace(" ", "").split(",") if t != "")
            except ValueError:
                raise ValueError(
                    f"prompt start {start!r}: 'tokens:' needs comma-separated integer token ids, "
                    f"e.g. 'tokens:1000,1001,1002'"
                ) from None
            if not ids:
                raise ValueError(f"prompt start {start!r}: 'tokens:' names no token id")
            return PromptStart("tokens", ids)
        if sep and head.strip().lower() == "phrase":
            if not rest:
                raise ValueError(f"prompt start {start!r}: 'phrase:' needs a non-empty text")
            return PromptStart("phrase", rest)
        if start.lower().endswith(".npy"):
            import os

            if not os.path.isfile(start):
                raise ValueError(f"prompt start {start!r}: no such .npy file")
            try:
                arr = np.load(start, allow_pickle=False)
            except (ValueError, OSError, EOFError) as err:
                raise ValueError(
                    f"prompt start {start!r}: not a NumPy .npy array file ({' '.join(str(err).split())}); accepted: "
                    "a file written by numpy.save of token ids [n] or embeddings [n, hidden]"
                ) from None
            return parse_start(arr)
        raise ValueError(f"unknown prompt start {start!r}; accepted: {', '.join(START_FORMS)}")
    arr = np.asarray(start)
    if arr.dtype.kind in "iu" and arr.ndim == 1:
        if arr.size == 0:
            raise ValueError("prompt start: an empty sequence of token ids")
        return PromptStart("tokens", tuple(int(i) for i in arr))
    if arr.dtype.kind == "f":
        if arr.ndim != 2:
            raise ValueError(
                f"prompt start array has shape {tuple(arr.shape)}; expected [n_prompt_tokens, hidden_size]"
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError("prompt start array has non-finite entries")
        return PromptStart("array", arr.astype(np.float32))
    raise ValueError(
        f"unknown prompt start of type {type(start).__name__} (dtype {arr.dtype}); accepted: {', '.join(START_FORMS)}"
    )


def start_token_ids(start, tokenizer=None) -> tuple[int, ...] | None:
    """The token ids a ``"tokens"``/``"phrase"`` start stands for (None for zeros and arrays).

    A phrase is encoded without special tokens, exactly as written (a leading space is part of it).
    """
    s = parse_start(start)
    if s.kind == "tokens":
        return s.value
    if s.kind == "phrase":
        if tokenizer is None:
            raise ValueError(f"prompt start {s.describe()!r} needs the model's tokenizer")
        ids = tuple(int(i) for i in tokenizer(s.value, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"prompt start {s.describe()!r} encodes to no token")
        return ids
    return None


def start_length(start, tokenizer=None) -> int | None:
    """The number of prompt tokens a start fixes (None for zeros: any length)."""
    s = parse_start(start)
    if s.kind == "array":
        return int(s.value.shape[0])
    ids = start_token_ids(s, tokenizer)
    return None if ids is None else len(ids)


def _encoder_embed(lm, ids):
    """The encoder's embedding output (word + position + type, LayerNorm) of one row of ids: ``[T, H]``."""
    import flax.linen as nn

    from .models import encoder

    ids = jnp.asarray(ids, jnp.int32)[None]
    fn = lambda m, i, t: m.embed(i, t)  # noqa: E731
    return nn.apply(fn, encoder.Encoder(lm.config))(lm.params, ids, jnp.zeros_like(ids))[0]


def build_start(
    lm, start, n_prompt_tokens: int, layout: str | None = None, *, placeholder: str = "auto"
) -> jax.Array | None:
    """Resolves a prompt-start option to the ``[n, H]`` float32 array that :func:`to_prompt` adds.

    The soft prompt is ``start + A z``, so z = 0 *is* the start prompt, and the manual-prompt baseline
    (:func:`fedbpt_jax.federated.manual_prompt`) deploys exactly that prompt. What the options mean,
    by where the prompt enters the model:

    * decoders (layouts "after" and "before") and encoders in "cat" mode, where the prompt vectors *are*
      the prompt tokens' inputs:

      - ``"zeros"`` (None is returned): n zero vectors;
      - token ids / a phrase: those tokens' input embeddings, so at z = 0 a decoder reads exactly the
        tokens (its logits equal those of the text with the tokens written in); an encoder in "cat" mode
        gets their embedding-layer outputs (word + position + type embeddings, LayerNorm) at positions
        1 … n, as they would be right after ``<s>``;
      - an array: the vectors themselves.

    * encoders in "add" mode (BBT's default), where the input carries n placeholder tokens and the
      prompt is *added* to their embedding-layer output:

      - ``"zeros"`` (None): nothing added: the placeholders (BBT's z = 0, the reference's manual prompt);
      - token ids / a phrase: the difference between those tokens' and the placeholders' embedding-layer
        outputs at positions 1 … n, so at z = 0 the model sees exactly the template with the chosen
        tokens in place of the placeholders;
      - an array: an offset added at the placeholder positions.

    Args:
      lm: the backbone bundle (its tokenizer encodes a phrase and, in "add" mode, the placeholders).
      start: any form :func:`parse_start` accepts.
      n_prompt_tokens: n; a token, phrase or array start must have exactly n tokens/rows.
      layout: the scorer's layout (None: the backbone's default, "add" for encoders).
      placeholder: the encoder placeholder mode the data were tokenised with
        (:func:`fedbpt_jax.data.placeholder_ids`).

    Returns:
      ``[n, H]`` float32, or None for ``"zeros"`` (``to_prompt`` then adds nothing).

    Raises:
      ValueError: an unknown option, a token count or array shape that does not match
        ``[n_prompt_tokens, hidden_size]``, token ids outside the vocabulary.

    Example:
      >>> start = build_start(lm, "phrase: In short:", 3)       # doctest: +SKIP
    """
    import numpy as np

    s = parse_start(start)
    hidden = lm.hidden_size
    if s.kind == "zeros":
        return None
    if s.kind == "array":
        if tuple(s.value.shape) != (n_prompt_tokens, hidden):
            raise ValueError(
                f"prompt start array has shape {tuple(s.value.shape)}; expected "
                f"[n_prompt_tokens, hidden_size] = [{n_prompt_tokens}, {hidden}]"
            )
        return jnp.asarray(s.value)
    ids = start_token_ids(s, lm.tokenizer)
    if len(ids) != n_prompt_tokens:
        what = f"the phrase {s.value!r}" if s.kind == "phrase" else "the token list"
        shown = ""
        if lm.tokenizer is not None:
            shown = f" {lm.tokenizer.convert_ids_to_tokens(list(ids))}"
        raise ValueError(
            f"prompt start {s.describe()!r}: {what} is {len(ids)} tokens{shown}, but "
            f"n_prompt_tokens={n_prompt_tokens}; set n_prompt_tokens={len(ids)} or choose "
            f"{n_prompt_tokens} tokens"
        )
    vocab = int(lm.input_embeddings().shape[0])
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"prompt start {s.describe()!r}: token ids {bad} are outside the vocabulary [0, {vocab})")
    from .models.kinds import get

    if get(lm.kind).causal:  # the prompt is tokens of the sequence: their embeddings
        return jnp.asarray(lm.input_embeddings(), jnp.float32)[jnp.asarray(ids)]
    layout = layout or "add"
    lead = None
    if lm.tokenizer is not None:
        from .data import special_frame

        pre, _ = special_frame(lm.tokenizer)
        lead = pre[0] if pre else None
    pad = getattr(lm.config, "pad_token_id", None)
    if lead is None:
        lead = next(i for i in range(vocab) if i != pad)
    chosen = _encoder_embed(lm, [lead, *ids])[1:]
    if layout == "cat":
        return chosen.astype(jnp.float32)
    if layout != "add":
        raise ValueError(f"unknown encoder layout {layout!r}; accepted: ('add', 'cat')")
    if lm.tokenizer is None:
        raise ValueError(f"prompt start {s.describe()!r} in 'add' mode needs the tokenizer (for BBT's placeholders)")
    from .data import placeholder_ids

    ph = np.asarray(placeholder_ids(lm.tokenizer, n_prompt_tokens, mode=placeholder)).tolist()
    return (chosen - _encoder_embed(lm, [lead, *ph])[1:]).astype(jnp.float32)
