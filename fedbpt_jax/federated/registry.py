"""The built-in algorithms by name: the one list that the command line's choices, the hyperparameter checks
of a sweep, the metrics documentation's test and :data:`fedbpt_jax.federated.ALGORITHMS` (the factories,
which must cover exactly these names) read. Knowing them needs no model and imports nothing heavy (the
factories import evosax, which starts the XLA backend)."""

from __future__ import annotations

import dataclasses

from .config import FedConfig, HParams

#: What ``--algorithm`` accepts, in the order the help lists them (``fedavg_bbt`` with ``--fedavg-perturb``
#: is the built-in ``fedavg_bbt_perturbed``).
COMMAND_ALGORITHMS = ("fedbpt", "fedavg_bbt", "centralized_bbt", "manual", "fedprompt")
#: Every built-in algorithm name (the keys of ``ALGORITHMS``).
ALGORITHM_NAMES = ("fedbpt", "fedavg_bbt", "fedavg_bbt_perturbed", "centralized_bbt", "manual", "fedprompt")


def hparams_read(name: str, config: FedConfig) -> tuple[str, ...]:
    """The :class:`HParams` fields that the built-in algorithm ``name`` reads under ``config``, in
    :class:`HParams` order; known without building it (the CLI checks a sweep with it before the model
    loads; each factory declares it in its spec, and a test checks it against what a round reads).

    Every federated algorithm samples its round's clients with ``sample_round`` (``dropout_rate``); the
    CMA-ES ones start from ``sigma0``; the perturbation term reads ``perturb_rate`` (FedBPT with
    ``config.perturb``, FedAvg-BBT+perturbation); FedPrompt's Adam reads ``learning_rate``. Centralized BBT
    has no clients to drop and the manual prompt reads nothing.

    Raises:
      ValueError: an unknown name, naming the accepted ones.
    """
    if name not in ALGORITHM_NAMES:
        raise ValueError(f"unknown algorithm {name!r}; accepted: {sorted(ALGORITHM_NAMES)}")
    reads = {
        "fedbpt": {"sigma0", "dropout_rate"} | ({"perturb_rate"} if config.perturb else set()),
        "fedavg_bbt": {"sigma0", "dropout_rate"},
        "fedavg_bbt_perturbed": {"sigma0", "dropout_rate", "perturb_rate"},
        "centralized_bbt": {"sigma0"},
        "manual": set(),
        "fedprompt": {"dropout_rate", "learning_rate"},
    }[name]
    return tuple(f.name for f in dataclasses.fields(HParams) if f.name in reads)


def declares(**flags):
    """Marks an algorithm factory with what its algorithms declare to :func:`~fedbpt_jax.federated.run`
    (:class:`AlgorithmSpec`'s ``uses_clean_context`` and ``uploads``; absent ones are False): the factory
    passes ``**factory.declares`` to its spec, and :func:`fedbpt_jax.federated.algorithms.declaring` reads them
    without building anything."""
    unknown = set(flags) - {"uses_clean_context", "uploads"}
    if unknown:
        raise ValueError(f"unknown declared properties {sorted(unknown)}; accepted: uploads, uses_clean_context")

    def mark(factory):
        factory.declares = {"uses_clean_context": False, "uploads": False, **flags}
        return factory

    return mark
