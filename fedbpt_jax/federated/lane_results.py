"""A sweep's results: each lane's curves and figures, a summary over the seeds of each hyperparameter point
(mean ± sample std), the markdown table and the JSON file (:class:`SweepResults`), made from the compiled
program's outputs by :func:`sweep_results`."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ..checkpoint import to_json, write_json_atomic
from .distributed import host

#: Figures summarised over the seeds of a hyperparameter point (mean ± std, n finite values).
SUMMARY_FIGURES = ("final_test_accuracy", "selected_test_accuracy", "selected_dev_accuracy", "best_test_reference")


def _stats(values: list) -> dict:
    """mean, sample std (ddof 1; NaN with fewer than 2 values) and n over the finite values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    mean = float(np.mean(xs)) if n else float("nan")
    std = float(np.std(xs, ddof=1)) if n >= 2 else float("nan")
    return {"mean": mean, "std": std, "n": n}


def _fmt_stat(s: dict) -> str:
    if not s["n"]:
        return "n/a"
    if not math.isfinite(s["std"]):
        return f"{s['mean']:.4f}"
    return f"{s['mean']:.4f} ± {s['std']:.4f}"


@dataclasses.dataclass
class SweepResults:
    """What :func:`sweep` returns.

    Attributes:
      algorithm: the algorithm's name.
      num_rounds, eval_every: the schedule; ``eval_rounds``: the evaluated rounds (0 = the initial state).
      swept: the hyperparameter fields that vary (in the order given).
      seeds: the S seeds; ``points``: the H hyperparameter points (every :class:`HParams` field).
      lanes: one dict per lane (point-major: lane ``h·S + s`` is point h with seed s): ``lane``, ``seed``,
        ``point``, ``hparams``; per evaluated round ``test_accuracy``, ``dev_accuracy`` (None without a dev
        set), ``test_loss``, ``z_norm`` (when the algorithm has a z); per round the scalar round metrics
        under ``rounds`` (e.g. ``sigma``, ``client_loss``); ``final_round``, ``final_test_accuracy``,
        ``final_dev_accuracy``; the dev-selected ``selected_round``, ``selected_dev_accuracy``,
        ``selected_test_accuracy`` (None when no finite evaluation was ever selected); the
        reference-compatibility ``best_test_reference`` (selected on test: optimistic) and its round;
        ``nonfinite_evals``. NaN accuracies are kept (as ``"nan"`` in JSON).
      summary: one dict per point: ``point``, ``hparams`` (the swept fields), ``seeds`` and, for each of
        :data:`SUMMARY_FIGURES`, ``{"mean", "std", "n"}`` over the seeds' finite values (std: sample std,
        NaN with fewer than two).
      selection_rule: how ``selected_*`` was chosen.
      carry: the lanes' final :class:`~fedbpt_jax.federated.RunCarry` as numpy with a leading lane axis (not
        written to JSON), e.g. ``carry.state.server.mean[lane]``.
    """

    algorithm: str
    num_rounds: int
    eval_every: int
    eval_rounds: list[int]
    swept: list[str]
    seeds: list[int]
    points: list[dict]
    lanes: list[dict]
    summary: list[dict]
    selection_rule: str
    carry: Any = dataclasses.field(default=None, repr=False)

    def lane(self, seed: int, **hparams) -> dict:
        """The lane of ``seed`` at the point whose swept fields equal ``hparams``."""
        for row in self.lanes:
            if row["seed"] == seed and all(row["hparams"].get(k) == float(v) for k, v in hparams.items()):
                return row
        raise KeyError(
            f"no lane with seed {seed} and {hparams}; seeds {self.seeds}, points "
            f"{[{k: p[k] for k in self.swept} for p in self.points]}"
        )

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "carry"}
        return {"kind": "sweep", **d}

    def to_json(self) -> str:
        """Strict JSON (NaN and ±inf as ``"nan"``, ``"inf"``, ``"-inf"``: read back with
        :func:`fedbpt_jax.checkpoint.read_json`)."""
        return json.dumps(to_json(self.as_dict()), indent=2, allow_nan=False) + "\n"

    def write(self, path) -> Path:
        """Writes :meth:`to_json` to ``path`` atomically (a complete file or the previous one, never half)."""
        return write_json_atomic(path, self.as_dict())

    def markdown(self) -> str:
        """A markdown table: one row per hyperparameter point, the swept values, n seeds, and mean ± std of
        the final, dev-selected and best-on-test (reference figure, optimistic) test accuracies."""
        cols = [
            *self.swept,
            "seeds",
            "final test acc",
            "dev-selected test acc",
            "selected dev acc",
            "best-on-test (reference, optimistic)",
        ]
        lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
        for s in self.summary:
            cells = [f"{s['hparams'][k]:g}" for k in self.swept] + [str(len(s["seeds"]))]
            cells += [_fmt_stat(s[f]) for f in SUMMARY_FIGURES]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def _finite_eval(ev0, evs, i: int, e: int, has_dev: bool) -> bool:
    """Whether evaluation ``e`` (0: the initial one) of lane ``i`` had finite logits on test (and dev)."""

    def at(k):
        return np.asarray(ev0[k])[i] if e == 0 else np.asarray(evs[k])[i, e - 1]

    names = ("", "dev_") if has_dev else ("",)
    return all(int(at(p + "nonfinite_examples")) == 0 and math.isfinite(float(at(p + "accuracy"))) for p in names)


