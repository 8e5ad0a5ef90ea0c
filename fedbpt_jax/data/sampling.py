"""BBT's true few-shot sampling: ``k`` train and ``k_dev`` dev examples per class from a pool
(docs/algorithm.md, "Data")."""

from __future__ import annotations

import numpy as np

from .. import tasks as tasks_lib
from .examples import Examples


def few_shot_indices(
    labels: np.ndarray,
    shots_per_class: int,
    seed: int,
    *,
    num_labels: int | None = None,
    dev_shots_per_class: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """BBT's true few-shot split: ``(train_idx, dev_idx)``.

    The pool is shuffled with ``np.random.default_rng(seed)``; walking through it in that order, the
    first ``k`` examples of each class go to train and the next ``k_dev`` (default ``k``) to dev, so
    train has ``k·C`` and dev ``k_dev·C`` examples, in shuffled order. ``k < 0``: a seeded 90/10 random
    split of the whole pool instead (BBT's convention).

    Raises:
      ValueError: a class has fewer than ``k + k_dev`` examples (names the class and the counts).
    """
    labels = np.asarray(labels).astype(np.int64)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    if shots_per_class < 0:
        cut = int(round(0.9 * len(labels)))
        return perm[:cut], perm[cut:]
    k = int(shots_per_class)
    kd = k if dev_shots_per_class is None else int(dev_shots_per_class)
    c = int(num_labels if num_labels is not None else (labels.max() + 1 if len(labels) else 0))
    counts = np.bincount(labels, minlength=c)
    short = [(i, int(n)) for i, n in enumerate(counts) if n < k + kd]
    if short:
        least = int(counts.min()) if c else 0
        fits = (
            f"at most {least // 2} train + {least // 2} dev shots per class fit"
            if dev_shots_per_class is None
            else f"with {k} train shots at most {max(least - k, 0)} dev shots per class fit"
        )
        raise ValueError(
            "not enough examples for "
            + f"{k} train + {kd} dev shots per class: "
            + ", ".join(f"class {i} has {n}" for i, n in short)
            + f" (class counts {counts.tolist()}; {fits})"
        )
    shuffled = labels[perm]
    # rank of each shuffled example within its class (a vectorised "cumcount")
    order = np.argsort(shuffled, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(labels), np.int64)
    rank[order] = np.arange(len(labels)) - starts[shuffled[order]]
    return perm[rank < k], perm[(rank >= k) & (rank < k + kd)]


def few_shot(
    examples: Examples, shots_per_class: int, seed: int, *, dev_shots_per_class: int | None = None
) -> tuple[Examples, Examples]:
    """:func:`few_shot_indices` applied to :class:`Examples`: ``(train, dev)``.

    Example:
      >>> train, dev = few_shot(load_task_data("sst2"), 16, seed=42)
      >>> len(train), len(dev)
      (32, 32)
    """
    task = tasks_lib.get(examples.task)
    try:
        tr, dv = few_shot_indices(
            examples.labels, shots_per_class, seed, num_labels=task.num_labels, dev_shots_per_class=dev_shots_per_class
        )
    except ValueError as err:
        names = ", ".join(f"{i}={n}" for i, n in enumerate(task.label_names))
        raise ValueError(f"task {task.name} ({names}): {err}") from None
    return examples.take(tr), examples.take(dv)
