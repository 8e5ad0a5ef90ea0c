"""Array containers shared by the whole package, and the one axis legend.

Axis order everywhere (leading axes may be absent):

    clients (N or K)  ×  population (P)  ×  examples (B)  ×  tokens (T)  ×  embedding (H)

Token arrays are static-shape and padded; masks say what is real. Every container here is a
``flax.struct.dataclass`` (a pytree), so it can be vmapped over clients, sharded and scanned.
"""

from __future__ import annotations

import flax.struct
import jax


@flax.struct.dataclass
class TokenBatch:
    """Tokenised examples of one task for one backbone.

    Encoder backbones (masked LM): ``input_ids`` is the whole template, right-padded, with the soft
    prompt's placeholder tokens at positions ``1 … n_prompt`` ("add" mode) and ``answer_pos`` the index
    of ``<mask>``.

    Decoder backbones (causal LM): ``input_ids`` is the *text part* of the template, **left-padded**;
    the answer cue (identical for every example) lives in :class:`ScoringSpec`. The sequence the model
    sees is ``[prompt, text, cue]`` (layout "before") or ``[text, prompt, cue]`` (layout "after"), and
    the label logits are read at the very last position, so ``answer_pos`` is ``T - 1`` (kept for
    symmetry; decoders do not read it).

    Attributes:
      input_ids: ``[..., B, T]`` int32 token ids (pad id where ``attention_mask`` is 0).
      attention_mask: ``[..., B, T]`` int32, 1 for real tokens.
      answer_pos: ``[..., B]`` int32 position whose logits are scored.
      labels: ``[..., B]`` int32 class index in ``[0, num_labels)``.
      example_mask: ``[..., B]`` float32, 1 for real examples, 0 for padding rows (clients with fewer
        examples than the padded width).
      packing: static ``(rows, width, cue_len)`` (decoders; ``None``: unknown): each group of the leading
        axes (a client, an evaluation chunk), its real examples sorted by length and dealt round-robin to
        ``rows`` rows, each example followed by the ``cue_len``-token cue, fits rows of ``width`` positions
        (:func:`fedbpt_jax.models.decoder_cache.packing_for`). Layout "before" then computes real tokens only,
        not ``B × T``. Gathering groups (sampling clients) and perturbing tokens keep it; :meth:`take`
        drops it.
    """

    input_ids: jax.Array
    attention_mask: jax.Array
    answer_pos: jax.Array
    labels: jax.Array
    example_mask: jax.Array
    packing: tuple[int, int] | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def num_examples(self) -> int:
        return self.input_ids.shape[-2]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[-1]

    def take(self, idx) -> "TokenBatch":
        """Rows ``idx`` of the example axis (works on numpy and jax arrays)."""
        return TokenBatch(
            input_ids=self.input_ids[..., idx, :],
            attention_mask=self.attention_mask[..., idx, :],
            answer_pos=self.answer_pos[..., idx],
            labels=self.labels[..., idx],
            example_mask=self.example_mask[..., idx],
        )


@flax.struct.dataclass
class ScoringSpec:
    """Everything static about *how* a task is scored with a given backbone (a pytree of small arrays).

    Attributes:
      label_ids: ``[C]`` int32 vocabulary rows of the label words (verbalizer).
      cue_ids: ``[Tc]`` int32 answer-cue tokens appended after text/prompt (decoders; empty for encoders).
      exempt_ids: ``[S]`` int32 ids that the perturbation may leave untouched when asked to (special,
        placeholder and mask tokens); padded with -1.
      lead_ids: ``[Tl]`` int32 fixed instruction tokens *before* the soft prompt (decoders' "reference"
        template: ``[lead, prompt, text, cue]``; empty for every other template).
      vocab_size: size of the vocabulary perturbation draws from (static).
      n_prompt: soft prompt tokens the examples were built for (static; 0: not recorded). Encoder
        templates hold that many placeholders, and decoder texts were fitted to the context leaving that
        much room, so a run with another ``n_prompt_tokens`` is refused.
    """

    label_ids: jax.Array
    cue_ids: jax.Array
    exempt_ids: jax.Array
    lead_ids: jax.Array | None = None
    vocab_size: int = flax.struct.field(pytree_node=False, default=0)
    n_prompt: int = flax.struct.field(pytree_node=False, default=0)
