"""The federated engine: FedBPT and its baselines as jitted, vmapped, sharded rounds."""
from .algorithms import ALGORITHMS, centralized_bbt, fedavg_bbt, fedbpt, fedprompt, make, manual_prompt
from .config import FedConfig, HParams
from .core import FederatedAlgorithm, FederatedData, ModelInputs, validate_data
from .distributed import client_mesh, clients_to_global, host, init_distributed, to_global
from .run import History, RunCarry, round_cost, compile_count, round_key, run, trace_count, write_results

__all__ = ["ALGORITHMS", "FedConfig", "HParams", "FederatedAlgorithm", "FederatedData", "ModelInputs", "History",
           "RunCarry", "run", "round_key", "round_cost", "trace_count", "compile_count", "write_results", "validate_data", "make",
           "fedbpt", "fedavg_bbt", "centralized_bbt", "manual_prompt", "fedprompt", "client_mesh",
           "init_distributed", "to_global", "clients_to_global", "host"]
