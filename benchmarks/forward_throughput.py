"""Forward throughput of black-box population scoring, in float32 and bfloat16.

Measures, in one process:

* this machine's matmul peak in each compute dtype (jitted 2048x2048 @ 2048x2048, bfloat16 inputs with
  float32 accumulation; measured again right before and after every timed item, since the machine may
  be shared: fractions use the bracketing pair of the item's own dtype);
* for each model (SmolLM2-135M with real weights and real SST-2 sentences; the tiny random decoder) and
  each decoder layout — "after" with the text-prefix cache (the default), "after" uncached
  (``make_scorer(use_cache=False)``) and "before" (the paper's prompt-first layout):
  - scoring a population of P candidates in ONE batched pass (``objective.population_logits``,
    vmapped over candidates) vs one candidate per pass (a Python loop over a jitted single-candidate
    call, each result read back to the host, as the reference code does);
  - GFLOP/s from the scorer's cost model (``Scorer.cost``: padding included, masked attention entries
    of the causal triangle not counted, about 1 % of the work at these lengths) and the fraction of the
    bracketing matmul peak of the same dtype;
* for each precision (``--dtypes``): the bfloat16 / float32 speed ratio of the same item;
* the prefix-cache speedup per pass and amortised over a FedBPT round (cache built once, then
  I + 1 = 9 passes: 8 generations and the final mean).

Checks before timing: the batched logits equal the per-candidate loop's, and the cached "after"
logits equal the uncached ones.

    python benchmarks/forward_throughput.py --quick                 # tiny model only, < 60 s
    python benchmarks/forward_throughput.py --json benchmarks/results/forward_throughput.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets OPENBLAS_NUM_THREADS before numpy/jax)

# isort: split

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedbpt_jax import objective, prompt  # noqa: E402

LAYOUTS = (
    ("after", True, "after+cache"),
    ("after", False, "after (no cache)"),
    ("before", False, "before"),
    ("before", True, "before+prompt cache"),
)
PASSES_PER_ROUND = 9  # FedBPT: I = 8 local generations + the final mean, one shared cache


@dataclasses.dataclass
class _Model:
    """One model in one compute dtype, with its scoring batch and prompt projection."""

    name: str
    dtype: str
    lm: Any
    batch: Any
    spec: Any
    source: str
    load_s: float
    real_len: float
    A: Any


@dataclasses.dataclass
class _Layout:
    """One layout at one population size, compiled: its prepared context, the batched call and the
    one-candidate loop, their compile seconds and the FLOPs of a pass."""

    label: str
    cached: bool
    P: int
    prompts: Any
    ctx: Any
    prepare_s: float
    prepare_compile_s: float
    batched: Callable
    batched_compile_s: float
    loop: Callable
    single_compile_s: float
    flops: float


def _load(name: str, dtype: str, args) -> _Model:
    t0 = time.perf_counter()
    lm = common.load_model(name, dtype)
    load_s = time.perf_counter() - t0
    cfg = lm.config
    n = args.n_prompt
    batch, spec, source = common.scoring_batch(lm, args.examples, args.text_len, n, seed=0)
    B, T = batch.input_ids.shape
    cue = int(spec.cue_ids.shape[0])
    real_len = float(np.mean(np.sum(np.asarray(batch.attention_mask), -1)))
    print(
        f"\n== {name} [{dtype}]: {lm.num_params() / 1e6:.1f}M params, L={cfg.num_layers} H={cfg.hidden_size}; "
        f"{source}: B={B} examples, text T={T} (mean real {real_len:.1f}), n_prompt={n}, cue={cue} "
        f"(load {load_s:.1f} s)",
        flush=True,
    )
    A = prompt.make_projection(
        jax.random.key(1), lm.input_embeddings(), intrinsic_dim=args.intrinsic_dim, n_prompt_tokens=n
    )
    return _Model(name, dtype, lm, batch, spec, source, load_s, real_len, A)


def _compile_layout(m: _Model, P: int, prompts, layout: tuple, args) -> _Layout:
    """The layout's scorer: its context prepared (and timed), the batched and the single-candidate call."""
    kind, cached, label = layout
    params, batch, spec = m.lm.params, m.batch, m.spec
    scorer = objective.make_scorer(m.lm, kind, use_cache=cached, n_prompt_tokens=args.n_prompt)
    prepare = jax.jit(lambda p, b: scorer.prepare(p, b, spec))
    prepare_c, prepare_compile = common.aot_compile(prepare, params, batch)
    prep = common.time_call(prepare_c, params, batch, repeats=args.repeats)
    ctx = prep.pop("out")

    batched = jax.jit(lambda p, c, pr: objective.population_logits(scorer, p, c, spec, pr))
    single = jax.jit(lambda p, c, pr: scorer.logits(p, c, spec, pr))
    batched_c, batched_compile = common.aot_compile(batched, params, ctx, prompts)
    single_c, single_compile = common.aot_compile(single, params, ctx, prompts[0])

    def loop(p, c, prs):
        # The reference's way: one forward call per candidate, each result read on the host.
        return np.stack([np.asarray(single_c(p, c, prs[i])) for i in range(prs.shape[0])])

    B, T = batch.input_ids.shape
    cue, num_labels = int(spec.cue_ids.shape[0]), int(spec.label_ids.shape[0])
    return _Layout(
        label=label,
        cached=cached,
        P=P,
        prompts=prompts,
        ctx=ctx,
        prepare_s=prep["median_s"] if cached else 0.0,
        prepare_compile_s=prepare_compile,
        batched=batched_c,
        batched_compile_s=batched_compile,
        loop=loop,
        single_compile_s=single_compile,
        flops=P * scorer.cost(T, cue, num_labels).call(B),
    )


