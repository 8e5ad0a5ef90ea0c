"""Golden numbers: a fixed tiny run of every trained algorithm, pinned bit for bit.

Each algorithm (FedBPT, also with a perturbed copy per generation; FedAvg-BBT with and without
perturbation; centralized BBT; FedPrompt) runs 4 rounds on a 6-client tiny decoder set-up (K = 3, a 30%
dropout: 2, 1, 2 and 3 clients take part; unequal client sizes), evaluated every 2 rounds on a test and
a dev set, checkpointed, stopped after round 2 and resumed from the checkpoint to round 4. Every number
of the history (round rows with their per-client diagnostics, evaluation rows; all but the wall-clock
``seconds``) and every leaf of the final carry must equal the
golden file ``tests/golden/<case>.json`` exactly: floats are stored losslessly (``float.hex``),
arrays as their raw bytes. A refactor must not change a single bit; a change that is meant to change
numbers regenerates the files and says why in its commit.

Regenerate (CPU, from the repository root)::

    FEDBPT_JAX_REGEN_GOLDEN=1 python -m pytest -q tests/test_golden.py

(that rewrites the main files; the per-machine files under ``golden/machines/`` are then stale: delete them
and add them again on their machines with ``FEDBPT_JAX_ADD_GOLDEN_MACHINE=1``, see :data:`MACHINE_DIR`).

The numbers are those of the CPU backend with the pinned jax/jaxlib (XLA may fuse and round
differently on another backend or version): the test runs on CPU only. They are also the numbers of one
CPU: XLA's CPU code and OpenBLAS's kernels are chosen for the host, so another CPU model (an AMD EPYC
against the Intel Xeon the files were written on) rounds differently in the last bits of float32. Each file
records the machine it was written on (``machine``: CPU model, flags, jax version); there the comparison is
exact, elsewhere floats agree to ``RTOL``/``ATOL`` (far above the ~1e-7 relative that another CPU's rounding
gives, far below what a changed algorithm gives) and everything else (integers, counts, PRNG keys) exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

import federated_setup as fs
from fedbpt_jax import federated as fl
from fedbpt_jax import machine, prompt, testing
from fedbpt_jax.federated.core import ModelInputs
from fedbpt_jax.models import decoder_cache

GOLDEN_DIR = Path(__file__).parent / "golden"
REGEN = os.environ.get("FEDBPT_JAX_REGEN_GOLDEN", "") not in ("", "0")
#: Golden files of further CPUs, a folder each: on some CPUs float32 rounds differently enough that a CMA-ES
#: ranking flips and a trajectory leaves the tolerance (an AMD EPYC without AVX-512 differs from the Intel
#: Xeon of the main files in 6 of 8 cases). ``FEDBPT_JAX_ADD_GOLDEN_MACHINE=1`` writes this machine's files
#: there, from code whose main files pass on their machine (the last commit's); the main files are never
#: rewritten for it. A machine with its own files is compared with them bit for bit.
MACHINE_DIR = GOLDEN_DIR / "machines"
ADD_MACHINE = os.environ.get("FEDBPT_JAX_ADD_GOLDEN_MACHINE", "") not in ("", "0")

#: Where the golden file's machine is not this one: floats must agree to this relative and absolute tolerance.
RTOL, ATOL = 1e-5, 1e-6

N, K, D = 6, 3, 8
COUNTS = (4, 3, 4, 2, 4, 1)
NUM_ROUNDS, EVAL_EVERY = 4, 2
HP = fl.HParams(dropout_rate=0.3, learning_rate=0.05)


def _config(**kw) -> fl.FedConfig:
    # The files of the cases below were written when the decoder default was the prompt after the text: they
    # name that layout. "fedbpt_prompt_before" pins the default layout (prompt cache, texts packed by length).
    base = dict(
        num_clients=N,
        clients_per_round=K,
        population_size=4,
        local_generations=2,
        intrinsic_dim=D,
        n_prompt_tokens=2,
        layout="after",
    )
    base.update(kw)
    return fl.FedConfig(**base)


#: case -> (builder, config): FedAvg-BBT also runs the optional ‖z‖ clip and σ clamp (which FedBPT shares);
#: FedBPT also runs with a fresh perturbed copy every generation.
CASES = {
    "fedbpt": (fl.fedbpt, _config()),
    "fedbpt_perturb_every_generation": (fl.fedbpt, _config(perturb_every="generation")),
    "fedavg_bbt": (
        fl.fedavg_bbt,
        _config(perturb=False, norm_clip=True, norm_clip_threshold=0.5, sigma_schedule="clamp", sigma_floor=0.9),
    ),
    "fedavg_bbt_perturbed": (lambda c, lm: fl.fedavg_bbt(c, lm, perturb=True), _config()),
    "centralized_bbt": (fl.centralized_bbt, _config(perturb=False)),
    "fedprompt": (fl.fedprompt, _config(perturb=False)),
    "fedbpt_prompt_before": (fl.fedbpt, _config(layout="before")),
}


def _clean(batch):
    pid = fs.poison_id()
    return batch.replace(input_ids=np.where(batch.input_ids == pid, pid - 1, batch.input_ids))


def _model() -> ModelInputs:
    lm = fs.tiny_lm()
    a = prompt.make_projection(jax.random.key(1), lm.input_embeddings(), intrinsic_dim=D, n_prompt_tokens=2)
    return ModelInputs(lm.params, a)


def _run(name: str, ckpt_dir: Path):
    make, cfg = CASES[name]
    lm = fs.tiny_lm()
    algo = make(cfg, lm)
    data = fs.make_data(N, seed=7, counts=COUNTS)
    if cfg.layout == "before":  # the texts packed to their real tokens, as the data loader gives them
        t = data.train
        packing = decoder_cache.packing_for(t.attention_mask, t.example_mask, cue_len=int(fs.spec().cue_ids.shape[0]))
        data = data.replace(train=t.replace(packing=packing))
    dev = _clean(testing.random_batch(2, 8, fs.SEQ, fs.VOCAB - 1))
    kw = dict(
        num_rounds=NUM_ROUNDS,
        hp=HP,
        dev=dev,
        eval_every=EVAL_EVERY,
        eval_chunk=8,
        checkpoint_dir=ckpt_dir,
        progress=False,
    )
    model = _model()
    fl.run(algo, jax.random.key(12), data, fs.test_set(), lm, model, stop_after=EVAL_EVERY, **kw)
    return fl.run(algo, jax.random.key(12), data, fs.test_set(), lm, model, **kw)  # resumed from the checkpoint


def _encode(x):
    """JSON-able and lossless: floats as ``"f:" + float.hex``, bools and ints as they are."""
    if isinstance(x, dict):
        return {str(k): _encode(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_encode(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return "f:" + float(x).hex()
    if x is None or isinstance(x, str):
        return x
    raise TypeError(f"unexpected value in the history: {type(x).__name__} {x!r}")


#: Carry leaves renamed since the golden files were written, current path -> the files' path: the server
#: CMA-ES state's σ and p_σ took the client state's names (``std``, ``p_std``; see
#: ``fedbpt_jax.checkpoint.RENAMED_FIELDS``). Only the names changed: the values are still compared bit for bit.
GOLDEN_PATHS = {".state.server.std": ".state.server.sigma", ".state.server.p_std": ".state.server.p_sigma"}


def _carry_leaves(carry) -> dict:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(fl.host(carry))[0]:
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        arr = np.ascontiguousarray(np.asarray(leaf))
        key = jax.tree_util.keystr(path)
        out[GOLDEN_PATHS.get(key, key)] = {
            "dtype": str(arr.dtype),
            "shape": list(arr.shape),
            "bytes": arr.tobytes().hex(),
        }
    return out


def _record(carry, history) -> dict:
    rounds = [{k: v for k, v in r.items() if k != "seconds"} for r in history.rounds]
    return {"rounds": _encode(rounds), "evals": _encode(history.evals), "carry": _carry_leaves(carry)}


def _machine() -> dict:
    """What decides the last bits of the CPU backend's float32 results."""
    return {"cpu": machine.cpu_model(), "cpu_flags": machine.cpu_flags(), "jax": jax.__version__}


