"""Throughput of whole FedBPT rounds: the vectorized engine vs the reference code's way, vs pure
inference of the same model on the same tokens, in float32 and bfloat16.

For each configuration (model, compute dtype, K clients per round, all K sampled from N = K clients):

* **vectorized**: ``jax.jit(fedbpt(config, lm).round)`` — clients vmapped (``lax.map`` over chunks of
  ``chunk_clients`` for large K), each client's population scored in one batched pass per
  generation, the local CMA-ES and the server CMA-ES in the same compiled program. Compile time (AOT
  ``lower().compile()``) is reported apart from steady state; a warm-up round runs before the timed
  rounds (except for the expensive K >= 10 real-model round, where the first execution after AOT
  compilation is timed unless ``--warmup-smollm2`` is given).
* **reference-style**: the NVFlare reference's structure: clients one after another; per client one
  pycma 3.4.0 ``CMAEvolutionStrategy`` made by ``server_es._copy_light`` (popsize λ, the server's
  mean/σ/C), I = 8 ask/tell iterations on the host, every candidate scored by its own jitted forward
  call (clean and perturbed: two calls per candidate, each loss read back on the host), then f of the
  final mean; the server aggregates with its own pycma ES (σ' as in the reference code, ask, tell on
  the client means). The same scorer (layout "after" with the prefix cache: this script's figures were
  measured in that layout, the library default until the prompt-before layout got its prompt cache; see
  ``layout_round.py`` for the default layout) is used by both paths, so the ratio measures batching and
  the ES placement, not the cache. For large K only ``--ref-clients`` clients are timed and the client
  time is extrapolated linearly to K (said in the output).
* **ES share**: the same vectorized round with the model call replaced by a trivial function of the
  prompt (the CMA-ES ask/tell, perturbation, prompt projection and server aggregation remain).
* **memory**: each configuration runs in its own subprocess; peak RSS (``VmHWM``, reset through
  ``/proc/self/clear_refs`` after setup) during compilation and during the timed rounds, next to one
  model copy's bytes. (On the CPU backend ``memory_stats()`` is not available.)
* **FLOPs**: FLOPs of a round from the package's cost model (``federated.round_cost``: prefix caches of
  the clean and perturbed copies + (I·λ + 1) clean and perturbed passes per client, padding included),
  over the matmul peak *of the same dtype* measured right before and after the timed rounds.
* **fraction of pure inference**: the round's tokens/s over the tokens/s of a plain batched forward of
  the same model on the same tokens (every client's clean and perturbed copy: its prefix cache, then
  all I·λ + 1 candidate prompts in one vmapped pass; no ES, no perturbation, no host work).

Before timing, each configuration checks that the vectorized fitness (``population_fitness`` vmapped
over clients and candidates) equals the reference-style per-candidate fitness for the same candidate
sets and the same perturbed data (relative 1e-4 in float32; 3e-2 in bfloat16, whose fitness moves by ~1 %
with the batching, see ``precision_ranking.py``; float32 on a GPU at JAX's default matmul precision runs its
matmuls on TF32 inputs: 3e-3 there).

    python benchmarks/round_throughput.py --quick              # tiny model, K in {1, 10}, < 60 s
    python benchmarks/round_throughput.py --models smollm2     # SmolLM2 only, K in {1, 10} (~10 min)
    python benchmarks/round_throughput.py --models tiny        # tiny only, K in {1, 10, 100, 1000}
    python benchmarks/round_throughput.py --json benchmarks/results/round_throughput.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets OPENBLAS_NUM_THREADS before numpy/jax)

# isort: split

import numpy as np  # noqa: E402

#: Vectorized vs reference-style fitness, relative: float32 agrees to rounding; bfloat16 batched differently
#: rounds differently (~1 % of a fitness, measured by precision_ranking.py).
CHECK_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}
#: float32 at JAX's default matmul precision on an accelerator: TF32 inputs on NVIDIA GPUs (10-bit mantissa,
#: measured 6e-4 to 8e-4 on an H100), bfloat16 passes on TPUs.
ACCELERATOR_FLOAT32_TOLERANCE = {"gpu": 3e-3, "tpu": 3e-2}


def check_tolerance(dtype: str) -> float:
    """Tolerance of the vectorized vs reference-style fitness check for ``dtype`` on this backend."""
    import jax

    backend = jax.default_backend()
    if dtype == "float32" and backend in ACCELERATOR_FLOAT32_TOLERANCE:
        if jax.config.jax_default_matmul_precision in (None, "default", "bfloat16", "tensorfloat32"):
            return ACCELERATOR_FLOAT32_TOLERANCE[backend]
    return CHECK_TOLERANCE[dtype]


DEFAULT_KS = {"tiny": (1, 10, 100, 1000), "smollm2": (1, 10)}
QUICK_KS = {"tiny": (1, 10), "smollm2": (1,)}


# ==================================================================================================
# One configuration (runs inside a worker process, or in-process with --quick)
# ==================================================================================================
def _federated_data(lm, K: int, E: int, T: int, n_prompt: int, seed: int = 0):
    """``(FederatedData, source)``: K clients with E examples each, text padded to T."""
    import jax
    import jax.numpy as jnp

    from fedbpt_jax import data as fdata
    from fedbpt_jax import testing
    from fedbpt_jax.federated.core import FederatedData

    if lm.tokenizer is not None:
        shots = -(-K * E // 2)
        fd = fdata.federated(
            "sst2",
            lm.tokenizer,
            "decoder",
            num_clients=K,
            shots_per_class=shots,
            alpha=None,
            seed=seed,
            n_prompt=n_prompt,
            max_length=T,
            pad_to=E,
            pad_to_max_length=True,
        )
        train, counts, spec, source = fd.train, fd.train_counts, fd.spec, "sst2 few-shot, IID split"
    else:
        train = testing.random_batch(seed, E, T, lm.vocab_size, leading=(K,), min_len=max(2, T // 2))
        counts = np.full((K,), E, np.int32)
        spec = testing.random_spec(lm.vocab_size, cue_len=4)
        source = "random tokens"
    data = FederatedData(
        train=jax.tree_util.tree_map(jnp.asarray, train), counts=jnp.asarray(counts, jnp.int32), spec=spec
    )
    return data, source


def _cheap_scorer(num_labels: int):
    """A stand-in for the model: label logits as a trivial function of the prompt (keeps the ES honest)."""
    import jax.numpy as jnp

    from fedbpt_jax.objective import ScoreCost, Scorer

    def prepare(params, batch, spec=None):
        return batch

    def logits(params, batch, spec, prompt):
        s = jnp.mean(prompt) * jnp.arange(1, num_labels + 1, dtype=jnp.float32)
        return s[None, :] + 0.01 * batch.attention_mask[:, :num_labels].astype(jnp.float32)

    return Scorer(prepare, logits, "after", lambda *a, **k: ScoreCost(0.0, 0.0))


def algo_scorer(algo, lm):
    from fedbpt_jax.federated.driver import algo_scorer as scorer_of

    return scorer_of(algo, lm.kind, lm.config)


def _make_algo(cfg, lm, scorer=None):
    """``fedbpt(cfg, lm)``, with another black-box scorer when given (the ES-share measurement)."""
    from fedbpt_jax.federated import algorithms

    return algorithms.fedbpt(cfg, lm, scorer=scorer)


class _RefStyle:
    """The reference code's execution structure (see the module docstring), on the same model."""

    def __init__(self, lm, cfg, data, model, hp, layout=None):
        import jax

        from fedbpt_jax import objective, prompt

        self.lm, self.cfg, self.data, self.model, self.hp = lm, cfg, data, model, hp
        layout = layout or cfg.layout
        # The paper-layout reference run is the plain computation (no prompt cache), as its label says.
        cache = "none" if layout == "before" else "auto"
        self.scorer = scorer = objective.make_scorer(lm, layout, n_prompt_tokens=cfg.n_prompt_tokens, cache=cache)
        spec, hidden = data.spec, lm.hidden_size

        def one_loss(params, A, ctx, labels, mask, z):
            logits = scorer.logits(params, ctx, spec, prompt.to_prompt(A, z, hidden))
            return objective.masked_mean(objective.per_example_loss(logits, labels, cfg.loss), mask)

        def perturbed(key, batch, rate):
            return objective.perturb(key, batch, rate, spec, exempt_special=cfg.exempt_special)

        self.loss = jax.jit(one_loss)
        self.prepare = jax.jit(lambda p, b: scorer.prepare(p, b, spec))
        self.perturb = jax.jit(perturbed)
        self.es_seconds = 0.0

    def client_batch(self, k: int):
        import jax

        return jax.tree_util.tree_map(lambda a: a[k], self.data.train)

    def contexts(self, key, batch):
        pert = self.perturb(key, batch, self.hp.perturb_rate)
        return self.prepare(self.model.params, batch), self.prepare(self.model.params, pert)

    def fitness(self, clean_ctx, pert_ctx, batch, z) -> float:
        """f(z) = L_clean / L_pert: two forward calls, each loss read back on the host."""
        p, A = self.model.params, self.model.projection
        z = np.asarray(z, np.float32)
        lc = float(self.loss(p, A, clean_ctx, batch.labels, batch.example_mask, z))
        if not self.cfg.perturb:
            return lc
        lp = float(self.loss(p, A, pert_ctx, batch.labels, batch.example_mask, z))
        return lc / lp

    def client(self, server_es, k: int, key, seed: int):
        import cma  # noqa: F401

        batch = self.client_batch(k)
        clean_ctx, pert_ctx = self.contexts(key, batch)
        t0 = time.perf_counter()
        es = server_es._copy_light(
            inopts={
                "seed": seed,
                "maxiter": self.cfg.local_generations,
                "popsize": self.cfg.population_size,
                "CMA_mu": None,
            }
        )
        self.es_seconds += time.perf_counter() - t0
        sigmas = []
        for _ in range(self.cfg.local_generations):
            sigmas.append(es.sigma)
            t0 = time.perf_counter()
            X = es.ask()
            self.es_seconds += time.perf_counter() - t0
            fits = [self.fitness(clean_ctx, pert_ctx, batch, x) for x in X]
            t0 = time.perf_counter()
            es.tell(X, fits)
            self.es_seconds += time.perf_counter() - t0
        mean = np.array(es.mean)
        return mean, self.fitness(clean_ctx, pert_ctx, batch, mean), sigmas

    def server(self, server_es, means, fits, sigmas):
        t0 = time.perf_counter()
        m = len(means)
        mu_loc = self.cfg.population_size // 2
        server_es.sigma = float(np.sqrt(np.sum(np.square(sigmas)) / (m * mu_loc)))
        server_es.ask()
        if m < server_es.popsize:  # K = 1: pycma refuses popsize 1, so the one upload is told twice
            means, fits = list(means) * server_es.popsize, list(fits) * server_es.popsize
        server_es.tell(
            [np.asarray(x) for x in means[: server_es.popsize]], [float(f) for f in fits[: server_es.popsize]]
        )
        dt = time.perf_counter() - t0
        self.es_seconds += dt
        return dt

    @staticmethod
    def server_es(d: int, sigma0: float, m: int, rounds: int = 100):
        import cma

        m = max(m, 2)  # pycma: "population size 1 is too small" (the reference cannot run m = 1 either)
        return cma.CMAEvolutionStrategy(
            np.zeros(d), sigma0, {"seed": 1234, "popsize": m, "CMA_mu": m, "maxiter": rounds, "verbose": -9}
        )


