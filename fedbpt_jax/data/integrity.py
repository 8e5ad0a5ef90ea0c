"""Keeping a task's splits honest: one copy of each text in the training pool, no test text in it.

Few-shot train and dev sets are drawn from the pool (:mod:`fedbpt_jax.data.sampling`), so a text that occurs
twice in the pool can land in train twice, or in train and dev at once (contaminating dev selection), and a
test text that is also a pool text can be trained on. :func:`clean_pool` removes both before any draw:

* a text that occurs more than once in the pool keeps its first occurrence when every copy has the same label,
  and is dropped altogether when the copies disagree (no label to trust);
* a pool text that is also a test text is dropped from the pool (the test split is the benchmark's and stays
  as it is; duplicates within it are counted, not removed).

Texts are compared exactly (for pair tasks, both fields). What was removed is counted in a
:class:`PoolReport` and warned about (:class:`DataOverlapWarning`) when anything was.
"""

from __future__ import annotations

import collections
import warnings
from typing import NamedTuple

import numpy as np

from .examples import Examples


class DataOverlapWarning(UserWarning):
    """A data source overlaps itself (duplicate texts in the pool or the test split, test texts in the pool)."""


class PoolReport(NamedTuple):
    """What :func:`clean_pool` found (counts of examples)."""

    pool_before: int
    duplicates_dropped: int  # extra copies of a text with one label
    conflicting_dropped: int  # every copy of a text whose copies disagree on the label
    test_overlap_dropped: int  # pool examples whose text is also a test text
    test_duplicates: int  # extra copies of a text within the test split (kept)

    @property
    def pool_after(self) -> int:
        return self.pool_before - self.duplicates_dropped - self.conflicting_dropped - self.test_overlap_dropped

    def describe(self) -> str:
        return (
            f"pool {self.pool_before} -> {self.pool_after} examples: {self.duplicates_dropped} duplicate copies, "
            f"{self.conflicting_dropped} copies of texts with conflicting labels and {self.test_overlap_dropped} "
            f"test texts removed; {self.test_duplicates} duplicate copies within the test split (kept)"
        )


def _keys(examples: Examples) -> list:
    return [t if isinstance(t, str) else tuple(t) for t in examples.texts]


def clean_pool(pool: Examples, test: Examples, origin: str = "data source") -> tuple[Examples, PoolReport]:
    """The pool without duplicate texts and without test texts, and the counts of what went (warned when any)."""
    keys = _keys(pool)
    labels = np.asarray(pool.labels)
    by_text: dict = collections.defaultdict(list)
    for i, k in enumerate(keys):
        by_text[k].append(i)
    test_keys = _keys(test)
    in_test = set(test_keys)
    keep = np.zeros(len(keys), bool)
    dup = conflict = overlap = 0
    for k, rows in by_text.items():
        if k in in_test:
            overlap += len(rows)
            continue
        if len({int(labels[i]) for i in rows}) > 1:
            conflict += len(rows)
            continue
        keep[rows[0]] = True
        dup += len(rows) - 1
    test_dup = len(test_keys) - len(in_test)
    report = PoolReport(len(keys), dup, conflict, overlap, test_dup)
    if dup or conflict or overlap or test_dup:
        warnings.warn(f"{origin}: {report.describe()}", DataOverlapWarning, stacklevel=2)
    if keep.all():
        return pool, report
    return pool.take(np.flatnonzero(keep)), report