def _machine_slug() -> str:
    m = _machine()
    raw = f"{m['cpu']} {m['cpu_flags']} jax{m['jax']}"
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in raw).strip("_")


def _golden_path(name: str) -> Path:
    """This machine's own golden file of ``name`` when it has one (:data:`MACHINE_DIR`), else the main file."""
    for folder in sorted(MACHINE_DIR.glob("*")):
        p = folder / f"{name}.json"
        if p.is_file() and json.loads(p.read_text()).get("machine") == _machine():
            return p
    return GOLDEN_DIR / f"{name}.json"


def _is_float_leaf(v) -> bool:
    return isinstance(v, dict) and set(v) == {"dtype", "shape", "bytes"} and np.dtype(v["dtype"]).kind == "f"


def _close(got, want) -> bool:
    return bool(np.all(np.isclose(got, want, rtol=RTOL, atol=ATOL, equal_nan=True)))


def _diff(got, want, where="", exact=True) -> list[str]:
    """The differences between a record and its golden file: bit for bit where ``exact``, else floats (history
    values and float carry leaves) to ``RTOL``/``ATOL`` and everything else exactly."""
    if not exact and _is_float_leaf(want) and _is_float_leaf(got):
        if (got["dtype"], got["shape"]) == (want["dtype"], want["shape"]):
            g, w = (np.frombuffer(bytes.fromhex(v["bytes"]), dtype=v["dtype"]) for v in (got, want))
            if _close(g, w):
                return []
            return [f"{where}: max |difference| {np.max(np.abs(g - w))!r} over {RTOL} relative / {ATOL} absolute"]
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{where}/{k}: missing" for k in want if k not in got]
        out += [f"{where}/{k}: unexpected" for k in got if k not in want]
        for k in want:
            if k in got:
                out += _diff(got[k], want[k], f"{where}/{k}", exact)
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{where}: length {len(got)}, golden {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in _diff(g, w, f"{where}[{i}]", exact)]
    is_float = lambda v: isinstance(v, str) and v.startswith("f:")  # noqa: E731
    show = lambda v: float.fromhex(v[2:]) if is_float(v) else v  # noqa: E731
    if not exact and is_float(got) and is_float(want) and _close(show(got), show(want)):
        return []
    if got != want or type(got) is not type(want):
        return [f"{where}: {show(got)!r}, golden {show(want)!r}"]
    return []


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the golden numbers are the CPU backend's")
@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_run(name, tmp_path):
    got = _record(*_run(name, tmp_path / "ckpt"))
    if ADD_MACHINE:
        path = MACHINE_DIR / _machine_slug() / f"{name}.json"
    elif REGEN:  # numbers meant to change: the main files (and delete machines/: re-add them on their machines)
        path = GOLDEN_DIR / f"{name}.json"
    else:
        path = _golden_path(name)
    if REGEN or ADD_MACHINE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps({"case": name, "jax": jax.__version__, "machine": _machine(), **got}, indent=1) + "\n"
        )
        return
    assert path.exists(), f"{path} is missing: regenerate with FEDBPT_JAX_REGEN_GOLDEN=1 (see this module's docstring)"
    want = json.loads(path.read_text())
    exact = want.get("machine") == _machine()
    diffs = _diff(got, {k: want[k] for k in ("rounds", "evals", "carry")}, exact=exact)
    how = (
        "bit for bit"
        if exact
        else f"to rtol {RTOL}, atol {ATOL} (written on {want.get('machine')}, this is {_machine()})"
    )
    assert not diffs, f"{len(diffs)} value(s) differ from {path.name}, compared {how}:\n  " + "\n  ".join(diffs[:30])


