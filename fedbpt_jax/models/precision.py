"""Precision policy shared by every backbone: which dtype the matmuls run in.

A backbone config carries ``compute_dtype`` (``"float32"`` or ``"bfloat16"``). With ``"bfloat16"``:

* weight matrices and embedding tables are *stored* in bfloat16 (half the memory and half the bytes
  streamed per forward pass); norm scales/biases stay float32;
* every matmul takes bfloat16 inputs and accumulates in float32 (``preferred_element_type``), so a
  dot product over thousands of terms is not rounded term by term;
* the residual stream, norms, softmax, the label logits and the losses stay float32, and so does
  everything in the CMA-ES (it never sees the backbone's dtype);
* the decoder's cached keys/values are stored in bfloat16 (they only ever feed a bfloat16 matmul).

``"auto"`` (opt-in; the loaders default to float32) decides at run time from what the backend offers
(:func:`resolve`): bfloat16 on GPU and TPU (their native matmul rate), and on a CPU only where a short
probe measures bfloat16 matmuls to be clearly faster than float32 ones (on the AVX-512-BF16 CPU of the
benchmarks, XLA's bfloat16 dot ran at ~0.7x the float32 rate, so "auto" means float32 there). The probe
runs once per process. Why float32 is the default: ``benchmarks/README.md``, precision section.

Example::

    >>> resolve("float32")
    'float32'
    >>> dense(jnp.ones((2, 3)), jnp.ones((3, 4), jnp.bfloat16), "bfloat16").dtype
    dtype('float32')
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp

COMPUTE_DTYPES = ("float32", "bfloat16")
CHOICES = ("auto",) + COMPUTE_DTYPES
#: A CPU uses bfloat16 under "auto" only if the probe's bf16 matmul is at least this much faster.
CPU_BF16_MIN_SPEEDUP = 1.25
#: Environment variable that overrides the CPU probe's answer (``float32`` or ``bfloat16``).
ENV_OVERRIDE = "FEDBPT_JAX_CPU_COMPUTE_DTYPE"


def check(name: str) -> str:
    """``name`` if it is a concrete compute dtype; a clear error otherwise."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"unknown compute_dtype {name!r}; accepted: {COMPUTE_DTYPES} (or 'auto' when loading)")
    return name


def resolve(name: str = "auto", backend: str | None = None) -> str:
    """The concrete compute dtype for ``name`` (``"auto"``, ``"float32"`` or ``"bfloat16"``).

    ``"auto"``: ``"bfloat16"`` on GPU/TPU backends; on CPU the answer of :func:`cpu_prefers_bf16`
    (overridable with the ``FEDBPT_JAX_CPU_COMPUTE_DTYPE`` environment variable).
    """
    if name not in CHOICES:
        raise ValueError(f"unknown compute_dtype {name!r}; accepted: {CHOICES}")
    if name != "auto":
        return name
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return "bfloat16"
    override = os.environ.get(ENV_OVERRIDE)
    if override:
        return check(override)
    return "bfloat16" if cpu_prefers_bf16() else "float32"


@functools.lru_cache(maxsize=1)
def matmul_rates(m: int = 2048, k: int = 576, n: int = 1536, repeats: int = 5) -> dict[str, float]:
    """Measured GFLOP/s of a jitted ``[m, k] @ [k, n]`` in float32 and in bfloat16 with float32
    accumulation (best of ``repeats``; compile excluded). Cached per process."""
    rates = {}
    for name in COMPUTE_DTYPES:
        dt = jnp.dtype(name)
        a = jnp.ones((m, k), dt)
        b = jnp.ones((k, n), dt)
        f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
        f(a, b).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            f(a, b).block_until_ready()
            best = min(best, time.perf_counter() - t)
        rates[name] = 2.0 * m * k * n / best / 1e9
    return rates


def cpu_prefers_bf16() -> bool:
    """Whether this CPU runs XLA's bfloat16 matmul at least :data:`CPU_BF16_MIN_SPEEDUP` times faster."""
    r = matmul_rates()
    return r["bfloat16"] >= CPU_BF16_MIN_SPEEDUP * r["float32"]


def dense(x: jax.Array, kernel: jax.Array, compute_dtype: str) -> jax.Array:
    """``x @ kernel`` with both inputs in ``compute_dtype`` and a float32 result (float32 accumulation)."""
    dt = jnp.dtype(compute_dtype)
    return jnp.dot(x.astype(dt), kernel.astype(dt), preferred_element_type=jnp.float32)


def einsum(spec: str, a: jax.Array, b: jax.Array, compute_dtype: str) -> jax.Array:
    """``jnp.einsum`` with both operands in ``compute_dtype`` and a float32 result."""
    dt = jnp.dtype(compute_dtype)
    return jnp.einsum(spec, a.astype(dt), b.astype(dt), preferred_element_type=jnp.float32)


def f32_accumulating_dot_general(*args, **kwargs):
    """``lax.dot_general`` that accumulates (and returns) float32: for ``nn.Dense(dot_general=...)``."""
    kwargs["preferred_element_type"] = jnp.float32
    return jax.lax.dot_general(*args, **kwargs)


def promote_to_f32_bias(*args, dtype=None, inexact=True):
    """``promote_dtype`` for ``nn.Dense(dot_general=f32_accumulating_dot_general, ...)``: inputs and kernel in
    ``dtype`` as flax's default does; the bias, if any, rounded to ``dtype`` as flax's default does and then
    given as float32, the dtype of the accumulated result it is added to. The addition is then float32 +
    float32 (a bfloat16 bias would be an implicit promotion, an error under strict dtype promotion), with the
    numbers of the default: the bfloat16-rounded bias, exactly widened, added in float32."""
    from flax.linen import dtypes

    inputs, kernel, bias = dtypes.promote_dtype(*args, dtype=dtype, inexact=inexact)
    return inputs, kernel, None if bias is None else bias.astype(jnp.float32)


def cast_tree(params, compute_dtype: str, keep_float32=lambda path: False):
    """Every floating leaf of ``params`` in ``compute_dtype``, except leaves whose path (a tuple of
    key names) ``keep_float32`` selects, which are float32."""
    dt = jnp.dtype(check(compute_dtype))

    def cast(path, x):
        names = tuple(getattr(p, "key", getattr(p, "name", str(p))) for p in path)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return x.astype(jnp.float32 if keep_float32(names) else dt)

    return jax.tree_util.tree_map_with_path(cast, params)


def tree_bytes(params) -> int:
    """Bytes held by the leaves of ``params``."""
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(params)))


__all__ = [
    "COMPUTE_DTYPES",
    "CHOICES",
    "CPU_BF16_MIN_SPEEDUP",
    "ENV_OVERRIDE",
    "check",
    "resolve",
    "matmul_rates",
    "cpu_prefers_bf16",
    "dense",
    "einsum",
    "f32_accumulating_dot_general",
    "cast_tree",
    "tree_bytes",
]
