"""Shared helpers of the benchmark scripts: timing, the matmul peak, machine facts, memory, FLOPs, tables.

Import this module *before* numpy/jax in a script: it imports ``fedbpt_jax`` first, which sets
``OPENBLAS_NUM_THREADS=1`` (docs/measurements.md, "CPU threads").

Timing rules followed everywhere: compile is timed separately (AOT ``lower().compile()`` or the first
call), one warm-up call runs before any timed call, every timed call ends in ``block_until_ready``.
The matmul peak *of the item's compute dtype* (float32, or bfloat16 inputs with float32 accumulation)
is measured in the same process, right before and right after each timed item, because the development
machine is shared: the fraction of peak of an item is its GFLOP/s over the mean of the two peak
measurements that bracket it (same load), and the run's best peak is reported too. FLOPs come from the
package's one cost model (``Scorer.cost``, ``federated.round_cost``).
"""

from __future__ import annotations

import fedbpt_jax  # noqa: F401  (first: sets OPENBLAS_NUM_THREADS before numpy/jax load)
from fedbpt_jax.machine import cpu_flags, cpu_model

# isort: split
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------------
# Machine facts
# ----------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "evosax", "cma", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def git_revision() -> str:
    """The repository's HEAD commit (with ``+dirty`` if tracked files under fedbpt_jax/ differ)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "fedbpt_jax"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    import jax

    return {
        "git": git_revision(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "versions": versions(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg_start": list(os.getloadavg()),
        "smollm2_weights": weights_note("smollm2"),
        "device_kind": [getattr(d, "device_kind", "") for d in jax.devices()],
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
    }


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def block(x):
    import jax

    return jax.block_until_ready(x)


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all threads)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def time_call(fn: Callable, *args, repeats: int = 3, warmup: int = 1) -> dict[str, Any]:
    """Warm-up calls, then ``repeats`` timed calls (each blocked). Returns seconds and the last output.

    ``cpu_util`` is the process's CPU time over wall time x cores during the timed calls: well below 1
    on a compute-bound item means other processes took cores (the machine was shared).
    """
    first = None
    out = None
    for i in range(warmup):
        t0 = time.perf_counter()
        out = block(fn(*args))
        if i == 0:
            first = time.perf_counter() - t0
    times = []
    c0, w0 = cpu_seconds(), time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = block(fn(*args))
        times.append(time.perf_counter() - t0)
    util = (cpu_seconds() - c0) / max(time.perf_counter() - w0, 1e-9) / (os.cpu_count() or 1)
    return {
        "first_s": first,
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "cpu_util": util,
        "out": out,
    }


def aot_compile(jitted, *args) -> tuple[Any, float]:
    """``jitted.lower(*args).compile()`` and the seconds it took (tracing + XLA compilation)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


class Peak:
    """The matmul peak of this machine in ``dtype``, measured now (jitted ``n x n @ n x n``, best of a
    few; bfloat16 inputs accumulate in float32, as the models' matmuls do; ``n`` 2048 on a CPU, 8192 on an
    accelerator; float32 at JAX's default matmul precision, as the models run: TF32 inputs on recent
    NVIDIA GPUs unless ``jax_default_matmul_precision`` says otherwise).

    ``best`` (the highest measurement of the run) is the machine's capability and the conservative
    reference for fractions of peak; :meth:`bracket` also gives the peak measured right before and
    after an item, i.e. under the same load from other processes (the development machine is shared).
    """

    def __init__(self, n: int | None = None, repeats: int = 4, dtype: str = "float32"):
        import jax
        import jax.numpy as jnp

        if n is None:  # 2048 saturates a CPU; an accelerator needs a larger product to reach its rate
            n = 2048 if jax.default_backend() == "cpu" else 8192
        self.n, self.repeats, self.dtype = n, repeats, dtype
        key_a, key_b = jax.random.split(jax.random.key(0))
        self.a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
        self.b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
        self.fn = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
        block(self.fn(self.a, self.b))
        self.history: list[float] = []

    def measure(self) -> float:
        t = time_call(self.fn, self.a, self.b, repeats=self.repeats, warmup=1)["min_s"]
        g = 2 * self.n**3 / t / 1e9
        self.history.append(g)
        return g

    @property
    def best(self) -> float:
        return max(self.history) if self.history else float("nan")

    def bracket(self, fn: Callable[[], Any], samples: int = 1) -> tuple[Any, float, float]:
        """Runs ``fn()`` between peak measurements (``samples`` each side, best kept); returns
        (its result, peak before, peak after)."""
        before = max(self.measure() for _ in range(samples))
        out = fn()
        after = max(self.measure() for _ in range(samples))
        return out, before, after


