"""Templates and verbalizers at work: parsing encoder templates, rendering decoder templates against a
tokenizer, and the label words' vocabulary ids.

The templates themselves (:class:`fedbpt_jax.tasks.DecoderTemplate`, a task's ``encoder_template``) are
defined with the tasks in :mod:`fedbpt_jax.tasks`; this module turns them into what tokenisation needs.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from .tasks import ENCODER, SLOT_RE, Task, check_kind, get

# Used when a tokenizer has no chat template (or jinja2 is missing): plain ChatML, no system turn.
CHATML_USER = "<|im_start|>user\n{content}<|im_end|>\n"
CHATML_ASSISTANT = "<|im_start|>assistant\n"
CHATML_SYSTEM = "<|im_start|>system\n{content}<|im_end|>\n"


@dataclasses.dataclass(frozen=True)
class RenderedDecoderTemplate:
    """A decoder template resolved against a tokenizer.

    The text part of an example is ``head + body.format(**fields)``; ``cue`` follows (after the soft
    prompt in layout "after"); the label words follow the cue.
    """

    style: str
    head: str
    body: str
    cue: str
    label_words: tuple[str, ...]
    lead: str = ""


# --------------------------------------------------------------------------------------------------
# Encoder template parsing.


@dataclasses.dataclass(frozen=True)
class EncoderPiece:
    """One piece of a parsed encoder template: ``kind`` is "literal", "prompt", "mask" or a text field."""

    kind: str
    value: str = ""  # literal text (with its leading space), or the separator before a text slot


def parse_encoder_template(template: str) -> tuple[EncoderPiece, ...]:
    """Splits a BBT template into pieces that tokenise independently.

    Spaces are attached to what follows them (byte-level BPE and WordPiece both split there, so
    tokenising piece by piece equals tokenising the joined string). The space right before
    ``{mask}`` is dropped: RoBERTa's ``<mask>`` strips the space on its left (``lstrip``).
    A text slot keeps its preceding space as ``value`` (prepended to the text when tokenised).
    """
    pieces: list[EncoderPiece] = []
    pos = 0
    pending = ""
    for m in SLOT_RE.finditer(template):
        lit = pending + template[pos : m.start()]
        pending = ""
        slot = m.group(1)
        if slot.startswith("text"):
            stripped = lit.rstrip(" ")
            if stripped:
                pieces.append(EncoderPiece("literal", stripped))
            pieces.append(EncoderPiece(slot, lit[len(stripped) :]))
        else:
            if slot == "mask":
                lit = lit.rstrip(" ")
            if lit:
                pieces.append(EncoderPiece("literal", lit))
            pieces.append(EncoderPiece(slot))
        pos = m.end()
    tail = template[pos:]
    if tail:
        pieces.append(EncoderPiece("literal", tail))
    return tuple(pieces)


# --------------------------------------------------------------------------------------------------
# Decoder template rendering.

_SENTINEL = "\u2063FEDBPT_USER_CONTENT\u2063"


def _chat_template_available(tokenizer) -> bool:
    if not getattr(tokenizer, "chat_template", None):
        return False
    try:
        import jinja2  # noqa: F401
    except ImportError:
        return False
    return True


def render_decoder_template(
    task: Task | str, tokenizer=None, style: str | None = None, *, use_chat_template: bool | None = None
) -> RenderedDecoderTemplate:
    """Resolves a task's decoder template (``style``: "completion" (default) or "chat").

    For "chat", the user message is rendered through ``tokenizer.apply_chat_template`` (with
    ``add_generation_prompt=True``) when the tokenizer has a chat template and jinja2 is installed,
    otherwise through a fixed ChatML form (``<|im_start|>user\\n…<|im_end|>\\n<|im_start|>assistant\\n``);
    ``use_chat_template=False`` forces the fixed form. Everything after the user's content becomes the
    cue, so the cue is the same for every example.
    """
    task = get(task)
    t = task.decoder_template(style)
    if t.style != "chat":
        return RenderedDecoderTemplate(t.style, "", t.text, t.cue, t.label_words, t.lead)
    use = _chat_template_available(tokenizer) if use_chat_template is None else use_chat_template
    if use_chat_template is None and not use and getattr(tokenizer, "chat_template", None):
        warnings.warn(
            "the tokenizer has a chat template but jinja2 is not installed: using the fixed "
            "ChatML form instead (no default system line); pip install jinja2 to use the "
            "model's own template",
            stacklevel=2,
        )
    if use:
        if not _chat_template_available(tokenizer):
            raise ValueError(
                "use_chat_template=True but the tokenizer has no chat_template or jinja2 "
                "is not installed (pip install jinja2)"
            )
        messages = [{"role": "user", "content": _SENTINEL}]
        if t.system is not None:
            messages.insert(0, {"role": "system", "content": t.system})
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if rendered.count(_SENTINEL) != 1:
            raise ValueError("the tokenizer's chat template did not render the user message verbatim")
        head, tail = rendered.split(_SENTINEL)
    else:
        head = CHATML_SYSTEM.format(content=t.system) if t.system is not None else ""
        head += CHATML_USER.split("{content}")[0]
        tail = CHATML_USER.split("{content}")[1] + CHATML_ASSISTANT
    return RenderedDecoderTemplate("chat", head, t.text, tail + t.cue, t.label_words)


# --------------------------------------------------------------------------------------------------
# Verbalizer ids.


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_after(tokenizer, context: str, text: str) -> list[int]:
    """Ids of ``text`` as the tokenizer writes it right after ``context``.

    Equals ``encode(text)`` for byte-level BPE; differs for SentencePiece-style tokenizers, which add a
    word-start marker to the beginning of a separately encoded string.
    """
    if not context:
        return _encode(tokenizer, text)
    ctx = _encode(tokenizer, context)
    full = _encode(tokenizer, context + text)
    if full[: len(ctx)] == ctx:
        return full[len(ctx) :]
    return _encode(tokenizer, text)


def label_token_ids(
    task: Task | str,
    tokenizer,
    kind: str,
    first_token: bool = False,
    *,
    style: str | None = None,
    use_chat_template: bool | None = None,
) -> np.ndarray:
    """``[C]`` int32 vocabulary ids of the label words (the verbalizer).

    Encoder: BBT's rule, ``encode(word)`` without a leading space. Decoder: the word's ids as they
    follow the template's answer cue.

    Args:
      first_token: score a multi-token label word by its first token (BBT's own behaviour). By default
        such a word is an error.

    Raises:
      ValueError: a label word is not one token (and ``first_token`` is False), is empty, or two
        classes share an id.
    """
    task = get(task)
    check_kind(kind)
    if kind == ENCODER:
        words, context = task.encoder_label_words, ""
    else:
        r = render_decoder_template(task, tokenizer, style, use_chat_template=use_chat_template)
        words, context = r.label_words, r.cue
    ids = []
    for w in words:
        toks = encode_after(tokenizer, context, w) if context else _encode(tokenizer, w)
        if not toks:
            raise ValueError(f"task {task.name}: label word {w!r} encodes to no token")
        if len(toks) > 1 and not first_token:
            pieces = tokenizer.convert_ids_to_tokens(toks)
            raise ValueError(
                f"task {task.name} ({kind}): label word {w!r} is {len(toks)} tokens {pieces} (ids {toks}), "
                f"not one; pass first_token=True to score it by its first token {pieces[0]!r}"
            )
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        dup = {w: i for w, i in zip(words, ids) if ids.count(i) > 1}
        raise ValueError(
            f"task {task.name} ({kind}): label words share token ids {dup}; classes would be indistinguishable"
        )
    return np.asarray(ids, dtype=np.int32)
