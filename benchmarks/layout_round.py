"""Whole FedBPT rounds in each decoder layout, on real task texts: what the prompt-before layout costs.

For each task (its real few-shot texts, so the real length spread), each ``n_prompt`` and each variant, one
jitted ``fedbpt(config, lm).round`` (K clients, E examples each, λ candidates, I generations, a perturbed copy
per round) is compiled ahead of time and then timed:

* ``after``: ``[text, prompt, cue]`` with the text-prefix cache (the fast variant);
* ``before``: ``[lead, prompt, text, cue]`` (the default) with the prompt cache: each candidate's ``[lead,
  prompt]`` keys/values are computed once and the texts, sorted by length and packed to their real tokens
  (``TokenBatch.packing``), with their cues attend to them; the clean and the perturbed copy share the pass;
* ``before-nocache``: the same layout computed the plain way, every (candidate, example) row in full at the
  padded length ``T`` (what the layout cost before the cache).

Before timing, the cached scorer's fitness of one client's candidates is checked against the uncached one
(relative 1e-4 in float32). Reported per item: round seconds, compile seconds, the cost model's GFLOP per
round and GFLOP/s, the ratio to ``after`` on the same examples, and for ``before`` the **fraction of pure
inference**: the seconds of the same model work alone (every client's clean and perturbed copies scored for
all I·λ + 1 candidates in one batched pass, no ES, no host work) over the round's seconds. XLA's buffer plan
of the compiled round (``memory_analysis``) and the per-candidate prompt cache's bytes are recorded.

    python benchmarks/layout_round.py --quick                         # tiny random model, ~1 min
    python benchmarks/layout_round.py --tasks sst2 --n-prompt 10 --json benchmarks/results/layout_round_sst2_n10.json

``--data`` (default ``$FEDBPT_JAX_DATA`` or ``../shared/data``) holds the tasks' TSV files. On 2 CPU cores a
SmolLM2 round takes minutes: run items one by one (``--variants``) and merge the JSON files.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets OPENBLAS_NUM_THREADS before numpy/jax)

# isort: split

import numpy as np  # noqa: E402

VARIANTS = ("after", "before", "before-nocache")


def _data(lm, task: str, source, K: int, E: int, n: int, style: str | None, seed: int):
    import jax
    import jax.numpy as jnp

    from fedbpt_jax import data as fdata
    from fedbpt_jax import testing
    from fedbpt_jax.federated.core import FederatedData
    from fedbpt_jax.models import decoder_cache

    if lm.tokenizer is None:  # tiny random model: random lengths
        train = testing.random_batch(seed, E, 24, lm.vocab_size, leading=(K,), min_len=2)
        spec = testing.random_spec(lm.vocab_size, cue_len=3)
        train = train.replace(packing=decoder_cache.packing_for(train.attention_mask, cue_len=3))
        counts = np.full((K,), E, np.int32)
        desc = "random tokens"
    else:
        fd = fdata.federated(
            task,
            lm.tokenizer,
            "decoder",
            num_clients=K,
            shots_per_class=-(-K * E // 2),
            alpha=None,
            seed=seed,
            n_prompt=n,
            source=source,
            style=style,
            pad_to=E,
            max_positions=getattr(lm.config, "max_position_embeddings", None),
        )
        train, counts, spec = fd.train, fd.train_counts, fd.spec
        desc = f"{task} few-shot, IID, style {style or 'default'}"
    data = FederatedData(
        train=jax.tree_util.tree_map(jnp.asarray, train), counts=jnp.asarray(counts, jnp.int32), spec=spec
    )
    return data, desc


def _pure_inference(lm, scorer, data, A, evals: int):
    """The round's model work alone: every client's clean and perturbed copy, ``evals`` candidates each, in
    one batched pass (the same packed contexts and shared prompt pass as the round; no ES, no host work)."""
    import jax

    from fedbpt_jax import objective, prompt

    spec, hidden = data.spec, lm.hidden_size

    def client(params, A, b, z):
        ctx = scorer.prepare(params, b, spec)
        paired = objective.stack_contexts(ctx, ctx)
        return objective.population_fitness_paired(scorer, params, paired, b, spec, prompt.to_prompt(A, z, hidden))

    @jax.jit
    def run(params, A, train, Z):
        return jax.vmap(lambda b, z: client(params, A, b, z))(train, Z)

    K = data.train.input_ids.shape[0]
    Z = 0.1 * jax.random.normal(jax.random.key(5), (K, evals, A.shape[0]))
    return run, Z


def _check(lm, data, A, n: int, layout: str) -> float:
    """Max relative difference of the cached and the uncached fitness of one client's candidates."""
    import jax

    from fedbpt_jax import objective, prompt

    b = jax.tree_util.tree_map(lambda a: a[0], data.train)
    pert = objective.perturb(jax.random.key(2), b, 0.5, data.spec)
    z = 0.5 * jax.random.normal(jax.random.key(3), (4, A.shape[0]))
    prompts = prompt.to_prompt(A, z, lm.hidden_size)
    out = []
    for cache in (True, False):
        sc = objective.make_scorer(lm, layout, use_cache=cache, n_prompt_tokens=n)
        fit = jax.jit(
            lambda p, b, pert, pr, sc=sc: objective.population_fitness(
                sc, p, sc.prepare(p, b, data.spec), sc.prepare(p, pert, data.spec), b, data.spec, pr
            )[0]
        )
        out.append(np.asarray(fit(lm.params, b, pert, prompts)))
    return float(np.max(np.abs(out[0] - out[1]) / np.maximum(np.abs(out[1]), 1e-12)))