def test_golden_comparison_is_exact_on_the_golden_machine_and_close_elsewhere():
    f = "f:" + (0.5).hex()
    near = "f:" + (0.5 * (1 + 3e-7)).hex()
    far = "f:" + (0.5 * (1 + 1e-3)).hex()
    leaf = lambda x: {"dtype": "float32", "shape": [2], "bytes": np.asarray(x, np.float32).tobytes().hex()}  # noqa: E731
    assert _diff({"a": near}, {"a": f}) == ["/a: 0.50000015, golden 0.5"]  # exact: one ulp-scale change fails
    assert _diff({"a": near, "b": 3}, {"a": f, "b": 3}, exact=False) == []
    assert _diff({"a": far}, {"a": f}, exact=False) == ["/a: 0.5005, golden 0.5"]
    assert _diff({"n": 2}, {"n": 3}, exact=False) == ["/n: 2, golden 3"]  # integers stay exact
    assert _diff(leaf([1.0, 2.0 + 2e-7]), leaf([1.0, 2.0]), exact=False) == []
    assert _diff(leaf([1.0, 2.0 + 2e-7]), leaf([1.0, 2.0]))  # bytes differ: exact fails
    assert "max |difference|" in _diff(leaf([1.0, 2.1]), leaf([1.0, 2.0]), exact=False)[0]
    keys = {"dtype": "uint32", "shape": [2], "bytes": np.asarray([1, 2], np.uint32).tobytes().hex()}
    other = {**keys, "bytes": np.asarray([1, 3], np.uint32).tobytes().hex()}
    assert _diff(other, keys, exact=False)  # PRNG key data and other integer leaves: exact everywhere
