"""The federated engine: FedBPT and its baselines as jitted, vmapped, sharded rounds."""
from .algorithms import ALGORITHMS, centralized_bbt, fedavg_bbt, fedbpt, fedprompt, make, manual_prompt
from .config import FedConfig, HParams
from .core import FederatedAlgorithm, FederatedData, ModelInputs
from .run import History, RunCarry, run

__all__ = ["ALGORITHMS", "FedConfig", "HParams", "FederatedAlgorithm", "FederatedData", "ModelInputs", "History",
           "RunCarry", "run", "make", "fedbpt", "fedavg_bbt", "centralized_bbt", "manual_prompt", "fedprompt"]