@dataclasses.dataclass
class _Item:
    """One item's round: its data, configuration, projection, scorer and algorithm."""

    layout: str
    data: Any
    desc: str
    cfg: Any
    hp: Any
    A: Any
    model: Any
    scorer: Any
    algo: Any


def _prepare_item(lm, task: str, n: int, variant: str, args) -> _Item:
    import jax

    from fedbpt_jax import objective, prompt
    from fedbpt_jax.federated import FedConfig, HParams, algorithms
    from fedbpt_jax.federated.core import ModelInputs

    K, E = args.clients, args.examples
    layout = "after" if variant == "after" else "before"
    data, desc = _data(lm, task, args.data, K, E, n, args.style, args.seed)
    cfg = FedConfig(
        num_clients=K,
        clients_per_round=K,
        population_size=args.population,
        local_generations=args.generations,
        intrinsic_dim=args.intrinsic_dim,
        n_prompt_tokens=n,
        layout=layout,
    )
    hp = HParams(sigma0=1.0, perturb_rate=0.5).validate()
    A = prompt.make_projection(
        jax.random.key(1), lm.input_embeddings(), intrinsic_dim=cfg.intrinsic_dim, n_prompt_tokens=n
    )
    model = ModelInputs(lm.params, A)
    scorer = objective.make_scorer(lm, layout, use_cache=variant != "before-nocache", n_prompt_tokens=n)
    algo = algorithms.fedbpt(cfg, lm, scorer=scorer)
    return _Item(layout, data, desc, cfg, hp, A, model, scorer, algo)


def _describe(item: _Item, task: str, n: int, variant: str, args) -> dict:
    """The item's shape: task, variant, sizes, padded and real text lengths."""
    data, cfg = item.data, item.cfg
    mask = np.asarray(data.train.attention_mask)
    return {
        "task": task,
        "data": item.desc,
        "variant": variant,
        "layout": item.layout,
        "n_prompt": n,
        "K": args.clients,
        "E": args.examples,
        "T": int(mask.shape[-1]),
        "lead": 0 if data.spec.lead_ids is None else int(np.shape(data.spec.lead_ids)[0]),
        "cue": int(np.shape(data.spec.cue_ids)[0]),
        "mean_text_tokens": float(mask.sum(-1).mean()),
        "packing": list(data.train.packing or ()),
        "population": cfg.population_size,
        "generations": cfg.local_generations,
    }


def _before_details(lm, item: _Item, res: dict) -> dict:
    """The prompt-before layout's packing, prompt-cache bytes and the cached vs uncached fitness check."""
    from fedbpt_jax.models import decoder_cache

    train = item.data.train
    rows, width, _ = train.packing
    mask = np.asarray(train.attention_mask)
    real = decoder_cache.example_lengths(mask, train.example_mask) + res["cue"] * (np.asarray(train.example_mask) > 0)
    n = res["n_prompt"]
    out = {
        "packed_rows": rows,
        "packed_width": width,
        "mean_client_tokens": float(real.sum(-1).mean()),
        "prompt_cache_bytes_per_candidate": decoder_cache.prompt_cache_bytes(lm.config, n, res["lead"]),
        "check_max_rel_diff": _check(lm, item.data, item.A, n, item.layout),
    }
    print(
        f"[{res['task']} n={n} {res['variant']}] cached vs uncached fitness: max rel diff "
        f"{out['check_max_rel_diff']:.2e}",
        flush=True,
    )
    return out