def sweep_results(algo, seeds, points, swept, num_rounds, eval_every, out, has_dev: bool) -> SweepResults:
    carry, ev0, evs, metrics = host(out)
    n_lanes = len(seeds) * len(points)
    carry = jax.tree_util.tree_map(lambda a: np.asarray(a)[:n_lanes], carry)
    eval_rounds = list(range(0, num_rounds + 1, eval_every))

    def curve(k, i):
        if k not in ev0:
            return None
        return [float(np.asarray(ev0[k])[i])] + [float(x) for x in np.asarray(evs[k])[i]]

    lanes = []
    for h, point in enumerate(points):
        for j, seed in enumerate(seeds):
            i = h * len(seeds) + j
            test_acc, dev_acc = curve("accuracy", i), curve("dev_accuracy", i)
            nonfinite = sum(1 for e in range(len(eval_rounds)) if not _finite_eval(ev0, evs, i, e, has_dev))
            rounds = {
                k: [float(x) for x in np.asarray(v)[i].reshape(-1)]
                for k, v in metrics.items()
                if np.asarray(v)[i].size == num_rounds
            }
            sel = int(carry.selected_round[i])
            ref_round = int(carry.best_test_reference_round[i])
            lanes.append(
                {
                    "lane": i,
                    "seed": seed,
                    "point": h,
                    "hparams": dict(point),
                    "eval_rounds": eval_rounds,
                    "test_accuracy": test_acc,
                    "dev_accuracy": dev_acc,
                    "test_loss": curve("loss", i),
                    "z_norm": curve("z_norm", i),
                    "rounds": rounds,
                    "final_round": num_rounds,
                    "final_test_accuracy": test_acc[-1],
                    "final_dev_accuracy": None if dev_acc is None else dev_acc[-1],
                    "selected_round": sel if sel >= 0 else None,
                    "selected_dev_accuracy": float(carry.selected_dev_accuracy[i]) if has_dev and sel >= 0 else None,
                    "selected_test_accuracy": float(carry.selected_test_accuracy[i]) if sel >= 0 else None,
                    "best_test_reference": float(carry.best_test_reference[i]) if ref_round >= 0 else None,
                    "best_test_reference_round": ref_round if ref_round >= 0 else None,
                    "nonfinite_evals": nonfinite,
                }
            )
    summary = []
    for h, point in enumerate(points):
        rows = [r for r in lanes if r["point"] == h]
        summary.append(
            {
                "point": h,
                "hparams": {k: point[k] for k in swept},
                "seeds": list(seeds),
                **{f: _stats([r[f] for r in rows]) for f in SUMMARY_FIGURES},
            }
        )
    rule = (
        "dev accuracy, ties to the earliest round; non-finite evaluations never selected"
        if has_dev
        else "none (no dev set): the latest finite evaluation"
    )
    return SweepResults(
        algorithm=algo.name,
        num_rounds=num_rounds,
        eval_every=eval_every,
        eval_rounds=eval_rounds,
        swept=list(swept),
        seeds=list(seeds),
        points=[dict(p) for p in points],
        lanes=lanes,
        summary=summary,
        selection_rule=rule,
        carry=carry,
    )