def _time_mode(m: _Model, lay: _Layout, mode: str, args, peak: common.Peak) -> dict:
    """One timed item (a layout's batched call or its loop), bracketed by matmul-peak measurements."""
    fn = lay.batched if mode == "batched" else lay.loop
    params, P, n = m.lm.params, lay.P, args.n_prompt
    timed, before, after = peak.bracket(
        lambda: common.time_call(fn, params, lay.ctx, lay.prompts, repeats=args.repeats)
    )
    t = timed["min_s"]  # best of the repeats: the machine is shared (see cpu_util)
    ref_peak = 0.5 * (before + after)
    B, T = m.batch.input_ids.shape
    cue = int(m.spec.cue_ids.shape[0])
    r = {
        "model": m.name,
        "dtype": m.dtype,
        "P": P,
        "layout": lay.label,
        "mode": mode,
        "B": B,
        "T": T,
        "n_prompt": n,
        "cue": cue,
        "seconds": t,
        "seconds_median": timed["median_s"],
        "times_s": timed["times_s"],
        "first_call_s": timed["first_s"],
        "compile_s": lay.batched_compile_s if mode == "batched" else lay.single_compile_s,
        "prepare_s": lay.prepare_s,
        "prepare_compile_s": lay.prepare_compile_s,
        "gflop": lay.flops / 1e9,
        "gflops": lay.flops / t / 1e9,
        "peak_adjacent": ref_peak,
        "frac_adjacent": lay.flops / t / 1e9 / ref_peak,
        "cpu_util": timed["cpu_util"],
        "candidates_per_s": P / t,
        "query_tokens_per_s": P * B * ((n + cue) if lay.cached else (T + n + cue)) / t,
    }
    print(
        f"  {m.dtype:<8s} P={P:<3d} {lay.label:<17s} {mode:<8s} {t * 1e3:10.1f} ms  {r['gflops']:7.1f} GFLOP/s "
        f"({100 * r['frac_adjacent']:5.1f}% of the adjacent peak {ref_peak:.0f}, cpu util "
        f"{r['cpu_util']:.2f})  compile {r['compile_s']:.1f} s",
        flush=True,
    )
    return r


def _bench_population(m: _Model, P: int, args, peak: common.Peak) -> tuple[list[dict], dict]:
    """Every layout at population size P: ``(rows, checks)``; the checks run before any timing."""
    z = jax.random.normal(jax.random.key(P), (P, args.intrinsic_dim), jnp.float32)
    prompts = prompt.to_prompt(m.A, z, m.lm.config.hidden_size)
    tag = f"{m.name}/{m.dtype}/P={P}"
    rows, checks, ref_logits = [], {}, {}
    for layout in LAYOUTS:
        lay = _compile_layout(m, P, prompts, layout, args)
        params = m.lm.params
        out_b = np.asarray(lay.batched(params, lay.ctx, prompts))
        out_l = lay.loop(params, lay.ctx, prompts)
        ref_logits[lay.label] = out_b
        checks[f"{tag}/{lay.label}: batched vs loop max|diff|"] = float(np.max(np.abs(out_b - out_l)))
        for mode in ("batched", "loop"):
            if mode == "loop" and not args.loop_all and not lay.cached and P > 1 and m.name != "tiny":
                continue  # same FLOPs as the cached loop's ratio shows; skipped to save time
            rows.append(_time_mode(m, lay, mode, args, peak))
    checks[f"{tag}: cached vs uncached 'after' max|diff|"] = float(
        np.max(np.abs(ref_logits["after+cache"] - ref_logits["after (no cache)"]))
    )
    checks[f"{tag}: logits max|value|"] = float(np.max(np.abs(ref_logits["after (no cache)"])))
    return rows, checks