def _check_fitness(ref: _RefStyle, cfg, data, model, num_clients: int) -> float:
    """Max relative difference between vectorized and reference-style fitness of the same candidates."""
    import jax
    import jax.numpy as jnp

    from fedbpt_jax import objective, prompt

    k = num_clients
    scorer, spec, hidden = ref.scorer, data.spec, ref.lm.hidden_size
    batch = jax.tree_util.tree_map(lambda a: a[:k], data.train)
    keys = jax.random.split(jax.random.key(7), k)
    Z = 0.5 * jax.random.normal(jax.random.key(8), (k, cfg.population_size, cfg.intrinsic_dim), jnp.float32)

    @jax.jit
    def vectorized(params, A, batch, keys, Z):
        def one(b, key, z):
            pert = objective.perturb(key, b, ref.hp.perturb_rate, spec, exempt_special=cfg.exempt_special)
            fit, _ = objective.population_fitness(
                scorer,
                params,
                scorer.prepare(params, b, spec),
                scorer.prepare(params, pert, spec) if cfg.perturb else None,
                b,
                spec,
                prompt.to_prompt(A, z, hidden),
                loss=cfg.loss,
                form=cfg.fitness_form,
            )
            return fit

        return jax.vmap(one)(batch, keys, Z)

    vec = np.asarray(vectorized(model.params, model.projection, batch, keys, Z))
    out = np.zeros_like(vec)
    for c in range(k):
        b = ref.client_batch(c)
        clean_ctx, pert_ctx = ref.contexts(keys[c], b)
        out[c] = [ref.fitness(clean_ctx, pert_ctx, b, Z[c, j]) for j in range(cfg.population_size)]
    return float(np.max(np.abs(vec - out) / np.maximum(np.abs(out), 1e-12)))


