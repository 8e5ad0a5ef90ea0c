"""Tiny random backbones and synthetic data for tests, examples and the tiny-model benchmarks.

Nothing here is downloaded: the models are random (seeded) and small enough for a 2-core CPU; they
exercise exactly the code paths the real backbones use.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .models.base import LanguageModel
from .testing_tokenizers import chatml_tokenizer, roberta_like_tokenizer, smollm2_tokenizer  # noqa: F401
from .types import ScoringSpec, TokenBatch


def tiny_decoder(
    seed: int = 0,
    *,
    vocab_size: int = 256,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tokenizer=None,
    tie_word_embeddings: bool = True,
) -> LanguageModel:
    """A random Llama-style decoder (GQA, RoPE, SwiGLU) as a :class:`LanguageModel`."""
    from .models import decoder

    vocab_size = max(vocab_size, len(tokenizer)) if tokenizer is not None else vocab_size
    cfg = decoder.DecoderConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        intermediate_size=intermediate_size,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=512,
    )
    params = decoder.init_params(cfg, jax.random.key(seed))
    return LanguageModel(
        name=f"tiny-decoder-{seed}", kind="decoder", config=cfg, params=params, tokenizer=tokenizer, module=None
    )


def tiny_encoder(
    seed: int = 0,
    *,
    vocab_size: int = 256,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    tokenizer=None,
    family: str = "roberta",
) -> LanguageModel:
    """A random RoBERTa-style masked LM as a :class:`LanguageModel`."""
    from .models import encoder

    vocab_size = max(vocab_size, len(tokenizer)) if tokenizer is not None else vocab_size
    cfg = encoder.EncoderConfig(
        family=family,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=514,
    )
    params = encoder.init_params(cfg, jax.random.key(seed))
    return LanguageModel(
        name=f"tiny-encoder-{seed}", kind="encoder", config=cfg, params=params, tokenizer=tokenizer, module=None
    )


def random_batch(
    seed: int,
    num_examples: int,
    seq_len: int,
    vocab_size: int,
    *,
    num_labels: int = 2,
    kind: str = "decoder",
    min_len: int | None = None,
    leading: tuple[int, ...] = (),
) -> TokenBatch:
    """Random token examples of varying length (decoder: left-padded; encoder: right-padded with the
    answer position at the last real token). ``leading`` adds axes in front (e.g. clients)."""
    rng = np.random.default_rng(seed)
    shape = leading + (num_examples,)
    min_len = min_len or max(2, seq_len // 2)
    lengths = rng.integers(min_len, seq_len + 1, size=shape)
    ids = rng.integers(3, vocab_size, size=shape + (seq_len,)).astype(np.int32)
    pos = np.arange(seq_len)
    if kind == "decoder":
        mask = (pos >= seq_len - lengths[..., None]).astype(np.int32)
        answer = np.full(shape, seq_len - 1, np.int32)
    else:
        mask = (pos < lengths[..., None]).astype(np.int32)
        answer = (lengths - 1).astype(np.int32)
    ids = np.where(mask > 0, ids, 0).astype(np.int32)
    labels = rng.integers(0, num_labels, size=shape).astype(np.int32)
    return TokenBatch(
        input_ids=ids, attention_mask=mask, answer_pos=answer, labels=labels, example_mask=np.ones(shape, np.float32)
    )


def random_spec(vocab_size: int, num_labels: int = 2, cue_len: int = 2, seed: int = 0) -> ScoringSpec:
    """A scoring spec with distinct random label ids and a random answer cue."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(3, vocab_size), size=num_labels + cue_len, replace=False).astype(np.int32)
    return ScoringSpec(
        label_ids=jnp.asarray(ids[:num_labels]),
        cue_ids=jnp.asarray(ids[num_labels:]),
        exempt_ids=jnp.asarray([0, 1, 2], jnp.int32),
        vocab_size=vocab_size,
    )


def assert_trees_all_close(a, b, *, rtol: float = 1e-6, atol: float = 0.0) -> None:
    """Asserts two pytrees have the same structure and numerically close leaves."""
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    if ta != tb:
        raise AssertionError(f"tree structures differ: {ta} vs {tb}")
    for i, (x, y) in enumerate(zip(la, lb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=f"leaf {i}")


@dataclasses.dataclass
class CompileCounts:
    """Traces and XLA compilations of :func:`fedbpt_jax.federated.run`'s jitted segments since a
    :func:`count_compiles` block began (keys: the algorithm name for its segment, ``name + "/eval"`` for
    its initial evaluation). Read inside the block they are live; after it, they are frozen at its end."""

    _start_traces: collections.Counter
    _start_compiles: collections.Counter
    _end: tuple | None = None

    def _now(self):
        if self._end is not None:
            return self._end
        from .federated import counters

        return collections.Counter(counters.TRACE_COUNTS), collections.Counter(counters.COMPILE_COUNTS)

    @property
    def traces(self) -> collections.Counter:
        """Traces per name within the block (a retrace shows here)."""
        return self._now()[0] - self._start_traces

    @property
    def compiles(self) -> collections.Counter:
        """XLA compilations per name within the block (also without a retrace, e.g. a new placement)."""
        return self._now()[1] - self._start_compiles


@contextlib.contextmanager
def count_compiles():
    """Counts the traces and compilations of :func:`fedbpt_jax.federated.run`'s segments within a block.

    Example::

        with testing.count_compiles() as counts:
            fl.run(algo, key, data, test, lm, model, num_rounds=2)
            fl.run(algo, key2, data, test, lm, model, num_rounds=2)
        assert counts.traces["fedbpt"] <= 1 and counts.compiles["fedbpt"] <= 1   # the second run reuses it
    """
    from .federated import counters

    counts = CompileCounts(collections.Counter(counters.TRACE_COUNTS), collections.Counter(counters.COMPILE_COUNTS))
    try:
        yield counts
    finally:
        counts._end = counts._now()
