"""Builds tests/fixtures/spm_tiny_reference.json: a tiny SentencePiece BPE model and its own encodings
(run once; tests never run it).

Llama-2-family GGUF files carry a SentencePiece vocabulary (``tokenizer.ggml.model = "llama"``: pieces,
scores, token types) instead of the model file. This script trains a small SentencePiece BPE model with
Llama-2's trainer settings (BPE, byte fallback, split digits, identity normalisation, a dummy prefix, no
whitespace clean-up) on a few invented sentences, and stores its pieces, scores and GGUF token types
together with the ids ``sentencepiece`` itself gives for a set of probe strings (spaces at the start, in
runs and at the end, digits, punctuation, characters outside the vocabulary that need byte fallback).
tests/test_gguf.py writes these into a GGUF file and checks that the tokenizer the loader builds from the
metadata encodes every probe exactly as ``sentencepiece`` did and decodes it back.

Needs ``sentencepiece`` (any scratch environment; fedbpt-jax does not depend on it). From the repository
root:

    /tmp/torchvenv/bin/python scripts/make_spm_fixture.py
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import sentencepiece as spm

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "spm_tiny_reference.json"

_SENTENCES = [
    "the film is a charming and often affecting journey",
    "a gorgeous , witty , seductive movie",
    "the plot is dull and the acting is flat",
    "it is the best movie of the year",
    "the story of two friends who travel to the sea",
    "a warm and funny film about a family",
    "there is nothing new in this tired thriller",
    "the music and the pictures are lovely",
    "one of the worst films i have seen",
    "in 1999 the director made 3 films , all of them good",
    "Review: the actors are great . Sentiment: positive",
    "Review: the script is bad . Sentiment: negative",
]

PROBES = [
    "the film is great",
    "The Film Is Great",
    " leading space",
    "two  spaces and   three",
    "trailing space ",
    "digits 2024 and 3.14",
    "naïve café — déjà vu ✓",
    "emoji 🙂 at the end",
    "line one\nline two\ttab",
    "Review: a warm film. Sentiment:",
    "unseen-words: zyxwv qqq",
    "",
]

# sentencepiece piece kinds -> GGUF token types (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def main() -> None:
    corpus = [s for _ in range(20) for s in _SENTENCES]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        pieces.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(
            _UNKNOWN
            if sp.is_unknown(i)
            else _CONTROL
            if sp.is_control(i)
            else _BYTE
            if sp.is_byte(i)
            else _UNUSED
            if sp.is_unused(i)
            else _NORMAL
        )
    records = [{"text": t, "ids": sp.encode(t), "decoded": sp.decode(sp.encode(t))} for t in PROBES]
    OUT.write_text(
        json.dumps(
            {
                "source": f"sentencepiece {spm.__version__} BPE, Llama-2 trainer settings (scripts/make_spm_fixture.py)",
                "unk_id": sp.unk_id(),
                "bos_id": sp.bos_id(),
                "eos_id": sp.eos_id(),
                "tokens": pieces,
                "scores": scores,
                "token_types": types,
                "records": records,
            },
            ensure_ascii=False,
            indent=0,
        )
        + "\n"
    )
    print(f"{OUT.name}: {len(pieces)} pieces, {OUT.stat().st_size / 1024:.1f} KiB")
    for r in records:
        print(repr(r["text"]), [sp.id_to_piece(i) for i in r["ids"]])


if __name__ == "__main__":
    main()
