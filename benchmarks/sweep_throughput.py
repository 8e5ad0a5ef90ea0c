"""Throughput of a seed sweep as one compiled program (``fedbpt_jax.federated.sweep``) vs the same lanes run
one after another (``fedbpt_jax.federated.run``, one call per seed), for S seeds of one FedBPT configuration.

For each S:

* **sweep**: ``sweep(..., seeds=S seeds)`` — S lanes vmapped in one jitted program (rounds, evaluations on
  test and dev, dev selection). The first call (tracing + XLA compilation + one execution) is reported as
  ``sweep_first_s``; the timed call is a second sweep with other seeds and the same lane count, which reuses
  the compiled program (steady state).
* **sequential**: S calls of ``run`` with the same configuration (each: its own segments, evaluations and
  selection), after one warm-up ``run`` that compiles its segment; the S timed calls reuse it.

Reported: lanes/s of both, the speedup (sweep lanes/s over sequential lanes/s), the compile-inclusive first
sweep, and the lanes' mean final test accuracy in both paths (the same work, not bitwise the same numbers:
the batched program rounds differently and CMA-ES can amplify that over rounds, so they may differ by an
example or so).
Nothing is asserted on time.

    python benchmarks/sweep_throughput.py --quick                       # tiny model, S in {1, 4}, < 2 min
    python benchmarks/sweep_throughput.py --json benchmarks/results/sweep_throughput_tiny.json   # S in {1, 4, 16}
    python benchmarks/sweep_throughput.py --model smollm2-135m-instruct --json benchmarks/results/sweep_throughput_smollm2.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets OPENBLAS_NUM_THREADS before numpy/jax)

# isort: split

import numpy as np  # noqa: E402

MODELS = ("tiny", "smollm2-135m-instruct")


def _setup(model: str, n: int, k: int, e: int, t: int, n_prompt: int, d: int, eval_size: int, seed: int = 0):
    """``(lm, algo, data, test, dev, model_inputs, source)`` of one FedBPT configuration."""
    import jax
    import jax.numpy as jnp

    from fedbpt_jax import data as fdata
    from fedbpt_jax import federated as fl
    from fedbpt_jax import testing

    lm = common.load_model("tiny" if model == "tiny" else "smollm2")
    if lm.tokenizer is not None:
        fd = fdata.federated(
            "sst2",
            lm.tokenizer,
            lm.kind,
            num_clients=n,
            shots_per_class=-(-n * e // 2),
            alpha=None,
            seed=seed,
            n_prompt=n_prompt,
            max_length=t,
            pad_to=e,
            pad_to_max_length=True,
            test_size=eval_size,
        )
        data, test, dev, source = fl.FederatedData.from_host(fd), fd.test, fd.dev, "sst2 few-shot, IID split"
    else:
        train = testing.random_batch(seed, e, t, lm.vocab_size, leading=(n,))
        spec = testing.random_spec(lm.vocab_size, cue_len=4)
        data = fl.FederatedData(
            train=jax.tree_util.tree_map(jnp.asarray, train), counts=jnp.full((n,), e, jnp.int32), spec=spec
        )
        test = testing.random_batch(seed + 1, eval_size, t, lm.vocab_size)
        dev = testing.random_batch(seed + 2, eval_size, t, lm.vocab_size)
        source = "random tokens"
    cfg = fl.FedConfig(
        num_clients=n,
        clients_per_round=k,
        population_size=5,
        local_generations=8,
        intrinsic_dim=d,
        n_prompt_tokens=n_prompt,
        chunk_clients=0,
    )
    algo = fl.fedbpt(cfg, lm)
    model_inputs = fl.ModelInputs.build(jax.random.key(seed), lm, cfg)
    return lm, algo, data, test, dev, model_inputs, source


def measure(s: int, setup, *, rounds: int, eval_every: int, eval_chunk: int) -> dict:
    """One S: the sweep (first and steady call) and S sequential runs (after a warm-up run)."""
    from fedbpt_jax import federated as fl

    lm, algo, data, test, dev, model, _ = setup
    kw = dict(num_rounds=rounds, eval_every=eval_every, dev=dev, eval_chunk=eval_chunk)

    t0 = time.perf_counter()
    fl.sweep(algo, data, test, lm, model, seeds=list(range(1000, 1000 + s)), **kw)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = fl.sweep(algo, data, test, lm, model, seeds=list(range(s)), **kw)
    steady = time.perf_counter() - t0

    import jax

    fl.run(algo, jax.random.key(999), data, test, lm, model, progress=False, log_clients=False, **kw)  # warm-up
    t0 = time.perf_counter()
    finals = []
    for seed in range(s):
        carry, hist = fl.run(algo, jax.random.key(seed), data, test, lm, model, progress=False, log_clients=False, **kw)
        finals.append(hist.evals[-1]["accuracy"])
    seq = time.perf_counter() - t0
    return {
        "S": s,
        "lanes": s,
        "rounds": rounds,
        "eval_every": eval_every,
        "sweep_first_s": first,
        "sweep_s": steady,
        "sweep_lanes_per_s": s / steady,
        "sequential_s": seq,
        "sequential_lanes_per_s": s / seq,
        "speedup": seq / steady,
        "sweep_final_test_acc_mean": float(np.mean([r["final_test_accuracy"] for r in res.lanes])),
        "sequential_final_test_acc_mean": float(np.mean(finals)),
    }


COLUMNS = [
    ("S", "S"),
    ("sweep_first_s", "first sweep s (compile)"),
    ("sweep_s", "sweep s"),
    ("sweep_lanes_per_s", "sweep lanes/s"),
    ("sequential_s", "S runs s"),
    ("sequential_lanes_per_s", "sequential lanes/s"),
    ("speedup", "speedup"),
    ("sweep_final_test_acc_mean", "sweep final acc"),
    ("sequential_final_test_acc_mean", "runs final acc"),
]


def _config(args, source: str, rounds: int, every: int) -> dict:
    """The measured configuration, as the JSON output records it."""
    return {
        "model": args.model,
        "source": source,
        "N": args.clients,
        "K": args.per_round,
        "E": args.examples,
        "T": args.text_len,
        "n_prompt": args.n_prompt,
        "d": args.intrinsic_dim,
        "population": 5,
        "local_generations": 8,
        "eval_size": args.eval_size,
        "rounds": rounds,
        "eval_every": every,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, S in {1, 4}, 2 rounds")
    ap.add_argument("--model", default="tiny", choices=MODELS, help="backbone (default: %(default)s)")
    ap.add_argument("--seeds", default=None, help="comma list of S (default: 1,4,16; --quick: 1,4)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per lane (default: 4; --quick: 2)")
    ap.add_argument("--eval-every", type=int, default=None, help="rounds between evaluations (default: 2; --quick: 1)")
    ap.add_argument("--clients", type=int, default=10, help="N (default: %(default)s)")
    ap.add_argument("--per-round", type=int, default=4, help="K (default: %(default)s)")
    ap.add_argument("--examples", type=int, default=4, help="E examples per client (default: %(default)s)")
    ap.add_argument("--text-len", type=int, default=32, help="T text tokens (default: %(default)s)")
    ap.add_argument("--n-prompt", type=int, default=5, help="prompt tokens (default: %(default)s)")
    ap.add_argument("--intrinsic-dim", type=int, default=64, help="d (default: %(default)s)")
    ap.add_argument("--eval-size", type=int, default=32, help="test and dev examples each (default: %(default)s)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.quick and args.model != "tiny":
        ap.error("--quick runs the tiny model only")
    ss = [int(x) for x in (args.seeds or ("1,4" if args.quick else "1,4,16")).split(",")]
    rounds = args.rounds or (2 if args.quick else 4)
    every = args.eval_every or (1 if args.quick else 2)

    info = common.machine_info()
    setup = _setup(
        args.model,
        args.clients,
        args.per_round,
        args.examples,
        args.text_len,
        args.n_prompt,
        args.intrinsic_dim,
        args.eval_size,
    )
    config = _config(args, setup[-1], rounds, every)
    print(
        f"machine: {info['cpu']} ({info['cores']} cores, {info['cpu_flags']}), {info['jax_backend']}, "
        f"load {info['loadavg_start']}"
    )
    rows = []
    for s in ss:
        rows.append(measure(s, setup, rounds=rounds, eval_every=every, eval_chunk=args.eval_size))
        print(
            f"S={s}: sweep {rows[-1]['sweep_lanes_per_s']:.3f} lanes/s, sequential "
            f"{rows[-1]['sequential_lanes_per_s']:.3f} lanes/s",
            flush=True,
        )
    print()
    print(common.table(rows, COLUMNS))
    info["loadavg_end"] = list(os.getloadavg())
    if args.json:
        common.write_json(
            args.json, {"benchmark": "sweep_throughput", "machine": info, "config": config, "results": rows}
        )


if __name__ == "__main__":
    main()
