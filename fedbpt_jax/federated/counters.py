"""How often the run's jitted pieces are traced and compiled in this process (tests count retraces with
:func:`fedbpt_jax.testing.count_compiles`; :mod:`~fedbpt_jax.federated.lanes` keeps its own program's counts
out of them)."""

from __future__ import annotations

import collections

import jax

#: Number of times each segment (key: algorithm name) and initial evaluation (key: ``name + "/eval"``)
#: has been traced in this process. A steady number across calls means no retrace.
TRACE_COUNTS: collections.Counter = collections.Counter()


#: Number of XLA compilations of the same functions (a recompilation can happen without a retrace,
#: e.g. when the inputs' placement changes).
COMPILE_COUNTS: collections.Counter = collections.Counter()


SEGMENT_PREFIX = "fedbpt_jax_segment__"


EVAL_PREFIX = "fedbpt_jax_initial_eval__"


def _on_compile(event: str, duration: float, **kwargs) -> None:
    name = str(kwargs.get("fun_name", ""))
    if event == "/jax/core/compile/backend_compile_duration" and "fedbpt_jax_" in name:
        name = name[name.index("fedbpt_jax_") :].rstrip(")")
        if name.startswith(SEGMENT_PREFIX):
            COMPILE_COUNTS[name[len(SEGMENT_PREFIX) :]] += 1
        elif name.startswith(EVAL_PREFIX):
            COMPILE_COUNTS[name[len(EVAL_PREFIX) :] + "/eval"] += 1


jax.monitoring.register_event_duration_secs_listener(_on_compile)


def trace_count(name: str) -> int:
    """How many times :func:`run`'s segment of algorithm ``name`` has been traced in this process
    (``name + "/eval"``: its initial evaluation). Tests count within a block with
    :func:`fedbpt_jax.testing.count_compiles`."""
    return TRACE_COUNTS[name]


def compile_count(name: str) -> int:
    """How many times :func:`run`'s segment of algorithm ``name`` has been compiled by XLA in this process."""
    return COMPILE_COUNTS[name]
