"""Tokenizer helpers shared by the encoder and the decoder input builders."""

from __future__ import annotations

import numpy as np

from .. import tasks as tasks_lib
from ..tasks import Task
from .examples import Examples


def encode_batch(tokenizer, texts: list[str], *, split_special: bool = False, offsets: bool = False):
    if not texts:
        return {"input_ids": [], "offset_mapping": []}
    kw = {"add_special_tokens": False}
    if split_special:
        kw["split_special_tokens"] = True
    if offsets:
        kw["return_offsets_mapping"] = True
    return tokenizer(texts, **kw)


def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """Ids the tokenizer adds before and after a single sequence (``<s>``…``</s>`` for RoBERTa)."""
    probe = "hello"
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i], full[i + len(bare) :]
    return [], []


def context_limit(tokenizer, max_positions: int | None, *, use_min: bool = False) -> int | None:
    """The context: ``max_positions``, else the tokenizer's ``model_max_length`` (if set); with
    ``use_min`` the smaller of both (RoBERTa's config says 514 positions, its tokenizer 512 tokens)."""
    m = getattr(tokenizer, "model_max_length", None)
    m = int(m) if m is not None and m < 1_000_000 else None
    if max_positions is None:
        return m
    return min(int(max_positions), m) if use_min and m is not None else int(max_positions)


def round_up(x: int, multiple: int) -> int:
    return x if multiple <= 1 else -(-x // multiple) * multiple


def placeholder_ids(tokenizer, n_prompt: int, *, mode: str = "auto", start: int = 1000) -> np.ndarray:
    """BBT's soft-prompt placeholder: ``decode(ids start … start+n−1)`` re-tokenised.

    ``mode="auto"`` uses the re-tokenised ids when they are exactly ``n_prompt`` tokens and otherwise
    the ids ``start …`` themselves (so the placeholders always fill positions ``1 … n``, where "add"
    mode adds the prompt); ``"retokenize"`` insists on the former, ``"ids"`` always takes the latter.
    """
    if n_prompt < 0:
        raise ValueError(f"n_prompt must be >= 0, got {n_prompt}")
    if n_prompt == 0:
        return np.zeros(0, np.int32)
    if len(tokenizer) < start + n_prompt:
        raise ValueError(
            f"the vocabulary has {len(tokenizer)} ids; BBT's placeholders need ids {start}..{start + n_prompt - 1}"
        )
    raw = list(range(start, start + n_prompt))
    if mode == "ids":
        return np.asarray(raw, np.int32)
    re_ids = list(tokenizer(tokenizer.decode(raw), add_special_tokens=False)["input_ids"])
    if len(re_ids) == n_prompt:
        return np.asarray(re_ids, np.int32)
    if mode == "retokenize":
        raise ValueError(
            f"decode/re-encode of ids {start}..{start + n_prompt - 1} gives {len(re_ids)} "
            f"tokens, not {n_prompt}; use mode='auto' or 'ids'"
        )
    if mode != "auto":
        raise ValueError(f"unknown placeholder mode {mode!r}; use 'auto', 'retokenize' or 'ids'")
    return np.asarray(raw, np.int32)


def texts_by_field(task: Task, examples: Examples) -> dict[str, list[str]]:
    if task.is_pair:
        return {
            "text_a": [task.preprocess(t[0]) for t in examples.texts],
            "text_b": [task.preprocess(t[1]) for t in examples.texts],
        }
    return {"text": [task.preprocess(t if isinstance(t, str) else " ".join(t)) for t in examples.texts]}


def check_examples(task: Task, examples: Examples) -> None:
    if examples.task != task.name and tasks_lib.get(examples.task).num_labels != task.num_labels:
        raise ValueError(f"examples of task {examples.task} cannot be tokenised for task {task.name}")
    if task.is_pair and examples.texts and isinstance(examples.texts[0], str):
        raise ValueError(f"task {task.name} needs (text_a, text_b) pairs")