def _pure_inference(lm, scorer, data, A, P: int, chunk: int):
    """The plain forward the round's model work amounts to: ``(params, batches [K, 2, E, T], Z [K, P, d],
    kept) -> logits [K, 2, P, E, C]``, jitted (clients chunked like the round when ``chunk``); ``kept``: the
    clients' clean prefix caches when the round keeps them (None: both copies are prepared)."""
    import jax

    from fedbpt_jax import objective, prompt

    spec, hidden = data.spec, lm.hidden_size

    def client(params, A, b2, z, kept):
        prompts = prompt.to_prompt(A, z, hidden)
        if kept is None:
            contexts = jax.vmap(lambda b: scorer.prepare(params, b, spec))(b2)
        else:  # the clean copy's prefix cache is kept across rounds: only the perturbed copy is prepared
            pert = jax.tree_util.tree_map(lambda a: a[1], b2)
            contexts = objective.stack_contexts(kept, scorer.prepare(params, pert, spec))
        return jax.vmap(lambda c: objective.population_logits(scorer, params, c, spec, prompts))(contexts)

    def run(params, A, batches, Z, kept=None):
        one = lambda bz: client(params, A, *bz)  # noqa: E731
        if chunk:
            return jax.lax.map(one, (batches, Z, kept), batch_size=chunk)
        return jax.vmap(one)((batches, Z, kept))

    return jax.jit(run)


@dataclasses.dataclass
class _Bench:
    """One configuration being measured: the model, the clients' data, the FedBPT configuration, and what
    the timing steps share. ``algo``, ``flops_round`` and ``tokens_round`` are set by ``_workload``."""

    model_name: str
    K: int
    dtype: str
    lm: Any
    data: Any
    cfg: Any
    hp: Any
    A: Any
    model: Any
    chunk: int
    warm: int  # untimed rounds before the timed ones
    rounds: int  # timed rounds
    key: Any  # the vectorized round's key (folded with the round number)
    algo: Any = None
    flops_round: float = 0.0
    tokens_round: int = 0

    @property
    def tag(self) -> str:
        return f"[{self.model_name} K={self.K}]"

    @property
    def passes(self) -> int:
        """Fitness evaluations per client per round."""
        return self.cfg.local_generations * self.cfg.population_size + 1

    @property
    def E(self) -> int:
        return int(self.data.train.input_ids.shape[-2])

    @property
    def T(self) -> int:
        return int(self.data.train.input_ids.shape[-1])

    @property
    def cue(self) -> int:
        return int(self.data.spec.cue_ids.shape[0])


def _warmup_and_rounds(model_name: str, K: int, args) -> tuple[int, int]:
    """``(warm-up rounds, timed rounds)``: the SmolLM2 K >= 10 round is timed at its first execution unless
    ``--warmup-smollm2``; SmolLM2 and tiny K >= 1000 have their own round counts."""
    warm = args.warmup if not (model_name == "smollm2" and K >= 10 and not args.warmup_smollm2) else 0
    rounds = args.rounds_smollm2 if model_name == "smollm2" else (args.rounds_tiny_large if K >= 1000 else args.rounds)
    return warm, rounds


def _prepare(model_name: str, K: int, args, lm, dtype: str) -> tuple[_Bench, dict]:
    """Load the model and the clients' data, build the configuration: ``(bench, its record so far)``."""
    import jax

    from fedbpt_jax import prompt
    from fedbpt_jax.federated import FedConfig, HParams
    from fedbpt_jax.federated.core import ModelInputs

    res: dict = {"model": model_name, "dtype": dtype, "K": K}
    jax.devices()
    res["rss_runtime"] = common.rss_bytes()  # Python + jaxlib + libraries, before any model or data
    t0 = time.perf_counter()
    lm = lm or common.load_model(model_name, dtype)
    res["load_s"] = time.perf_counter() - t0
    n = args.n_prompt
    data, source = _federated_data(lm, K, args.examples, args.text_len, n)
    chunk = args.chunk if (args.chunk and K > args.chunk) else 0
    cfg = FedConfig(
        num_clients=K,
        clients_per_round=K,
        population_size=args.population,
        local_generations=args.generations,
        intrinsic_dim=args.intrinsic_dim,
        n_prompt_tokens=n,
        chunk_clients=chunk,
        layout="after",
    )
    hp = HParams(sigma0=1.0, perturb_rate=0.5).validate()
    A = prompt.make_projection(
        jax.random.key(1), lm.input_embeddings(), intrinsic_dim=cfg.intrinsic_dim, n_prompt_tokens=n
    )
    warm, rounds = _warmup_and_rounds(model_name, K, args)
    model = ModelInputs(lm.params, A)
    b = _Bench(model_name, K, dtype, lm, data, cfg, hp, A, model, chunk, warm, rounds, jax.random.key(3))
    res.update(
        {
            "source": source,
            "E": b.E,
            "T": b.T,
            "n_prompt": n,
            "cue": b.cue,
            "d": cfg.intrinsic_dim,
            "population": cfg.population_size,
            "generations": cfg.local_generations,
            "chunk_clients": chunk,
            "model_bytes": common.tree_bytes(lm.params),
            "projection_bytes": common.tree_bytes(A),
            "num_params": lm.num_params(),
        }
    )
    return b, res


def _workload(b: _Bench, args) -> dict:
    """The algorithm (with the clean prefix caches when kept) and a round's FLOPs, tokens and evaluations."""
    from fedbpt_jax.federated import round_cost

    fwd_per_eval = 2 if b.cfg.perturb else 1
    b.algo = _make_algo(b.cfg, b.lm)
    out: dict = {"keep_clean_cache": bool(args.keep_clean_cache)}
    if args.keep_clean_cache:  # the clean prefix caches, built once outside the timed round (as run() keeps them)
        from fedbpt_jax.federated import with_clean_context

        t0 = time.perf_counter()
        b.data = with_clean_context(b.data, algo_scorer(b.algo, b.lm), b.lm.params, chunk=b.chunk)
        common.block(b.data.clean_context)
        out["clean_cache_build_s"] = time.perf_counter() - t0
        out["clean_cache_bytes"] = common.tree_bytes(b.data.clean_context)
    b.flops_round = b.K * round_cost(b.algo, b.lm, b.data)["flops_per_client"]
    E, T, n = b.E, b.T, args.n_prompt
    prefix_tokens = (fwd_per_eval - 1 if args.keep_clean_cache else fwd_per_eval) * E * T
    b.tokens_round = b.K * (prefix_tokens + fwd_per_eval * b.passes * E * (n + b.cue))
    out.update(
        {
            "gflop_per_round": b.flops_round / 1e9,
            "tokens_per_round": b.tokens_round,
            "evals_per_round": b.K * b.passes,
            "forward_calls_per_round_ref": b.K * b.passes * fwd_per_eval,
        }
    )
    return out


