"""Plots of runs (matplotlib, Agg backend: no display needed).

* :func:`plot_run`: one run's ``metrics.png`` next to its ``metrics.json`` (test and dev accuracy, loss,
  σ and ‖z‖ per round); :func:`fedbpt_jax.federated.run` writes it at the end of a run with ``results_dir``.
* :func:`comparison_plots`: several groups of runs (mean over seeds with a ± 1 std band, and bars of the
  final and dev-selected accuracy), used by ``fedbpt-jax report`` (:mod:`fedbpt_jax.report`) and
  ``experiments/grid.py report``.

Every PNG is written atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: The accuracy figures of a run (:func:`fedbpt_jax.report.run_figures`) and their labels.
FIGURES = {
    "final": "test acc. at the final round",
    "dev_selected": "test acc. at the dev-selected round",
    "best_on_test": "best-on-test (reference-compatibility, optimistic)",
    "initial": "test acc. at z = 0 (round 0)",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> str:
    """Saves ``fig`` as a PNG at ``path`` atomically (its folder is created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return str(path)


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """``(rounds, values)`` of ``key`` over the rows that have a number for it (None/NaN strings as NaN)."""
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, bool) or v is None:
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        xs.append(int(r["round"]))
        ys.append(v)
    return xs, ys


def _load_metrics(source) -> tuple[dict, Path | None]:
    if isinstance(source, dict):
        return source, None
    from .checkpoint import read_json

    p = Path(source)
    path = p / "metrics.json" if p.is_dir() else p
    if not path.is_file():
        raise FileNotFoundError(
            f"plot_run: {str(p)!r} holds no metrics.json; accepted: a results folder written by "
            "fedbpt-jax simulate --results-dir / run(results_dir=...), its metrics.json, or the "
            "metrics dict"
        )
    return read_json(path), path.parent


def plot_run(source, out=None, *, title: str | None = None) -> str:
    """Writes a run's ``metrics.png``: four panels over rounds, (a) test and dev accuracy of the global
    prompt (round 0 = z = 0) with the dev-selected round marked, (b) the evaluation loss (test, dev) and
    the clients' mean local loss, (c) the server's σ, (d) ‖z‖ of the global prompt's intrinsic vector.
    A panel whose metric the algorithm does not report says so.

    Args:
      source: a results folder (with ``metrics.json``), the path of a ``metrics.json``, or its content
        (the dict :func:`fedbpt_jax.federated.records.write_results` writes).
      out: the PNG's path (default: ``metrics.png`` next to ``metrics.json``; required for a dict).
      title: the figure's title (default: the folder's name).

    Returns: the path written.
    """
    metrics, folder = _load_metrics(source)
    if out is None:
        if folder is None:
            raise ValueError("plot_run(metrics dict): give out=, the PNG's path")
        out = folder / "metrics.png"
    evals, rounds = metrics.get("evals") or [], metrics.get("rounds") or []
    if not evals:
        raise ValueError("plot_run: the metrics hold no evaluation (expected an 'evals' list with at least round 0)")
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    (a_acc, a_loss), (a_sig, a_z) = axes

    def line(ax, rows, key, label, **kw):
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, marker="o", ms=2.5, label=label, **kw)
        return bool(xs)

    def empty(ax, what):
        ax.text(
            0.5,
            0.5,
            f"{what}: not reported by this run",
            ha="center",
            va="center",
            transform=ax.transAxes,
            fontsize=8,
            color="gray",
        )

    line(a_acc, evals, "accuracy", "test")
    if line(a_acc, evals, "dev_accuracy", "dev"):
        sel = metrics.get("selected_round")
        if isinstance(sel, int):
            a_acc.axvline(sel, color="gray", ls=":", lw=1, label=f"dev-selected (round {sel})")
    a_acc.set_ylabel("accuracy")
    a_acc.set_title("accuracy of the global prompt", fontsize=9)
    got = [
        line(a_loss, evals, "loss", "test loss"),
        line(a_loss, evals, "dev_loss", "dev loss"),
        line(a_loss, rounds, "client_loss", "clients' mean local loss"),
    ]
    if not any(got):
        empty(a_loss, "loss")
    a_loss.set_ylabel("loss (nats / example)")
    a_loss.set_title("loss", fontsize=9)
    if not line(a_sig, rounds, "sigma", "σ after the round"):
        empty(a_sig, "σ")
    a_sig.set_ylabel("σ")
    a_sig.set_title("server CMA-ES step size σ", fontsize=9)
    if not line(a_z, evals, "z_norm", "‖z‖ of the global prompt"):
        empty(a_z, "‖z‖")
    a_z.set_ylabel("‖z‖ (L2)")
    a_z.set_title("‖z‖ of the global intrinsic vector", fontsize=9)
    for ax in axes.flat:
        ax.set_xlabel("round")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    name = title or (folder.name if folder is not None else "run")
    stop = metrics.get("stopped_early")
    fig.suptitle(name + (f" (stopped early after round {stop})" if stop is not None else ""), fontsize=10)
    fig.tight_layout()
    try:
        return save_figure(fig, out)
    finally:
        plt.close(fig)


def comparison_plots(groups: list[dict], out, title: str) -> list[str]:
    """``accuracy_rounds.png`` (each group's test accuracy per round: mean over its runs, band ± 1 sample
    std) and ``accuracy_bars.png`` (final and dev-selected accuracy, mean ± std) in folder ``out``.

    ``groups``: dicts with ``label`` (and optionally ``display``, the name shown), ``runs`` (each with
    ``curve``: ``[(round, accuracy)]``) and, per
    figure of :data:`FIGURES`, ``None`` or ``{"mean", "std", "min", ...}`` (:func:`fedbpt_jax.report.stats`).
    Returns the paths written.
    """
    import numpy as np

    plt = _pyplot()
    out = Path(out)
    made = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for g in groups:
        curves = [dict(r["curve"]) for r in g["runs"]]
        rounds = sorted(set.intersection(*[set(c) for c in curves]))
        y = np.asarray([[c[r] for r in rounds] for c in curves], float) * 100
        m = y.mean(0)
        (line,) = ax.plot(rounds, m, marker="o", ms=2.5, label=f"{g.get('display', g['label'])} (n={len(curves)})")
        if len(curves) > 1:
            s = y.std(0, ddof=1)
            ax.fill_between(rounds, m - s, m + s, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{title}: mean over seeds, band ± 1 std", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    made.append(save_figure(fig, out / "accuracy_rounds.png"))
    plt.close(fig)

    figs = [f for f in ("final", "dev_selected") if any(g.get(f) for g in groups)]
    if not figs:
        return made
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(groups) + 2), 4.5))
    width = 0.8 / len(figs)
    x = np.arange(len(groups))
    for j, f in enumerate(figs):
        means = [100 * g[f]["mean"] if g.get(f) else np.nan for g in groups]
        errs = [100 * (g[f]["std"] or 0) if g.get(f) else 0 for g in groups]
        ax.bar(x + (j - (len(figs) - 1) / 2) * width, means, width, yerr=errs, capsize=3, label=FIGURES[f])
    ax.set_xticks(x)
    ax.set_xticklabels([g.get("display", g["label"]) for g in groups], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("test accuracy (%)")
    lows = [100 * g[f]["min"] for g in groups for f in figs if g.get(f) and math.isfinite(g[f]["min"])]
    ax.set_ylim(max(0, min(lows, default=0) - 10), 100)
    ax.set_title(f"{title}: mean ± std over seeds", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    made.append(save_figure(fig, out / "accuracy_bars.png"))
    plt.close(fig)
    return made
