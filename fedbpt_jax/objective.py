"""Black-box scoring of a whole population of soft prompts, losses, perturbation, fitness.

The model is used as a black box: a candidate ``z`` is scored only through the label-word logits the
frozen model returns. Everything here is a pure function, jittable and vmappable over clients and
candidates; per-candidate code is written unbatched and ``vmap``ped at the call site.

Fitness of a candidate (FedBPT, eq. 7 and the reference code):

* no perturbation (``rate == 0``): the mean loss over the client's examples;
* ``"ratio_of_means"`` (reference code, the default): ``mean_i L_clean,i / mean_i L_pert,i``;
* ``"mean_of_ratios"`` (paper eq. 7, as a mean instead of a sum so the scale does not depend on the
  number of examples; ranking within a client is the same): ``mean_i (L_clean,i / L_pert,i)``.

Perturbation (reference ``perturb_dataset``): each real (non-pad) token is replaced with probability
``rate`` by a token id drawn uniformly from ``[0, vocab_size)``. The reference replaces *every* real
position, special, placeholder and ``<mask>`` tokens included (the default here); ``exempt_special``
keeps the ids in :attr:`ScoringSpec.exempt_ids` untouched. Logits are still read at the original answer
position. For decoders the answer cue is not part of ``input_ids`` and is never perturbed.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from .models.kinds import KINDS
from .models.kinds import get as get_kind
from .types import ScoringSpec, TokenBatch

LOSSES = ("ce", "hinge", "accuracy")
FITNESS_FORMS = ("ratio_of_means", "mean_of_ratios")
HINGE_MARGIN = 2.0


# ----------------------------------------------------------------------------------------------
# Losses over label-word logits
# ----------------------------------------------------------------------------------------------
def per_example_loss(logits: jax.Array, labels: jax.Array, kind: str = "ce") -> jax.Array:
    """Loss of each example from its label-word logits.

    Args:
      logits: ``[..., B, C]`` label-word logits.
      labels: ``[..., B]`` int class indices.
      kind: ``"ce"`` (cross-entropy, default), ``"hinge"`` (Σ_{j≠y} max(0, s_j − s_y + 2)) or
        ``"accuracy"`` (−1 for a correct prediction, 0 otherwise: BBT's ``perf`` loss).

    Returns:
      ``[..., B]`` float32 losses.
    """
    logits = logits.astype(jnp.float32)
    labels = jnp.broadcast_to(labels, logits.shape[:-1])
    true = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    if kind == "ce":
        return jax.nn.logsumexp(logits, axis=-1) - true
    if kind == "hinge":
        margins = jnp.maximum(0.0, logits - true[..., None] + HINGE_MARGIN)
        not_true = jnp.arange(logits.shape[-1]) != labels[..., None]
        return jnp.sum(jnp.where(not_true, margins, 0.0), axis=-1)
    if kind == "accuracy":
        return -(jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    raise ValueError(f"unknown loss {kind!r}; accepted: {LOSSES}")


def masked_mean(x: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
    """Mean of ``x`` over ``axis`` counting only entries where ``mask`` is 1 (0 if none are)."""
    mask = mask.astype(x.dtype)
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def fitness(
    clean: jax.Array,
    perturbed: jax.Array | None,
    example_mask: jax.Array,
    form: str = "ratio_of_means",
) -> jax.Array:
    """Fitness (to minimise) from per-example losses ``[..., B]``; see the module docstring."""
    if perturbed is None:
        return masked_mean(clean, example_mask)
    if form == "ratio_of_means":
        return masked_mean(clean, example_mask) / masked_mean(perturbed, example_mask)
    if form == "mean_of_ratios":
        return masked_mean(clean / perturbed, example_mask)
    raise ValueError(f"unknown fitness form {form!r}; accepted: {FITNESS_FORMS}")


# ----------------------------------------------------------------------------------------------
# Perturbation kernel
# ----------------------------------------------------------------------------------------------
def perturb(
    key: jax.Array,
    batch: TokenBatch,
    rate: jax.Array | float,
    spec: ScoringSpec,
    *,
    exempt_special: bool = False,
) -> TokenBatch:
    """Randomly replaces real tokens of ``batch`` (FedBPT's perturbed copy of the local data).

    Each position with ``attention_mask == 1`` is replaced independently with probability ``rate`` by
    an id drawn uniformly from ``[0, spec.vocab_size)``. Works on any leading axes (clients, …).

    Args:
      key: the perturbation's named key.
      batch: tokenised examples.
      rate: r_p ∈ [0, 1] (may be traced).
      spec: supplies ``vocab_size`` and, with ``exempt_special``, the ids never replaced.
      exempt_special: keep special, placeholder and mask tokens (the reference replaces them too).
    """
    if spec.vocab_size < 1:
        raise ValueError(f"spec.vocab_size must be >= 1 to perturb, got {spec.vocab_size}")
    key_mask, key_ids = jax.random.split(key)
    ids = batch.input_ids
    replace = jax.random.bernoulli(key_mask, rate, ids.shape) & (batch.attention_mask > 0)
    if exempt_special:
        exempt = jnp.any(ids[..., None] == spec.exempt_ids, axis=-1)
        replace = replace & ~exempt
    random_ids = jax.random.randint(key_ids, ids.shape, 0, spec.vocab_size, dtype=ids.dtype)
    return batch.replace(input_ids=jnp.where(replace, random_ids, ids))


# ----------------------------------------------------------------------------------------------
# Scorer: a backbone seen as a black box
# ----------------------------------------------------------------------------------------------
class ScoreCost(NamedTuple):
    """Forward FLOPs per example of a scorer's two functions (2 per multiply-add; matmuls and attention
    products, which dominate; norms, softmax and activations are not counted).

    Attributes:
      forward: one call of ``logits`` (one candidate prompt) per example.
      prepare: one call of ``prepare`` per example (the decoder's text-prefix cache; 0 when ``prepare``
        is the identity).
      per_prompt: one call of ``logits`` once per candidate, whatever the number of examples (layout
        "before" with the prompt cache: the ``[lead, prompt]`` pass; ``logits_paired`` runs it once for
        both copies).
    """

    forward: float
    prepare: float
    per_prompt: float = 0.0

    def call(self, examples: int) -> float:
        """FLOPs of one ``logits`` call (one candidate) over ``examples`` examples."""
        return examples * self.forward + self.per_prompt


class Scorer(NamedTuple):
    """A backbone as a black box, as a pair of pure functions plus what they cost.

    ``prepare(params, batch, spec) -> ctx`` does the per-data work that does not depend on the prompt
    (the decoder's text-prefix key/value cache for layout "after"; the length-sorted packing of the texts
    for layout "before"; the identity otherwise), so it runs once per data set (clean data: once per run;
    perturbed data: once per round), not per candidate. ``logits(params, ctx, spec, prompt [n, H]) ->
    [B, C]`` scores one candidate prompt.

    Attributes:
      prepare, logits: the functions.
      layout: where the prompt goes (encoder: "add"/"cat"; decoder: "before"/"after").
      cost: ``(seq_len, cue_len, num_labels, packing=None, lead_len=0, examples=None) -> ScoreCost``: the
        one cost model every FLOP figure of the package (``run``, the CLI, the benchmarks) is computed from.
        ``seq_len`` is the padded text length ``T`` of the batch (padding is computed, so it is counted),
        ``packing`` the batch's :attr:`TokenBatch.packing` and ``examples`` its example count (layout
        "before" computes the packed rows), ``lead_len`` the template's fixed instruction before the prompt.
      caches_prefix: ``prepare`` does real, prompt-independent work (the decoder's prefix cache), so
        its result is worth keeping across calls (e.g. for a fixed test set).
      logits_paired: ``(params, paired_ctx, spec, prompt) -> [2, B, C]`` on a clean and a perturbed
        context stacked by :func:`stack_contexts`, sharing what does not depend on the copy (layout
        "before": the candidate's prompt cache); None: ``logits`` vmapped over the two copies.
      cache: the name of the scorer's cache (``"prefix"``, ``"prompt"`` or ``"none"``), for reports.
    """

    prepare: Callable[[Any, TokenBatch, ScoringSpec], Any]
    logits: Callable[[Any, Any, ScoringSpec, jax.Array | None], jax.Array]
    layout: str
    cost: Callable[..., ScoreCost]
    caches_prefix: bool = False
    logits_paired: Callable[[Any, Any, ScoringSpec, jax.Array | None], jax.Array] | None = None
    cache: str = "none"

    def flops_per_example(self, seq_len: int, cue_len: int = 0, num_labels: int = 2) -> float:
        """``cost(seq_len, cue_len, num_labels).forward``: FLOPs of one candidate per example."""
        return self.cost(seq_len, cue_len, num_labels).forward

    def paired(self, params, paired_ctx, spec: ScoringSpec, prompt) -> jax.Array:
        """``[2, B, C]`` logits of one candidate on a stacked clean and perturbed context."""
        if self.logits_paired is not None:
            return self.logits_paired(params, paired_ctx, spec, prompt)
        return jax.vmap(lambda c: self.logits(params, c, spec, prompt))(paired_ctx)


#: Which cache a scorer uses: "auto" (the layout's own: :attr:`~fedbpt_jax.models.kinds.BackboneKind.layout_caches`),
#: "prompt" (decoders, layout "before"), "prefix" (decoders, layout "after") or "none".
SCORER_CACHES = ("auto", "prompt", "prefix", "none")
#: The prompt layouts of each backbone kind, the default first (:mod:`fedbpt_jax.models.kinds`).
LAYOUTS = {k.name: k.layouts for k in KINDS.values()}


def make_scorer(
    lm, layout: str | None = None, *, use_cache: bool = True, n_prompt_tokens: int = 0, cache: str = "auto"
) -> Scorer:
    """Builds the :class:`Scorer` of a :class:`~fedbpt_jax.models.base.LanguageModel`
    (:func:`scorer_for` its kind and config)."""
    return scorer_for(lm.kind, lm.config, layout, use_cache=use_cache, n_prompt_tokens=n_prompt_tokens, cache=cache)


@functools.lru_cache(maxsize=128)
def scorer_for(
    kind: str,
    config,
    layout: str | None = None,
    *,
    use_cache: bool = True,
    n_prompt_tokens: int = 0,
    cache: str = "auto",
) -> Scorer:
    """The :class:`Scorer` of a backbone of ``kind`` (``"encoder"``/``"decoder"``) and static ``config``.

    The same arguments give the same (cached) object, so jitted callers keyed on it never retrace.

    Args:
      kind: the backbone kind.
      config: its ``EncoderConfig`` / ``DecoderConfig``.
      layout: encoders ``"add"`` (BBT default) or ``"cat"``; decoders ``"before"`` (the default: the
        paper's and every reference's layout, ``[lead, prompt, text, cue]``) or ``"after"`` (the fast
        variant, ``[lead, text, prompt, cue]``: the text prefix's key/value cache is shared by all
        candidates).
      use_cache: decoders: layout "after" reuses the text-prefix cache; layout "before" computes each
        candidate's ``[lead, prompt]`` keys/values once (the prompt cache) and every example's text and
        cue, packed by length to real tokens, against them. Results equal the uncached computation up to
        float rounding; turn off only to measure the caches' effect.
      cache: :data:`SCORER_CACHES`: "auto" (the layout's cache, or none when ``use_cache`` is False), or
        one named: "prompt" (layout "before"), "prefix" (layout "after"), "none".
      n_prompt_tokens: the soft prompt length (for the cost model).

    Raises:
      ValueError: an unknown kind or a layout the kind does not support (named, with what is accepted).
    """
    spec = get_kind(kind)
    layout = _checked_layout(spec, layout, cache)
    use_cache = use_cache and cache != "none"
    return spec.scorer_builder()(config, int(n_prompt_tokens), layout, use_cache)


def _checked_layout(kind, layout: str | None, cache: str) -> str:
    """``layout`` (the kind's default when None) once ``kind``, ``layout`` and ``cache`` are known to go together."""
    layout = layout or kind.layouts[0]
    if layout not in kind.layouts:
        raise ValueError(f"unknown {kind.name} layout {layout!r}; accepted: {kind.layouts}")
    if cache not in SCORER_CACHES:
        raise ValueError(f"unknown scorer cache {cache!r}; accepted: {SCORER_CACHES}")
    if cache in ("auto", "none") or cache == kind.layout_caches.get(layout):
        return layout
    if not kind.caches():
        raise ValueError(
            f"scorer cache {cache!r} is for {', '.join(k.name + 's' for k in KINDS.values() if k.caches())}; "
            f"an {kind.name} (layout {layout!r}) has no cache: accepted 'auto' or 'none'"
        )
    owner = [k for k, v in kind.layout_caches.items() if v == cache][0]
    raise ValueError(
        f"scorer cache {cache!r} cannot apply to {kind.name} layout {layout!r} (the {cache} cache is layout "
        f"{owner!r}'s); accepted with layout {layout!r}: 'auto', {kind.layout_caches[layout]!r} or 'none'"
    )


def decoder_scorer(cfg, n: int, layout: str, use_cache: bool) -> Scorer:
    """A decoder's scorer: layout "after" with the text-prefix cache, "before" with the prompt cache, or uncached."""
    if layout == "after" and use_cache:
        return _prefix_cache_scorer(cfg, n, layout)
    if layout == "before" and use_cache:
        return _prompt_cache_scorer(cfg, n, layout)
    return _uncached_decoder_scorer(cfg, n, layout)


def encoder_scorer(cfg, n: int, layout: str, use_cache: bool = False) -> Scorer:
    """An encoder's scorer (layout "add" or "cat"; an encoder has no cache)."""
    from .models import encoder

    def prepare(params, batch, spec=None):
        return batch

    def logits(params, batch, spec, prompt):
        return encoder.label_logits(cfg, params, batch, spec, prompt, mode=layout)

    def cost(
        seq_len: int, cue_len: int = 0, num_labels: int = 2, packing=None, lead_len: int = 0, examples=None
    ) -> ScoreCost:
        # The head runs at the <mask> position only, on the label rows only.
        return ScoreCost(
            float(encoder.flops_per_example(cfg, seq_len, n_prompt=n, mode=layout, num_labels=num_labels)), 0.0
        )

    return Scorer(prepare, logits, layout, cost)


def _prefix_cache_scorer(cfg, n: int, layout: str) -> Scorer:
    """Decoder layout "after": the text prefix's keys/values computed once, shared by every candidate."""
    from .models import decoder, decoder_cache

    def prepare(params, batch, spec=None):
        return decoder_cache.prefix_cache(cfg, params, batch, spec)

    def logits(params, cache, spec, prompt):
        return decoder_cache.label_logits_cached(cfg, params, cache, spec, prompt)

    def cost(
        seq_len: int, cue_len: int = 0, num_labels: int = 2, packing=None, lead_len: int = 0, examples=None
    ) -> ScoreCost:
        s = n + cue_len
        pre = lead_len + seq_len
        return ScoreCost(
            decoder.flops_per_example(cfg, s, pre + s, num_labels),
            decoder.flops_per_example(cfg, pre, pre, 0),
        )

    return Scorer(prepare, logits, layout, cost, caches_prefix=True, cache="prefix")


def _prompt_cache_scorer(cfg, n: int, layout: str) -> Scorer:
    """Decoder layout "before": each candidate's prompt cache, the texts packed by length against it."""
    from .models import decoder_cache

    def prepare(params, batch, spec):
        return decoder_cache.pack_texts(batch, spec)

    def logits(params, packed, spec, prompt):
        return decoder_cache.label_logits_packed(cfg, params, packed, spec, prompt)

    def cost(
        seq_len: int, cue_len: int = 0, num_labels: int = 2, packing=None, lead_len: int = 0, examples=None
    ) -> ScoreCost:
        return packed_cost(cfg, n, seq_len, cue_len, num_labels, packing, lead_len, examples)

    return Scorer(prepare, logits, layout, cost, logits_paired=logits, cache="prompt")


def _uncached_decoder_scorer(cfg, n: int, layout: str) -> Scorer:
    from .models import decoder

    def prepare(params, batch, spec=None):
        return batch

    def logits(params, batch, spec, prompt):
        return decoder.label_logits(cfg, params, batch, spec, prompt, layout=layout)

    def cost(
        seq_len: int, cue_len: int = 0, num_labels: int = 2, packing=None, lead_len: int = 0, examples=None
    ) -> ScoreCost:
        total = lead_len + seq_len + n + cue_len
        return ScoreCost(decoder.flops_per_example(cfg, total, total, num_labels), 0.0)

    return Scorer(prepare, logits, layout, cost)


def packed_cost(
    cfg,
    n: int,
    seq_len: int,
    cue_len: int,
    num_labels: int,
    packing=None,
    lead_len: int = 0,
    examples: int | None = None,
) -> ScoreCost:
    """Layout "before" with the prompt cache: per candidate, one ``[lead, prompt]`` pass (``per_prompt``;
    the lead's own pass is shared by every candidate and not counted); per example, its share of the packed
    rows (:func:`fedbpt_jax.models.decoder_cache.pack_texts`: ``packing = (rows, width)``, or a row of ``T + Tc``
    per example without one), every row computing all its positions against the ``lead + n`` cached keys
    and its own positions, plus the label head. ``examples``: the batch's examples (default 1)."""
    from .models import decoder

    e = int(examples or 1)
    rows, w = (int(packing[0]), int(packing[1])) if packing is not None else (e, int(seq_len) + int(cue_len))
    past = int(lead_len) + int(n)
    per_layer = decoder.matmul_params_per_token(cfg) // cfg.num_layers
    attn = 4 * cfg.num_heads * cfg.head_dim
    # Every row computes W queries against the cached keys and its own W keys (masked, not skipped).
    row = cfg.num_layers * (2 * per_layer * w + attn * w * (past + w))
    forward = rows * row / e + 2 * cfg.hidden_size * num_labels
    per_prompt = decoder.flops_per_example(cfg, int(n), past, 0) if n else 0.0
    return ScoreCost(float(forward), 0.0, float(per_prompt))


# ----------------------------------------------------------------------------------------------
# Population scoring
# ----------------------------------------------------------------------------------------------
def population_logits(
    scorer: Scorer,
    params: Any,
    ctx: Any,
    spec: ScoringSpec,
    prompts: jax.Array,
    *,
    chunk_size: int = 0,
) -> jax.Array:
    """Label logits of every candidate on every example: ``prompts [P, n, H] -> [P, B, C]``.

    The population axis is vmapped, so XLA runs one batched forward pass over candidates × examples.
    ``chunk_size > 0`` bounds memory: candidates are processed ``chunk_size`` at a time
    (``lax.map`` with a vmapped body), which is how large client × population batches fit one device.
    """

    def one(prompt):
        return scorer.logits(params, ctx, spec, prompt)

    return _map_population(one, prompts, chunk_size)


def _map_population(one, prompts, chunk_size: int):
    if chunk_size and chunk_size < prompts.shape[0]:
        return jax.lax.map(one, prompts, batch_size=chunk_size)
    return jax.vmap(one)(prompts)


def population_losses(
    scorer: Scorer,
    params: Any,
    ctx: Any,
    batch: TokenBatch,
    spec: ScoringSpec,
    prompts: jax.Array,
    *,
    loss: str = "ce",
    chunk_size: int = 0,
) -> jax.Array:
    """Per-example losses ``[P, B]`` of a population of prompts ``[P, n, H]``."""
    logits = population_logits(scorer, params, ctx, spec, prompts, chunk_size=chunk_size)
    return per_example_loss(logits, batch.labels, loss)


def flatten_clients(batch: TokenBatch) -> TokenBatch:
    """``[N, E, ...]`` → ``[N·E, ...]`` (one pooled batch). Its packing is unknown (``None``): a pooled batch
    that layout "before" should compute to real tokens is packed per client (:func:`prepare_pooled`)."""
    flat = jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[2:]), batch)
    return flat.replace(packing=None)


def prepare_pooled(scorer: Scorer, params, batch: TokenBatch, spec: ScoringSpec) -> Any:
    """``scorer.prepare`` of the pooled ``[N·E]`` examples of ``batch [N, E, T]``: for layout "before" each
    client's texts are packed by its own packing and the rows stacked (logits then come out in the pooled
    order); otherwise ``prepare`` of :func:`flatten_clients`."""
    if scorer.cache != "prompt":
        return scorer.prepare(params, flatten_clients(batch), spec)
    from .models import decoder_cache

    packed = jax.vmap(lambda b: decoder_cache.pack_texts(b, spec))(batch)  # [N, R, W], ends [N, E]
    n, r, w = packed.ids.shape
    offset = (jnp.arange(n, dtype=jnp.int32) * (r * w))[:, None]
    return decoder_cache.PackedText(
        ids=packed.ids.reshape(n * r, w),
        mask=packed.mask.reshape(n * r, w),
        seg_pos=packed.seg_pos.reshape(n * r, w),
        segments=packed.segments.reshape(n * r, w),
        ends=(packed.ends + offset).reshape(-1),
    )


def stack_contexts(clean_ctx: Any, pert_ctx: Any) -> Any:
    """The clean and the perturbed prepared contexts stacked on a new leading axis of 2 (for
    :func:`population_fitness_paired`; build it once per round when the perturbed copy is fixed)."""
    return jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), clean_ctx, pert_ctx)


