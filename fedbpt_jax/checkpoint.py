"""Persistence: orbax checkpoints of a whole simulation and atomic result files.

* :class:`Checkpointer` wraps an ``orbax.checkpoint.CheckpointManager``: each save is one step
  directory holding the simulation carry (server state, best-so-far, the run key) as a
  ``StandardSave`` pytree and a JSON item with the metrics history and a configuration fingerprint.
  orbax writes to a temporary directory and renames it when complete, so a run killed mid-save keeps
  its previous checkpoint. Restoring checks the fingerprint: a checkpoint from another configuration
  is a clear error, never a silent mix. A checkpoint written before a field of the carry was renamed
  (:data:`RENAMED_FIELDS`) restores under the new name.
* :func:`write_json_atomic` / :func:`write_csv_atomic` write to a temporary file in the same folder and
  ``os.replace`` it, so results on disk are always complete.
* One encoding of the floats JSON cannot hold, for results and checkpoint metadata alike: NaN and ±inf
  are the strings ``"nan"``, ``"inf"``, ``"-inf"`` (:func:`to_json`, :func:`from_json`, :func:`read_json`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

#: How JSON files of this package write the floats JSON cannot hold (strict JSON, no NaN/Infinity tokens).
NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def to_json(x):
    """``x`` as JSON-able builtins: dicts, lists, ints, floats, strings; numpy and jax arrays and scalars
    become lists and numbers. NaN and ±inf become the strings ``"nan"``, ``"inf"`` and ``"-inf"``, so that
    nothing is lost (:func:`from_json` turns them back into floats)."""
    if isinstance(x, dict):
        return {str(k): to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return to_json(np.asarray(x).tolist())
    if isinstance(x, np.floating):
        x = float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)  # "nan", "inf", "-inf"
    return x


def from_json(x):
    """The inverse of :func:`to_json` for non-finite floats: the strings ``"nan"``, ``"inf"``, ``"-inf"``
    become floats again, anywhere in ``x``.

    Files written before this encoding stored NaN as ``null`` and ±inf as ±1e308; those values are read
    as they are (``None`` and ±1e308), as they always were.
    """
    if isinstance(x, dict):
        return {k: from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [from_json(v) for v in x]
    if isinstance(x, str) and x in NONFINITE:
        return NONFINITE[x]
    return x


def read_json(path) -> Any:
    """Reads a JSON file written by :func:`write_json_atomic` (non-finite floats decoded)."""
    return from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def write_text_atomic(path: Path, text: str) -> Path:
    """Writes ``text`` to ``path`` atomically (a temporary file in the same folder, then a rename): a reader sees
    the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; results files get the permissions any new file gets (umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path, obj: Any) -> Path:
    """Writes ``obj`` (numpy/jax arrays allowed) as strict JSON, non-finite floats as ``"nan"``, ``"inf"``,
    ``"-inf"`` (:func:`to_json`; read back with :func:`read_json`); the file is replaced atomically."""
    return write_text_atomic(Path(path), json.dumps(to_json(obj), indent=2, allow_nan=False) + "\n")


def write_csv_atomic(path, rows: list[dict]) -> Path:
    """Writes a list of flat dicts as CSV (columns = union of keys, in first-seen order), atomically.

    A key a row lacks is an empty cell; NaN and ±inf are written ``nan``, ``inf``, ``-inf``."""
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: to_json(v) for k, v in r.items()})
    return write_text_atomic(Path(path), buf.getvalue())


def fingerprint(*parts: Any) -> str:
    """A short stable hash of configuration objects (their ``repr``)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
    return h.hexdigest()[:16]


#: Fields of the saved carry renamed since checkpoints were first written, earlier name -> current name:
#: the server CMA-ES state's σ and p_σ (``aggregation.ServerCMAState``) took the client state's (evosax's)
#: names. A checkpoint that stores a field under its earlier name restores into the current one.
RENAMED_FIELDS = {"sigma": "std", "p_sigma": "p_std"}


def _path_key(entry) -> str | int:
    """A key-path entry's name or index (``DictKey``, ``GetAttrKey``, ``SequenceKey``)."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    raise TypeError(f"unsupported pytree key {entry!r}")


def _stored_paths(stored: Any, template: Any, renamed: dict[str, str]) -> list[tuple] | None:
    """Each leaf's path in the stored tree ``stored`` (orbax's metadata: nested dicts and lists) where a
    field of ``template`` is found under its earlier name (``renamed``: earlier -> current); None when
    no earlier name is used or the trees do not correspond leaf for leaf."""
    earlier = {new: old for old, new in renamed.items()}
    paths, used = [], False
    for path, _ in jax.tree_util.tree_flatten_with_path(template)[0]:
        node, stored_path = stored, []
        for entry in path:
            key = _path_key(entry)
            if isinstance(node, dict) and key not in node and earlier.get(key) in node:
                key, used = earlier[key], True
            try:
                node = node[key]
            except (KeyError, IndexError, TypeError):
                return None
            if node is None:
                return None
            stored_path.append(key)
        paths.append(tuple(stored_path))
    n_stored = sum(1 for _ in _stored_leaves(stored))
    if not used or n_stored != len(paths) or len(set(paths)) != len(paths):
        return None
    return paths


