"""Builds tests/fixtures/decoder_tiny_qwen2/ with Hugging Face's PyTorch Qwen2 (run once; tests never run it).

Qwen2 is the Llama architecture plus a bias on the query, key and value projections. The fixture is a
tiny random Qwen2 (2 layers, hidden 32, 4 query heads, 2 key/value heads, vocabulary 128) whose q/k/v
biases and norm scales are drawn large enough that dropping or mis-mapping any of them changes the logits
well beyond the test's tolerance (HF initialises biases to zero).

Needs a separate environment with torch (CPU), transformers, safetensors and numpy; fedbpt-jax itself
never imports torch. Run from the repository root:

    /tmp/torchvenv/bin/python scripts/make_qwen2_fixture.py

Writes tests/fixtures/decoder_tiny_qwen2/: config.json, model.safetensors and reference.npz
(input_ids [B,T], attention_mask [B,T] with row 2 left-padded, logits [B,T,V]: HF logits with
position_ids = cumsum(mask) - 1; padded positions are not compared), the layout of
scripts/make_decoder_fixtures.py's tiny Llama fixtures.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "decoder_tiny_qwen2"
SEED = 7

CONFIG = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    max_position_embeddings=64,
    use_sliding_window=False,
)


def main() -> None:
    torch.manual_seed(SEED)
    config = Qwen2Config(initializer_range=0.1, attn_implementation="eager", **CONFIG)
    model = Qwen2ForCausalLM(config).eval()
    n_bias = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # non-trivial norm scales, so a missing/mis-mapped norm shows
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.5 * torch.randn_like(param))
                n_bias += 1
    assert n_bias == 3 * CONFIG["num_hidden_layers"], n_bias  # q, k, v per layer; no o_proj/MLP bias
    if OUT.exists():
        shutil.rmtree(OUT)
    model.save_pretrained(OUT, safe_serialization=True)
    (OUT / "generation_config.json").unlink(missing_ok=True)

    rng = np.random.default_rng(SEED)
    b, t = 3, 10
    ids = rng.integers(3, config.vocab_size, size=(b, t)).astype(np.int64)
    mask = np.ones((b, t), np.int64)
    mask[2, :3] = 0  # left padding
    ids[2, :3] = 0
    pos = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    with torch.no_grad():
        logits = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(pos)
        ).logits.numpy()
        # The same model with its biases zeroed: how far the biases move the logits (printed, so the
        # fixture is known to exercise them).
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.zero_()
        no_bias = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(pos)
        ).logits.numpy()
    np.savez_compressed(
        OUT / "reference.npz",
        input_ids=ids.astype(np.int32),
        attention_mask=mask.astype(np.int32),
        logits=logits.astype(np.float32),
    )
    size = sum(f.stat().st_size for f in OUT.iterdir())
    print(
        f"{OUT.name}: {size / 1024:.0f} KiB, |logits| max {np.abs(logits).max():.2f}, "
        f"max change from the biases {np.abs(logits - no_bias)[mask.astype(bool)].max():.3f}"
    )


if __name__ == "__main__":
    main()
