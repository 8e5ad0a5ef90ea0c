"""Facts about the host CPU that figures are recorded with: its model name and the instruction-set flags that
decide float32 vs bfloat16 matmul speed on a CPU (AVX-512 bf16, AMX)."""

from __future__ import annotations

import platform

#: The flags that matter for this package's matmuls, in the order they are reported.
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name as ``/proc/cpuinfo`` gives it (a virtual machine's may be generic: "AMD EPYC"),
    else what ``platform`` knows, else "unknown"."""
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def cpu_flags() -> str:
    """The relevant instruction-set flags the CPU has (``RELEVANT_FLAGS``, space-separated; "" where
    ``/proc/cpuinfo`` cannot be read)."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return " ".join(f for f in RELEVANT_FLAGS if f in flags)


def machine_record() -> dict:
    """Where figures are computed, as a run's records keep it: the JAX backend and device kind, the CPU's model
    and relevant flags, and the default matmul precision (float32 on a GPU means TF32 matmul inputs unless this
    says "highest")."""
    import jax

    return {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "matmul_precision": jax.config.jax_default_matmul_precision or "default",
    }