# ----------------------------------------------------------------------------------------------
# Memory (host RSS: on the CPU backend device memory is process memory)
# ----------------------------------------------------------------------------------------------
def _status(field: str) -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def rss_bytes() -> int:
    return _status("VmRSS")


def peak_rss_bytes() -> int:
    """High-water mark of this process's RSS (since start or the last :func:`reset_peak_rss`)."""
    hwm = _status("VmHWM")
    if hwm < 0:
        import resource

        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return hwm


def release_freed_memory() -> None:
    """``gc.collect()`` and glibc ``malloc_trim(0)``: returns memory that was freed but kept by the
    allocator to the OS, so that a peak measured next counts memory really held, not retention."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss(release: bool = True) -> bool:
    """Resets VmHWM to the current RSS (Linux ``/proc/self/clear_refs`` 5; after
    :func:`release_freed_memory` unless ``release=False``); False if not possible."""
    if release:
        release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def device_memory_stats() -> dict | None:
    import jax

    try:
        return jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001  (CPU backends may not implement it)
        return None


def tree_bytes(tree) -> int:
    from fedbpt_jax.models import precision

    return precision.tree_bytes(tree)


# ----------------------------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------------------------
MODELS = ("tiny", "smollm2")


DTYPES = ("float32", "bfloat16")


#: Environment variable naming an architecture folder (:func:`export_architecture`): when set,
#: ``load_model("smollm2")`` builds SmolLM2's exact architecture and tokenizer from it with *random*
#: weights, for throughput figures on a machine the 98 MB checkpoint cannot reach. Subprocess workers
#: inherit it. Throughput does not depend on the weights' values; accuracies measured with it mean nothing.
RANDOM_WEIGHTS_ENV = "FEDBPT_BENCH_RANDOM_WEIGHTS"


def write_architecture(lm, out_dir: str | os.PathLike) -> Path:
    """Writes a decoder bundle's config (``decoder_config.json``) and tokenizer files into ``out_dir``:
    everything but the weights (a few MB). :func:`random_weights_model` rebuilds it with random weights."""
    import dataclasses

    if lm.kind != "decoder" or lm.tokenizer is None:
        raise ValueError(
            f"write_architecture needs a decoder with a tokenizer; {lm.name!r} is a {lm.kind} "
            f"{'with' if lm.tokenizer is not None else 'without'} one"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.asdict(lm.config)
    cfg["compute_dtype"] = "float32"
    (out / "decoder_config.json").write_text(json.dumps({"name": lm.name, "config": cfg}, indent=1) + "\n")
    lm.tokenizer.save_pretrained(str(out))
    return out


def export_architecture(name: str, out_dir: str | os.PathLike) -> Path:
    """:func:`write_architecture` of ``load_model(name)``; ``load_model`` rebuilds the model from the folder,
    with random weights, when :data:`RANDOM_WEIGHTS_ENV` names it."""
    return write_architecture(load_model(name), out_dir)


def random_weights_model(directory: str | os.PathLike, compute_dtype: str = "float32"):
    """The decoder that :func:`write_architecture` wrote to ``directory``, with random weights (key 0)."""
    import jax

    from fedbpt_jax.models import decoder, hf
    from fedbpt_jax.models.base import LanguageModel

    path = Path(directory)
    try:
        raw = json.loads((path / "decoder_config.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{str(directory)!r}: cannot read decoder_config.json ({err}); write the folder with "
            "`python benchmarks/common.py export-architecture smollm2 DIR`"
        ) from err
    config = decoder.DecoderConfig(**{**raw["config"], "compute_dtype": compute_dtype})
    tokenizer = hf.load_tokenizer(path)
    params = decoder.init_params(config, jax.random.key(0))
    return LanguageModel(
        name=f"{raw['name']} (random weights)",
        kind="decoder",
        config=config,
        params=params,
        tokenizer=tokenizer,
        module=None,
    )


def weights_note(name: str) -> str:
    """Which weights ``load_model(name)`` loads now: ``"real"``, ``"random (test model)"`` (tiny) or random
    with the architecture of the folder :data:`RANDOM_WEIGHTS_ENV` names."""
    if name == "smollm2" and os.environ.get(RANDOM_WEIGHTS_ENV):
        return f"random (architecture and tokenizer from ${RANDOM_WEIGHTS_ENV})"
    return "random (test model)" if name == "tiny" else "real"


def load_model(name: str, compute_dtype: str = "float32"):
    """``"tiny"``: the random 2-layer decoder of :mod:`fedbpt_jax.testing`; ``"smollm2"``: the real
    SmolLM2-135M-Instruct (GGUF, offline), or its architecture with random weights when
    ``$FEDBPT_BENCH_RANDOM_WEIGHTS`` names an exported folder; in ``compute_dtype``."""
    if name == "tiny":
        import dataclasses

        from fedbpt_jax import testing
        from fedbpt_jax.models import decoder

        lm = testing.tiny_decoder(0)
        cfg = dataclasses.replace(lm.config, compute_dtype=compute_dtype)
        return dataclasses.replace(lm, config=cfg, params=decoder.cast_params(cfg, lm.params))
    if name == "smollm2":
        from fedbpt_jax import models

        if os.environ.get(RANDOM_WEIGHTS_ENV):
            return random_weights_model(os.environ[RANDOM_WEIGHTS_ENV], compute_dtype)

        return models.load("smollm2-135m-instruct", compute_dtype=compute_dtype)
    raise ValueError(f"unknown model {name!r}; accepted: {MODELS}")


def scoring_batch(lm, num_examples: int, max_length: int, n_prompt: int, *, seed: int = 0):
    """``(TokenBatch [B, T], ScoringSpec, source)`` at SST-2 lengths.

    With a tokenizer: ``num_examples`` real SST-2 test sentences (random, fixed seed), tokenised by
    :func:`fedbpt_jax.data.tokenize` with the decoder completion template (``Review: {text}`` and the
    cue ``\\nSentiment:``), texts cut to ``max_length`` tokens. Without one (tiny model): random tokens
    of lengths in ``[max_length*3/4, max_length]`` and a random 4-token cue.
    """
    import jax.numpy as jnp

    from fedbpt_jax import data as fdata
    from fedbpt_jax import testing

    if lm.tokenizer is not None:
        examples = fdata.load_task_data("sst2", None, "test")
        idx = np.sort(np.random.default_rng(seed).permutation(len(examples))[:num_examples])
        examples = examples.take(idx)
        batch = fdata.tokenize(
            "sst2", examples, lm.tokenizer, "decoder", n_prompt=n_prompt, max_length=max_length, pad_to_max_length=True
        )
        spec = fdata.scoring_spec("sst2", lm.tokenizer, "decoder", n_prompt=n_prompt)
        source = "sst2-test"
    else:
        batch = testing.random_batch(seed, num_examples, max_length, lm.vocab_size, min_len=max(2, 3 * max_length // 4))
        spec = testing.random_spec(lm.vocab_size, cue_len=4)
        source = "random-tokens"
    import jax

    return jax.tree_util.tree_map(jnp.asarray, batch), spec, source


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if x != x:
            return "nan"
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A GitHub markdown table of ``rows`` with ``columns = [(key, header), ...]``."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def write_json(path: str | os.PathLike, obj: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=1))
    os.replace(tmp, path)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="benchmark helpers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export-architecture", help="write a model's config and tokenizer (no weights) to DIR")
    ex.add_argument("model", choices=["smollm2"])
    ex.add_argument("out_dir")
    a = ap.parse_args()
    print(export_architecture(a.model, a.out_dir))
