"""Resumable grid driver for the paper-claim experiments, and its report.

A *grid* is a base configuration plus axes (algorithm × partition × seed × task/template × any other
setting), declared in a small TOML or JSON file (``experiments/grids/*.toml``). Every point of the grid is
one :func:`fedbpt_jax.run` simulation in its own directory, named from its configuration (a readable
prefix and a hash), holding ``config.json`` (the effective configuration), ``status.json``,
``metrics.json``, ``rounds.csv`` and ``ckpt/`` (orbax checkpoints, git-ignored). Re-running the same
grid skips every run whose ``metrics.json`` already reaches the requested rounds and resumes an
interrupted one from its checkpoint (bit-identical to an uninterrupted run); a run that fails is
recorded in its ``status.json`` and the grid goes on.

Usage::

    python experiments/grid.py run experiments/grids/sst2_noniid.toml --dry-run     # list the runs
    python experiments/grid.py run experiments/grids/sst2_noniid.toml --only seed=0 --max-runs 3
    python experiments/grid.py run experiments/grids/sst2_noniid.toml               # the rest (resumes)
    python experiments/grid.py run experiments/grids/mr_iid.toml --jobs 8           # 8 runs at once (a GPU)
    python experiments/grid.py run experiments/grids/mr_iid.toml --restart-every 4  # fresh process each 4 rounds
    python experiments/grid.py report experiments/results/grid_sst2_noniid           # tables and plots
    python experiments/grid.py sync ../wt/experiments/results/grid_mr experiments/results/grid_mr  # land/park

A run is ``fedbpt-jax simulate`` with the same settings (``grid_spec.py``): ``seed`` drives the few-shot draw,
the partition and the keys, so runs that differ only in the algorithm share them (a paired design over seeds).

Grid file (TOML; JSON with the same structure also works)::

    [grid]
    name = "sst2_noniid"                 # output folder: experiments/results/grid_<name>
    description = "..."

    [base]                               # any setting (grid_spec.SETTINGS), for every run
    rounds = 15
    partition = "dirichlet:1.0"

    [axes]                               # the cartesian product of these lists
    seed = [0, 1, 2]                     # an axis named after a setting: its values
    method = [                           # any other name: tables of settings, each with a label
      { label = "fedbpt", algorithm = "fedbpt" },
      { label = "fedavg_bbt_perturb", algorithm = "fedavg_bbt", algorithm_options = { perturb = true } },
    ]

    [report]
    pairs = [["fedbpt", "fedavg_bbt_perturb"]]     # paired per-seed differences A − B (labels)

Runs are ordered seed first, so ``--max-runs`` takes every configuration's first seed before any second seed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

import fedbpt_jax  # noqa: E402,F401  (first: sets OPENBLAS_NUM_THREADS before numpy/jax load)
from fedbpt_jax.machine import machine_record

sys.path.insert(0, str(Path(__file__).resolve().parent))  # grid_spec beside this file, however it is loaded
from grid_spec import (  # noqa: E402
    NOT_IN_HASH,
    READINGS,
    SETTINGS,
    GridError,
    algorithm_options,
    check_settings,
    declaration,
    digest,
    expand,
    identify,
    load_grid,
    matches,
    parse_filters,
    resolve_dev_selection,
    run_options,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

#: Settings an algorithm does not read: a finished run that differs from a wanted one only in these is the
#: same experiment, so it is copied instead of computed again. The manual prompt never trains: its copy is
#: exact. Centralized BBT pools every client's examples, so the partition changes only the order in which the
#: pooled examples' losses are summed: the fitness values agree to float rounding (~1e-7 relative), CMA-ES
#: uses only their ranking, and the trajectory is the same unless two candidates tie to within rounding
#: (``tests/test_grid.py`` compares copies with runs computed from scratch; on SmolLM2, SST-2 seed 0, the
#: IID and Dirichlet(1) runs' accuracies and losses were bit-identical over 15 rounds). The copy's cost
#: figures are its source's (:data:`PARTITION_COST_KEYS`). ``--no-reuse`` computes them instead.
UNUSED_BY = {"centralized_bbt": ("partition",), "manual": ("partition",)}
#: Per-round cost figures of ``metrics.json`` that a copy across partitions keeps from its source (the pooled
#: batch is padded to the partition's largest client, so they differ from what the copy's own run would count).
PARTITION_COST_KEYS = ("examples_per_call", "model_flops")
#: The per-client keys of ``config.json``'s ``data`` record (they describe the partition).
PER_CLIENT_DATA = ("train_counts", "train_label_counts")

# --------------------------------------------------------------------------------------------------
# Running


def is_finished(run_dir: Path, rounds: int) -> tuple[bool, int]:
    """(finished, last evaluated round) from ``metrics.json``."""
    from fedbpt_jax.checkpoint import read_json

    try:
        m = read_json(run_dir / "metrics.json")
        last = int(m["evals"][-1]["round"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError, IndexError):
        return False, 0
    return last >= rounds, last


def _same_id_beside(out: Path, run: dict) -> list[Path]:
    """The run folders with ``run``'s id in the other grid folders beside ``out``."""
    here = out.resolve()
    return [d for d in out.parent.glob(f"*/*-{run['run_id']}") if d.is_dir() and d.parent.resolve() != here]


