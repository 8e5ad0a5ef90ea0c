"""Task data: loading, BBT few-shot sampling, tokenising to static padded arrays, client partitions.

One module per concern, in the order a run uses them:

* :mod:`~fedbpt_jax.data.examples`: :class:`Example` rows and the column-wise :class:`Examples`.
* :mod:`~fedbpt_jax.data.sources`: :func:`load_task_data` from the six sources (embedded, shared-data
  folder, hub, hub name, file, folder) and :func:`pool_and_test`; the embedded Rotten Tomatoes data and
  its movie-level split live in :mod:`~fedbpt_jax.data.embedded`.
* :mod:`~fedbpt_jax.data.sampling`: BBT's ``k``-shot train/dev draw.
* :mod:`~fedbpt_jax.data.tokenization`: :func:`tokenize` and :func:`scoring_spec` for either backbone
  kind, built on :mod:`~fedbpt_jax.data.encoder_inputs` (masked LM), :mod:`~fedbpt_jax.data.decoder_inputs`
  (causal LM) and the shared helpers of :mod:`~fedbpt_jax.data.text_encoding`.
* :mod:`~fedbpt_jax.data.partitions`: IID and Dirichlet client partitions (with the sizing QP).
* :mod:`~fedbpt_jax.data.batches`: per-client ``[N, E, T]`` arrays (:func:`federated_batches`) and
  :func:`federated`, the one call from a task name to a :class:`FederatedSplits` (host-side; the device
  arrays the rounds take are :class:`fedbpt_jax.FederatedData`).

Every public name is re-exported here, so ``fedbpt_jax.data.<name>`` works for all of them.
"""

from __future__ import annotations

from .batches import FederatedSplits, federated, federated_batches
from .decoder_inputs import decoder_cue_ids, decoder_lead_ids, encode_decoder
from .embedded import group_stratified_split, load_rotten_tomatoes
from .encoder_inputs import encode_encoder
from .examples import Example, Examples
from .partitions import ClientIndices, Partition, label_skew, min_norm_sizes, partition_dirichlet, partition_iid
from .sampling import few_shot, few_shot_indices
from .sources import default_data_dir, load_task_data, pool_and_test
from .text_encoding import placeholder_ids, special_frame
from .tokenization import scoring_spec, tokenize

__all__ = [
    "ClientIndices",
    "Example",
    "Examples",
    "FederatedSplits",
    "Partition",
    "decoder_cue_ids",
    "decoder_lead_ids",
    "default_data_dir",
    "encode_decoder",
    "encode_encoder",
    "federated",
    "federated_batches",
    "few_shot",
    "few_shot_indices",
    "group_stratified_split",
    "label_skew",
    "load_rotten_tomatoes",
    "load_task_data",
    "min_norm_sizes",
    "partition_dirichlet",
    "partition_iid",
    "placeholder_ids",
    "pool_and_test",
    "scoring_spec",
    "special_frame",
    "tokenize",
]


def __getattr__(name: str):
    if name == "FederatedData":  # the host-side type's earlier name, which the device-side type also had
        import warnings

        warnings.warn(
            "fedbpt_jax.data.FederatedData is now fedbpt_jax.data.FederatedSplits (fedbpt_jax.FederatedData "
            "is the device-side type)",
            DeprecationWarning,
            stacklevel=2,
        )
        return FederatedSplits
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
