"""What a run's checkpoint must agree with before it resumes: a fingerprint of everything that changes a
number (:func:`describe`), the difference said in words (:func:`differs`), and :class:`RunCheckpoint`
(restore and save)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..checkpoint import Checkpointer, CheckpointMismatch, fingerprint
from ..types import TokenBatch
from .config import HParams
from .core import (
    FederatedAlgorithm,
    FederatedData,
    ModelInputs,
)
from .distributed import host
from .evaluation import RunCarry
from .records import History


def _fingerprint(x) -> str | None:
    """A short digest of an array's shape, dtype and bytes (None stays None)."""
    if x is None:
        return None
    import hashlib

    arr = np.ascontiguousarray(np.asarray(host(x)))
    return f"{arr.dtype}{list(arr.shape)}:{hashlib.sha256(arr.tobytes()).hexdigest()[:16]}"


def _readable(x) -> bool:
    return not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated


def _tree_fingerprint(tree) -> str | None:
    """One digest of every array leaf of ``tree`` (examples, a scoring spec); None when a leaf lives on
    devices this process cannot read (a multi-process run: the shapes and the other entries still apply)."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if x is not None]
    if not all(_readable(x) for x in leaves):
        return None
    return fingerprint(*[_fingerprint(x) for x in leaves])


#: What a checkpoint's description entries are, in words (a refused resume names these, not raw values).
_DESCRIBED_IN_WORDS = {
    "key": "the run's key (--seed)",
    "train_examples": "the clients' training examples (task, data source, shots, seed, partition, template)",
    "test_examples": "the test examples (task, data source, --test-size, template)",
    "dev_examples": "the dev examples (task, data source, --dev-shots, template)",
    "scoring": "the scoring (label words, answer cue, instruction lead)",
    "backbone": "the backbone (model and its configuration)",
    "prompt_start": "the prompt start",
}


#: FedConfig fields recorded in a checkpoint's description under their earlier names.
_DESCRIBED_AS = {"projection_alpha": "alpha"}


def describe(
    algo: FederatedAlgorithm,
    hp: HParams,
    eval_every: int,
    key_data,
    data: FederatedData,
    lm,
    model: ModelInputs,
    test: TokenBatch | None = None,
    dev: TokenBatch | None = None,
) -> dict[str, str]:
    """What identifies a run for resuming (everything but the round count, the mesh and the I/O): the
    configuration, the hyperparameters, the key, and digests of every example it trains, selects and is
    scored on, and of how it scores them (label words, cue, instruction)."""
    c = data.counts
    readable = not isinstance(c, jax.Array) or c.is_fully_addressable or c.is_fully_replicated
    counts = host(c) if readable else None
    desc = {
        "algorithm": algo.name,
        "eval_every": eval_every,
        "key": np.asarray(host(key_data)).tolist(),
        "backbone": f"{lm.name} {lm.config!r}",
        "data_shape": list(np.shape(data.train.input_ids)),
        "client_counts_sum": None if counts is None else int(np.sum(counts)),
        "projection_shape": None if model.projection is None else list(np.shape(model.projection)),
        "prompt_start": _fingerprint(getattr(model, "start", None)),
        "train_examples": _tree_fingerprint(data.train),
        "test_examples": None if test is None else _tree_fingerprint(test),
        "dev_examples": None if dev is None else _tree_fingerprint(dev),
        "scoring": _tree_fingerprint(data.spec),
    }
    # Keys keep their historical names (projection_alpha was "alpha"), so older checkpoints still resume.
    desc.update(
        {
            f"config.{_DESCRIBED_AS.get(f.name, f.name)}": getattr(algo.config, f.name)
            for f in dataclasses.fields(algo.config)
        }
    )
    desc.update({f"hp.{k}": float(np.asarray(v)) for k, v in dataclasses.asdict(host(hp)).items()})
    return {k: repr(v) for k, v in desc.items()}


def _differs(name: str, then: str, now: str) -> str:
    """One difference between a checkpoint's description and this run's, in words: digests and keys are named
    by what they cover ("the test examples differ"), settings by name with both values."""
    if name in _DESCRIBED_IN_WORDS:
        if "<absent>" in (then, now):
            where = "the checkpoint" if then == "<absent>" else "this run"
            return f"{_DESCRIBED_IN_WORDS[name]}: not recorded by {where}"
        return f"{_DESCRIBED_IN_WORDS[name]}: not the checkpoint's"
    label = name.replace("config.", "FedConfig.").replace("hp.", "HParams.")
    return f"{label}: checkpoint {then}, this run {now}"


class RunCheckpoint:
    """A run's checkpoints: the carry and the history under the run's configuration (its fingerprint)."""

    def __init__(self, directory, desc: dict[str, str]):
        self.desc = desc
        self.ckpt = Checkpointer(directory, fingerprint(sorted(desc.items())))

    def resume(self, template: RunCarry, num_rounds: int, mesh) -> tuple[RunCarry, History] | None:
        """The latest checkpoint's carry and history (None when there is none); a checkpoint of another
        configuration is a :class:`CheckpointMismatch` naming every differing value."""
        ckpt = self.ckpt
        if ckpt.latest_step() is None:
            return None
        try:
            step, carry, meta = ckpt.restore(template)
        except CheckpointMismatch as err:
            raise CheckpointMismatch(self._mismatch(err)) from None
        if mesh is None:  # restored arrays are committed to a device: match a fresh run's placement
            carry = jax.tree_util.tree_map(jnp.asarray, host(carry))
        if step > num_rounds:
            raise ValueError(f"checkpoint {ckpt.directory} is at round {step}, past num_rounds={num_rounds}")
        return carry, History(rounds=meta["rounds"], evals=meta["evals"])

    def _mismatch(self, err: Exception) -> str:
        step = self.ckpt.latest_step()
        old = self.ckpt.restore_meta(step).get("config", {})
        diff = [_differs(k, old.get(k, "<absent>"), v) for k, v in self.desc.items() if old.get(k) != v]
        diff += [_differs(k, v, "<absent>") for k, v in old.items() if k not in self.desc]
        return (
            f"checkpoint {self.ckpt.directory} (round {step}) is from another configuration: "
            + ("; ".join(diff) or str(err))
            + ". Resume with the same configuration or use a new checkpoint directory"
        )

    def save(self, done: int, carry: RunCarry, history: History) -> None:
        self.ckpt.save(done, carry, {**history.as_dict(), "config": self.desc})

    def close(self) -> None:
        self.ckpt.close()
