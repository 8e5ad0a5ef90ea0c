"""Causal-LM (decoder) inputs: the left-padded text part, and the answer cue that follows it."""

from __future__ import annotations

import numpy as np

from .. import tasks as tasks_lib
from .. import templates
from ..tasks import Task
from ..types import TokenBatch
from .examples import Examples
from .text_encoding import check_examples, context_limit, encode_batch, round_up, special_frame, texts_by_field


def _tokenizer_adds_bos(tokenizer) -> bool:
    pre, _ = special_frame(tokenizer)
    return tokenizer.bos_token_id is not None and pre[:1] == [tokenizer.bos_token_id]


def decoder_cue_ids(
    task: Task | str, tokenizer, *, style: str | None = None, use_chat_template: bool | None = None
) -> np.ndarray:
    """``[Tc]`` int32 ids of a task's answer cue as they follow a text part."""
    task = tasks_lib.get(task)
    r = templates.render_decoder_template(task, tokenizer, style, use_chat_template=use_chat_template)
    probe = r.head + tasks_lib.SLOT_RE.sub("Hello world.", r.body)
    return np.asarray(templates.encode_after(tokenizer, probe, r.cue), np.int32)


def decoder_lead_ids(
    task: Task | str, tokenizer, *, style: str | None = None, use_chat_template: bool | None = None
) -> np.ndarray:
    """``[Tl]`` int32 ids of what comes before the soft prompt: the template's lead (an instruction), and for
    the "reference" style the BOS that a tokenizer like Llama's adds (there the text part has none).
    Empty for the other templates."""
    task = tasks_lib.get(task)
    r = templates.render_decoder_template(task, tokenizer, style, use_chat_template=use_chat_template)
    ids = list(templates.encode_after(tokenizer, "", r.lead)) if r.lead else []
    if r.style == "reference" and _tokenizer_adds_bos(tokenizer):
        ids = [int(tokenizer.bos_token_id)] + ids
    return np.asarray(ids, np.int32)


def _split_body(body: str) -> list[tuple[str, str]]:
    """``"Review: {text}"`` → ``[("literal", "Review: "), ("slot", "text")]``."""
    out, pos = [], 0
    for m in tasks_lib.SLOT_RE.finditer(body):
        if m.start() > pos:
            out.append(("literal", body[pos : m.start()]))
        out.append(("slot", m.group(1)))
        pos = m.end()
    if pos < len(body):
        out.append(("literal", body[pos:]))
    return out


def _build_text(head: str, parts: list[tuple[str, str]], fields: dict) -> tuple[str, dict]:
    """An example's text part (``head`` then the body's literals and fields) and each field's character span."""
    s, spans = head, {}
    for kind, val in parts:
        if kind == "literal":
            s += val
        else:
            spans[val] = (len(s), len(s) + len(fields[val]))
            s += fields[val]
    return s, spans


def _with_bos(bos: list[int], ids: list[int]) -> list[int]:
    return bos + ids if bos and (not ids or ids[0] != bos[0]) else ids


def _text_length(
    task: Task,
    lengths: np.ndarray,
    *,
    n_prompt: int,
    cue_len: int,
    lead_len: int,
    limit: int | None,
    max_length: int | None,
    pad_to_max_length: bool,
    pad_multiple: int,
) -> int:
    """The static text length ``T`` of :func:`encode_decoder` for text parts of ``lengths`` tokens; refuses
    lengths that the model's context ``limit`` cannot hold beside the lead, prompt and cue."""
    n = len(lengths)
    room = None if limit is None else limit - n_prompt - cue_len - lead_len
    if room is not None and room < 1 and lead_len:
        raise ValueError(
            f"task {task.name}: the lead ({lead_len} tokens) + prompt ({n_prompt}) + cue ({cue_len}) = "
            f"{lead_len + n_prompt + cue_len} tokens leave no room for the text in the model's context of {limit}; "
            f"accepted: n_prompt (--n-prompt) at most {limit - cue_len - lead_len - 1}, or a shorter lead"
        )
    if max_length is not None:
        T = int(max_length)
        if room is not None and T > room:
            raise ValueError(
                f"task {task.name}: lead ({lead_len}) + prompt ({n_prompt}) + text part (max_length={T}) + cue "
                f"({cue_len}) = {lead_len + n_prompt + T + cue_len} tokens exceeds the model's context "
                f"of {limit}"
            )
        if not pad_to_max_length:
            T = min(T, round_up(max(int(lengths.max()) if n else 1, 1), pad_multiple))
        return T
    longest = int(lengths.max()) if n else 1
    if room is not None and longest > room:
        i = int(np.argmax(lengths))
        need = (
            f"task {task.name}: example {i} needs lead ({lead_len}) + prompt ({n_prompt}) + text part "
            f"({longest}) + cue ({cue_len}) = {lead_len + n_prompt + longest + cue_len} tokens, more than "
            f"the model's context of {limit}"
        )
        if room < 1:
            raise ValueError(
                f"{need}; the prompt and cue alone take {n_prompt + cue_len}: use fewer prompt "
                f"tokens (n_prompt / --n-prompt at most {limit - cue_len - 1})"
            )
        raise ValueError(f"{need}; truncate the texts with max_length<={room} (CLI: --max-length {room})")
    T = round_up(max(longest, 1), pad_multiple)
    if room is not None:
        T = min(T, room)
    return T


