"""The test tokenizers, now in the package: :mod:`fedbpt_jax.testing_tokenizers` (re-exported here so the
tests can keep ``import tokenizers_util as tu``)."""

from fedbpt_jax.testing_tokenizers import (  # noqa: F401
    CHATML_TEMPLATE,
    VOCAB_SIZE,
    chatml_tokenizer,
    data_dir,
    gguf_metadata,
    roberta_like_tokenizer,
    smollm2_tokenizer,
)