def find_reusable(out: Path, run: dict) -> Path | None:
    """A finished run that computed what ``run`` would, or None: one with ``run``'s id (the same settings)
    in another grid folder beside ``out``, else one in ``out`` or beside it that differs only in settings
    ``run``'s algorithm does not read (:data:`UNUSED_BY`: the IID grid's centralized BBT is the non-IID
    grid's).

    Grids overlap (the perturbation-rate ablation's r_p = 0.5 arm is the main grid's FedBPT); a run found
    finished elsewhere is copied instead of being computed again. The newest such folder wins."""
    rounds = run["settings"]["rounds"]
    found = [d for d in _same_id_beside(out, run) if is_finished(d, rounds)[0]]
    if not found and run["settings"]["algorithm"] in UNUSED_BY:
        unused = UNUSED_BY[run["settings"]["algorithm"]]
        wanted = digest(run["settings"], unused)
        for cfg_path in out.parent.glob("*/*/config.json"):
            d = cfg_path.parent
            if d.name.endswith(".copying") or (d.name == run["dirname"] and d.parent.resolve() == out.resolve()):
                continue
            try:  # the algorithm is in the digest: only runs of the same algorithm match
                same = digest({**SETTINGS, **json.loads(cfg_path.read_text())["settings"]}, unused) == wanted
            except (json.JSONDecodeError, KeyError, TypeError, GridError):
                continue
            if same and is_finished(d, rounds)[0]:
                found.append(d)
    return max(found, key=lambda d: (d / "metrics.json").stat().st_mtime) if found else None


def find_continuable(out: Path, run: dict) -> tuple[Path, int] | None:
    """(folder, last round) of a run with ``run``'s id in another grid folder beside ``out`` that stopped short of
    ``run``'s last round but kept its checkpoints, or None: a longer grid continues it from its last checkpoint
    instead of starting over (the rounds are not in a run id, and resuming gives the bits of an uninterrupted
    run). The furthest wins."""
    found = []
    for d in _same_id_beside(out, run):
        if (d / "ckpt").is_dir():
            done, last = is_finished(d, run["settings"]["rounds"])
            if not done and last > 0:
                found.append((last, d))
    if not found:
        return None
    last, d = max(found)
    return d, last


def reuse(src: Path, dst: Path, run: dict, grid_name: str) -> None:
    """Copies the finished run ``src`` (checkpoint included) to ``dst`` under this grid's name and labels.

    The copy is assembled beside ``dst`` and renamed into place, so an interruption leaves no half copy;
    ``config.json`` records where it came from (``copied_from``). A copy of an equivalent run (differing
    only in settings the algorithm does not read) takes ``run``'s settings and id, and keeps the source's
    values of those settings under ``copied_settings``; the source's per-client data counts, which describe
    its partition, are left out, and ``copied_cost_figures`` names the per-round cost figures that are the
    source's (:data:`PARTITION_COST_KEYS`)."""
    from fedbpt_jax.checkpoint import read_json, write_json_atomic

    tmp = dst.with_name(dst.name + ".copying")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    cfg = read_json(tmp / "config.json")
    if cfg.get("run_id") == run["run_id"]:
        how = "identical settings, same run id; relabelled"
    else:
        src_settings = {**SETTINGS, **cfg.get("settings", {})}
        differ = sorted(
            k for k in run["settings"] if run["settings"][k] != src_settings.get(k) and k not in NOT_IN_HASH
        )
        how = (
            f"run id {cfg.get('run_id')}: differs only in {', '.join(differ)}, which "
            f"{run['settings']['algorithm']} does not read; relabelled"
        )
        cfg["copied_settings"] = {k: src_settings.get(k) for k in differ}
        cfg["copied_cost_figures"] = (
            f"{', '.join(PARTITION_COST_KEYS)} in metrics.json count the source's padded batches "
            f"({', '.join(f'{k} = {v}' for k, v in cfg['copied_settings'].items())})"
        )
        cfg["settings"] = {**cfg.get("settings", {}), **{k: run["settings"][k] for k in differ}}
        cfg["run_id"] = run["run_id"]
        if isinstance(cfg.get("data"), dict):
            cfg["data"] = {k: v for k, v in cfg["data"].items() if k not in PER_CLIENT_DATA}
    cfg.update(grid=grid_name, labels=run["labels"], copied_from=f"{src.parent.name}/{src.name} ({how})")
    write_json_atomic(tmp / "config.json", cfg)
    shutil.rmtree(dst, ignore_errors=True)  # an empty or failed attempt of this run
    tmp.rename(dst)


class Context:
    """Caches across the runs of one process: the backbone per (model, dtype), the algorithm objects."""

    def __init__(self):
        self.models: dict = {}
        self.data: dict = {}
        self.algos: dict = {}

    def algorithm(self, name: str, cfg, lm, options: dict):
        """One algorithm object per (name, config, options): runs differing only in seed (or data) reuse
        its compiled segment (``run`` caches the jitted segment per algorithm object)."""
        import fedbpt_jax as fb

        key = (name, cfg, json.dumps(options, sort_keys=True, default=str), id(lm))
        if key not in self.algos:
            self.algos[key] = fb.make(name, cfg, lm, **options)
        return self.algos[key]

    def model(self, name: str, dtype: str):
        key = (name, dtype)
        if key not in self.models:
            import fedbpt_jax as fb

            if name == "tiny":
                lm = fb.testing.tiny_decoder(0, num_layers=1, tokenizer=fb.testing.chatml_tokenizer())
            else:
                lm = fb.models.load(name, compute_dtype=dtype)
            self.models = {key: lm}  # one backbone in memory at a time
            self.algos = {}
        return self.models[key]


CONTEXT = Context()


def _git_commit() -> str | None:
    """The commit this process started from (read once: later commits do not change the code it runs)."""
    global _COMMIT
    if _COMMIT is None:
        _COMMIT = _read_commit() or "unknown"
    return _COMMIT


_COMMIT = None