def bench_model(name: str, args, peak: common.Peak, dtype: str = "float32") -> dict:
    m = _load(name, dtype, args)
    rows, checks = [], {}
    for P in args.populations:
        more_rows, more_checks = _bench_population(m, P, args, peak)
        rows += more_rows
        checks.update(more_checks)
    return {
        "model": name,
        "dtype": dtype,
        "model_bytes": common.tree_bytes(m.lm.params),
        "num_params": m.lm.num_params(),
        "rows": rows,
        "checks": checks,
        "source": m.source,
        "mean_real_text_tokens": m.real_len,
        "load_s": m.load_s,
    }


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    keys = sorted(
        {(r["model"], r["dtype"], r["P"]) for r in rows},
        key=lambda k: (common.MODELS.index(k[0]), common.DTYPES.index(k[1]), k[2]),
    )
    for model, dtype, P in keys:
        get = {(r["layout"], r["mode"]): r for r in rows if r["model"] == model and r["P"] == P and r["dtype"] == dtype}
        c, u, b = (
            get.get(("after+cache", "batched")),
            get.get(("after (no cache)", "batched")),
            get.get(("before", "batched")),
        )
        s = {"model": model, "dtype": dtype, "P": P}
        for label in ("after+cache", "after (no cache)", "before"):
            if (label, "batched") in get and (label, "loop") in get:
                s[f"batched_speedup[{label}]"] = get[(label, "loop")]["seconds"] / get[(label, "batched")]["seconds"]
        if c and u:
            s["cache_speedup_per_pass"] = u["seconds"] / c["seconds"]
            s["cache_speedup_per_round"] = (PASSES_PER_ROUND * u["seconds"]) / (
                c["prepare_s"] + PASSES_PER_ROUND * c["seconds"]
            )
        if c and b:
            s["cache_speedup_vs_before"] = b["seconds"] / c["seconds"]
        if c:
            s["frac_peak_cached_batched"] = c["frac_peak"]
            s["frac_adjacent_cached_batched"] = c["frac_adjacent"]
            f32 = [
                r
                for r in rows
                if r["model"] == model
                and r["P"] == P
                and r["dtype"] == "float32"
                and r["layout"] == "after+cache"
                and r["mode"] == "batched"
            ]
            if dtype != "float32" and f32:
                s["speed_vs_float32[after+cache]"] = f32[0]["seconds"] / c["seconds"]
        for label in ("after (no cache)", "before"):
            f32 = [
                r
                for r in rows
                if r["model"] == model
                and r["P"] == P
                and r["dtype"] == "float32"
                and r["layout"] == label
                and r["mode"] == "batched"
            ]
            if dtype != "float32" and f32 and (label, "batched") in get:
                s[f"speed_vs_float32[{label}]"] = f32[0]["seconds"] / get[(label, "batched")]["seconds"]
        out.append(s)
    return out


ROW_COLUMNS = [
    ("model", "model"),
    ("dtype", "dtype"),
    ("P", "P"),
    ("layout", "layout"),
    ("mode", "mode"),
    ("B", "B"),
    ("T", "T"),
    ("n_prompt", "n"),
    ("cue", "cue"),
    ("seconds", "s / pass (best)"),
    ("candidates_per_s", "cand/s"),
    ("gflop", "GFLOP/pass"),
    ("gflops", "GFLOP/s"),
    ("frac_peak", "frac of best peak"),
    ("peak_adjacent", "adjacent peak"),
    ("frac_adjacent", "frac of adjacent"),
    ("cpu_util", "cpu util"),
    ("compile_s", "compile s"),
]
SUMMARY_COLUMNS = [
    ("model", "model"),
    ("dtype", "dtype"),
    ("P", "P"),
    ("speed_vs_float32[after+cache]", "speed vs float32 (cache)"),
    ("speed_vs_float32[before]", "speed vs float32 (before)"),
    ("batched_speedup[after+cache]", "batched/loop (cache)"),
    ("batched_speedup[after (no cache)]", "batched/loop (no cache)"),
    ("batched_speedup[before]", "batched/loop (before)"),
    ("cache_speedup_per_pass", "cache speedup/pass"),
    ("cache_speedup_per_round", "cache speedup/round"),
    ("cache_speedup_vs_before", "cache vs before"),
    ("frac_peak_cached_batched", "frac best peak (cache, batched)"),
    ("frac_adjacent_cached_batched", "frac adjacent peak"),
]


