"""Labelled examples of one task: :class:`Example` rows and the column-wise :class:`Examples`."""

from __future__ import annotations

import dataclasses
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from .. import tasks as tasks_lib
from ..tasks import Task


class Example(NamedTuple):
    """One labelled example: ``text`` is a string, or ``(text_a, text_b)`` for sentence-pair tasks."""

    text: str | tuple[str, str]
    label: int


@dataclasses.dataclass(frozen=True, eq=False)
class Examples(Sequence[Example]):
    """A column-wise list of :class:`Example` rows of one task.

    Attributes:
      task: task name.
      texts: one string (or ``(text_a, text_b)`` pair) per example.
      labels: ``[n]`` int32 class indices.
      groups: optional ``[n]`` int group ids (the movie of each Rotten Tomatoes snippet).
    """

    task: str
    texts: tuple
    labels: np.ndarray
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            return Example(self.texts[idx], int(self.labels[idx]))
        idx = np.arange(len(self))[idx] if isinstance(idx, slice) else np.asarray(idx, dtype=np.int64)
        return self.take(idx)

    def __iter__(self) -> Iterator[Example]:
        for t, y in zip(self.texts, self.labels):
            yield Example(t, int(y))

    def take(self, idx) -> "Examples":
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        return Examples(
            self.task,
            tuple(self.texts[i] for i in idx),
            self.labels[idx],
            None if self.groups is None else self.groups[idx],
        )

    def class_counts(self, num_labels: int | None = None) -> np.ndarray:
        n = num_labels or tasks_lib.get(self.task).num_labels
        return np.bincount(self.labels, minlength=n)

    def __repr__(self) -> str:
        return f"Examples(task={self.task!r}, n={len(self)}, class_counts={self.class_counts().tolist()})"

    @staticmethod
    def from_rows(task: Task | str, rows) -> "Examples":
        """From ``(text, label)`` rows (pairs as ``((a, b), label)``); labels must already be ints."""
        task = tasks_lib.get(task)
        rows = list(rows)
        texts = tuple(r[0] if isinstance(r[0], str) else tuple(r[0]) for r in rows)
        labels = np.asarray([int(r[1]) for r in rows], dtype=np.int32)
        _check_label_range(task, labels, "rows")
        return Examples(task.name, texts, labels)


def _check_label_range(task: Task, labels: np.ndarray, origin: str) -> None:
    bad = np.unique(labels[(labels < 0) | (labels >= task.num_labels)])
    if bad.size:
        raise ValueError(
            f"{origin}: labels {bad.tolist()[:20]} are outside the label set of task "
            f"{task.name}: accepted are 0..{task.num_labels - 1} or the names "
            f"{list(task.label_names)}"
        )
