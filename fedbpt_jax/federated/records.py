"""A run's output folder as one consistent record: who owns it, what describes it, whether it is complete.

* :func:`claim` takes a results (or uploads) folder for one run: a second run started on the same folder
  while the first holds it is refused with an error naming the folder and the owner, instead of both writing
  and leaving one run's ``config.json`` beside the other's ``metrics.json``.
* :func:`completeness` is what ``metrics.json`` says about the run's extent: the rounds it was asked for, the
  last round it reached and whether it finished, so that a report never shows an interrupted run's last round
  as its final one.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

#: The lock file a run holds in each folder it writes.
LOCK_NAME = ".fedbpt-run.lock"


class FolderInUse(RuntimeError):
    """Another run holds the folder."""


@contextlib.contextmanager
def claim(folder, what: str = "results folder"):
    """Holds ``folder`` (created if needed) for the duration of the ``with`` block.

    The hold is an exclusive ``flock`` on ``folder/.fedbpt-run.lock``: it ends with the process, so a run that
    was killed leaves no stale claim. None is a no-op (nothing to claim).

    Raises:
      FolderInUse: another process holds the folder (the message names it and the holder's pid and start).
    """
    if folder is None:
        yield None
        return
    import fcntl

    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    path = d / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            raise FolderInUse(
                f"{what} {str(d)!r} is in use by another run ({holder}); wait for it to finish or choose another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())
        try:
            yield d
        finally:  # the file stays (unlinking it would let a waiting opener lock a file no one else sees)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "its owner did not say who it is"
    return f"pid {info.get('pid')}, started {info.get('started')}"


def completeness(planned_rounds: int | None, evals: list[dict], stopped_early: int | None = None) -> dict:
    """``metrics.json``'s record of the run's extent.

    ``planned_rounds``: the rounds the run was asked for (None: not known); ``evals``: the evaluation rows
    (their last ``round`` is the last round reached); ``stopped_early``: the round a callback stopped it at.
    ``complete`` is True only when the last round reached is the planned one.
    """
    reached = int(evals[-1]["round"]) if evals else 0
    out = {"planned_rounds": planned_rounds, "rounds_reached": reached}
    out["complete"] = None if planned_rounds is None else bool(reached >= planned_rounds)
    if stopped_early is not None:
        out["complete"] = False if planned_rounds is None or reached < planned_rounds else out["complete"]
    return out