def _fitness_check(b: _Bench, ref: _RefStyle, args) -> dict:
    """Deterministic check: vectorized vs reference-style fitness of the same candidates."""
    out: dict = {"check_clients": min(b.K, args.check_clients)}
    out["check_max_rel_diff"] = _check_fitness(ref, b.cfg, b.data, b.model, out["check_clients"])
    out["check_tolerance"] = check_tolerance(b.dtype)
    out["check_ok"] = out["check_max_rel_diff"] <= out["check_tolerance"]
    print(
        f"{b.tag} check: vectorized vs reference-style fitness, {out['check_clients']} client(s) x "
        f"{b.cfg.population_size} candidates: max rel diff {out['check_max_rel_diff']:.2e}",
        flush=True,
    )
    return out


def _xla_memory(compiled) -> dict:
    """XLA's own buffer plan of the compiled round (what a GPU/TPU would hold in device memory)."""
    try:
        ma = compiled.memory_analysis()
        return {
            k: int(getattr(ma, k))
            for k in (
                "argument_size_in_bytes",
                "output_size_in_bytes",
                "alias_size_in_bytes",
                "temp_size_in_bytes",
                "peak_memory_in_bytes",
            )
            if hasattr(ma, k)
        }
    except Exception as e:  # noqa: BLE001  (not every backend/version implements it)
        return {"error": repr(e)}


def _compile_round(b: _Bench, state) -> tuple[Any, dict]:
    """The vectorized round compiled ahead of time: ``(compiled, compile seconds and memory)``."""
    import jax

    round_jit = jax.jit(b.algo.round)
    common.release_freed_memory()
    out: dict = {"rss_before_compile": common.rss_bytes()}
    common.reset_peak_rss()
    compiled, out["compile_s"] = common.aot_compile(round_jit, b.key, state, b.data, b.hp, b.model)
    out["peak_rss_compile"] = common.peak_rss_bytes()
    out["xla_memory"] = _xla_memory(compiled)
    return compiled, out


def _time_rounds(b: _Bench, compiled, state, peak: common.Peak, args) -> dict:
    """Warm-up rounds, then the timed rounds, bracketed by matmul-peak measurements; peak RSS meanwhile."""
    import jax

    warm, rounds = b.warm, b.rounds
    common.release_freed_memory()
    out: dict = {"rss_before_run": common.rss_bytes()}
    common.reset_peak_rss()

    def run_rounds():
        nonlocal state
        times, first = [], None
        c0, w0 = common.cpu_seconds(), None
        for r in range(warm + rounds):
            t0 = time.perf_counter()
            state, metrics = compiled(jax.random.fold_in(b.key, r), state, b.data, b.hp, b.model)
            common.block((state, metrics))
            dt = time.perf_counter() - t0
            if r < warm:
                first = first if first is not None else dt
            else:
                times.append(dt)
            if r + 1 == warm:
                c0, w0 = common.cpu_seconds(), time.perf_counter()
        w0 = w0 if w0 is not None else t_start
        util = (common.cpu_seconds() - c0) / (time.perf_counter() - w0) / (os.cpu_count() or 1)
        return times, first, metrics, util

    t_start = time.perf_counter()
    (times, first, metrics, util), pb, pa = peak.bracket(run_rounds, samples=args.peak_samples)
    out["peak_rss_run"] = common.peak_rss_bytes()
    out["device_memory_stats"] = common.device_memory_stats()
    t = float(np.min(times))  # best of the timed rounds: the machine is shared (see cpu_util)
    ref_peak = 0.5 * (pb + pa)
    out.update(
        {
            "warmup_rounds": warm,
            "timed_rounds": rounds,
            "round_times_s": times,
            "first_round_s": first,
            "round_s": t,
            "rounds_per_s": 1 / t,
            "client_generations_per_s": b.K * b.cfg.local_generations / t,
            "candidate_evals_per_s": b.K * b.passes / t,
            "tokens_per_s": b.tokens_round / t,
            "gflops": b.flops_round / t / 1e9,
            "peak_adjacent": ref_peak,
            "frac_adjacent": b.flops_round / t / 1e9 / ref_peak,
            "cpu_util": util,
            "metrics_last_round": {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()},
        }
    )
    return out


def _vectorized_round(b: _Bench, peak: common.Peak, args) -> dict:
    """The jitted round: compiled, then timed (the compiled program is released on return)."""
    import jax

    state = b.algo.init(jax.random.key(0), b.hp)
    compiled, out = _compile_round(b, state)
    out.update(_time_rounds(b, compiled, state, peak, args))
    return out


def _print_vectorized(b: _Bench, res: dict, peak: common.Peak) -> None:
    print(
        f"{b.tag} vectorized: compile {res['compile_s']:.1f} s, round {res['round_s']:.3f} s "
        f"({res['gflops']:.1f} GFLOP/s, {100 * res['frac_adjacent']:.1f}% of the adjacent peak "
        f"{res['peak_adjacent']:.0f}, best peak so far {peak.best:.0f}, cpu util {res['cpu_util']:.2f}), "
        f"peak RSS {res['peak_rss_run'] / 2**20:.0f} MiB (model {res['model_bytes'] / 2**20:.0f} MiB)",
        flush=True,
    )


