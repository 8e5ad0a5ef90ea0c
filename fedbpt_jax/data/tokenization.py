"""Tokenising a task for a backbone kind, and the task's :class:`~fedbpt_jax.types.ScoringSpec`."""

from __future__ import annotations

import numpy as np

from .. import tasks as tasks_lib
from .. import templates
from ..models.kinds import get as get_kind
from ..tasks import Task
from ..types import ScoringSpec, TokenBatch
from .decoder_inputs import decoder_cue_ids, decoder_lead_ids
from .examples import Examples
from .text_encoding import placeholder_ids


def tokenize(
    task: Task | str,
    examples: Examples,
    tokenizer,
    kind: str,
    *,
    n_prompt: int = 50,
    max_length: int | None = None,
    max_positions: int | None = None,
    style: str | None = None,
    **kwargs,
) -> TokenBatch:
    """The backbone ``kind``'s encoding (:attr:`~fedbpt_jax.models.kinds.BackboneKind.encode`: e.g.
    :func:`encode_encoder`, :func:`encode_decoder`); ``style`` is for causal kinds, whose templates have styles."""
    tasks_lib.check_kind(kind)
    spec = get_kind(kind)
    if spec.causal:
        kwargs["style"] = style
    return spec.encoder_fn()(
        task, examples, tokenizer, n_prompt=n_prompt, max_length=max_length, max_positions=max_positions, **kwargs
    )


def scoring_spec(
    task: Task | str,
    tokenizer,
    kind: str,
    *,
    n_prompt: int = 50,
    style: str | None = None,
    first_token: bool = False,
    use_chat_template: bool | None = None,
    vocab_size: int | None = None,
    placeholder: str = "auto",
    exempt_pad_to: int | None = None,
) -> ScoringSpec:
    """The :class:`ScoringSpec` of a task for a tokenizer and backbone kind.

    ``exempt_ids`` are the tokenizer's special ids, plus (encoder) the placeholder and ``<mask>`` ids,
    sorted, padded with -1 to ``exempt_pad_to`` if given. ``vocab_size`` defaults to ``len(tokenizer)``
    (pass the model's embedding rows when they differ).
    """
    task = tasks_lib.get(task)
    tasks_lib.check_kind(kind)
    labels = templates.label_token_ids(
        task, tokenizer, kind, first_token, style=style, use_chat_template=use_chat_template
    )
    exempt = set(int(i) for i in tokenizer.all_special_ids)
    if not get_kind(kind).causal:  # the label word at <mask>: no cue; placeholders and <mask> exempt
        cue = np.zeros(0, np.int32)
        exempt |= set(placeholder_ids(tokenizer, n_prompt, mode=placeholder).tolist())
        if tokenizer.mask_token_id is not None:
            exempt.add(int(tokenizer.mask_token_id))
        lead = None
    else:
        cue = decoder_cue_ids(task, tokenizer, style=style, use_chat_template=use_chat_template)
        lead = decoder_lead_ids(task, tokenizer, style=style, use_chat_template=use_chat_template)
        lead = lead if len(lead) else None  # most templates: no lead (the spec's structure as before)
    ex = np.asarray(sorted(exempt), np.int32)
    if exempt_pad_to is not None:
        if exempt_pad_to < len(ex):
            raise ValueError(f"exempt_pad_to={exempt_pad_to} < {len(ex)} exempt ids")
        ex = np.concatenate([ex, np.full(exempt_pad_to - len(ex), -1, np.int32)])
    return ScoringSpec(
        label_ids=labels,
        cue_ids=cue,
        exempt_ids=ex,
        lead_ids=lead,
        vocab_size=int(vocab_size if vocab_size is not None else len(tokenizer)),
        n_prompt=int(n_prompt),
    )
