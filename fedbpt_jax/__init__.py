"""fedbpt-jax: a JAX-vectorized simulator of FedBPT (federated black-box prompt tuning).

Public API (submodules and names are imported lazily, so ``jax.distributed.initialize`` can run first)::

    import jax, fedbpt_jax as fb
    lm = fb.models.load("smollm2-135m-instruct")
    fed = fb.data.federated("sst2", lm.tokenizer, lm.kind, num_clients=10, shots_per_class=16, alpha=1.0)
    cfg = fb.FedConfig(num_clients=10, clients_per_round=10, n_prompt_tokens=5)
    algo = fb.fedbpt(cfg, lm)
    model = fb.ModelInputs.build(jax.random.key(0), lm, cfg)
    carry, history = fb.run(algo, jax.random.key(1), fb.FederatedData.from_host(fed), fed.test, lm, model,
                            num_rounds=10)
"""

from __future__ import annotations

import importlib
import os

# The one place OPENBLAS_NUM_THREADS is set (a value already set wins). It must happen before numpy or jax
# loads OpenBLAS, whose threads compete with XLA's (docs/measurements.md, "CPU threads"): import fedbpt_jax
# first.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# transformers announces at import, through its advisory-warning channel, that PyTorch is missing; this package
# never needs PyTorch (models are Flax, transformers only provides tokenizers and configs). The variable is read
# when the notice is emitted, so setting it here (before any submodule imports transformers) silences it for
# the CLI, the experiment and benchmark scripts and library users alike; a value already set wins.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"

_SUBMODULES = (
    "assets",
    "bbt",
    "callbacks",
    "checkpoint",
    "accounting",
    "data",
    "federated",
    "models",
    "objective",
    "plots",
    "prompt",
    "report",
    "strategy",
    "tasks",
    "templates",
    "testing",
    "types",
)
_FEDERATED = (
    "FedConfig",
    "HParams",
    "FederatedAlgorithm",
    "FederatedData",
    "ModelInputs",
    "run",
    "make",
    "fedbpt",
    "fedavg_bbt",
    "centralized_bbt",
    "manual_prompt",
    "fedprompt",
    "client_mesh",
    "init_distributed",
    "History",
    "RunCarry",
    "summarize",
    "load_uploads",
    "tune_learning_rate",
    "sweep",
    "SweepResults",
    "lane_mesh",
)
_OTHER = {"TokenBatch": "types", "ScoringSpec": "types", "BBTConfig": "bbt"}

__all__ = [*_SUBMODULES, *_FEDERATED, *_OTHER, "__version__"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    elif name in _FEDERATED:
        value = getattr(importlib.import_module(".federated", __name__), name)
    elif name in _OTHER:
        value = getattr(importlib.import_module(f".{_OTHER[name]}", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
