"""Paper Table 1 style comparison: FedBPT vs its baselines on one task, IID and non-IID.

For each (algorithm, partition) it runs a simulation with the same data, model, projection and seed,
and writes ``results/<name>/{summary.json, <algo>_<split>/metrics.json, rounds.csv}`` plus a plot of
test accuracy per round (``accuracy.png``). The paper's setting is RoBERTa-large, 10 clients, 40 shots
per class, Dirichlet α = 1; on this project's CPU the default is SmolLM2-135M with a reduced budget.

    python experiments/compare_algorithms.py --task sst2 --rounds 10          # real model (slow on CPU)
    python experiments/compare_algorithms.py --tiny                           # 1-minute smoke run
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import fedbpt_jax  # noqa: E402,F401  (first: sets OPENBLAS_NUM_THREADS before numpy/jax load)

ALGOS = ("manual", "fedavg_bbt", "fedbpt", "centralized_bbt", "fedprompt")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--data", default=None)
    ap.add_argument("--algorithms", default=",".join(ALGOS))
    ap.add_argument("--splits", default="iid,noniid")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--d", type=int, default=500)
    ap.add_argument("--n-prompt", type=int, default=5)
    ap.add_argument("--population", type=int, default=5)
    ap.add_argument("--local-generations", type=int, default=8)
    ap.add_argument("--perturb-rate", type=float, default=0.5)
    ap.add_argument("--test-size", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="results folder (default experiments/results/compare_<task>)")
    ap.add_argument("--tiny", action="store_true", help="tiny random model and budget (smoke test)")
    return ap.parse_args(argv)


def load_model(args: argparse.Namespace):
    """The backbone; with ``--tiny`` the tiny random decoder, and the budget in ``args`` shrunk to match."""
    import fedbpt_jax as fb

    if not args.tiny:
        return fb.models.load(args.model)
    from fedbpt_jax import testing

    args.clients, args.shots, args.rounds, args.d, args.n_prompt = 4, 4, 2, 8, 2
    args.population, args.local_generations, args.test_size = 4, 2, 24
    return testing.tiny_decoder(0, num_layers=1, tokenizer=testing.chatml_tokenizer())


class SplitSetup(NamedTuple):
    """What every algorithm of one partition shares: data, configuration, projection and run key. (A named
    tuple, not a dataclass: the tests load this script by path, outside ``sys.modules``.)"""

    fed: Any
    data: Any
    cfg: Any
    hp: Any
    model: Any
    key_run: Any


def prepare_split(args: argparse.Namespace, lm, split: str) -> SplitSetup:
    import jax

    import fedbpt_jax as fb

    fed = fb.data.federated(
        args.task,
        lm.tokenizer,
        lm.kind,
        num_clients=args.clients,
        shots_per_class=args.shots,
        alpha=None if split == "iid" else 1.0,
        seed=args.seed,
        n_prompt=args.n_prompt,
        source=args.data,
        test_size=args.test_size or None,
    )
    cfg = fb.FedConfig(
        num_clients=args.clients,
        clients_per_round=args.clients,
        population_size=args.population,
        local_generations=args.local_generations,
        intrinsic_dim=args.d,
        n_prompt_tokens=args.n_prompt,
    )
    key_proj, key_run = jax.random.split(jax.random.key(args.seed))
    return SplitSetup(
        fed=fed,
        data=fb.FederatedData.from_host(fed),
        cfg=cfg,
        hp=fb.HParams(perturb_rate=args.perturb_rate),
        model=fb.ModelInputs.build(key_proj, lm, cfg),
        key_run=key_run,
    )


def run_algorithm(args: argparse.Namespace, lm, setup: SplitSetup, name: str, results_dir: Path):
    """One simulation: ``(summary row, test-accuracy curve)``."""
    import fedbpt_jax as fb

    algo = fb.make(name, setup.cfg, lm)
    t0 = time.perf_counter()
    carry, hist = fb.run(
        algo,
        setup.key_run,
        setup.data,
        setup.fed.test,
        lm,
        setup.model,
        dev=setup.fed.dev,
        num_rounds=args.rounds,
        hp=setup.hp,
        results_dir=results_dir,
        progress=not args.tiny,
    )
    s = fb.summarize(hist, carry)
    res = {
        "z0": s["initial_test_accuracy"],
        "final": s["final_test_accuracy"],
        "selected": s["selected_test_accuracy"],
        "selected_round": s["selected_round"],
        "best_test_reference": s["best_test_reference"],
        "seconds": time.perf_counter() - t0,
        "bytes_up_per_client": algo.cost.comm.up_per_client,
    }
    return res, [(e["round"], e["accuracy"]) for e in hist.evals]


def main(argv=None) -> int:
    args = parse_args(argv)

    from fedbpt_jax.checkpoint import write_json_atomic

    lm = load_model(args)
    out = Path(args.out or Path(__file__).parent / "results" / f"compare_{args.task}")
    summary = {"args": vars(args), "model": lm.name, "results": {}}
    curves = {}
    for split in args.splits.split(","):
        setup = prepare_split(args, lm, split)
        for name in args.algorithms.split(","):
            res, curve = run_algorithm(args, lm, setup, name, out / f"{name}_{split}")
            summary["results"][f"{name}/{split}"] = res
            curves[f"{name}/{split}"] = curve
            print(
                f"{name:16s} {split:7s} z0 {res['z0']:.4f} final {res['final']:.4f} dev-selected "
                f"{res['selected']:.4f} (round {res['selected_round']})  {res['seconds']:.0f}s",
                flush=True,
            )
            write_json_atomic(out / "summary.json", summary)
    plot(curves, out / "accuracy.png", f"{args.task}, {lm.name}")
    return 0


def plot(curves: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, pts in curves.items():
        r, a = zip(*pts)
        ax.plot(r, a, marker="o", ms=3, label=label, ls="-" if label.endswith("noniid") else "--")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
