"""The registry of backbone kinds: what the rest of the package needs to know about a kind of language model.

Two kinds are built in: ``"encoder"`` (a masked LM such as RoBERTa: BBT's setting, the label word is read at
``<mask>``) and ``"decoder"`` (a causal LM such as SmolLM2, Llama or Qwen2: the label word is the next token after
an answer cue). Everything that differs by kind is read from its :class:`BackboneKind` here: which Hugging Face
``model_type`` values load as it, which modules hold its forward pass and its checkpoint conversion, its prompt
layouts and the scorer cache each layout uses, how its texts are encoded, and whether it is causal. A third kind
is one more entry in :data:`KINDS` and the modules it names; the loaders (:func:`fedbpt_jax.models.load`), the
scorers (:func:`fedbpt_jax.objective.scorer_for`), the data encoders and the CLI's checks read it from here.

This module imports nothing of the package at import time (the entries name their modules as strings), so any
module may import it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class BackboneKind:
    """One kind of backbone.

    Attributes:
      name: the kind's name (``LanguageModel.kind``).
      description: one line for errors and docs.
      model_types: the Hugging Face ``model_type`` values that load as this kind.
      module: the module with the forward pass and ``word_embeddings(params)``.
      hf_module: the module with ``config_from_hf(hf_config, compute_dtype=)`` and ``params_from_hf(config, tensors)``.
      layouts: where the soft prompt goes; the first is the default.
      layout_caches: the scorer cache each layout computes with (``"auto"`` picks it; a layout absent here has
        none).
      scorer: ``"module:function"`` building a :class:`~fedbpt_jax.objective.Scorer` from ``(config, n_prompt,
        layout, use_cache)``.
      encode: ``"module:function"`` turning a task's examples into a token batch for this kind.
      causal: a causal LM: the soft prompt and the answer cue are tokens of the sequence (they count towards the
        context), templates come in styles (completion, chat, bbt) and the tasks' measured prompt starts apply.
    """

    name: str
    description: str
    model_types: tuple[str, ...]
    module: str
    hf_module: str
    layouts: tuple[str, ...]
    layout_caches: Mapping[str, str]
    scorer: str
    encode: str
    causal: bool

    def backbone(self):
        """The forward-pass module."""
        return importlib.import_module(self.module)

    def hf(self):
        """The checkpoint-conversion module."""
        return importlib.import_module(self.hf_module)

    def scorer_builder(self):
        return _resolve(self.scorer)

    def encoder_fn(self):
        return _resolve(self.encode)

    def caches(self) -> tuple[str, ...]:
        """The scorer caches this kind has (besides ``"auto"`` and ``"none"``)."""
        return tuple(dict.fromkeys(self.layout_caches.values()))


def _resolve(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


ENCODER = BackboneKind(
    name="encoder",
    description="masked LM (RoBERTa, BERT): the label word at <mask>",
    model_types=("roberta", "bert", "xlm-roberta", "camembert"),
    module="fedbpt_jax.models.encoder",
    hf_module="fedbpt_jax.models.encoder",
    layouts=("add", "cat"),
    layout_caches={},
    scorer="fedbpt_jax.objective:encoder_scorer",
    encode="fedbpt_jax.data.encoder_inputs:encode_encoder",
    causal=False,
)
DECODER = BackboneKind(
    name="decoder",
    description="causal LM (SmolLM2, Llama, Mistral, Qwen2): the label word after an answer cue",
    model_types=("llama", "mistral", "smollm", "smollm2", "qwen2"),
    module="fedbpt_jax.models.decoder",
    hf_module="fedbpt_jax.models.decoder_hf",
    layouts=("before", "after"),
    layout_caches={"before": "prompt", "after": "prefix"},
    scorer="fedbpt_jax.objective:decoder_scorer",
    encode="fedbpt_jax.data.decoder_inputs:encode_decoder",
    causal=True,
)
#: Every backbone kind by name.
KINDS: dict[str, BackboneKind] = {k.name: k for k in (ENCODER, DECODER)}


def get(name: str) -> BackboneKind:
    """The kind called ``name``. Raises ValueError naming the accepted kinds."""
    if name not in KINDS:
        raise ValueError(f"unknown model kind {name!r}; accepted: {tuple(KINDS)}")
    return KINDS[name]


def of_model_type(model_type: str) -> BackboneKind:
    """The kind a Hugging Face ``model_type`` loads as. Raises ValueError naming what each kind accepts."""
    for kind in KINDS.values():
        if model_type in kind.model_types:
            return kind
    raise ValueError(f"unsupported model_type {model_type!r}; accepted {accepted_model_types()}")


def accepted_model_types() -> str:
    """``"encoders (...); decoders (...)"``: the model types each kind loads, for error messages."""
    return "; ".join(f"{k.name}s {k.model_types}" for k in KINDS.values())