def _read_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE.parent, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "fedbpt_jax"],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if out.returncode == 0:
            return out.stdout.strip() + ("+uncommitted changes in fedbpt_jax" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    # A copy of the tree without its git folder (a remote machine): the commit it was copied from, if given.
    return os.environ.get("FEDBPT_JAX_COMMIT") or None


class Watcher(threading.Thread):
    """Prints a line per new evaluation that :func:`fedbpt_jax.run` writes to ``metrics.json``."""

    def __init__(self, run_dir: Path, tag: str, seen: int, interval: float = 5.0):
        super().__init__(daemon=True)
        self.path, self.tag, self.seen, self.interval = run_dir / "metrics.json", tag, seen, interval
        self.stop = threading.Event()

    def poll(self):
        try:
            m = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return
        rows = {r["round"]: r for r in m.get("rounds", [])}
        for ev in m.get("evals", []):
            if ev["round"] <= self.seen:
                continue
            r = rows.get(ev["round"], {})
            dev = f" dev {ev['dev_accuracy']:.4f}" if "dev_accuracy" in ev else ""
            loss = r.get("client_loss")
            extra = (
                ""
                if not r
                else (f" loss {loss:.4f}" if isinstance(loss, float) and math.isfinite(loss) else "")
                + f" σ {r.get('sigma', float('nan')):.3f} {r.get('seconds', float('nan')):.1f}s/round"
            )
            print(f"    {self.tag} round {ev['round']:3d}: test {ev['accuracy']:.4f}{dev}{extra}", flush=True)
            self.seen = ev["round"]

    def run(self):
        while not self.stop.wait(self.interval):
            self.poll()

    def finish(self):
        self.stop.set()
        self.join()
        self.poll()


def run_record(run: dict, grid_name: str, plan, options, dev: bool) -> dict:
    """``config.json`` of a grid run: the layout ``fedbpt-jax simulate`` writes (``command``, ``args``: every
    option, ``resolved``, ``versions``, ``git_revision``) with the grid's own keys: ``grid``, ``run_id``,
    ``labels``, ``settings`` (the grid's vocabulary, what the run id hashes), ``data`` (per-client label counts)
    and ``environment`` (where it ran)."""
    import dataclasses

    import jax
    import numpy as np

    import fedbpt_jax as fb
    from fedbpt_jax.plan import config_record

    s, fed, lm = run["settings"], plan.fed, plan.lm
    train_labels = np.asarray(fed.train.labels)
    mask = np.asarray(fed.train.example_mask) > 0
    nl = int(np.shape(fed.spec.label_ids)[0])
    resolved = plan.resolved(
        algorithm_options=algorithm_options(s["algorithm"], s["algorithm_options"]),
        dev_selection=dev,
        precision=str(lm.config.compute_dtype) if s["model"] != "tiny" else "float32",
        hparams={k: float(v) for k, v in dataclasses.asdict(plan.hp).items()},
        keys="key(seed) -> split -> (projection, run); data seed = seed",
    )
    record = config_record(options, resolved)
    record["command"] = ["python", "experiments/grid.py", *sys.argv[1:]]
    record.update(
        grid=grid_name,
        run_id=run["run_id"],
        labels=run["labels"],
        settings=s,
        data={
            "train_counts": np.asarray(fed.train_counts).tolist(),
            "train_label_counts": [
                [int(((train_labels[i] == c) & mask[i]).sum()) for c in range(nl)] for i in range(train_labels.shape[0])
            ],
            "dev_size": int(len(fed.dev.labels)),
            "test_size": int(len(fed.test.labels)),
        },
        environment={
            "model": lm.name,
            "fedbpt_jax": fb.__version__,
            "commit": _git_commit(),
            "jax": jax.__version__,
            **machine_record(),
        },
    )
    return record


def run_one(run: dict, out: Path, ctx: Context, grid_name: str, stop_after_rounds: int | None = None) -> dict:
    """Runs (or resumes) one grid point; returns its status record. The run is prepared as ``fedbpt-jax
    simulate`` prepares one (:func:`fedbpt_jax.plan.prepare` from :func:`run_options`).

    ``stop_after_rounds``: compute at most this many rounds here (rounded up to whole evaluation segments),
    then stop at a checkpoint (state ``"stopped"``); the next call resumes from it. The manual prompt, one
    segment without a checkpoint, always runs to the end."""
    import fedbpt_jax as fb
    from fedbpt_jax.checkpoint import write_json_atomic
    from fedbpt_jax.plan import prepare

    s = run["settings"]
    d = out / run["dirname"]
    t0 = time.time()
    d.mkdir(parents=True, exist_ok=True)
    _, seen = is_finished(d, s["rounds"])
    lm = ctx.model(s["model"], s["compute_dtype"])
    options = run_options(s, lm.kind)
    algorithm_options(s["algorithm"], s["algorithm_options"])  # an option the factory does not take: named
    dev = resolve_dev_selection(s["dev_selection"])
    # runs that differ only in seed (or data) share one algorithm object, and so its compiled segment
    plan = prepare(options, "simulate", lm=lm, algorithm_options=s["algorithm_options"], make_algorithm=ctx.algorithm)
    algo = plan.algo
    # config.json is written by the run once its checkpoint (if any) is accepted, with the earlier segments'
    # provenance (which rounds ran where) when it resumes
    record = run_record(run, grid_name, plan, options, dev)
    write_json_atomic(d / "status.json", {"state": "running", "started": t0, "from_round": seen})
    # The manual prompt never changes: evaluating it at round 0 and at the last round is enough (the same
    # numbers as every round, at a fraction of the evaluation cost; the run's identity is unchanged). It
    # keeps no checkpoint: asked for more rounds later, it simply runs again (two evaluations).
    manual = s["algorithm"] == "manual"
    kw = dict(
        num_rounds=s["rounds"],
        hp=plan.hp,
        eval_every=s["rounds"] if manual else s["eval_every"],
        eval_chunk=s["eval_chunk"],
        checkpoint_dir=None if manual else d / "ckpt",
        checkpoint_every=s["checkpoint_every"],
        results_dir=d,
        run_config=record,
        progress=False,
        eval_cache_budget=int(s["eval_cache_gb"] * 2**30),
        keep_clean_context={"auto": None, "on": True, "off": False}[s["keep_clean_cache"]],
    )
    if dev:
        kw["dev"] = plan.fed.dev
    if stop_after_rounds is not None and not manual:
        every = kw["eval_every"]
        kw["stop_after"] = seen + every * math.ceil(stop_after_rounds / every)
    watcher = Watcher(d, run["dirname"][:40], seen)
    watcher.start()
    try:
        carry, hist = fb.run(algo, plan.key_run, plan.data, plan.fed.test, lm, plan.model, **kw)
    finally:
        watcher.finish()
    ev = hist.evals
    status = {
        "state": "finished" if ev[-1]["round"] >= s["rounds"] else "stopped",
        "started": t0,
        "seconds": time.time() - t0,
        "from_round": seen,
        "rounds": ev[-1]["round"],
        "initial_test_accuracy": ev[0]["accuracy"],
        "final_test_accuracy": ev[-1]["accuracy"],
    }
    write_json_atomic(d / "status.json", status)
    return status


def run_command(grid_path: Path, out: Path, run: dict) -> list[str]:
    """The command that computes ``run`` alone in a process of its own (``grid.py run --run NAME --no-reuse``):
    a worker of ``--jobs``, a process of ``--restart-every``."""
    return [
        sys.executable,
        str(HERE / "grid.py"),
        "run",
        str(grid_path),
        "--out",
        str(out),
        "--run",
        run["dirname"],
        "--no-reuse",
    ]


def run_restarting(grid_path: Path, out: Path, run: dict, tag: str, every: int) -> dict:
    """Runs ``run`` in fresh processes, each computing at most ``every`` rounds (``grid.py run --run NAME
    --stop-after-rounds every``) and resuming from the checkpoint the one before left, until it is finished;
    returns its status record. The rounds are those of one process (a resume is bit-identical), but no
    process lives long, e.g. where a process's memory or speed degrades over hours; each restart costs one
    compilation. A process that fails (its failure is recorded in the run's
    ``status.json``) or adds no round raises :class:`GridError`."""
    import subprocess

    from fedbpt_jax.checkpoint import read_json

    d, rounds = out / run["dirname"], run["settings"]["rounds"]
    cmd = run_command(grid_path, out, run) + ["--stop-after-rounds", str(every)]
    while True:
        _, before = is_finished(d, rounds)
        proc = subprocess.Popen(cmd)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()  # the child stops cleanly (interrupts.py) and keeps its checkpoint
            proc.wait()
            raise
        if code != 0:
            raise GridError(f"{tag}: its process exited with code {code} (see its status.json)")
        done, last = is_finished(d, rounds)
        if done:
            return read_json(d / "status.json")
        if last <= before:
            raise GridError(
                f"{tag}: a process added no round (still after round {last} of {rounds}); "
                "run it once without --restart-every to continue"
            )
        print(f"{tag}: stopped after round {last}; continuing in a fresh process (--restart-every {every})", flush=True)


def run_in_workers(
    grid_path: Path, out: Path, pending: list[tuple[str, dict]], jobs: int, restart_every=None
) -> tuple[int, int]:
    """Runs each pending run in its own ``grid.py run --run NAME`` process, at most ``jobs`` at a time;
    returns (finished, failed). For accelerators that one small simulation does not fill (a SmolLM2 run with
    10 clients uses a few percent of a GPU): the runs share the device. Each worker writes only its own run
    folder (every file atomically), so the results are those of running the runs one after another. JAX's
    preallocation of most of the device memory per process is turned off unless the caller set it."""
    import subprocess

    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    queue, running = list(pending), {}
    finished = failed = 0
    try:
        while queue or running:
            while queue and len(running) < jobs:
                tag, r = queue.pop(0)
                cmd = run_command(grid_path, out, r)
                if restart_every is not None:  # the worker restarts its run's process itself
                    cmd += ["--restart-every", str(restart_every)]
                running[subprocess.Popen(cmd, env=env)] = tag
                print(f"{tag}: started in a worker process ({len(running)} of {jobs})", flush=True)
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                tag = running.pop(proc)
                if proc.returncode == 0:
                    finished += 1
                else:
                    failed += 1
                    print(f"{tag}: worker exited with code {proc.returncode}", flush=True)
    except KeyboardInterrupt:
        for proc in running:
            proc.terminate()
        for proc in running:
            proc.wait()
        raise
    return finished, failed


def select_runs(args, grid: dict) -> tuple[list[dict], list[dict]]:
    """(all runs of the grid, those ``--only`` and ``--run`` select, checked and identified)."""
    runs = expand(grid)
    filters = parse_filters(args.only, runs)
    selected = []
    for r in runs:
        if matches(r, filters):
            check_settings(r["settings"])
            identify(r)
            selected.append(r)
    if args.run:
        wanted = set(args.run)
        unknown = sorted(wanted - {r["dirname"] for r in selected} - {r["run_id"] for r in selected})
        if unknown:
            raise GridError(
                f"--run {', '.join(unknown)}: no such run among the {len(selected)} selected; accepted: the "
                "run folder names (or their hash) that --dry-run lists"
            )
        selected = [r for r in selected if r["dirname"] in wanted or r["run_id"] in wanted]
    names = [r["dirname"] for r in selected]
    if len(set(names)) != len(names):
        raise GridError(
            "two grid points have the same settings (an axis changes nothing?): "
            + ", ".join(sorted({n for n in names if names.count(n) > 1}))
        )
    return runs, selected


def write_grid_meta(out: Path, grid: dict, grid_file: str) -> None:
    """``grid.json``: the grid's name, axes, base and pairs, and the comparisons as declared when its first run
    started (kept from then on)."""
    from fedbpt_jax.checkpoint import write_json_atomic

    readings = {k: grid[k] for k in READINGS if k in grid}  # the declared readings besides the pairs
    meta = {
        "name": grid["name"],
        "description": grid["description"],
        "axes": [a for a, _ in grid["axes"]],
        "pairs": grid["pairs"],
        **readings,
        "source": Path(grid_file).name,
        "base": grid["base"],
    }
    old = json.loads((out / "grid.json").read_text()) if (out / "grid.json").exists() else {}
    if "declared" in old:  # the comparisons as they stood when the first run started: kept
        meta["declared"] = old["declared"]
    elif not any(out.glob("*/config.json")) and not any(out.glob("*/status.json")):
        meta["declared"] = declaration(Path(grid_file), grid["pairs"], readings)
    write_json_atomic(out / "grid.json", meta)
    if meta.get("declared", {}).get("grid_file_commit") in (None, "uncommitted"):
        print(
            f"note: the grid file {_portable(str(grid_file))} is not committed as it is: its comparisons count as "
            "declared before the runs only from a committed file (grid.json's 'declared')",
            flush=True,
        )


def record_failure(d: Path, r: dict, err: Exception, tag: str) -> None:
    from fedbpt_jax.checkpoint import write_json_atomic

    d.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        d / "status.json",
        {
            "state": "failed",
            "error": f"{type(err).__name__}: {err}",
            "traceback": _portable(traceback.format_exc()),
            "settings": r["settings"],
            "labels": r["labels"],
            "run_id": r["run_id"],
        },
    )
    print(f"{tag}: FAILED: {type(err).__name__}: {err}", flush=True)


