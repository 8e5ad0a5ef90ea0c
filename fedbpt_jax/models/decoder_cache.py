"""The decoder's caches: what a candidate prompt's scoring reuses instead of recomputing.

Layout "after": :class:`PrefixCache`, the text part's keys/values computed once and shared by every
candidate (:func:`prefix_cache`, :func:`label_logits_cached`). Layout "before": each candidate's
``[lead, prompt]`` keys/values (:func:`prompt_kv`), attended to by the texts packed by length into rows of
real tokens (:func:`packing_for`, :func:`pack_texts`, :func:`label_logits_packed`). Both equal the
uncached :func:`fedbpt_jax.models.decoder.label_logits`; the trunk and the layers are
:mod:`fedbpt_jax.models.decoder`'s.

Example::

    cache = prefix_cache(cfg, params, batch)                       # text part, once
    scores = jax.vmap(lambda p: label_logits_cached(cfg, params, cache, spec, p))(prompts)  # [P, B, C]
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ..types import ScoringSpec, TokenBatch
from . import decoder
from .decoder import DecoderConfig


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
    lead = decoder.lead_ids(spec) if spec is not None else jnp.zeros((0,), jnp.int32)
    if lead.shape[0]:
        ids = jnp.concatenate([jnp.broadcast_to(lead[None], (ids.shape[0], lead.shape[0])), ids], axis=1)
        mask = jnp.concatenate([jnp.ones((ids.shape[0], lead.shape[0]), jnp.int32), mask], axis=1)
    hidden, (k, v) = decoder.trunk(
        config, params, decoder.embed(params, ids), decoder.token_positions(mask), mask, collect_kv=True, last_only=True
    )
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
    suffix = decoder.suffix_embeds(params, b, spec, prompt)
    s = suffix.shape[1]
    if s == 0:
        return decoder.label_rows_logits(config, params, cache.last_hidden, spec)
    positions = cache.lengths[:, None] + jnp.arange(s)[None, :]
    key_valid = jnp.concatenate([cache.mask, jnp.ones((b, s), jnp.int32)], axis=1)
    hidden, _ = decoder.trunk(config, params, suffix, positions, key_valid, cache.k, cache.v, last_only=True)
    return decoder.label_rows_logits(config, params, hidden[:, -1], spec)


def prompt_kv(
    config: DecoderConfig, params, spec: ScoringSpec, prompt: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Keys/values ``[L, Tl + n, Nkv, D]`` of ``[lead, prompt]``: the per-candidate prompt cache of layout "before".

    They depend on the candidate (and on the fixed lead before it), not on the example: every example's
    text and cue attend to them (:func:`label_logits_packed`). The lead's own keys/values do not depend
    on the candidate either, so under a ``vmap`` over candidates (and over clients) its pass stays
    unbatched: computed once for all of them.
    """
    lead = decoder.lead_ids(spec)
    tl = lead.shape[0]
    empty = jnp.zeros((config.num_layers, 0, config.num_kv_heads, config.head_dim), jnp.dtype(config.compute_dtype))
    if tl:
        ones = jnp.ones((1, tl), jnp.int32)
        _, (lk, lv) = decoder.trunk(
            config,
            params,
            decoder.embed(params, lead)[None],
            decoder.token_positions(ones),
            ones,
            collect_kv=True,
            last_only=True,
        )
        lk, lv = lk[:, 0], lv[:, 0]
    else:
        lk, lv = empty, empty
    if prompt is None:
        return lk, lv
    n = prompt.shape[0]
    positions = (tl + jnp.arange(n, dtype=jnp.int32))[None]
    _, (k, v) = decoder.trunk(
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
    return 2 * (decoder.matmul_params_per_token(c) // c.num_layers) / (4 * c.num_heads * c.head_dim)


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
    emb = decoder.embed(params, flat(packed.ids))
    hidden, _ = decoder.trunk(
        config, params, emb, lead + flat(packed.seg_pos), flat(packed.mask), pk, pv, segments=flat(packed.segments)
    )
    ends = packed.ends.reshape(copies, -1) + (jnp.arange(copies, dtype=jnp.int32) * (r * w))[:, None]
    h = hidden.reshape(-1, hidden.shape[-1])[ends.reshape(-1)]
    out = decoder.label_rows_logits(config, params, h, spec)
    return out.reshape(*lead_shape, packed.ends.shape[-1], out.shape[-1])


__all__ = [
    "PrefixCache",
    "prefix_cache",
    "prompt_kv",
    "example_lengths",
    "packing_for",
    "key_cost_ratio",
    "PackedText",
    "pack_texts",
    "label_logits_packed",
    "prompt_cache_bytes",
    "label_logits_cached",
]
