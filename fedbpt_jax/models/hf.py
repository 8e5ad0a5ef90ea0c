"""Host-side reading of Hugging Face checkpoints, shared by every backbone (no torch).

A checkpoint is a directory in the HF layout: ``config.json``, tokenizer files and the weights as
``model.safetensors`` or as shards listed in ``model.safetensors.index.json``. Hub ids are downloaded
into the usual HF cache with ``huggingface_hub.snapshot_download`` (config, tokenizer and safetensors
files only); a local directory is used as is and works offline.

Example::

    from fedbpt_jax.models import hf
    directory = hf.resolve("roberta-large")            # or "/path/to/a/local/checkpoint"
    tensors = hf.read_safetensors(directory)           # {"roberta.embeddings...": np.ndarray, ...}
    hf_config = hf.load_config(directory)
    tokenizer = hf.load_tokenizer(directory)
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

#: Files fetched from the hub: configs, tokenizers and safetensors weights, never ``*.bin`` / ``*.pt``.
ALLOW_PATTERNS = (
    "*.json",  # config.json, tokenizer.json, tokenizer_config.json, *.safetensors.index.json, …
    "*.safetensors",
    "*.txt",  # merges.txt, vocab.txt
    "*.model",  # sentencepiece tokenizers
    "vocab.*",
)

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def resolve(name_or_path: str | Path) -> Path:
    """Return the local directory of a checkpoint, downloading a hub id if needed.

    Args:
      name_or_path: a local directory in the HF layout (used as is), or a hub id such as
        ``"roberta-large"`` / ``"FacebookAI/roberta-large"``.

    Returns:
      The directory holding ``config.json``, the tokenizer files and the safetensors weights.

    Raises:
      FileNotFoundError: ``name_or_path`` is an existing path that is not a directory, or a directory
        without ``config.json``.
      OSError: the hub id could not be downloaded (offline, unknown id, …). The message says that a local
        directory or the embedded default model works offline.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(
                f"{str(path)!r} is a file; expected a checkpoint directory in the Hugging Face layout "
                "(config.json, tokenizer files, *.safetensors)"
            )
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"checkpoint directory {str(path)!r} has no config.json (expected the Hugging Face layout: "
                "config.json, tokenizer files, *.safetensors)"
            )
        return path
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"checkpoint directory {name!r} does not exist")
    try:
        import huggingface_hub

        local = huggingface_hub.snapshot_download(repo_id=name, allow_patterns=list(ALLOW_PATTERNS))
    except Exception as err:  # offline, unknown id, gated repo, HTTP errors: all mean the same here
        raise OSError(
            f"could not fetch the model {name!r} from the Hugging Face hub "
            f"({type(err).__name__}: {err}). Without network access, pass a local directory in the "
            "Hugging Face layout (config.json, tokenizer files, *.safetensors) or use the embedded "
            "default model, which works offline."
        ) from err
    return Path(local)


def safetensors_files(directory: str | Path) -> list[Path]:
    """The safetensors weight files of a checkpoint directory (shards in index order).

    Raises:
      FileNotFoundError: no safetensors file exists (``.bin`` / torch checkpoints are not supported).
    """
    directory = Path(directory)
    index = directory / _INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))  # unique, first-seen order
        missing = [f for f in files if not (directory / f).exists()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard files that do not exist: {missing}")
        return [directory / f for f in files]
    if (directory / _SINGLE).exists():
        return [directory / _SINGLE]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    others = (
        sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack"))
        if directory.is_dir()
        else []
    )
    hint = f" (found {others})" if others else ""
    raise FileNotFoundError(
        f"no safetensors weights in {str(directory)!r}{hint}: fedbpt-jax reads only *.safetensors "
        "checkpoints; .bin / torch (pickle) checkpoints are not supported. Convert them once with "
        "transformers' save_pretrained(..., safe_serialization=True)."
    )


def _header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def _read_bf16(path: Path, info: dict[str, Any], data_start: int, keep: bool = False) -> np.ndarray:
    """The raw bfloat16 words, as ``ml_dtypes.bfloat16`` (``keep``) or widened exactly to float32
    (bfloat16 is the top half of a float32)."""
    begin, end = info["data_offsets"]
    raw = np.fromfile(path, dtype="<u2", count=(end - begin) // 2, offset=data_start + begin)
    if keep:
        import ml_dtypes

        return raw.view(ml_dtypes.bfloat16).reshape(info["shape"])
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def read_safetensors(directory: str | Path, *, keep_bf16: bool = False) -> dict[str, np.ndarray]:
    """Read every tensor of a checkpoint (single file or sharded) into numpy arrays.

    bfloat16 tensors are converted exactly to float32, or kept as ``ml_dtypes.bfloat16`` arrays with
    ``keep_bf16`` (loading for bfloat16 compute: no float32 copy is ever made); every other dtype is
    returned as stored.

    Args:
      directory: checkpoint directory with ``model.safetensors``, or ``model.safetensors.index.json`` and
        its shards, or other ``*.safetensors`` files.

    Returns:
      ``{tensor name: np.ndarray}``.

    Raises:
      FileNotFoundError: no safetensors file (``.bin``/torch checkpoints are not supported).
    """
    from safetensors import safe_open

    tensors: dict[str, np.ndarray] = {}
    for path in safetensors_files(directory):
        header = _header(path)
        with open(path, "rb") as f:
            data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        plain = [k for k, v in header.items() if v["dtype"] != "BF16"]
        if plain:
            with safe_open(str(path), framework="numpy") as f:
                for name in plain:
                    tensors[name] = f.get_tensor(name)
        for name, info in header.items():
            if info["dtype"] == "BF16":
                tensors[name] = _read_bf16(path, info, data_start, keep_bf16)
    return tensors


def load_config(directory: str | Path):
    """``transformers.AutoConfig`` of a local checkpoint directory (no network)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(directory), local_files_only=True)


def load_tokenizer(directory: str | Path):
    """Fast ``transformers.AutoTokenizer`` of a local checkpoint directory (no network)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), use_fast=True, local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"no fast tokenizer could be built from {str(directory)!r} (need tokenizer.json)")
    return tokenizer