def _round_cost(run_dir: Path, cfg: dict) -> tuple[float, str] | None:
    """(seconds a round, CPU) of a finished run (``cfg``: its ``config.json``) as its ``status.json`` timed its
    last process (whole rounds, evaluations and compilation included), or None where it has no such record
    (copied or unreadable runs)."""
    from fedbpt_jax.checkpoint import read_json

    try:
        st = read_json(run_dir / "status.json")
        rounds = int(st["rounds"]) - int(st.get("from_round", 0))
        seconds = float(st["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if st.get("state") != "finished" or rounds <= 0 or "copied_from" in cfg:
        return None
    return seconds / rounds, str(cfg.get("environment", {}).get("cpu", "unknown CPU"))


def _own_round_seconds(run_dir: Path) -> list[float]:
    """The seconds each round of an unfinished run took (``rounds.csv``), [] where there are none."""
    try:
        with open(run_dir / "rounds.csv", newline="") as f:
            return [float(row["seconds"]) for row in csv.DictReader(f) if row.get("seconds")]
    except (OSError, ValueError, KeyError):
        return []


def _costs_by_config(folder: Path) -> dict[tuple, dict]:
    """The finished runs of a grid folder by their labels less the seed (one configuration):
    ``{"costs": [(seconds a round, CPU)], "settings": one run's settings}``."""
    found: dict[tuple, dict] = {}
    for cfg_path in sorted(folder.glob("*/config.json")):
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError):
            continue
        labels = cfg.get("labels") if isinstance(cfg, dict) else None
        cost = _round_cost(cfg_path.parent, cfg) if isinstance(labels, dict) else None
        if cost is not None:
            key = tuple(sorted((k, v) for k, v in labels.items() if k != "seed"))
            entry = found.setdefault(key, {"costs": [], "settings": cfg.get("settings", {})})
            entry["costs"].append(cost)
    return found


def estimate_left(out: Path, r: dict, last: int, costs: dict | None = None) -> tuple[float | None, str]:
    """(seconds of compute ``r`` still needs, what the estimate rests on), for planning a grid across sessions
    (an estimate for the machines named, not a measurement): its remaining rounds at the median cost a round of

    1. the finished runs in ``out`` with its labels but the seed (the same configuration), else
    2. such runs in a grid folder beside ``out`` whose settings differ least from its own (another task in the
       same layout, say), scaled by the median ratio of the two folders' costs over the configurations
       finished in both (the manual prompt's, evaluation only, left out of the ratio), else
    3. its own rounds so far;

    (None, why) without any of them. ``costs`` caches each folder's finished runs (``_costs_by_config``) across
    the calls of one dry run, so that the folders are read once."""
    costs = {} if costs is None else costs

    def by_config(folder: Path) -> dict[tuple, dict]:
        if folder not in costs:
            costs[folder] = _costs_by_config(folder) if folder.is_dir() else {}
        return costs[folder]

    s = r["settings"]
    left = s["rounds"] - (0 if s["algorithm"] == "manual" else last)
    key = tuple(sorted((k, v) for k, v in r["labels"].items() if k != "seed"))

    def median_cost(entry):
        runs = entry["costs"]
        return statistics.median(c for c, _ in runs), ", ".join(sorted({cpu for _, cpu in runs}))

    here = by_config(out.resolve())
    if key in here:
        per, cpus = median_cost(here[key])
        return left * per, f"{len(here[key]['costs'])} finished run(s) like it, {per:.0f} s a round, {cpus}"
    best = None
    for other in sorted(d for d in out.parent.glob("*") if d.is_dir() and d.resolve() != out.resolve()):
        there = by_config(other.resolve())
        if key not in there:
            continue
        theirs = there[key]["settings"]  # settings an older record lacks are not counted as differences
        differ = sorted(k for k in set(s) & set(theirs) if k not in ("seed", "rounds") and s[k] != theirs[k])
        shared = [k for k in here if k in there and ("method", "manual") not in k]
        if not shared and differ:
            continue
        ratio = statistics.median(median_cost(here[k])[0] / median_cost(there[k])[0] for k in shared) if shared else 1.0
        rank = (len(differ), -len(shared))
        if best is None or rank < best[0]:
            best = (rank, other, ratio, median_cost(there[key]), differ, len(shared))
    if best is not None:
        _, other, ratio, (per, cpus), differ, n = best
        like = (
            f"its configuration's runs in {other.name} ({', '.join(differ)} differ)"
            if differ
            else (f"runs with its settings (rounds aside) in {other.name}")
        )
        scaled = f" x {ratio:.2f} (this grid's cost a round over that one's, median of {n} configuration(s) finished in both)"
        return left * per * ratio, f"{like}, {per:.0f} s a round{scaled if n else ''}, {cpus}"
    own = _own_round_seconds(out / r["dirname"])
    if own:
        per = statistics.median(own)
        return left * per, f"its own {len(own)} round(s), {per:.0f} s a round"
    return None, "no finished run like it here or beside"


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def settled(args, out: Path, r: dict, tag: str, grid_name: str) -> tuple[bool, int]:
    """(whether ``r`` needs no run here: finished or copied from a finished twin (--dry-run: would be); the last
    round it has), saying so on the console."""
    done, last = is_finished(out / r["dirname"], r["settings"]["rounds"])
    rounds = r["settings"]["rounds"]
    if done:
        more = f" (has {last} rounds, more than the {rounds} asked)" if last > rounds else ""
        print(f"{tag}: finished, skipped{more}", flush=True)
        return True, last
    src = find_reusable(out, r) if args.reuse and not last else None
    if src is not None:
        if not args.dry_run:
            reuse(src, out / r["dirname"], r, grid_name)
        print(f"{tag}: {'would copy' if args.dry_run else 'copied'} the finished {_portable(str(src))}", flush=True)
        return True, last
    found = find_continuable(out, r) if args.reuse and not last else None
    if found is not None:
        part, stopped = found
        if not args.dry_run:
            reuse(part, out / r["dirname"], r, grid_name)  # the copy stops where its source stopped
            last = stopped
        what = "would continue" if args.dry_run else "continuing"
        print(f"{tag}: {what} {_portable(str(part))} (stopped at round {stopped})", flush=True)
    return False, last


def dry_run_line(out: Path, r: dict, last: int, tag: str, costs: dict) -> float | None:
    """Says what a run ``--dry-run`` lists would do and about how long it would take; returns the estimated
    seconds of compute left (None: unknown). ``costs``: the dry run's cache for ``estimate_left``."""
    try:
        algorithm_options(r["settings"]["algorithm"], r["settings"]["algorithm_options"])
        what = f"resume from round {last}" if last else "run"
    except GridError as err:
        what = f"would fail: {err}"
    seconds, basis = estimate_left(out, r, last, costs)
    guess = f"~{_duration(seconds)} left" if seconds is not None else "time left unknown"
    print(f"{tag}: {what} ({r['settings']['rounds']} rounds; {guess}: {basis})", flush=True)
    return seconds


def cmd_run(args) -> int:
    grid = load_grid(args.grid)
    if args.jobs < 1:
        raise GridError(f"--jobs {args.jobs}: expected a positive number of worker processes")
    for flag, value in (("--restart-every", args.restart_every), ("--stop-after-rounds", args.stop_after_rounds)):
        if value is not None and value < 1:
            raise GridError(f"{flag} {value}: expected a positive number of rounds")
    if args.restart_every is not None and args.stop_after_rounds is not None:
        raise GridError(
            "--restart-every and --stop-after-rounds: give one of them (the first runs the second in processes)"
        )
    runs, selected = select_runs(args, grid)
    out = Path(args.out) if args.out else RESULTS / f"grid_{grid['name']}"
    if not args.dry_run:
        write_grid_meta(out, grid, args.grid)
    print(f"grid {grid['name']}: {len(runs)} runs, {len(selected)} selected, output {_portable(str(out))}", flush=True)
    _git_commit()
    started = 0
    counts = {"finished": 0, "skipped": 0, "failed": 0, "stopped": 0}
    pending: list[tuple[str, dict]] = []
    left: list[float | None] = []  # --dry-run: each listed run's estimated compute left
    costs: dict = {}  # --dry-run: the finished runs' costs of each folder read, for estimate_left
    for i, r in enumerate(selected, 1):
        tag = f"[{i}/{len(selected)}] {r['dirname']}"
        skip, last = settled(args, out, r, tag, grid["name"])
        if args.dry_run and not skip:
            left.append(dry_run_line(out, r, last, tag, costs))
        if skip or args.dry_run:
            counts["skipped"] += skip
            continue
        if args.max_runs is not None and started >= args.max_runs:
            print(f"--max-runs {args.max_runs} reached; {len(selected) - i + 1} selected run(s) left", flush=True)
            break
        started += 1
        again = r["settings"]["algorithm"] == "manual" and last
        what = "running again (the manual prompt keeps no checkpoint)" if again else "starting"
        what = f"resuming after round {last}" if last and not again else what
        if args.jobs > 1:
            print(f"{tag}: queued ({what})", flush=True)
            pending.append((tag, r))
            continue
        print(f"{tag}: {what}", flush=True)
        if args.restart_every is not None:
            try:
                st = run_restarting(Path(args.grid), out, r, tag, args.restart_every)
            except GridError as err:  # the process recorded its failure in status.json
                counts["failed"] += 1
                print(f"{tag}: failed: {err}", flush=True)
                continue
            counts["finished"] += 1
            print(f"{tag}: finished, final test {st['final_test_accuracy']:.4f}", flush=True)
            continue
        try:
            st = run_one(r, out, CONTEXT, grid["name"], stop_after_rounds=args.stop_after_rounds)
            if st["state"] == "stopped":
                counts["stopped"] += 1
                print(
                    f"{tag}: stopped after round {st['rounds']} (--stop-after-rounds {args.stop_after_rounds})",
                    flush=True,
                )
                continue
            counts["finished"] += 1
            print(
                f"{tag}: finished in {st['seconds']:.0f}s, test z=0 {st['initial_test_accuracy']:.4f} "
                f"final {st['final_test_accuracy']:.4f}",
                flush=True,
            )
        except KeyboardInterrupt:
            raise
        except Exception as err:  # recorded; the grid goes on
            counts["failed"] += 1
            record_failure(out / r["dirname"], r, err, tag)
    if pending:
        finished, failed = run_in_workers(Path(args.grid), out, pending, args.jobs, args.restart_every)
        counts["finished"] += finished
        counts["failed"] += failed
    if args.dry_run:
        known = [x for x in left if x is not None]
        total = f"; ~{_duration(sum(known))} of compute left for {len(known)} of them" if known else ""
        unknown = f", {len(left) - len(known)} without an estimate" if len(known) < len(left) else ""
        print(
            f"grid {grid['name']}: dry run, {counts['skipped']} of {len(selected)} selected run(s) already "
            f"finished, {len(left)} to run or resume{total}{unknown}",
            flush=True,
        )
        return 0
    stopped = f", {counts['stopped']} stopped to resume later" if counts["stopped"] else ""
    print(
        f"grid {grid['name']}: {counts['finished']} finished now, {counts['skipped']} already finished, "
        f"{counts['failed']} failed{stopped}",
        flush=True,
    )
    return 1 if counts["failed"] else 0


#: The files of a run folder that are results (committed); ``ckpt/`` travels only while a run is in flight.
RESULT_FILES = ("config.json", "status.json", "metrics.json", "rounds.csv", "metrics.png")


def _ckpt_steps(run_dir: Path) -> list[int]:
    """The checkpoint steps (orbax step folders) of a run folder, oldest first."""
    ck = run_dir / "ckpt"
    return sorted(int(p.name) for p in ck.iterdir() if p.is_dir() and p.name.isdigit()) if ck.is_dir() else []


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".syncing")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _same_result_file(s: Path, t: Path) -> bool:
    """Whether the result file ``t`` already holds what ``s`` does: the same bytes, or for ``config.json`` the
    same record but for the ``earlier_segments`` that landing added to ``t`` (:func:`_landing_record`)."""
    if not t.exists():
        return False
    a, b = s.read_bytes(), t.read_bytes()
    if a == b:
        return True
    if s.name != "config.json":
        return False
    try:
        src, dst = json.loads(a), json.loads(b)
    except ValueError:
        return False
    return (
        isinstance(src, dict)
        and isinstance(dst, dict)
        and "earlier_segments" not in src
        and "earlier_segments" in dst
        and {k: v for k, v in dst.items() if k != "earlier_segments"} == src
    )


