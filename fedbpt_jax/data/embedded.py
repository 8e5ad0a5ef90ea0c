"""The embedded default data set: Rotten Tomatoes review snippets, split by movie.

The snippets come from ``assets.fetch("rotten-tomatoes-csv")`` (columns ``category, text, movie_name``):
"plot" rows (synopses) are dropped, "fresh" is 1 (positive) and "rotten" 0; an exact duplicate snippet
is kept once. The train/test split is **group-aware and stratified**: the movies are put in a seeded
random order, and each movie (with all its snippets) goes to test if that keeps the test counts of both
classes at or below ``test_fraction`` of the class totals, otherwise to train. So no movie has snippets
on both sides, class balance is kept to a fraction of a percent, the test size is ``test_fraction`` of
the data to within a few snippets, and a seed fixes the split (default ``seed=0``,
``test_fraction=0.2``).
"""

from __future__ import annotations

import bz2
import csv
import functools
from pathlib import Path

import numpy as np

from .. import tasks as tasks_lib
from ..tasks import Task
from .examples import Examples


def _read_rotten_tomatoes(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """All fresh/rotten snippets: texts, labels (1 fresh), movie ids, movie names."""
    texts, labels, movies = [], [], []
    seen = set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"category", "text", "movie_name"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: columns {reader.fieldnames}; needed category, text, movie_name")
        for row in reader:
            cat = row["category"].strip().lower()
            if cat not in ("fresh", "rotten"):
                continue  # "plot": synopses, not reviews
            text = " ".join(row["text"].split())
            if not text or text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(1 if cat == "fresh" else 0)
            movies.append(row["movie_name"])
    names = sorted(set(movies))
    index = {m: i for i, m in enumerate(names)}
    return texts, np.asarray(labels, np.int32), np.asarray([index[m] for m in movies], np.int64), names


@functools.lru_cache(maxsize=2)
def rotten_tomatoes_table(path: str):
    return _read_rotten_tomatoes(Path(path))


def group_stratified_split(
    labels: np.ndarray, groups: np.ndarray, test_fraction: float, seed: int, num_labels: int | None = None
) -> np.ndarray:
    """Boolean ``[n]`` test mask: whole groups on one side, class counts near ``test_fraction``.

    Groups are visited in a seeded random order; a group goes to test iff adding it keeps every class's
    test count at or below ``round(test_fraction * class total)``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    c = int(num_labels or labels.max() + 1)
    uniq, gidx = np.unique(groups, return_inverse=True)
    per_group = np.zeros((len(uniq), c), np.int64)
    np.add.at(per_group, (gidx, labels), 1)
    target = np.round(test_fraction * per_group.sum(0)).astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(uniq))
    taken = np.zeros(c, np.int64)
    in_test = np.zeros(len(uniq), bool)
    for g in order:
        if np.all(taken + per_group[g] <= target):
            taken += per_group[g]
            in_test[g] = True
    return in_test[gidx]


def load_rotten_tomatoes(
    split: str = "train", *, seed: int = 0, test_fraction: float = 0.2, task: Task | str = "rotten_tomatoes"
) -> Examples:
    """The embedded Rotten Tomatoes snippets (fresh = positive), split by movie (see module docstring)."""
    from .. import assets

    task = tasks_lib.get(task)
    if task.num_labels != 2:
        raise ValueError(f"the embedded Rotten Tomatoes data is binary; task {task.name} has {task.num_labels} classes")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' for the embedded data, got {split!r}")
    texts, labels, movies, _ = rotten_tomatoes_table(str(assets.fetch("rotten-tomatoes-csv")))
    test = group_stratified_split(labels, movies, test_fraction, seed, 2)
    idx = np.flatnonzero(test if split == "test" else ~test)
    return Examples(task.name, tuple(texts[i] for i in idx), labels[idx], movies[idx])