def _time_pure(b: _Bench, round_s: float) -> dict:
    """Pure inference: the same model on the same tokens, nothing else."""
    import jax
    import jax.numpy as jnp

    from fedbpt_jax import objective as obj

    lm, data, cfg = b.lm, b.data, b.cfg
    scorer = b.algo.scorer or obj.make_scorer(lm, cfg.layout, n_prompt_tokens=cfg.n_prompt_tokens)
    pure = _pure_inference(lm, scorer, data, b.A, b.passes, b.chunk)
    key_pert, key_z = jax.random.split(jax.random.key(21))
    pert = obj.perturb(key_pert, data.train, b.hp.perturb_rate, data.spec)
    batches = jax.tree_util.tree_map(lambda a, c: jnp.stack([a, c], axis=1), data.train, pert)
    Z = jax.random.normal(key_z, (b.K, b.passes, cfg.intrinsic_dim), jnp.float32)
    kept = data.clean_context
    out: dict = {}
    pure_c, out["pure_compile_s"] = common.aot_compile(pure, lm.params, b.A, batches, Z, kept)
    warmup = 1 if b.model_name == "tiny" or b.K < 10 else 0
    timed = common.time_call(pure_c, lm.params, b.A, batches, Z, kept, repeats=max(b.rounds, 1), warmup=warmup)
    out["pure_s"] = timed["min_s"]
    out["pure_tokens_per_s"] = b.tokens_round / out["pure_s"]
    out["frac_pure_inference"] = out["pure_s"] / round_s
    print(
        f"{b.tag} pure inference of the same tokens: {out['pure_s']:.3f} s; the round runs at "
        f"{100 * out['frac_pure_inference']:.1f}% of pure-inference tokens/s",
        flush=True,
    )
    return out


def _es_share_wanted(args, K: int) -> bool:
    return args.es_ks in ("", "all") or (args.es_ks != "none" and K in [int(k) for k in args.es_ks.split(",")])


def _time_es_share(b: _Bench, round_s: float) -> dict:
    """ES share: the same round with a trivial model, over the full round's time."""
    import jax

    es_algo = _make_algo(b.cfg, b.lm, _cheap_scorer(int(b.data.spec.label_ids.shape[0])))
    es_state = es_algo.init(jax.random.key(0), b.hp)
    out: dict = {}
    es_compiled, out["es_compile_s"] = common.aot_compile(
        jax.jit(es_algo.round), b.key, es_state, b.data, b.hp, b.model
    )
    es_times = []
    for r in range(1 + max(b.rounds, 2)):
        t0 = time.perf_counter()
        es_state, _ = common.block(es_compiled(jax.random.fold_in(b.key, r), es_state, b.data, b.hp, b.model))
        if r:
            es_times.append(time.perf_counter() - t0)
    out["es_round_s"] = float(np.min(es_times))
    out["es_share"] = out["es_round_s"] / round_s
    return out


def _time_reference(b: _Bench, ref: _RefStyle, server_es, keys, res: dict, args) -> dict:
    """The reference-style round: ``--ref-clients`` clients timed (extrapolated to K), then the server."""
    K, t = b.K, res["round_s"]
    S = K if args.ref_clients <= 0 else min(K, args.ref_clients)
    ref.client(server_es, 0, keys[0], seed=1234)  # warm-up: compiles the jitted calls, loads pycma
    ref.es_seconds = 0.0
    uploads, client_s = [], []
    for c in range(S):
        t0 = time.perf_counter()
        uploads.append(ref.client(server_es, c, keys[c], seed=1234 + c))
        client_s.append(time.perf_counter() - t0)
    es_client_s = ref.es_seconds
    means = [uploads[c % S][0] for c in range(K)]
    fits = [uploads[c % S][1] for c in range(K)]
    sig = [uploads[c % S][2] for c in range(K)]
    server_s = ref.server(server_es, means, fits, sig)
    ref_round = sum(client_s) / S * K + server_s
    out = {
        "ref_clients_timed": S,
        "ref_extrapolated": S < K,
        "ref_client_s_mean": float(np.mean(client_s)),
        "ref_server_s": server_s,
        "ref_round_s": ref_round,
        "ref_es_s": es_client_s / S * K + server_s,
        "ref_gflops": b.flops_round / ref_round / 1e9,
        "speedup": ref_round / t,
    }
    out["ref_es_share"] = out["ref_es_s"] / ref_round
    print(
        f"{b.tag} reference-style: {S} client(s) timed{' (extrapolated to K)' if S < K else ''}, "
        f"round {ref_round:.3f} s, pycma share {100 * out['ref_es_share']:.1f}%; vectorized speedup "
        f"{out['speedup']:.1f}x; ES share of vectorized round {100 * res.get('es_share', float('nan')):.1f}%",
        flush=True,
    )
    return out


def _time_reference_before(b: _Bench, server_es, keys, res: dict, args) -> dict:
    """The reference-style round in the paper's prompt-first layout (no prefix cache possible)."""
    K, S2 = b.K, min(b.K, args.ref_before_clients)
    ref_b = _RefStyle(b.lm, b.cfg, b.data, b.model, b.hp, layout="before")
    ref_b.client(server_es, 0, keys[0], seed=1234)  # warm-up (compiles)
    times_b = []
    for c in range(S2):
        t0 = time.perf_counter()
        ref_b.client(server_es, c, keys[c], seed=1234 + c)
        times_b.append(time.perf_counter() - t0)
    out = {
        "ref_before_clients_timed": S2,
        "ref_before_round_s": sum(times_b) / S2 * K + res["ref_server_s"],
        "ref_before_extrapolated": S2 < K,
    }
    out["speedup_vs_ref_before"] = out["ref_before_round_s"] / res["round_s"]
    print(
        f"{b.tag} reference-style, paper layout 'before' (no cache): {S2} client(s) timed"
        f"{' (extrapolated to K)' if S2 < K else ''}, round {out['ref_before_round_s']:.3f} s; vectorized "
        f"('after' + cache) speedup {out['speedup_vs_ref_before']:.1f}x",
        flush=True,
    )
    return out


def run_config(model_name: str, K: int, args, lm=None, dtype: str = "float32") -> dict:
    """One configuration's record: setup, the fitness check, the vectorized round, pure inference, the ES
    share and the reference-style rounds, in that order (each step prints its line)."""
    import jax

    b, res = _prepare(model_name, K, args, lm, dtype)
    peak = common.Peak(repeats=args.peak_repeats, dtype=dtype)
    for _ in range(args.peak_samples):
        peak.measure()
    res.update(_workload(b, args))
    ref = _RefStyle(b.lm, b.cfg, b.data, b.model, b.hp)
    res.update(_fitness_check(b, ref, args))
    res.update(_vectorized_round(b, peak, args))
    _print_vectorized(b, res, peak)
    if not args.skip_pure:
        res.update(_time_pure(b, res["round_s"]))
    if _es_share_wanted(args, K):
        res.update(_time_es_share(b, res["round_s"]))
    if args.skip_ref:
        res["peak_gflops_history"] = peak.history
        res["peak_best_worker"] = peak.best
        return res
    server_es = _RefStyle.server_es(b.cfg.intrinsic_dim, 1.0, K)
    keys = jax.random.split(jax.random.key(11), K)
    res.update(_time_reference(b, ref, server_es, keys, res, args))
    if min(K, args.ref_before_clients) > 0:
        res.update(_time_reference_before(b, server_es, keys, res, args))
    for _ in range(args.peak_samples):
        peak.measure()
    res["peak_gflops_history"] = peak.history
    res["peak_best_worker"] = peak.best
    res["loadavg_end"] = list(os.getloadavg())
    return res


