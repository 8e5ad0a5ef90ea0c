"""The federated engine: FedBPT and its baselines as jitted, vmapped, sharded rounds.

The algorithms (which import evosax through :mod:`fedbpt_jax.strategy`) are imported lazily (PEP 562):
importing evosax starts the XLA backend, and ``jax.distributed.initialize`` (:func:`init_distributed`)
must come before that.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .config import HPARAM_RANGES, FedConfig, HParams, check_hparams
from .core import (
    AlgorithmCost,
    AlgorithmSpec,
    ClientSample,
    FederatedAlgorithm,
    FederatedData,
    ModelInputs,
    clean_context_bytes,
    sample_round,
    validate_data,
    with_clean_context,
)
from .counters import compile_count, trace_count
from .distributed import client_mesh, clients_to_global, host, init_distributed, to_global
from .driver import median_token_norm, round_cost, round_key, run
from .evaluation import RunCarry
from .lanes import LR_GRID, SweepResults, hp_points, lane_mesh, sweep, tune_learning_rate
from .records import History, load_uploads, summarize, write_results
from .registry import ALGORITHM_NAMES, COMMAND_ALGORITHMS, hparams_read

_LAZY = (
    "ALGORITHMS",
    "centralized_bbt",
    "fedavg_bbt",
    "fedbpt",
    "fedprompt",
    "make",
    "manual_prompt",
)

__all__ = [
    "ALGORITHMS",
    "FedConfig",
    "HParams",
    "HPARAM_RANGES",
    "check_hparams",
    "FederatedAlgorithm",
    "AlgorithmCost",
    "AlgorithmSpec",
    "ClientSample",
    "sample_round",
    "FederatedData",
    "ModelInputs",
    "History",
    "RunCarry",
    "run",
    "summarize",
    "load_uploads",
    "median_token_norm",
    "round_key",
    "round_cost",
    "trace_count",
    "compile_count",
    "write_results",
    "LR_GRID",
    "tune_learning_rate",
    "validate_data",
    "make",
    "hparams_read",
    "ALGORITHM_NAMES",
    "COMMAND_ALGORITHMS",
    "fedbpt",
    "fedavg_bbt",
    "centralized_bbt",
    "manual_prompt",
    "fedprompt",
    "client_mesh",
    "init_distributed",
    "to_global",
    "clients_to_global",
    "host",
    "clean_context_bytes",
    "with_clean_context",
    "sweep",
    "SweepResults",
    "hp_points",
    "lane_mesh",
]


def __getattr__(name: str):
    if name in _LAZY:
        home = ".white_box" if name == "fedprompt" else ".algorithms"
        value = getattr(importlib.import_module(home, __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover
    from .algorithms import (  # noqa: F401
        ALGORITHMS,
        centralized_bbt,
        fedavg_bbt,
        fedbpt,
        make,
        manual_prompt,
    )
    from .white_box import fedprompt  # noqa: F401