def population_fitness_paired(
    scorer: Scorer,
    params: Any,
    paired_ctx: Any,
    batch: TokenBatch,
    spec: ScoringSpec,
    prompts: jax.Array,
    *,
    loss: str = "ce",
    form: str = "ratio_of_means",
    chunk_size: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """:func:`population_fitness` with the clean and perturbed contexts already stacked by
    :func:`stack_contexts`: both passes run as **one** forward pass over (copy × candidate × example)
    rows, so every weight matrix is streamed once per generation instead of twice and the GEMMs are
    twice as tall."""
    logits = _map_population(lambda p: scorer.paired(params, paired_ctx, spec, p), prompts, chunk_size)  # [P, 2, B, C]
    losses = jnp.moveaxis(per_example_loss(logits, batch.labels, loss), 1, 0)  # [2, P, B]
    fit = fitness(losses[0], losses[1], batch.example_mask, form)
    return fit, masked_mean(losses[0], batch.example_mask)


def population_fitness(
    scorer: Scorer,
    params: Any,
    clean_ctx: Any,
    pert_ctx: Any | None,
    batch: TokenBatch,
    spec: ScoringSpec,
    prompts: jax.Array,
    *,
    loss: str = "ce",
    form: str = "ratio_of_means",
    chunk_size: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Fitness ``[P]`` (to minimise) and clean mean loss ``[P]`` of a population ``[P, n, H]``.

    ``pert_ctx`` is the prepared perturbed copy of ``batch`` (``None``: no perturbation term).
    The clean and the perturbed pass are one forward pass batched over both copies and the population
    (:func:`population_fitness_paired`).
    """
    if pert_ctx is not None:
        return population_fitness_paired(
            scorer,
            params,
            stack_contexts(clean_ctx, pert_ctx),
            batch,
            spec,
            prompts,
            loss=loss,
            form=form,
            chunk_size=chunk_size,
        )
    clean = population_losses(scorer, params, clean_ctx, batch, spec, prompts, loss=loss, chunk_size=chunk_size)
    fit = fitness(clean, None, batch.example_mask, form)
    return fit, masked_mean(clean, batch.example_mask)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def chunk_examples(batch: TokenBatch, size: int, *, by_length: bool = False, cue_len: int = 0) -> TokenBatch:
    """Reshapes ``[B, T]`` examples into ``[ceil(B/size), size, T]`` chunks (padding rows masked out).

    ``by_length`` (a scorer that computes real tokens only: layout "before" with the prompt cache): the examples
    are ordered by real length, longest first, and dealt round-robin, so every chunk holds the same spread of
    lengths, and the chunks carry their common packing (:attr:`TokenBatch.packing`, for a cue of ``cue_len``
    tokens): one compiled evaluation over all chunks computes close to the real tokens only. The order of examples changes, which
    no set metric (accuracy, loss, F1, label shares) depends on.
    """
    import numpy as np

    n = batch.input_ids.shape[0]
    size = max(1, min(size, n))
    chunks = -(-n // size)
    pad = chunks * size - n
    order = None
    if by_length:
        lengths = np.asarray(batch.attention_mask).sum(-1)
        # sorted[i] goes to chunk i % chunks, slot i // chunks (the padding rows, the shortest, come last)
        order = np.argsort(-lengths, kind="stable")

    def fix(a, fill):
        a = np.asarray(a)
        if order is not None:
            a = a[order]
        if pad:
            a = np.concatenate([a, np.full((pad,) + a.shape[1:], fill, a.dtype)], axis=0)
        if order is not None:  # sorted example i -> chunk i % chunks, slot i // chunks
            return np.swapaxes(a.reshape((size, chunks) + a.shape[1:]), 0, 1)
        return a.reshape((chunks, size) + a.shape[1:])

    out = TokenBatch(
        input_ids=fix(batch.input_ids, 0),
        attention_mask=fix(batch.attention_mask, 0),
        answer_pos=fix(batch.answer_pos, 0),
        labels=fix(batch.labels, 0),
        example_mask=fix(batch.example_mask, 0),
    )
    if by_length:
        from .models.decoder_cache import packing_for

        out = out.replace(packing=packing_for(out.attention_mask, out.example_mask, cue_len=cue_len))
    return out


def eval_chunks(scorer: Scorer, batch: TokenBatch, size: int, spec: ScoringSpec) -> TokenBatch:
    """:func:`chunk_examples` as ``scorer`` evaluates best: by length, packed for ``spec``'s cue, when it
    computes real tokens only (layout "before" with the prompt cache); in order otherwise."""
    import numpy as np

    by_length = scorer.cache == "prompt"
    return chunk_examples(batch, size, by_length=by_length, cue_len=int(np.shape(spec.cue_ids)[0]))


def evaluate_logits(scorer: Scorer, params, chunks: TokenBatch, spec: ScoringSpec, prompt) -> jax.Array:
    """Label logits ``[chunks, size, C]`` of one prompt on chunked examples (``lax.map`` over chunks)."""

    def one(chunk):
        return scorer.logits(params, scorer.prepare(params, chunk, spec), spec, prompt)

    return jax.lax.map(one, chunks)


def prepare_chunks(scorer: Scorer, params, chunks: TokenBatch, spec: ScoringSpec) -> Any:
    """``scorer.prepare`` of every chunk ``[chunks, size, T]`` (``lax.map``): e.g. a fixed test set's prefix
    cache, computed once and reused by every later evaluation (:func:`evaluate_prepared`)."""
    return jax.lax.map(lambda c: scorer.prepare(params, c, spec), chunks)


def prepared_bytes(scorer: Scorer, params, chunks: TokenBatch, spec: ScoringSpec) -> int:
    """Bytes :func:`prepare_chunks` would hold for ``chunks`` (shape inference only, nothing computed)."""
    import numpy as np

    shape_of = lambda t: jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), t)  # noqa: E731
    shapes = jax.eval_shape(lambda c, s: prepare_chunks(scorer, params, c, s), shape_of(chunks), shape_of(spec))
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes)))


def evaluate_prepared(scorer: Scorer, params, ctx, spec: ScoringSpec, prompt) -> jax.Array:
    """Label logits ``[chunks, size, C]`` of one prompt on chunks already prepared by :func:`prepare_chunks`."""
    return jax.lax.map(lambda c: scorer.logits(params, c, spec, prompt), ctx)


def classification_metrics(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Accuracy, CE loss and binary F1 (positive class 1) over masked examples; any leading axes."""
    logits = logits.reshape(-1, logits.shape[-1])
    labels, mask = labels.reshape(-1), mask.reshape(-1)
    pred = jnp.argmax(logits, axis=-1)
    m = mask.astype(jnp.float32)
    acc = jnp.sum((pred == labels).astype(m.dtype) * m) / jnp.maximum(jnp.sum(m), 1.0)
    ce = masked_mean(per_example_loss(logits, labels, "ce"), m)
    tp = jnp.sum(((pred == 1) & (labels == 1)).astype(m.dtype) * m)
    fp = jnp.sum(((pred == 1) & (labels != 1)).astype(m.dtype) * m)
    fn = jnp.sum(((pred != 1) & (labels == 1)).astype(m.dtype) * m)
    f1 = 2 * tp / jnp.maximum(2 * tp + fp + fn, 1.0)
    return {"accuracy": acc, "loss": ce, "f1": f1}