# ==================================================================================================
# Orchestration
# ==================================================================================================
def _worker_cmd(model: str, K: int, args, out: str, dtype: str = "float32") -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", model, str(K), out, "--dtypes", dtype]
    for name in (
        "examples",
        "text_len",
        "n_prompt",
        "intrinsic_dim",
        "population",
        "generations",
        "chunk",
        "rounds",
        "rounds_tiny_large",
        "rounds_smollm2",
        "warmup",
        "ref_clients",
        "ref_clients_smollm2",
        "check_clients",
        "ref_before_clients",
        "ref_before_clients_smollm2",
        "es_ks",
        "peak_samples",
        "peak_repeats",
    ):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.warmup_smollm2:
        cmd.append("--warmup-smollm2")
    if args.keep_clean_cache:
        cmd.append("--keep-clean-cache")
    if args.skip_ref:
        cmd.append("--skip-ref")
    if args.skip_pure:
        cmd.append("--skip-pure")
    return cmd


def _where(machine: dict | None) -> str:
    """``"CPU, 2 cores"`` or ``"GPU NVIDIA H100 80GB HBM3"``: the machine a plot's figures come from."""
    if not machine:
        return "machine unknown"
    backend = machine.get("jax_backend", "cpu")
    if backend == "cpu":
        return f"CPU, {machine.get('cores', '?')} cores"
    kinds = sorted(set(machine.get("device_kind") or [])) or [str(d) for d in machine.get("devices", [])]
    return f"{backend.upper()} {', '.join(kinds)}"


def _plot(results: list[dict], path: str, machine: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for model, color in (("tiny", "tab:blue"), ("smollm2", "tab:red")):
        rs = sorted((r for r in results if r["model"] == model and "round_s" in r), key=lambda r: r["K"])
        if not rs:
            continue
        ks = [r["K"] for r in rs]
        ax.plot(ks, [r["round_s"] for r in rs], "o-", color=color, label=f"{model}: vectorized (jit, vmap)")
        rr = [r for r in rs if "ref_round_s" in r]
        if rr:
            ax.plot(
                [r["K"] for r in rr],
                [r["ref_round_s"] for r in rr],
                "s--",
                color=color,
                alpha=0.7,
                label=f"{model}: reference-style (loop, pycma)",
            )
        rb = [r for r in rs if r.get("ref_before_round_s")]
        if rb:
            ax.plot(
                [r["K"] for r in rb],
                [r["ref_before_round_s"] for r in rb],
                "^:",
                color=color,
                alpha=0.6,
                label=f"{model}: reference-style, paper layout 'before'",
            )
        for r in rs:
            if r.get("ref_extrapolated") and "ref_round_s" in r:
                ax.annotate(
                    "extrap.", (r["K"], r["ref_round_s"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("clients per round K")
    ax.set_ylabel("seconds per round")
    ax.set_title(f"FedBPT round time ({_where(machine)}; d=500, lambda=5, I=8)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


COLUMNS = [
    ("model", "model"),
    ("dtype", "dtype"),
    ("K", "K"),
    ("chunk_clients", "chunk"),
    ("round_s", "s/round"),
    ("rounds_per_s", "rounds/s"),
    ("client_generations_per_s", "client-gens/s"),
    ("candidate_evals_per_s", "cand evals/s"),
    ("tokens_per_s", "tokens/s"),
    ("gflops", "GFLOP/s"),
    ("frac_peak", "frac best peak"),
    ("frac_adjacent", "frac adj. peak"),
    ("cpu_util", "cpu util"),
    ("compile_s", "compile s"),
    ("es_share", "ES share"),
    ("frac_pure_inference", "frac of pure inference"),
    ("speed_vs_float32", "speed vs float32"),
]
REF_COLUMNS = [
    ("model", "model"),
    ("dtype", "dtype"),
    ("K", "K"),
    ("round_s", "vectorized s/round"),
    ("ref_round_s", "ref s/round"),
    ("ref_clients_timed", "ref clients timed"),
    ("ref_es_share", "ref pycma share"),
    ("speedup", "speedup"),
    ("ref_before_round_s", "ref 'before' s/round"),
    ("speedup_vs_ref_before", "speedup vs ref 'before'"),
    ("check_max_rel_diff", "check rel diff"),
]
MEM_COLUMNS = [
    ("model", "model"),
    ("dtype", "dtype"),
    ("K", "K"),
    ("model_mib", "model MiB"),
    ("runtime_rss_mib", "runtime RSS MiB"),
    ("peak_rss_compile_mib", "peak RSS compile MiB"),
    ("peak_rss_mib", "peak RSS run MiB"),
    ("round_working_set_mib", "round working set MiB"),
    ("mem_x_model", "peak RSS / model"),
    ("mem_above_runtime_x_model", "(peak - runtime) / model"),
    ("peak_rss_vs_float32", "peak RSS vs float32"),
    ("above_runtime_vs_float32", "(peak - runtime) vs float32"),
]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny model, K in {1, 10}, 2 reference-style clients timed, in-process (< 60 s)",
    )
    ap.add_argument("--models", default=None, help="comma list of tiny,smollm2 (default both; --quick: tiny)")
    ap.add_argument("--ks", default=None, help="comma list of K (default: tiny 1,10,100,1000; smollm2 1,10)")
    ap.add_argument("--examples", type=int, default=4, help="examples per client E (SST-2 few-shot split)")
    ap.add_argument("--text-len", type=int, default=48, help="padded text length T")
    ap.add_argument("--n-prompt", type=int, default=10)
    ap.add_argument("--intrinsic-dim", type=int, default=500)
    ap.add_argument("--population", type=int, default=5)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=100, help="chunk_clients used when K > chunk (0: never)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (tiny, K < 1000)")
    ap.add_argument("--rounds-tiny-large", type=int, default=2, help="timed rounds (tiny, K >= 1000)")
    ap.add_argument("--rounds-smollm2", type=int, default=1, help="timed rounds (SmolLM2)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up rounds before timing")
    ap.add_argument(
        "--warmup-smollm2",
        action="store_true",
        help="SmolLM2 K>=10: run a warm-up round too (default: time the first execution after AOT "
        "compilation, which saves a ~1-minute round)",
    )
    _add_reference_options(ap)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma list of compute dtypes")
    ap.add_argument(
        "--keep-clean-cache",
        action="store_true",
        help="keep the clients' clean prefix caches across rounds (built once, outside the timed round)",
    )
    ap.add_argument("--check-clients", type=int, default=2)
    ap.add_argument("--peak-samples", type=int, default=2, help="matmul-peak measurements at each point")
    ap.add_argument("--peak-repeats", type=int, default=4, help="timed matmuls per peak measurement")
    ap.add_argument(
        "--es-ks", default="all", help="comma list of K whose ES share is measured, 'all' (default) or 'none'"
    )
    ap.add_argument("--no-subprocess", action="store_true", help="run every configuration in this process")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="PNG path (default benchmarks/results/round_throughput[_quick].png)")
    ap.add_argument(
        "--plot-from",
        nargs="+",
        default=None,
        metavar="JSON",
        help="only draw the plot (--plot) from the results of earlier --json files",
    )
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "K", "OUT"), help=argparse.SUPPRESS)
    return ap


