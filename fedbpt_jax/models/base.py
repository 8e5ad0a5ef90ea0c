"""The backbone contract: what every language model in fedbpt-jax provides.

A :class:`LanguageModel` is a host-side bundle (not a pytree): a static config, the parameter pytree
(passed to jitted functions as an *argument*, never closed over), the HF tokenizer, and the pure scoring
functions. All scoring functions are unbatched over the population: a caller ``vmap``s them over
candidate prompts (and clients); XLA fuses that into one batched forward pass.

Scoring functions (``kind == "encoder"``)::

    label_logits(params, batch: TokenBatch, spec: ScoringSpec, prompt: [n, H] | None) -> [B, C]

Scoring functions (``kind == "decoder"``)::

    label_logits(params, batch, spec, prompt)                 # layout taken from the bundle
    prefix_cache(params, batch) -> PrefixCache               # text part's K/V, computed once
    label_logits_cached(params, cache, spec, prompt) -> [B, C]   # == label_logits with layout "after"
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

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
        from . import encoder, decoder  # noqa: F401  (local import: avoid cycles)

        params = self.params if params is None else params
        if self.kind == "encoder":
            return encoder.word_embeddings(params)
        return decoder.word_embeddings(params)

    def num_params(self) -> int:
        return int(sum(x.size for x in jax.tree_util.tree_leaves(self.params)))
