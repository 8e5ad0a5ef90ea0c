"""Federated arrays: each client's examples gathered and padded to ``[N, E, T]``, and the one call
from a task name to everything a simulation reads (:func:`federated`)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import tasks as tasks_lib
from ..models.kinds import get as get_kind
from ..tasks import Task
from ..types import ScoringSpec, TokenBatch
from .examples import Examples
from .integrity import clean_pool
from .partitions import ClientIndices, Partition, partition_dirichlet, partition_iid
from .sampling import few_shot
from .sources import pool_and_test
from .tokenization import scoring_spec, tokenize


def federated_batches(batch: TokenBatch, parts, pad_to: int | None = None) -> tuple[TokenBatch, np.ndarray]:
    """Gathers each client's examples into ``[N, E, T]`` arrays (``E`` = the largest client or
    ``pad_to``); missing rows have ``example_mask`` 0.

    A padding row is a copy of one of the client's own examples (not all-pad tokens, whose fully masked
    attention rows would give NaNs), with ``example_mask`` 0 so that it never counts.

    Args:
      batch: a :class:`TokenBatch` with one example axis ``[B, T]``.
      parts: a :class:`Partition`, or a sequence of per-client index arrays.

    Returns:
      ``(TokenBatch [N, E, T] of numpy arrays, counts [N])``.
    """
    if isinstance(parts, Partition):
        parts = parts.parts
    if isinstance(parts, ClientIndices):
        order, counts = parts.order, parts.counts
    else:
        parts = [np.asarray(p, np.int64).reshape(-1) for p in parts]
        counts = np.asarray([len(p) for p in parts], np.int64)
        order = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    B = np.shape(batch.labels)[-1]
    if order.size and (order.min() < 0 or order.max() >= B):
        raise ValueError(f"partition indices must lie in [0, {B}) (the batch has {B} examples)")
    E = int(counts.max()) if counts.size else 0
    if pad_to is not None:
        if pad_to < E:
            raise ValueError(f"pad_to={pad_to} is smaller than the largest client ({E} examples)")
        E = int(pad_to)
    E = max(E, 1)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    slot = np.arange(E)[None, :]
    valid = slot < counts[:, None]
    first = np.where(counts > 0, order[np.minimum(offsets, max(len(order) - 1, 0))] if order.size else 0, 0)
    flat = np.where(valid, offsets[:, None] + np.minimum(slot, np.maximum(counts[:, None] - 1, 0)), 0)
    gather = np.where(valid, order[np.minimum(flat, max(len(order) - 1, 0))] if order.size else 0, first[:, None])
    ids = np.asarray(batch.input_ids)
    out = TokenBatch(
        input_ids=ids[gather],
        attention_mask=np.asarray(batch.attention_mask)[gather],
        answer_pos=np.asarray(batch.answer_pos)[gather],
        labels=np.asarray(batch.labels)[gather],
        example_mask=(np.asarray(batch.example_mask)[gather] * valid).astype(np.float32),
    )
    return out, counts


class FederatedSplits(NamedTuple):
    """Everything a simulation reads, on the host (numpy): per-client train arrays, a dev and a test set, the
    spec and the partition. :meth:`fedbpt_jax.FederatedData.from_host` turns it into the device arrays the
    rounds take (``fedbpt_jax.FederatedData``: train, counts, spec); two names for two types."""

    train: TokenBatch  # [N, E, T]
    train_counts: np.ndarray  # [N]
    dev: TokenBatch  # [B_dev, T]
    test: TokenBatch  # [B_test, T']
    spec: ScoringSpec
    partition: Partition


def federated(
    task: Task | str,
    tokenizer,
    kind: str,
    *,
    num_clients: int,
    shots_per_class: int,
    alpha: float | None = None,
    seed: int = 0,
    n_prompt: int = 50,
    source=None,
    style: str | None = None,
    max_length: int | None = None,
    max_positions: int | None = None,
    test_size: int | None = None,
    first_token: bool = False,
    prior: str = "class",
    min_size: int = 1,
    pad_to: int | None = None,
    pad_to_max_length: bool = False,
    dev_shots_per_class: int | None = None,
    clean: bool = True,
) -> FederatedSplits:
    """Task → BBT few-shot train/dev → tokenised → partitioned over clients (IID, or Dirichlet(α)).

    ``dev_shots_per_class``: dev examples per class, drawn from the training pool after the train shots
    and disjoint from them (default: as many as ``shots_per_class``, BBT's convention); the test split
    is never used for it. ``seed`` drives the few-shot draw and the partition; ``test_size`` keeps a fixed random subset of
    the test split (the same for every seed). Train and dev share one static length ``T``. A single
    data file is split into a training pool and a disjoint test set (:func:`pool_and_test`). ``clean``
    (default): the pool loses duplicate texts and test texts before the draw
    (:func:`~fedbpt_jax.data.integrity.clean_pool`), so train, dev and test are disjoint by text; False
    reproduces draws made before that rule (a pool with duplicates gives other draws).

    Raises:
      ValueError: ``test_size`` below 1 or above the test split's size (names both).

    Example:
      >>> data = federated("sst2", tok, "encoder", num_clients=10, shots_per_class=40, alpha=1.0)
      >>> data.train.input_ids.shape   # [10, E, T]
    """
    task = tasks_lib.get(task)
    # The pool/test split (embedded data) and the test subsample do not depend on ``seed``: runs with
    # different seeds are evaluated on the same examples.
    # A single file is split into a pool and a disjoint test set (never both roles at once).
    pool, test = pool_and_test(task, source)
    if clean:
        pool, _ = clean_pool(pool, test, origin=f"task {task.name} ({'default source' if source is None else source})")
    if test_size is not None:
        if not 1 <= int(test_size) <= len(test):
            raise ValueError(
                f"test_size {test_size} for task {task.name}: its test split has {len(test)} examples; accepted: "
                f"1..{len(test)}, or none for the whole split"
            )
        if test_size < len(test):
            test = test.take(np.sort(np.random.default_rng(0).permutation(len(test))[:test_size]))
    train, dev = few_shot(pool, shots_per_class, seed, dev_shots_per_class=dev_shots_per_class)
    kw = dict(
        n_prompt=n_prompt, max_length=max_length, max_positions=max_positions, pad_to_max_length=pad_to_max_length
    )
    if get_kind(kind).causal:  # templates with styles
        kw["style"] = style
    both = tokenize(
        task,
        Examples(task.name, train.texts + dev.texts, np.concatenate([train.labels, dev.labels])),
        tokenizer,
        kind,
        **kw,
    )
    tr_batch = both.take(np.arange(len(train)))
    dv_batch = both.take(np.arange(len(train), len(train) + len(dev)))
    te_batch = tokenize(task, test, tokenizer, kind, **kw)
    if alpha is None:
        part = partition_iid(train.labels, num_clients, seed)
    else:
        part = partition_dirichlet(
            train.labels, num_clients, alpha, seed, min_size, prior=prior, num_labels=task.num_labels
        )
    fed, counts = federated_batches(tr_batch, part, pad_to)
    spec = scoring_spec(task, tokenizer, kind, n_prompt=n_prompt, style=style, first_token=first_token)
    if "prompt" in get_kind(kind).caches():  # what the prompt cache packs the clients' texts into (real tokens)
        from ..models.decoder_cache import packing_for

        fed = fed.replace(packing=packing_for(fed.attention_mask, fed.example_mask, cue_len=len(spec.cue_ids)))
    return FederatedSplits(fed, counts, dv_batch, te_batch, spec, part)