def _cut_to_fit(task: Task, tokenizer, i: int, T: int, ids: list[int], fields: dict, text, build, bos) -> list[int]:
    """Example ``i``'s ids cut to at most ``T`` tokens: its longest field is cut at a token boundary and the
    text part re-tokenised (the template is kept), until it fits."""
    tries = 0
    while len(ids) > T:
        tries += 1
        s, spans = text
        e = encode_batch(tokenizer, [s], offsets=True)
        offs = list(e["offset_mapping"][0])
        excess = len(ids) - T
        per = {
            f: [k for k, (a, b) in enumerate(offs) if a >= spans[f][0] and b <= spans[f][1] and b > a] for f in spans
        }
        f = max(per, key=lambda k: len(per[k]))
        toks = per[f]
        if not toks or tries > 8:
            raise ValueError(
                f"task {task.name}: the decoder template alone does not fit max_length={T} "
                f"(example {i}: {len(ids)} tokens)"
            )
        cut_tok = toks[max(0, len(toks) - excess)]
        cut_char = offs[cut_tok][0] - spans[f][0]
        cut = dict(fields)
        cut[f] = fields[f][: max(0, cut_char)].rstrip()
        if cut[f] == fields[f]:  # no progress (odd offsets): drop one more character
            cut[f] = cut[f][:-1]
        fields = cut
        text = build(fields)
        ids = _with_bos(bos, list(encode_batch(tokenizer, [text[0]])["input_ids"][0]))
    return ids


def encode_decoder(
    task: Task | str,
    examples: Examples,
    tokenizer,
    *,
    n_prompt: int = 50,
    max_positions: int | None = None,
    max_length: int | None = None,
    style: str | None = None,
    use_chat_template: bool | None = None,
    pad_multiple: int = 8,
    pad_to_max_length: bool = False,
) -> TokenBatch:
    """Causal-LM inputs: the text part of each example, **left**-padded to a static length ``T``.

    The model sees ``[prompt (n), text part (T), cue]`` or ``[text part, prompt, cue]``; the cue ids come
    from :func:`decoder_cue_ids` / :func:`scoring_spec`. The text part is tokenised as one string (so
    any tokenizer, SentencePiece included, tokenises it as it would the joined text), with no special
    tokens added except the BOS the tokenizer itself adds by default (e.g. Llama's), when the template
    does not already start with it.

    Args:
      max_positions: the model's context (default ``tokenizer.model_max_length``).
      max_length: the longest ``T``: longer text parts are truncated (the example text is cut, the
        template is kept). ``T`` is the longest text part present rounded up to ``pad_multiple``, capped
        at ``max_length`` (padding computes as much as real tokens, so it is never added for nothing).
      pad_to_max_length: ``T = max_length`` exactly (a fixed static shape, e.g. to share one compiled
        program across data sets).

    Raises:
      ValueError: ``n_prompt + T + len(cue)`` exceeds ``max_positions`` (names the lengths and the
        limit), or the template alone does not fit ``max_length``.
    """
    task = tasks_lib.get(task)
    check_examples(task, examples)
    r = templates.render_decoder_template(task, tokenizer, style, use_chat_template=use_chat_template)
    cue = decoder_cue_ids(task, tokenizer, style=style, use_chat_template=use_chat_template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    # The reference style puts BOS in the lead, before the prompt (decoder_lead_ids).
    bos = [int(tokenizer.bos_token_id)] if _tokenizer_adds_bos(tokenizer) and r.style != "reference" else []
    lead = decoder_lead_ids(task, tokenizer, style=style, use_chat_template=use_chat_template)
    parts = _split_body(r.body)
    by_field = texts_by_field(task, examples)
    n = len(examples)

    def build(fields):
        return _build_text(r.head, parts, fields)

    fields_i = [{f: by_field[f][i] for f in by_field} for i in range(n)]
    built = [build(fields_i[i]) for i in range(n)]
    enc = encode_batch(tokenizer, [b[0] for b in built])  # offsets only for texts to truncate
    ids_list = [list(x) for x in enc["input_ids"]]
    lengths = np.array([len(_with_bos(bos, x)) for x in ids_list], np.int64)
    T = _text_length(
        task,
        lengths,
        n_prompt=n_prompt,
        cue_len=len(cue),
        lead_len=len(lead),
        limit=context_limit(tokenizer, max_positions),
        max_length=max_length,
        pad_to_max_length=pad_to_max_length,
        pad_multiple=pad_multiple,
    )
    out_ids = np.full((n, T), pad_id, np.int32)
    att = np.zeros((n, T), np.int32)
    for i in range(n):
        ids = _with_bos(bos, ids_list[i])
        if len(ids) > T:
            ids = _cut_to_fit(task, tokenizer, i, T, ids, fields_i[i], built[i], build, bos)
        out_ids[i, T - len(ids) :] = ids
        att[i, T - len(ids) :] = 1
    return TokenBatch(
        input_ids=out_ids,
        attention_mask=att,
        answer_pos=np.full(n, T - 1, np.int32),
        labels=np.asarray(examples.labels, np.int32),
        example_mask=np.ones(n, np.float32),
    )
