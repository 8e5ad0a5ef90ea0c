"""The backbone contract: what every language model in fedbpt-jax provides.

A :class:`LanguageModel` is a host-side bundle (not a pytree): the model's name and kind, its static
config, the parameter pytree (passed to jitted functions as an *argument*, never closed over), the HF
tokenizer and the Flax module. It holds no scoring functions: those are pure module-level functions of
:mod:`fedbpt_jax.models.encoder` and :mod:`fedbpt_jax.models.decoder` that take ``(config, params, ...)``,
and :func:`fedbpt_jax.objective.make_scorer` wraps the right ones for a bundle. They are unbatched over
the population: a caller ``vmap``s them over candidate prompts (and clients), and XLA fuses that into one
batched forward pass.

Encoder (``kind == "encoder"``)::

    encoder.label_logits(config, params, batch: TokenBatch, spec: ScoringSpec, prompt: [n, H] | None,
                         mode="add") -> [B, C]

Decoder (``kind == "decoder"``)::

    decoder.label_logits(config, params, batch, spec, prompt, layout) -> [B, C]
    decoder_cache.prefix_cache(config, params, batch) -> PrefixCache          # the text part's K/V, once
    decoder_cache.label_logits_cached(config, params, cache, spec, prompt) -> [B, C]   # == layout "after"
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """A frozen backbone.

    Attributes:
      name: canonical name (registry name, hub id or path).
      kind: ``"encoder"`` (masked LM, e.g. RoBERTa) or ``"decoder"`` (causal LM, e.g. SmolLM2/Llama).
      config: the model's frozen config dataclass (``EncoderConfig`` / ``DecoderConfig``).
      params: parameter pytree (matrices and embeddings in ``config.compute_dtype``, norms float32).
      tokenizer: a ``transformers`` fast tokenizer.
      module: the Flax linen module.
    """

    name: str
    kind: str
    config: Any
    params: Any
    tokenizer: Any
    module: Any

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def input_embeddings(self, params=None) -> jax.Array:
        """``[V, H]`` input word-embedding matrix (for BBT's σ̂_E and for perturbation)."""
        from .kinds import get

        params = self.params if params is None else params
        return get(self.kind).backbone().word_embeddings(params)

    def num_params(self) -> int:
        return int(sum(x.size for x in jax.tree_util.tree_leaves(self.params)))
