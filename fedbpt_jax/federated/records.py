"""A run's output folder as one consistent record: who owns it, what describes it, whether it is complete.

* :func:`claim` takes a results (or uploads) folder for one run: a second run started on the same folder
  while the first holds it is refused with an error naming the folder and the owner, instead of both writing
  and leaving one run's ``config.json`` beside the other's ``metrics.json``.
* :func:`completeness` is what ``metrics.json`` says about the run's extent: the rounds it was asked for, the
  last round it reached and whether it finished, so that a report never shows an interrupted run's last round
  as its final one.
* The rows and files of a run: :class:`History`, :func:`round_rows` (one row a round, with the accounting),
  :func:`summarize` (the figures a run reports), :func:`write_results` (``metrics.json`` and ``rounds.csv``),
  the uploads (:func:`save_upload`, :func:`load_uploads`) and ``metrics.png`` (:func:`plot_metrics`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from ..checkpoint import write_csv_atomic, write_json_atomic
from .core import (
    FederatedAlgorithm,
)
from .distributed import host
from .evaluation import RunCarry

#: The keys of a run's ``config.json`` that say with what code and where it ran: kept for each earlier segment
#: of a resumed run (:func:`resumed_record`). ``fedbpt-jax simulate`` writes the first three, grid runs the last.
PROVENANCE_KEYS = ("git_revision", "versions", "machine", "environment")

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


def resumed_record(earlier: dict | None, record: dict, from_round: int) -> dict:
    """``record`` (a run's ``config.json`` as this process writes it) for a run that resumed from a checkpoint
    after round ``from_round``: with ``earlier_segments``, one entry per stretch of the rounds it kept that an
    earlier process computed, ``{"from_round": a, "to_round": b}`` (rounds a+1 .. b) with that process's
    provenance (:data:`PROVENANCE_KEYS`) as ``earlier`` (the ``config.json`` the folder held) recorded it, so
    that a run carried across machines or commits says which rounds ran where. Without an earlier record the
    stretch has no provenance keys (unknown). Stretches at or beyond ``from_round`` (rounds that are computed
    again) are dropped; a fresh run (``from_round`` 0) is ``record`` unchanged."""
    if from_round <= 0:
        return record
    earlier = earlier if isinstance(earlier, dict) else {}
    stretches = [dict(s) for s in earlier.get("earlier_segments", []) if isinstance(s, dict)]
    start = stretches[-1]["to_round"] if stretches else 0
    stretches.append(
        {"from_round": start, "to_round": from_round, **{k: earlier[k] for k in PROVENANCE_KEYS if k in earlier}}
    )
    kept = [{**s, "to_round": min(s["to_round"], from_round)} for s in stretches if s["from_round"] < from_round]
    return {**record, "earlier_segments": kept}


def earlier_record(path) -> dict | None:
    """The ``config.json`` at ``path`` as a dict, or None where there is none or it cannot be read (then the
    earlier rounds' provenance is unknown, not an error: the checkpoint decides whether a run resumes)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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
    ``complete`` is True only when the last round reached is the planned one; with no planned rounds it is
    unknown (None), unless the run was stopped early (False). A run stopped at its last planned round is
    complete (the stop changed nothing).
    """
    reached = int(evals[-1]["round"]) if evals else 0
    if planned_rounds is None:
        complete = False if stopped_early is not None else None
    else:
        complete = reached >= planned_rounds
    return {"planned_rounds": planned_rounds, "rounds_reached": reached, "complete": complete}


@dataclasses.dataclass
class History:
    """Host-side record of a run: per-round metrics and the evaluations (round 0 = the initial state).

    Each round row holds scalar metrics (the ``rounds.csv`` columns) and, for algorithms with clients,
    ``"clients"``: one dict per sampled client (see
    :func:`fedbpt_jax.federated.diagnostics.client_diagnostics`). Each evaluation row holds the test
    metrics (``accuracy``, ``loss``, ``f1``, ``nonfinite_examples``, ``pred_dist``), the same with a
    ``dev_`` prefix when a dev set is given, and the global prompt's ``z_norm`` and
    ``prompt_norm_ratio``. Every key, with its meaning and units: ``docs/metrics.md``.

    ``stopped_early``: the round after which a callback stopped the run (None: it was not stopped; see
    :mod:`fedbpt_jax.callbacks`); written to ``metrics.json`` only when set.
    """

    rounds: list[dict] = dataclasses.field(default_factory=list)
    evals: list[dict] = dataclasses.field(default_factory=list)
    stopped_early: int | None = None

    def as_dict(self) -> dict:
        out = {"rounds": self.rounds, "evals": self.evals}
        if self.stopped_early is not None:
            out["stopped_early"] = self.stopped_early
        return out


def _row_value(v):
    v = np.asarray(v)
    if v.dtype == bool or np.issubdtype(v.dtype, np.integer):
        return int(v)
    return float(v)


def round_rows(metrics: dict, first_round: int, algo: FederatedAlgorithm, cost: dict, seconds: float) -> list[dict]:
    """The history rows of one segment's rounds from its stacked host metrics ``{name: [E, ...]}``
    (without ``"uploads"``): the algorithm's scalars, the accounting for the round's active clients
    (bytes, forward calls, prefix passes, FLOPs, from ``algo.cost`` and :func:`round_cost`), ``seconds``
    and, when logged, the per-client diagnostics."""
    metrics = dict(metrics)
    clients = metrics.pop("clients", None)
    comm = algo.cost.comm
    rows = []
    for i in range(len(next(iter(metrics.values())))):
        row = {"round": first_round + i, **{k: _row_value(v[i]) for k, v in metrics.items()}}
        active = 1 if algo.cost.pooled and row.get("active_clients", 0) > 0 else row.get("active_clients", 0)
        row.update(
            {
                "bytes_down_per_client": comm.down_per_client,
                "bytes_up_per_client": comm.up_per_client,
                "fedavg_full_model_bytes_per_client": comm.fedavg_full_model_per_client,
                "forward_calls": int(algo.cost.forward_calls * active),
                "prefix_passes": int(cost["prefix_passes"] * active),
                "examples_per_call": cost["examples_per_call"],
                "model_flops": float(cost["flops_per_client"] * active),
                "seconds": seconds,
            }
        )
        if clients is not None:
            row["clients"] = _client_rows({k: v[i] for k, v in clients.items()})
        rows.append(row)
    return rows


def plot_metrics(results_dir, name: str) -> None:
    """``metrics.png`` next to ``metrics.json``; a failure to plot warns and leaves the run's results as they are."""
    import warnings

    from ..plots import plot_run

    try:
        plot_run(results_dir)
    except Exception as err:  # noqa: BLE001  (a plot never fails a finished run)
        warnings.warn(
            f"{name}: could not write {Path(results_dir) / 'metrics.png'}: {err}", RuntimeWarning, stacklevel=3
        )


def _client_rows(clients: dict) -> list[dict]:
    """``{name: [K, ...]}`` → one JSON-friendly dict per sampled client (NaN → None)."""
    k = len(next(iter(clients.values())))
    rows = []
    for i in range(k):
        row = {}
        for name, v in clients.items():
            x = np.asarray(v[i])
            if x.ndim:
                row[name] = x.tolist()
            elif x.dtype == bool:
                row[name] = bool(x)
            elif np.issubdtype(x.dtype, np.integer):
                row[name] = int(x)
            else:  # NaN (nothing sent, or a NaN fitness) as None: JSON null, and equal to itself
                row[name] = None if np.isnan(x) else float(x)
        rows.append(row)
    return rows


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_upload(directory, r: int, uploads: dict) -> None:
    import os
    import tempfile

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".round_{r:06d}.", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, round=np.asarray(r, np.int32), **{k: np.asarray(v) for k, v in uploads.items()})
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what any new file gets, like every other output
        os.replace(tmp, d / f"round_{r:06d}.npz")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_uploads(directory) -> dict[str, np.ndarray]:
    """The uploads :func:`run` saved with ``save_uploads=directory``, stacked over rounds.

    Returns ``round`` ``[R]`` and, stacked on a leading round axis, ``client_index`` ``[R, K]``,
    ``active`` ``[R, K]``, ``mean`` ``[R, K, d]``, ``fitness`` ``[R, K]``, ``sigmas`` ``[R, K, I]``,
    ``server_mean`` ``[R, d]`` and ``server_sigma`` ``[R]`` (the broadcast the clients answered). E.g.
    replay another server rule: ``aggregation.server_update(state, u["mean"][r], u["fitness"][r],
    u["sigmas"][r], u["active"][r])``.
    """
    files = sorted(Path(directory).glob("round_[0-9][0-9][0-9][0-9][0-9][0-9].npz"))
    if not files:
        raise FileNotFoundError(f"no round_NNNNNN.npz uploads in {directory}")
    loaded = []
    for f in files:
        x = dict(np.load(f))
        if "round" not in x or int(x["round"]) != int(f.stem.split("_")[1]):
            raise ValueError(
                f"{f} is not an upload file of round {f.stem.split('_')[1]} (its 'round' entry: "
                f"{x.get('round')!r}); the folder holds files of another kind or run"
            )
        loaded.append(x)
    keys = set(loaded[0])
    odd = [f.name for f, x in zip(files, loaded) if set(x) != keys]
    if odd:
        raise ValueError(f"{directory}: {odd[0]} holds other entries than {files[0].name}: uploads of two runs mixed")
    return {k: np.stack([x[k] for x in loaded]) for k in loaded[0]}


def summarize(history: History, carry: RunCarry) -> dict:
    """The figures a run reports: z = 0 / initial, final, dev-selected, and the reference-compatibility
    best-on-test (optimistic: it selects on the test set, as the reference code's reported peak does).

    Keys: ``selection_rule``; ``initial_test_accuracy``; ``final_round``, ``final_test_accuracy``,
    ``final_dev_accuracy``; ``selected_round``, ``selected_dev_accuracy``, ``selected_test_accuracy``;
    ``best_test_reference``, ``best_test_reference_round``; ``nonfinite_evals`` (evaluations with
    non-finite logits, never selected); ``fitness_all_nonfinite_rounds`` (rounds where clients were
    active but none had a finite fitness) and ``fitness_all_nonfinite`` (true when that held for every
    round with active clients: the server never moved).
    """
    c = host(carry)
    first, final = history.evals[0], history.evals[-1]
    has_dev = "dev_accuracy" in final
    bad_rounds = [r["round"] for r in history.rounds if r.get("all_fitness_nonfinite", 0)]
    with_clients = [r for r in history.rounds if r.get("active_clients", 0) > 0]
    sel_round = int(c.selected_round)

    def num(x):
        return None if x < 0 else float(x)

    return {
        "selection_rule": "dev accuracy, ties to the earliest round"
        if has_dev
        else "none (no dev set): the latest finite evaluation",
        "initial_test_accuracy": first["accuracy"],
        "final_round": final["round"],
        "final_test_accuracy": final["accuracy"],
        "final_dev_accuracy": final.get("dev_accuracy"),
        "selected_round": sel_round if sel_round >= 0 else None,
        "selected_dev_accuracy": num(float(c.selected_dev_accuracy)) if has_dev else None,
        "selected_test_accuracy": num(float(c.selected_test_accuracy)),
        "best_test_reference": num(float(c.best_test_reference)),
        "best_test_reference_round": int(c.best_test_reference_round)
        if int(c.best_test_reference_round) >= 0
        else None,
        "nonfinite_evals": sum(
            1 for e in history.evals if e.get("nonfinite_examples", 0) > 0 or not math.isfinite(e["accuracy"])
        ),
        "fitness_all_nonfinite_rounds": len(bad_rounds),
        "fitness_all_nonfinite": bool(with_clients) and len(bad_rounds) == len(with_clients),
    }


def warn_nonfinite(summary: dict, name: str) -> None:
    import warnings

    if summary["fitness_all_nonfinite"]:
        warnings.warn(
            f"{name}: every active client's fitness was non-finite in every round "
            f"({summary['fitness_all_nonfinite_rounds']} rounds): the server never moved and the "
            "reported prompt is the initial one",
            RuntimeWarning,
            stacklevel=3,
        )
    if summary["nonfinite_evals"]:
        warnings.warn(
            f"{name}: {summary['nonfinite_evals']} evaluation(s) had non-finite logits (reported as NaN, "
            "never selected)",
            RuntimeWarning,
            stacklevel=3,
        )


def write_results(results_dir, history: History, carry: RunCarry, planned_rounds: int | None = None) -> None:
    """``metrics.json`` (history, per-client diagnostics, :func:`summarize`'s figures and the run's extent:
    planned rounds, the last round reached, complete or not) and ``rounds.csv`` (one row a round, scalars
    only), each replaced atomically."""
    from ..interrupts import deferred

    d = Path(results_dir)
    extent = completeness(planned_rounds, history.evals, history.stopped_early)
    with deferred():  # a Ctrl-C / SIGTERM lands after both files describe the same round
        write_json_atomic(d / "metrics.json", {**history.as_dict(), **summarize(history, carry), **extent})
        write_csv_atomic(d / "rounds.csv", [{k: v for k, v in r.items() if k != "clients"} for r in history.rounds])