def _add_reference_options(ap: argparse.ArgumentParser) -> None:
    """The reference-style runs' options, and those that leave out a comparison."""
    ap.add_argument("--ref-clients", type=int, default=100, help="reference-style: clients timed (<=0: all)")
    ap.add_argument("--ref-clients-smollm2", type=int, default=1, help="reference-style clients timed, SmolLM2")
    ap.add_argument(
        "--ref-before-clients",
        type=int,
        default=10,
        help="reference-style with the paper's 'before' layout (uncached): clients timed (0: skip)",
    )
    ap.add_argument(
        "--ref-before-clients-smollm2",
        type=int,
        default=0,
        help="the same for SmolLM2 (default 0: ~5x the cached cost per client)",
    )
    ap.add_argument("--skip-ref", action="store_true", help="leave out the reference-style runs")
    ap.add_argument("--skip-pure", action="store_true", help="leave out the pure-inference comparison")


def _worker(args) -> int:
    """A worker process: one configuration, its record written to OUT."""
    model, K, out = args.worker[0], int(args.worker[1]), args.worker[2]
    if model == "smollm2":
        args.ref_clients, args.ref_before_clients = args.ref_clients_smollm2, args.ref_before_clients_smollm2
    res = run_config(model, K, args, dtype=args.dtypes)
    common.write_json(out, res)
    return 0


def _plot_only(args) -> int:
    """``--plot-from``: the plot of earlier runs' results, nothing measured."""
    runs = [json.load(open(path)) for path in args.plot_from]
    rows = [r for run in runs for r in run["results"] if "round_s" in r]
    plot = args.plot or str(common.RESULTS_DIR / "round_throughput.png")
    _plot(rows, plot, runs[0].get("machine"))
    print(f"wrote {plot}")
    return 0


def _apply_quick(args) -> None:
    """Time box (< 60 s on a 2-core CPU): compilation dominates, so the ES-only round is compiled and timed
    for K = 1 only, and the paper-layout reference run is left out."""
    args.no_subprocess = True
    args.rounds, args.check_clients, args.ref_clients, args.ref_before_clients = 2, 1, 2, 0
    args.es_ks, args.peak_samples, args.peak_repeats = "1", 1, 2


def _configs(args, models: list[str], dtypes: list[str]) -> list[tuple[str, int, str]]:
    """``(model, K, dtype)`` in run order: both precisions of one K back to back (the same machine load for
    the ratio)."""
    default_ks = QUICK_KS if args.quick else DEFAULT_KS
    return [
        (model, K, dtype)
        for model in models
        for K in ([int(k) for k in args.ks.split(",")] if args.ks else default_ks[model])
        for dtype in dtypes
    ]


def _run_worker(model: str, K: int, dtype: str, args) -> dict:
    """One configuration in its own process: its record, or ``{..., "error": ...}`` when the worker failed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res.json")
        proc = subprocess.run(_worker_cmd(model, K, args, out, dtype))
        if proc.returncode != 0 or not os.path.exists(out):
            print(f"[{model} {dtype} K={K}] worker failed (exit {proc.returncode})", flush=True)
            return {"model": model, "dtype": dtype, "K": K, "error": f"exit {proc.returncode}"}
        return json.load(open(out))


def _measure(model: str, K: int, dtype: str, args) -> dict:
    """One configuration's record (in this process or a worker), with its wall time and memory figures."""
    t0 = time.perf_counter()
    if args.no_subprocess:
        if model == "smollm2":
            args.ref_clients = args.ref_clients_smollm2
            args.ref_before_clients = args.ref_before_clients_smollm2
        res = run_config(model, K, args, common.load_model(model, dtype), dtype)
    else:
        res = _run_worker(model, K, dtype, args)
        if "error" in res:
            return res
    res["wall_s"] = time.perf_counter() - t0
    res["peak_rss_mib"] = res["peak_rss_run"] / 2**20
    res["runtime_rss_mib"] = res["rss_runtime"] / 2**20
    res["mem_x_model"] = res["peak_rss_run"] / res["model_bytes"]
    res["mem_above_runtime_x_model"] = (res["peak_rss_run"] - res["rss_runtime"]) / res["model_bytes"]
    res["round_working_set_mib"] = (res["peak_rss_run"] - res["rss_before_run"]) / 2**20
    res["subprocess"] = not args.no_subprocess
    return res


def _measure_peaks(peaks: dict, args) -> None:
    for pk in peaks.values():
        for _ in range(args.peak_samples + 1):
            pk.measure()


