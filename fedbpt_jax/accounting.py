"""Communication, compute and memory accounting of a federated round.

What FedBPT really sends (docs/algorithm.md, "Paper vs reference code"): down, the server's CMA-ES mean z (d floats), σ
and, optionally, the covariance C (d² floats: the reference actually broadcasts the whole pickled ES
object, ~4.3 MB at d = 500; the paper's "4 KB" counts only the mean); up, the final local mean (d), its
fitness (1) and the local σ history (I floats). FedAvg of the full model moves every parameter both
ways. All sizes are in bytes at ``bytes_per_float`` (4 for float32; the paper's figures imply 8).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class CommBytes:
    down_per_client: int
    up_per_client: int
    fedavg_full_model_per_client: int  # one direction; FedAvg sends the model down and up

    def as_dict(self, prefix: str = "") -> dict[str, int]:
        return {f"{prefix}{k}": v for k, v in dataclasses.asdict(self).items()}


def fedbpt_bytes(
    d: int, local_generations: int, num_model_params: int, *, send_covariance: bool = False, bytes_per_float: int = 4
) -> CommBytes:
    """Bytes per client per round for FedBPT (and FedAvg-BBT, which sends the same plus C up)."""
    down = d + 1 + (d * d if send_covariance else 0)  # mean, σ, [C]
    up = d + 1 + local_generations  # mean, fitness, σ history
    return CommBytes(down * bytes_per_float, up * bytes_per_float, num_model_params * bytes_per_float)


def fedavg_bbt_bytes(d: int, num_model_params: int, *, bytes_per_float: int = 4) -> CommBytes:
    """FedAvg-BBT: down mean, σ, C; up mean, σ, C."""
    n = d + 1 + d * d
    return CommBytes(n * bytes_per_float, n * bytes_per_float, num_model_params * bytes_per_float)


def prompt_bytes(n_prompt_tokens: int, hidden: int, num_model_params: int, *, bytes_per_float: int = 4) -> CommBytes:
    """FedPrompt: the soft prompt embeddings both ways."""
    n = n_prompt_tokens * hidden
    return CommBytes(n * bytes_per_float, n * bytes_per_float, num_model_params * bytes_per_float)


def tree_bytes(tree) -> int:
    """Total bytes of a pytree's array leaves."""
    import jax

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))
