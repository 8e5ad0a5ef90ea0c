"""Does bfloat16 change what CMA-ES sees? Fitness rankings and tuned-prompt accuracy, float32 vs bfloat16.

With SmolLM2-135M-Instruct and real SST-2 data (the completion template, prompt after the text):

1. a prompt is tuned with centralized BBT in float32 on a 16-shot split (``--generations``);
2. **ranking**: populations are drawn as CMA-ES draws them, ``z ~ N(m, σ² I)`` with λ ∈ {5, 20},
   σ ∈ {0.1, 1} and m ∈ {0 (the start), the tuned mean}; each population is scored on a client-sized
   batch of training examples (the clean mean CE loss, the fitness of BBT and FedAvg-BBT; FedBPT's
   ratio divides by a second loss of the same kind) by the same model in float32 and in bfloat16;
   the Spearman correlation of the two fitness vectors is computed per population, together with
   whether the best candidate (the one CMA-ES's mean moves towards most) is the same;
3. **accuracy**: z = 0 and the tuned z are scored on the whole SST-2 test set (872 sentences) both ways.

    python benchmarks/precision_ranking.py --json benchmarks/results/precision_ranking.json
    python benchmarks/precision_ranking.py --quick         # tiny random model, seconds (a smoke test)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets OPENBLAS_NUM_THREADS before numpy/jax)

# isort: split

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedbpt_jax import bbt, objective, prompt  # noqa: E402
from fedbpt_jax.models import decoder  # noqa: E402


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties; 1.0 when both vectors are constant)."""

    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for v in np.unique(x):  # ties share their mean rank
            tie = x == v
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(np.asarray(a)), ranks(np.asarray(b))
    if ra.std() == 0 or rb.std() == 0:
        return 1.0 if ra.std() == rb.std() else 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def as_bf16(lm):
    cfg = dataclasses.replace(lm.config, compute_dtype="bfloat16")
    return dataclasses.replace(lm, config=cfg, params=decoder.cast_params(cfg, lm.params))


LAMBDAS = (5, 20)
SIGMAS = (0.1, 1.0)
SUMMARY_COLUMNS = [
    ("lambda", "λ"),
    ("sigma", "σ"),
    ("populations", "populations"),
    ("spearman_mean", "Spearman mean"),
    ("spearman_median", "median"),
    ("spearman_min", "min"),
    ("frac_ge_0.99", "share ≥ 0.99"),
    ("same_best", "same best candidate"),
    ("max_rel_diff_median", "median max rel. fitness diff"),
]