def _time_round(item: _Item, args) -> dict:
    """The jitted round compiled ahead of time, its XLA temp buffers, then timed."""
    import jax

    out = {}
    state = item.algo.init(jax.random.key(0), item.hp)
    key = jax.random.key(3)
    compiled, out["compile_s"] = common.aot_compile(
        jax.jit(item.algo.round), key, state, item.data, item.hp, item.model
    )
    try:
        ma = compiled.memory_analysis()
        out["xla_temp_bytes"] = int(getattr(ma, "temp_size_in_bytes", 0))
    except Exception:  # noqa: BLE001  (not every backend has it)
        pass
    t = common.time_call(compiled, key, state, item.data, item.hp, item.model, repeats=args.repeats, warmup=args.warmup)
    out.update({"round_s": t["median_s"], "round_times_s": t["times_s"], "cpu_util": t["cpu_util"]})
    return out


def _time_pure(lm, item: _Item, round_s: float, args) -> dict:
    """The round's model work alone, compiled and timed; its fraction of the round."""
    evals = item.cfg.local_generations * item.cfg.population_size + 1
    fn, Z = _pure_inference(lm, item.scorer, item.data, item.A, evals)
    out = {}
    pure, out["pure_compile_s"] = common.aot_compile(fn, lm.params, item.A, item.data.train, Z)
    p = common.time_call(pure, lm.params, item.A, item.data.train, Z, repeats=args.repeats, warmup=args.warmup)
    out["pure_inference_s"] = p["median_s"]
    out["fraction_of_pure_inference"] = p["median_s"] / round_s
    return out


def run_item(lm, task: str, n: int, variant: str, args) -> dict:
    from fedbpt_jax.federated import round_cost

    item = _prepare_item(lm, task, n, variant, args)
    res = _describe(item, task, n, variant, args)
    if variant == "before":
        res.update(_before_details(lm, item, res))
    res["gflop_per_round"] = res["K"] * round_cost(item.algo, lm, item.data)["flops_per_client"] / 1e9
    res.update(_time_round(item, args))
    res["gflops"] = res["gflop_per_round"] / res["round_s"]
    if variant == "before" and not args.skip_pure:
        res.update(_time_pure(lm, item, res["round_s"], args))
    print(
        f"[{task} n={n} {variant}] round {res['round_s']:.1f} s (compile {res['compile_s']:.1f} s), "
        f"{res['gflop_per_round']:.0f} GFLOP, {res['gflops']:.1f} GFLOP/s"
        + (
            f", pure inference {res['fraction_of_pure_inference']:.2f} of the round"
            if "pure_inference_s" in res
            else ""
        ),
        flush=True,
    )
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", choices=common.MODELS)
    ap.add_argument("--tasks", default="sst2,yelp_polarity")
    ap.add_argument("--n-prompt", default="10,50")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--style", default=None, help="decoder template style (default: the library's)")
    ap.add_argument("--data", default=os.environ.get("FEDBPT_JAX_DATA", os.path.join("..", "shared", "data")))
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--population", type=int, default=5)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--intrinsic-dim", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=0, help="untimed rounds after compilation (default 0)")
    ap.add_argument("--skip-pure", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny random model, K = 2, small everything")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.tasks, args.n_prompt = "tiny", "random", "3"
        args.clients, args.examples, args.generations, args.intrinsic_dim = 2, 4, 2, 16
    lm = common.load_model(args.model)
    info = common.machine_info()
    rows = []
    for task in args.tasks.split(","):
        for n in (int(x) for x in args.n_prompt.split(",")):
            for variant in args.variants.split(","):
                if variant not in VARIANTS:
                    raise SystemExit(f"unknown variant {variant!r}; accepted: {VARIANTS}")
                rows.append(run_item(lm, task, n, variant, args))
                if args.json:  # after every item: a long run that stops keeps what it measured
                    common.write_json(args.json, {"machine": info, "args": vars(args), "rows": rows})
    by = {(r["task"], r["n_prompt"], r["variant"]): r for r in rows}
    for r in rows:
        base = by.get((r["task"], r["n_prompt"], "after"))
        if base is not None:
            r["vs_after"] = r["round_s"] / base["round_s"]
        nocache = by.get((r["task"], r["n_prompt"], "before-nocache"))
        if r["variant"] == "before" and nocache is not None:
            r["cache_speedup"] = nocache["round_s"] / r["round_s"]
    cols = [
        ("task", "task"),
        ("n_prompt", "n"),
        ("variant", "variant"),
        ("mean_text_tokens", "text tokens (mean)"),
        ("T", "T"),
        ("round_s", "round (s)"),
        ("vs_after", "x after"),
        ("cache_speedup", "cache speedup"),
        ("gflops", "GFLOP/s"),
        ("fraction_of_pure_inference", "pure inference / round"),
        ("compile_s", "compile (s)"),
    ]
    print(common.table(rows, cols))
    if args.json:
        common.write_json(args.json, {"machine": info, "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