def _parse_args(argv=None) -> argparse.Namespace:
    """The options; ``dtypes``, ``models`` and ``populations`` come back as lists (``--quick`` applied)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model only, small sizes (< 60 s)")
    ap.add_argument("--models", default=None, help="comma list of tiny,smollm2 (default: both; --quick: tiny)")
    ap.add_argument("--populations", default="5", help="comma list of population sizes P")
    ap.add_argument("--examples", type=int, default=16, help="examples per pass (SST-2-like: 16-32)")
    ap.add_argument("--text-len", type=int, default=40, help="padded text length T (SST-2 texts: ~30-40)")
    ap.add_argument("--n-prompt", type=int, default=10)
    ap.add_argument("--intrinsic-dim", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--loop-all",
        action="store_true",
        help="also time the one-candidate loop for the uncached layouts of the real model",
    )
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma list of compute dtypes")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    for d in args.dtypes.split(","):
        if d not in common.DTYPES:
            ap.error(f"unknown dtype {d!r}; accepted: {common.DTYPES}")
    args.populations = [int(p) for p in args.populations.split(",")]
    if args.quick:
        args.repeats = min(args.repeats, 2)
    return args


def _report(rows: list[dict], summary: list[dict], results: list[dict], peaks: dict) -> None:
    print(
        "\nfractions: 'frac of best peak' = GFLOP/s over the best matmul peak of the item's dtype measured in "
        "this run (conservative); 'adjacent' = over the peak measured right before/after the item (same load)."
    )
    for d, pk in peaks.items():
        print(f"{d} matmul peak in this run: best {pk.best:.1f} GFLOP/s, all {[round(x, 1) for x in pk.history]}")
    print(f"load average now {list(os.getloadavg())}\n")
    print(common.table(rows, ROW_COLUMNS))
    print()
    print(common.table(summary, SUMMARY_COLUMNS))
    print("\nchecks (max |difference| of label logits):")
    for res in results:
        for k, v in res["checks"].items():
            print(f"  {k}: {v:.3g}")


def _targets(summary: list[dict]) -> dict:
    """The project's targets for SmolLM2 in float32, printed MET / NOT MET."""
    targets = {}
    for s in summary:
        if s["model"] == "smollm2" and s["dtype"] == "float32":
            targets[f"P={s['P']}: population scoring >= 50% of the best matmul peak of the run"] = (
                s.get("frac_peak_cached_batched", 0) >= 0.5
            )
            targets[f"P={s['P']}: prefix cache >= 2x uncached 'after' (per pass)"] = (
                s.get("cache_speedup_per_pass", 0) >= 2
            )
    for k, v in targets.items():
        print(f"target {k}: {'MET' if v else 'NOT MET'}")
    return targets


def main(argv=None):
    args = _parse_args(argv)
    dtypes = args.dtypes.split(",")
    models = (args.models or ("tiny" if args.quick else "tiny,smollm2")).split(",")
    info = common.machine_info()
    print(
        f"machine: {info['cpu']} ({info['cores']} cores, {info['cpu_flags']}), jax {info['versions']['jax']}, "
        f"load average {info['loadavg_start']}"
    )
    peaks = {d: common.Peak(dtype=d) for d in dtypes}
    for d, pk in peaks.items():
        print(f"{d} matmul peak (2048^3, jitted, float32 accumulation): {pk.measure():.1f} GFLOP/s", flush=True)
    results = [bench_model(m, args, peaks[d], d) for m in models for d in dtypes]
    rows = [r for res in results for r in res["rows"]]
    for pk in peaks.values():
        for _ in range(2):
            pk.measure()
    for r in rows:  # conservative: against the best peak of the item's dtype measured anywhere in this run
        r["peak_best"] = peaks[r["dtype"]].best
        r["frac_peak"] = r["gflops"] / r["peak_best"]
    summary = summarise(rows)
    _report(rows, summary, results, peaks)
    targets = _targets(summary)
    ok = all(v < 1e-3 for res in results for k, v in res["checks"].items() if "max|diff|" in k and "float32" in k)
    info["loadavg_end"] = list(os.getloadavg())
    out = {
        "benchmark": "forward_throughput",
        "machine": info,
        "args": vars(args),
        "peak_gflops_history": {d: pk.history for d, pk in peaks.items()},
        "peak_gflops_best": {d: pk.best for d, pk in peaks.items()},
        "rows": rows,
        "summary": summary,
        "targets": targets,
        "checks": {k: v for res in results for k, v in res["checks"].items()},
        "checks_ok": ok,
        "models": [{k: v for k, v in res.items() if k != "rows"} for res in results],
    }
    if args.json:
        common.write_json(args.json, out)
        print(f"wrote {args.json}")
    if not ok:
        print("CHECK FAILED: batched and loop (or cached and uncached) logits differ by > 1e-3")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