def _parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny random model, few populations")
    ap.add_argument("--populations", type=int, default=25, help="populations per (λ, σ, mean) cell")
    ap.add_argument("--examples", type=int, default=8, help="examples scored per population (a client's data)")
    ap.add_argument("--n-prompt", type=int, default=5)
    ap.add_argument("--generations", type=int, default=30, help="float32 BBT generations for the tuned prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


@dataclasses.dataclass
class _Setup:
    """The float32 model, its bfloat16 copy and the data: training examples, test set, scoring spec."""

    lm32: Any
    lm16: Any
    train: Any
    test: Any
    spec: Any
    source: str


def _quick_setup(args) -> tuple:
    """The tiny random decoder on random tokens (the test set is the training set); shrinks the budget."""
    from fedbpt_jax import testing

    lm32 = testing.tiny_decoder(0)
    train, spec, _ = common.scoring_batch(lm32, 32, 24, args.n_prompt, seed=1)
    train = train.replace(labels=jnp.asarray(np.arange(32) % 2, jnp.int32))
    args.populations, args.generations = min(args.populations, 3), min(args.generations, 4)
    return lm32, train, train, spec, "random tokens (tiny model)"


def _sst2_setup(args) -> tuple:
    """SmolLM2-135M-Instruct in float32 on a 16-shot SST-2 split and the SST-2 test set."""
    from fedbpt_jax import data as fdata
    from fedbpt_jax import models

    lm32 = models.load("smollm2-135m-instruct", compute_dtype="float32")
    pool = fdata.load_task_data("sst2", None, "train")
    tr, _ = fdata.few_shot(pool, 16, args.seed)
    train = fdata.tokenize("sst2", tr, lm32.tokenizer, "decoder", n_prompt=args.n_prompt)
    test = fdata.tokenize(
        "sst2", fdata.load_task_data("sst2", None, "test"), lm32.tokenizer, "decoder", n_prompt=args.n_prompt
    )
    spec = fdata.scoring_spec("sst2", lm32.tokenizer, "decoder", n_prompt=args.n_prompt)
    source = "SST-2 (16-shot train for tuning and ranking, 872 test sentences for accuracy)"
    return lm32, train, test, spec, source


def _prepare(args) -> _Setup:
    t0 = time.perf_counter()
    lm32, train, test, spec, source = _quick_setup(args) if args.quick else _sst2_setup(args)
    setup = _Setup(lm32, as_bf16(lm32), train, test, spec, source)
    print(f"models ready in {time.perf_counter() - t0:.1f} s; data: {source}", flush=True)
    return setup


def _tune(setup: _Setup, args):
    """Step 1: a prompt tuned with float32 BBT: ``(z_tuned, projection)``."""
    cfg = bbt.BBTConfig(
        n_prompt_tokens=args.n_prompt, population_size=10, num_generations=args.generations, eval_every=args.generations
    )
    t0 = time.perf_counter()
    res = bbt.tune(jax.random.key(args.seed), setup.lm32, setup.train, setup.spec, cfg, progress=False)
    print(
        f"tuned {args.generations} generations in {time.perf_counter() - t0:.0f} s; final loss "
        f"{float(res.history['loss_mean'][-1]):.4f}",
        flush=True,
    )
    return np.asarray(res.final_mean), res.projection


def _fitness_fns(setup: _Setup, A, args) -> dict:
    """``{dtype: (jitted fitness of a population, clean context, params)}`` on a client-sized batch."""
    batch = setup.train.take(np.arange(min(args.examples, setup.train.num_examples)))
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    spec = setup.spec
    fits = {}
    for name, lm in (("float32", setup.lm32), ("bfloat16", setup.lm16)):
        sc = objective.make_scorer(lm, "after", n_prompt_tokens=args.n_prompt)
        ctx = jax.jit(sc.prepare)(lm.params, batch, spec)

        def fitness(params, ctx, Z, sc=sc, hidden=lm.hidden_size):
            prompts = prompt.to_prompt(A, Z, hidden)
            return objective.population_fitness(sc, params, ctx, None, batch, spec, prompts)[0]

        fits[name] = (jax.jit(fitness), ctx, lm.params)
    return fits


def _population_row(a: np.ndarray, b: np.ndarray, lam: int, sigma: float, mean_name: str) -> dict:
    """How one population's float32 fitness ``a`` and bfloat16 fitness ``b`` agree."""
    return {
        "lambda": lam,
        "sigma": sigma,
        "mean": mean_name,
        "spearman": spearman(a, b),
        "same_best": bool(np.argmin(a) == np.argmin(b)),
        "max_rel_diff": float(np.max(np.abs(a - b) / np.abs(a))),
        "fitness_spread": float(np.std(a)),
    }


def _rankings(fits: dict, z_tuned: np.ndarray, args) -> list[dict]:
    """Step 2: one row per population, for every (λ, σ, mean) cell; a progress line per cell."""
    rows = []
    key = jax.random.key(100 + args.seed)
    t0 = time.perf_counter()
    for lam in LAMBDAS:
        for sigma in SIGMAS:
            for mean_name, mean in (("z=0", np.zeros_like(z_tuned)), ("tuned", z_tuned)):
                key, sub = jax.random.split(key)
                Z = jnp.asarray(mean) + sigma * jax.random.normal(sub, (args.populations, lam, z_tuned.shape[0]))
                out = {}
                for name, (fn, ctx, params) in fits.items():
                    out[name] = np.stack([np.asarray(fn(params, ctx, Z[i])) for i in range(args.populations)])
                for i in range(args.populations):
                    rows.append(_population_row(out["float32"][i], out["bfloat16"][i], lam, sigma, mean_name))
                cell = rows[-args.populations :]
                print(
                    f"  λ={lam:<2d} σ={sigma:<3} mean={mean_name:<5s}: Spearman median "
                    f"{np.median([r['spearman'] for r in cell]):.4f}, min "
                    f"{min(r['spearman'] for r in cell):.4f}, same best "
                    f"{np.mean([r['same_best'] for r in cell]):.2f} "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    return rows


def _summarise(rows: list[dict]) -> list[dict]:
    """One line per (λ, σ) cell, both means together."""
    summary = []
    for lam in LAMBDAS:
        for sigma in SIGMAS:
            cell = [r for r in rows if r["lambda"] == lam and r["sigma"] == sigma]
            rho = np.array([r["spearman"] for r in cell])
            summary.append(
                {
                    "lambda": lam,
                    "sigma": sigma,
                    "populations": len(cell),
                    "spearman_mean": float(rho.mean()),
                    "spearman_median": float(np.median(rho)),
                    "spearman_min": float(rho.min()),
                    "frac_ge_0.99": float(np.mean(rho >= 0.99)),
                    "same_best": float(np.mean([r["same_best"] for r in cell])),
                    "max_rel_diff_median": float(np.median([r["max_rel_diff"] for r in cell])),
                }
            )
    return summary


def _accuracy(setup: _Setup, A, z_tuned: np.ndarray, args) -> dict:
    """Step 3: test metrics of z = 0 and the tuned prompt, in float32 and in bfloat16."""
    acc = {}
    for name, lm in (("float32", setup.lm32), ("bfloat16", setup.lm16)):
        scorer = objective.make_scorer(lm, "after", n_prompt_tokens=args.n_prompt)
        ev = bbt.Evaluator(lm, scorer, setup.test, setup.spec)
        acc[name] = {
            "z=0": ev.metrics(A, jnp.zeros_like(jnp.asarray(z_tuned))),
            "tuned": ev.metrics(A, jnp.asarray(z_tuned)),
        }
    return acc


def _report(summary: list[dict], all_rho: np.ndarray, acc: dict) -> None:
    print()
    print(common.table(summary, SUMMARY_COLUMNS))
    print(
        f"\nall {len(all_rho)} populations: Spearman mean {all_rho.mean():.4f}, median {np.median(all_rho):.4f}, "
        f"min {all_rho.min():.4f}"
    )
    for which in ("z=0", "tuned"):
        a32, a16 = acc["float32"][which], acc["bfloat16"][which]
        print(
            f"test accuracy {which}: float32 {a32['accuracy']:.4f}  bfloat16 {a16['accuracy']:.4f} "
            f"(loss {a32['loss']:.4f} vs {a16['loss']:.4f})"
        )


def main(argv=None):
    args = _parse_args(argv)
    info = common.machine_info()
    print(f"machine: {info['cpu']} ({info['cores']} cores, {info['cpu_flags']}), jax {info['versions']['jax']}")
    setup = _prepare(args)
    z_tuned, A = _tune(setup, args)
    rows = _rankings(_fitness_fns(setup, A, args), z_tuned, args)
    summary = _summarise(rows)
    all_rho = np.array([r["spearman"] for r in rows])
    acc = _accuracy(setup, A, z_tuned, args)
    _report(summary, all_rho, acc)
    out = {
        "benchmark": "precision_ranking",
        "machine": info,
        "args": vars(args),
        "source": setup.source,
        "summary": summary,
        "rows": rows,
        "spearman_all": {
            "mean": float(all_rho.mean()),
            "median": float(np.median(all_rho)),
            "min": float(all_rho.min()),
            "n": len(all_rho),
        },
        "accuracy": acc,
        "target_spearman_0.99_mean": bool(all_rho.mean() >= 0.99),
    }
    if args.json:
        common.write_json(args.json, out)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