def _stored_leaves(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _stored_leaves(v)
    elif isinstance(node, list):
        for v in node:
            yield from _stored_leaves(v)
    elif node is not None:
        yield node


def _copy_nodes(node):
    if isinstance(node, dict):
        return {k: _copy_nodes(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_copy_nodes(v) for v in node]
    return node


def _at(tree, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


class CheckpointMismatch(ValueError):
    """A checkpoint was written by a run with another configuration."""


class CheckpointCorrupt(ValueError):
    """No step of a checkpoint folder could be read."""


class Checkpointer:
    """Saves and restores a simulation's carry and history with orbax.

    Args:
      directory: where step directories go.
      fingerprint: a string identifying the configuration (see :func:`fingerprint`).
      max_to_keep: checkpoints kept (older ones are deleted).
    """

    def __init__(self, directory, fingerprint: str, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).absolute()
        self.fingerprint = fingerprint
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
            ),
            item_names=("carry", "meta"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, carry: Any, meta: dict) -> None:
        from .interrupts import deferred

        ocp = self._ocp
        meta = dict(meta, fingerprint=self.fingerprint)
        with deferred():  # never leave a half-written step (an orphan *.orbax-checkpoint-tmp) on Ctrl-C / SIGTERM
            self.manager.save(
                step,
                args=ocp.args.Composite(carry=ocp.args.StandardSave(carry), meta=ocp.args.JsonSave(to_json(meta))),
            )
            self.manager.wait_until_finished()

    def restore(self, template: Any, step: int | None = None) -> tuple[int, Any, dict]:
        """Restores ``(step, carry, meta)``; ``template`` gives the carry's structure/dtypes.

        Without ``step``: the latest readable step. A step that cannot be read (truncated or corrupt files)
        is reported with a warning, deleted, and the previous intact step is restored instead; when no
        step is readable the error names the folder, the step and what went wrong.
        """
        if step is not None:
            return self._restore_step(template, step)
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        failures = []
        for s in steps:
            try:
                return self._restore_step(template, s)
            except CheckpointMismatch:
                raise
            except Exception as err:  # noqa: BLE001  (any unreadable step: fall back to the previous one)
                failures.append(f"step {s}: {' '.join(str(err).split())[:200] or type(err).__name__}")
                import warnings

                warnings.warn(
                    f"checkpoint {self.directory}/{s} is unreadable ({failures[-1]}); trying the previous step",
                    RuntimeWarning,
                    stacklevel=2,
                )
                try:
                    self.manager.delete(s)
                except Exception:  # noqa: BLE001, S110  (a step we cannot delete is skipped anyway)
                    pass
        raise CheckpointCorrupt(
            f"no readable checkpoint in {self.directory} ({'; '.join(failures)}); delete "
            "that folder to start the run over, or point --checkpoint-dir elsewhere"
        )

    def _restore_step(self, template: Any, step: int) -> tuple[int, Any, dict]:
        ocp = self._ocp
        meta = self.restore_meta(step)
        if meta.get("fingerprint") != self.fingerprint:
            raise CheckpointMismatch(
                f"checkpoint {self.directory}/{step} was written by a run with configuration "
                f"{meta.get('fingerprint')!r}, this run's is {self.fingerprint!r}; resume with the same "
                "configuration or use a new checkpoint directory"
            )
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        try:
            carry = self.manager.restore(step, args=ocp.args.Composite(carry=ocp.args.StandardRestore(abstract)))
        except ValueError as err:
            carry = self._restore_renamed(step, abstract)
            if carry is None:
                raise err from None
            return step, carry, meta
        return step, carry["carry"], meta

    def _restore_renamed(self, step: int, abstract: Any) -> Any | None:
        """The carry of a step that stores fields under their earlier names (:data:`RENAMED_FIELDS`), in
        ``abstract``'s structure and names; None when that is not what differs."""
        stored = self.manager.item_metadata(step)["carry"]
        stored = getattr(stored, "tree", stored)
        paths = _stored_paths(stored, abstract, RENAMED_FIELDS)
        if paths is None:
            return None
        target = _copy_nodes(stored)  # the stored structure and names, each leaf the template's shape/dtype
        leaves, treedef = jax.tree_util.tree_flatten(abstract)
        for path, leaf in zip(paths, leaves):
            _at(target, path[:-1])[path[-1]] = leaf
        raw = self.manager.restore(step, args=self._ocp.args.Composite(carry=self._ocp.args.StandardRestore(target)))
        return jax.tree_util.tree_unflatten(treedef, [_at(raw["carry"], path) for path in paths])

    def restore_meta(self, step: int | None = None) -> dict:
        """The JSON item of checkpoint ``step`` (default: the latest), whatever its fingerprint."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return from_json(
            self.manager.restore(step, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore()))["meta"]
        )

    def close(self) -> None:
        self.manager.close()