def _landing_record(s: Path, t: Path) -> dict | None:
    """The ``config.json`` to land for the finished run ``s`` over the parked run ``t`` when ``s`` resumed
    (``from_round`` > 0 in its ``status.json``) and does not list its earlier segments itself: its record with
    ``earlier_segments`` taken from ``t``'s parked record. None when there is nothing to add."""
    from fedbpt_jax.checkpoint import read_json
    from fedbpt_jax.federated.records import earlier_record, resumed_record

    try:
        status_t = read_json(t / "status.json")
        status_s = read_json(s / "status.json")
        record = read_json(s / "config.json")
    except (OSError, ValueError):
        return None
    if not (isinstance(status_t, dict) and isinstance(status_s, dict) and isinstance(record, dict)):
        return None
    if status_t.get("state") != "parked" or "earlier_segments" in record:
        return None
    try:
        from_round = int(status_s.get("from_round", 0))
    except (TypeError, ValueError):
        return None
    earlier = earlier_record(t / "config.json")
    if from_round <= 0 or earlier is None:
        return None
    return resumed_record(earlier, record, from_round)


def sync(src: Path, dst: Path, dry_run: bool = False) -> list[str]:
    """Brings the grid folder ``dst`` up to date with ``src``; returns a line per run folder it changed.

    For carrying a long grid across machines through the repository: a *finished* run's result files
    (:data:`RESULT_FILES`) are copied and any checkpoint parked beside them in ``dst`` is removed (results
    are what is committed); an *unfinished* run that has a checkpoint is parked: its files so far plus its
    newest checkpoint step only, with ``status.json`` saying so (``state = "parked"``), so that ``grid.py run``
    on another machine, given this folder, resumes it from that round instead of starting over. Nothing in
    ``dst`` that is further along is replaced: a run finished there, or a parked checkpoint at the same or a
    later step, is left alone, and so is a run finished in both as far whose files differ (said, not copied:
    the committed record may carry what the source lacks). The grid's ``grid.json`` (its declaration) is copied
    when it differs. ``ckpt/`` is git-ignored: ``git add -f`` a parked checkpoint to commit it.

    A finished run that replaces a parked one and resumed from it (its ``status.json`` has ``from_round`` > 0)
    but whose ``config.json`` has no ``earlier_segments`` (written by code that predates them) lands with them
    added from the parked ``config.json``, the record of the process that computed the earlier rounds
    (:func:`fedbpt_jax.federated.records.resumed_record`), as a run resumed by this code records itself; later
    syncs treat that record and the source's as the same."""
    from fedbpt_jax.checkpoint import read_json, write_json_atomic

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise GridError(f"sync: no grid folder {src}")
    changed = []
    if (src / "grid.json").exists():
        same = (dst / "grid.json").exists() and (dst / "grid.json").read_bytes() == (src / "grid.json").read_bytes()
        if not same:
            changed.append("grid.json: copied")
            if not dry_run:
                dst.mkdir(parents=True, exist_ok=True)
                _copy_atomic(src / "grid.json", dst / "grid.json")
    for cfg_path in sorted(src.glob("*/config.json")):
        s = cfg_path.parent
        if s.name.endswith((".copying", ".syncing")):
            continue
        t = dst / s.name
        try:
            rounds = int(read_json(cfg_path)["settings"]["rounds"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            changed.append(f"{s.name}: config.json unreadable, not copied")
            continue
        done, last = is_finished(s, rounds)
        t_done, t_last = is_finished(t, rounds)
        files = [f for f in RESULT_FILES if (s / f).exists()]
        if done:
            parked = (t / "ckpt").is_dir()
            same = all(_same_result_file(s / f, t / f) for f in files)
            if same and not parked:
                continue
            if t_done and t_last >= last:  # finished there too and as far: never overwritten
                changed.append(
                    f"{s.name}: finished in both (round {t_last} there) with different files, left alone: compare "
                    "them and copy by hand if the source is the record to keep"
                )
                continue
            record = _landing_record(s, t)
            segments = (
                ", rounds "
                + ", ".join(f"{g['from_round'] + 1}-{g['to_round']}" for g in record["earlier_segments"])
                + " recorded as earlier segments from the parked config.json"
                if record
                else ""
            )
            changed.append(
                f"{s.name}: finished (round {last}), results copied"
                + (", checkpoint removed" if parked else "")
                + segments
            )
            if not dry_run:
                t.mkdir(parents=True, exist_ok=True)
                for f in files:
                    if record and f == "config.json":
                        write_json_atomic(t / f, record)  # the source's record with its earlier segments
                    else:
                        _copy_atomic(s / f, t / f)
                shutil.rmtree(t / "ckpt", ignore_errors=True)
            continue
        steps, t_steps = _ckpt_steps(s), _ckpt_steps(t)
        if not steps:
            continue  # nothing to resume from (a manual prompt, or a run before its first checkpoint)
        if t_done or (t_steps and t_steps[-1] >= steps[-1]):
            continue
        changed.append(f"{s.name}: in flight, parked at checkpoint step {steps[-1]} (round {last} evaluated)")
        if dry_run:
            continue
        t.mkdir(parents=True, exist_ok=True)
        for f in files:
            if f != "status.json":
                _copy_atomic(s / f, t / f)
        tmp = t / "ckpt.syncing"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        shutil.copytree(s / "ckpt" / str(steps[-1]), tmp / str(steps[-1]))
        for marker in (tmp / str(steps[-1])).rglob("commit_success.txt"):  # orbax writes the absolute path here
            marker.write_text("Checkpoint commit was successful\n")
        old = t / "ckpt.old"  # the previous parked step stays on disk until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        if (t / "ckpt").exists():
            os.replace(t / "ckpt", old)
        os.replace(tmp, t / "ckpt")
        shutil.rmtree(old, ignore_errors=True)
        status = read_json(s / "status.json") if (s / "status.json").exists() else {}
        status.update(state="parked", parked_at_step=steps[-1], parked_at_round=last)
        write_json_atomic(t / "status.json", status)
    return changed


def cmd_sync(args) -> int:
    lines = sync(Path(args.src), Path(args.dst), args.dry_run)
    for line in lines:
        print(("would: " if args.dry_run else "") + line, flush=True)
    print(f"sync {args.src} -> {args.dst}: {len(lines)} change(s){' (dry run)' if args.dry_run else ''}")
    if not args.dry_run and any("parked at" in line for line in lines):
        print("parked checkpoints are git-ignored: commit them with `git add -f <run folder>/ckpt`")
    return 0


def _portable(text: str) -> str:
    """``text`` with this machine's repository and Python prefixes shortened, for files that get committed."""
    for prefix, short in ((sys.prefix, "<python>"), (sys.base_prefix, "<python>"), (str(HERE.parent), ".")):
        text = text.replace(prefix.rstrip("/") + "/", short + "/")
    return text


def cmd_report(args) -> int:
    from fedbpt_jax.comparisons import write_grid_report
    from fedbpt_jax.report import ReportError

    try:
        write_grid_report(args.dirs, args.out, args.title)
    except ReportError as err:
        raise GridError(str(err)) from None
    out = Path(args.out) if args.out else Path(args.dirs[0]) / "report"
    print((out / "report.md").read_text())
    print(f"report written to {out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) a grid")
    r.add_argument("grid", help="grid file (.toml or .json)")
    r.add_argument("--out", default=None, help="output folder (default experiments/results/grid_<name>)")
    r.add_argument(
        "--only",
        action="append",
        default=[],
        help="keep runs whose axis label or setting equals a value: key=value or key=v1,v2 (repeatable: all must hold)",
    )
    r.add_argument(
        "--run",
        action="append",
        default=[],
        help="only this run (its folder name or hash, as --dry-run lists them; repeatable)",
    )
    r.add_argument("--max-runs", type=int, default=None, help="start at most N runs (skipped ones do not count)")
    r.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="run up to N runs at once, each in its own process (for a GPU/TPU that one run does not fill; "
        "on a CPU they only share its cores)",
    )
    r.add_argument(
        "--restart-every",
        type=int,
        default=None,
        metavar="ROUNDS",
        help="run each run in fresh processes of at most ROUNDS rounds each, every one resuming from the "
        "checkpoint the one before left (the same numbers as one process, one compilation more per restart)",
    )
    r.add_argument(
        "--stop-after-rounds",
        type=int,
        default=None,
        metavar="ROUNDS",
        help="compute at most ROUNDS rounds of each run here, then stop it at a checkpoint (it resumes there "
        "next time); e.g. to split long runs over sessions",
    )
    r.add_argument("--dry-run", action="store_true", help="list what would run, resume or be skipped")
    r.add_argument(
        "--no-reuse",
        dest="reuse",
        action="store_false",
        help="compute every run here, even one finished with the same settings in another grid folder beside "
        "the output folder (by default that run is copied, checkpoint included, and relabelled)",
    )
    p = sub.add_parser("report", help="tables (markdown + JSON) and plots of one or more grid folders")
    p.add_argument("dirs", nargs="+", help="grid output folders")
    p.add_argument("--out", default=None, help="report folder (default <first dir>/report)")
    p.add_argument("--title", default=None)
    y = sub.add_parser(
        "sync",
        help="bring a grid folder up to date with another: finished runs' results, in-flight runs' newest checkpoint",
    )
    y.add_argument("src", help="grid folder where the runs are computed (e.g. in a pinned worktree)")
    y.add_argument("dst", help="grid folder to update (e.g. the committed one, or a fresh worktree's)")
    y.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    args = ap.parse_args(argv)
    try:
        return {"run": cmd_run, "report": cmd_report, "sync": cmd_sync}[args.command](args)
    except GridError as err:
        print(f"grid.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