def _relate(ok_rows: list[dict], best_of: dict) -> None:
    """Each measured row against the best matmul peak of its dtype and against its float32 twin; its model
    and compile-time memory in MiB."""
    for r in ok_rows:  # conservative: against the best matmul peak of its dtype measured anywhere in the run
        best = best_of[r["dtype"]]
        r["peak_best"] = best
        r["frac_peak"] = r["gflops"] / best
        if "ref_round_s" in r:
            r["ref_frac_peak"] = r["gflop_per_round"] / r["ref_round_s"] / best
        twin = [q for q in ok_rows if q["model"] == r["model"] and q["K"] == r["K"] and q["dtype"] == "float32"]
        if twin and r["dtype"] != "float32":
            r["speed_vs_float32"] = twin[0]["round_s"] / r["round_s"]
            r["peak_rss_vs_float32"] = r["peak_rss_run"] / twin[0]["peak_rss_run"]
            r["above_runtime_vs_float32"] = (r["peak_rss_run"] - r["rss_runtime"]) / (
                twin[0]["peak_rss_run"] - twin[0]["rss_runtime"]
            )
        r["model_mib"] = r["model_bytes"] / 2**20
        r["peak_rss_compile_mib"] = r["peak_rss_compile"] / 2**20


def _report(ok_rows: list[dict], best_of: dict) -> None:
    print(
        f"\nload average now {list(os.getloadavg())}; best matmul peaks of the run "
        f"{ {d: round(b, 1) for d, b in best_of.items()} } GFLOP/s\n"
    )
    print(common.table(ok_rows, COLUMNS))
    print()
    print(common.table(ok_rows, REF_COLUMNS))
    print()
    print(common.table(ok_rows, MEM_COLUMNS))
    print(
        "\nES share: CMA-ES ask/tell + perturbation + projection + server aggregation, timed as the same "
        "compiled round with the model replaced by a trivial function, over the full round time. "
        "'ref' = reference-style run (clients in sequence, one jitted call per candidate and pass, pycma on "
        "the host); speedup = ref s/round / vectorized s/round, measured in the same process."
    )
    for r in ok_rows:
        if r.get("ref_extrapolated"):
            print(
                f"  {r['model']} K={r['K']}: reference-style time extrapolated linearly from "
                f"{r['ref_clients_timed']} timed client(s) (+ the measured server step)."
            )
        if not r["check_ok"]:
            print(
                f"  {r['model']} {r['dtype']} K={r['K']}: CHECK FAILED (rel diff {r['check_max_rel_diff']:.2e} > "
                f"{r['check_tolerance']:g})"
            )


def _smollm2_k10_targets(r: dict, tag: str) -> dict:
    targets = {}
    if "speed_vs_float32" in r:
        targets[f"{tag}: >= 1.7x faster than float32"] = r["speed_vs_float32"] >= 1.7
        targets[f"{tag}: peak RSS <= 60% of float32's"] = r["peak_rss_vs_float32"] <= 0.6
    if r["dtype"] == "float32":
        targets["smollm2 K=10: round >= 50% of the best matmul peak of the run"] = r["frac_peak"] >= 0.5
        if "es_share" in r:
            targets["smollm2 K=10: CMA-ES + aggregation <= 10% of round"] = r["es_share"] <= 0.10
        targets["smollm2 K=10: peak RSS of the whole process <= 3x one model copy"] = r["mem_x_model"] <= 3
        targets["smollm2 K=10: peak RSS above the bare JAX runtime <= 3x one model copy"] = (
            r["mem_above_runtime_x_model"] <= 3
        )
    return targets


def _targets(ok_rows: list[dict]) -> dict:
    """The project's targets, printed MET / NOT MET."""
    targets = {}
    for r in ok_rows:
        if r["model"] == "tiny" and r["K"] == 100:
            if "speedup" in r:
                targets["tiny K=100: vectorized >= 20x reference-style"] = r["speedup"] >= 20
        tag = f"{r['model']} {r['dtype']} K={r['K']}"
        if "frac_pure_inference" in r:
            targets[f"{tag}: round >= 90% of pure-inference tokens/s"] = r["frac_pure_inference"] >= 0.9
        if r["model"] == "smollm2" and r["K"] == 10:
            targets.update(_smollm2_k10_targets(r, tag))
        if r["model"] == "smollm2" and r["K"] == 1:
            if "es_share" in r:
                targets["smollm2 K=1: CMA-ES + aggregation <= 10% of round"] = r["es_share"] <= 0.10
    for k, v in targets.items():
        print(f"target {k}: {'MET' if v else 'NOT MET'}")
    return targets


def _write_outputs(args, info: dict, results: list[dict], ok_rows: list[dict], targets: dict) -> None:
    """The plot, and the JSON record of the run when ``--json``."""
    plot = args.plot or str(
        common.RESULTS_DIR / ("round_throughput_quick.png" if args.quick else "round_throughput.png")
    )
    if ok_rows:
        os.makedirs(os.path.dirname(plot), exist_ok=True)
        _plot(ok_rows, plot, info)
        print(f"wrote {plot}")
    info["loadavg_end"] = list(os.getloadavg())
    if args.json:
        common.write_json(
            args.json,
            {
                "benchmark": "round_throughput",
                "machine": info,
                "args": {k: v for k, v in vars(args).items() if k != "worker"},
                "results": results,
                "targets": targets,
                "plot": os.path.relpath(plot, common.RESULTS_DIR.parent.parent),
            },
        )
        print(f"wrote {args.json}")


def main(argv=None):
    ap = _parser()
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args)
    if args.plot_from:
        return _plot_only(args)
    models = (args.models or ("tiny" if args.quick else "tiny,smollm2")).split(",")
    if args.quick:
        _apply_quick(args)
    info = common.machine_info()
    print(
        f"machine: {info['cpu']} ({info['cores']} cores, {info['cpu_flags']}), jax {info['versions']['jax']}, "
        f"cma {info['versions']['cma']}, load average {info['loadavg_start']}",
        flush=True,
    )
    import jax  # noqa: F401  (the parent measures the peak too; it is idle while a worker runs)

    dtypes = args.dtypes.split(",")
    for d in dtypes:
        if d not in common.DTYPES:
            ap.error(f"unknown dtype {d!r}; accepted: {common.DTYPES}")
    peaks = {d: common.Peak(repeats=args.peak_repeats, dtype=d) for d in dtypes}
    _measure_peaks(peaks, args)
    results = [_measure(model, K, dtype, args) for model, K, dtype in _configs(args, models, dtypes)]
    _measure_peaks(peaks, args)
    best_of = {
        d: max([pk.best] + [r.get("peak_best_worker", 0) for r in results if r.get("dtype") == d])
        for d, pk in peaks.items()
    }
    ok_rows = [r for r in results if "round_s" in r]
    _relate(ok_rows, best_of)
    _report(ok_rows, best_of)
    targets = _targets(ok_rows)
    _write_outputs(args, info, results, ok_rows, targets)
    return 0 if all(r.get("check_ok", False) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
