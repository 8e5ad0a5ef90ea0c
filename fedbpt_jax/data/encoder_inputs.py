"""Masked-LM (encoder) inputs in BBT's "add" layout."""

from __future__ import annotations

import numpy as np

from .. import tasks as tasks_lib
from .. import templates
from ..tasks import Task
from ..types import TokenBatch
from .examples import Examples
from .text_encoding import (
    check_examples,
    context_limit,
    encode_batch,
    placeholder_ids,
    round_up,
    special_frame,
    texts_by_field,
)


def _longest_first(lens: np.ndarray, budget: int) -> np.ndarray:
    """Token counts to keep per text field (one or two): the longer field is shortened first."""
    keep = np.asarray(lens, np.int64).copy()
    if keep.sum() <= budget:
        return keep
    if len(keep) == 1:
        return np.minimum(keep, budget)
    short = int(np.argmin(keep))
    keep[short] = min(int(keep[short]), budget // 2)
    keep[1 - short] = budget - keep[short]
    return keep


def encode_encoder(
    task: Task | str,
    examples: Examples,
    tokenizer,
    *,
    n_prompt: int = 50,
    max_length: int | None = None,
    max_positions: int | None = None,
    placeholder: str = "auto",
    pad_multiple: int = 8,
    pad_to_max_length: bool = False,
) -> TokenBatch:
    """Masked-LM inputs in BBT's "add" layout: ``<s> <P>×n . {text} . It was <mask> . </s>``.

    Template pieces are tokenised separately and concatenated (equal to tokenising the joined string for
    byte-level BPE and WordPiece, since every piece starts at a whitespace boundary), which pins the
    ``n`` placeholders to positions ``1 … n`` and lets only the example text be truncated. Texts are
    tokenised with special-token strings split, so a literal ``<mask>`` in a review stays text.

    Args:
      n_prompt: number of soft-prompt placeholder tokens (50 in BBT/FedBPT).
      max_length: the longest sequence length ``T``; ``T`` is the longest example present rounded up to
        ``pad_multiple``, capped at the context and at ``max_length``. Longer texts are truncated (the
        longer text of a pair first); BBT drops inputs over 512 tokens instead.
      pad_to_max_length: ``T = max_length`` exactly (a fixed static shape).
      max_positions: the model's context; the smaller of it and ``tokenizer.model_max_length`` is used.

    Returns:
      A right-padded :class:`TokenBatch` of numpy arrays; ``answer_pos`` is the ``<mask>`` index.

    Raises:
      ValueError: the template alone (specials, placeholders, words, mask) does not fit the context or
        ``max_length``.
    """
    task = tasks_lib.get(task)
    check_examples(task, examples)
    if tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token; encoder templates need <mask>")
    mask_id = int(tokenizer.mask_token_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pre, post = special_frame(tokenizer)
    ph = placeholder_ids(tokenizer, n_prompt, mode=placeholder).tolist()
    pieces = templates.parse_encoder_template(task.encoder_template)
    lit_ids = {
        p.value: list(tokenizer(p.value, add_special_tokens=False)["input_ids"]) for p in pieces if p.kind == "literal"
    }
    fixed = (
        len(pre)
        + len(post)
        + sum(
            len(ph) if p.kind == "prompt" else 1 if p.kind == "mask" else len(lit_ids[p.value])
            for p in pieces
            if not p.kind.startswith("text")
        )
    )
    limit = context_limit(tokenizer, max_positions, use_min=True)
    if limit is not None and fixed > limit:
        raise ValueError(
            f"task {task.name}: the encoder template alone is {fixed} tokens ({n_prompt} "
            f"placeholders + {fixed - n_prompt} template/special tokens), more than the "
            f"model's context of {limit}"
        )
    if max_length is not None and fixed > max_length:
        raise ValueError(
            f"task {task.name}: the encoder template alone is {fixed} tokens, more than max_length={max_length}"
        )
    by_field = texts_by_field(task, examples)
    seps = {p.kind: p.value for p in pieces if p.kind.startswith("text")}
    enc = {
        f: encode_batch(tokenizer, [seps[f] + t for t in ts], split_special=True)["input_ids"]
        for f, ts in by_field.items()
    }
    n = len(examples)
    fields = list(by_field)
    lens = np.array([[len(enc[f][i]) for f in fields] for i in range(n)], dtype=np.int64).reshape(n, len(fields))
    longest = int(fixed + lens.sum(1).max()) if n else fixed
    if max_length is None:
        T = round_up(longest, pad_multiple)
        if limit is not None:
            T = min(T, limit)
    else:
        T = int(max_length)
        if not pad_to_max_length:
            T = min(T, round_up(longest, pad_multiple))
    budget = T - fixed
    ids = np.full((n, T), pad_id, np.int32)
    att = np.zeros((n, T), np.int32)
    ans = np.zeros(n, np.int32)
    for i in range(n):
        keep = _longest_first(lens[i], budget)
        row = list(pre)
        for p in pieces:
            if p.kind == "prompt":
                row += ph
            elif p.kind == "mask":
                ans[i] = len(row)
                row.append(mask_id)
            elif p.kind == "literal":
                row += lit_ids[p.value]
            else:
                row += enc[p.kind][i][: keep[fields.index(p.kind)]]
        row += post
        ids[i, : len(row)] = row
        att[i, : len(row)] = 1
    return TokenBatch(
        input_ids=ids,
        attention_mask=att,
        answer_pos=ans,
        labels=np.asarray(examples.labels, np.int32),
        example_mask=np.ones(n, np.float32),
    )
