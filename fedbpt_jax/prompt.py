"""Soft prompt parameterisation: the fixed random projection ``A`` and ``z → A z``.

BBT/FedBPT optimise a low-dimensional ``z ∈ R^d`` (d = 500); the soft prompt is ``p = A z`` reshaped to
``[n_prompt, H]``. We store ``A`` as ``[d, n_prompt·H]`` so that a whole population ``Z [P, d]`` maps to
prompts with one matmul ``Z @ A``.

``A`` is built as BBT builds it ("normal", the default): i.i.d. N(0, s²) with
``s = α · σ̂_E / (√d · σ)``, σ̂_E the standard deviation of *all* entries of the model's input word
embedding matrix, α = ``alpha`` and σ = ``sigma`` (both 1 by default; the embedding mean is computed
but not used, as in the reference). The "uniform" option reproduces the reference's fallback, PyTorch's
default ``Linear`` init U(−1/√d, 1/√d).

The paper says the server creates and distributes A; the reference code regenerates it on every
client from a shared seed. Both give the same matrix for the same key; in the simulator A is built once
from a named key and passed as an argument (never a closure) to every jitted function.
"""
from __future__ import annotations

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


def to_prompt(projection: jax.Array, z: jax.Array, hidden_size: int) -> jax.Array:
    """Maps ``z [..., d]`` to soft prompts ``[..., n_prompt, H]`` (``p = A z``)."""
    flat = z.astype(projection.dtype) @ projection
    return flat.reshape(*z.shape[:-1], -1, hidden_size)
