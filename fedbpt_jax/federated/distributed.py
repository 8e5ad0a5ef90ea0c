"""Devices, meshes and processes: the client axis sharded over every device of every host.

* :func:`client_mesh` builds the 1-D mesh whose ``"clients"`` axis the engine shards (Auto axis type:
  evosax's ``tell`` fails under the Explicit default of ``jax.make_mesh``).
* :func:`init_distributed` starts multi-controller JAX (one process per host, or several processes on
  one machine for tests); on CPU it selects the gloo collectives first, which CPU cross-process
  computations need.
* :func:`to_global` / :func:`clients_to_global` turn host values into global ``jax.Array``s over a mesh
  (replicated, or sharded on the client axis), from full host copies or from each process's own slice
  of the clients; :func:`host` reads a replicated global array back on any process.

Example (two processes on one machine; run the same script with ``process_id`` 0 and 1)::

    from fedbpt_jax import federated as fl
    fl.init_distributed("127.0.0.1:12345", num_processes=2, process_id=pid)
    mesh = fl.client_mesh()                      # every device of every process
    carry, history = fl.run(algo, key, data, test, lm, model, num_rounds=10, mesh=mesh)
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .core import CLIENT_AXIS


def client_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D mesh named ``"clients"`` over ``devices`` (default: ``jax.devices()``, all processes).

    Any number of devices works: a client count that the device count does not divide is padded
    by XLA inside the round, and the stored N-client data are then replicated instead of sharded.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("client_mesh needs at least one device")
    return jax.make_mesh((len(devices),), (CLIENT_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def init_distributed(
    coordinator: str,
    num_processes: int,
    process_id: int,
    *,
    local_device_ids: Sequence[int] | None = None,
    timeout_s: int = 120,
) -> tuple[int, int]:
    """Starts multi-controller JAX (``jax.distributed.initialize``) and returns ``(process_index, process_count)``.

    Call it once per process, before any other JAX work. On CPU the cross-process collectives go
    through gloo (set here; it must be chosen before the CPU backend starts).

    Args:
      coordinator: ``"host:port"`` of process 0 (every process passes the same address).
      num_processes: processes taking part.
      process_id: this process's index in ``[0, num_processes)``.
      local_device_ids: restrict this process to some of its local devices (e.g. one GPU each).
      timeout_s: how long to wait for every process to join before failing (never hangs forever).

    Raises:
      ValueError: bad ``num_processes`` / ``process_id`` / ``coordinator``.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if ":" not in str(coordinator):
        raise ValueError(f"coordinator must be 'host:port', got {coordinator!r}")
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # pragma: no cover - a build without gloo: GPU/TPU collectives need none of this
        pass
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=int(timeout_s),
    )
    return jax.process_index(), jax.process_count()


def _is_global_on(x, mesh: Mesh) -> bool:
    s = getattr(x, "sharding", None)
    return isinstance(s, NamedSharding) and s.mesh == mesh


def put_sharded(x, sharding: NamedSharding):
    """A global array with ``sharding`` from a full host copy ``x`` (every process holds the same value)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x  # already global (e.g. made by the caller with make_array_from_callback)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        raise TypeError("typed PRNG key arrays cannot be placed with to_global; pass jax.random.key_data(key)")
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host_x = np.asarray(x)
    return jax.make_array_from_callback(host_x.shape, sharding, lambda idx: host_x[idx])


def to_global(tree, mesh: Mesh, *, clients: bool = False):
    """Places every array leaf of ``tree`` on ``mesh``: replicated, or with the leading axis on ``"clients"``.

    Leaves already laid out on ``mesh`` are kept as they are; a leading client axis that the device
    count does not divide is replicated instead of sharded. Works in one process and in many (each
    process must hold the same full value: it keeps only its own shards).
    """
    n_dev = mesh.devices.size

    def one(x):
        if not hasattr(x, "shape") and not isinstance(x, (int, float, bool, np.generic)):
            return x
        if _is_global_on(x, mesh):
            return x
        shape = np.shape(x)
        split = clients and len(shape) >= 1 and shape[0] % n_dev == 0
        return put_sharded(x, NamedSharding(mesh, P(CLIENT_AXIS) if split else P()))

    return jax.tree_util.tree_map(one, tree)


def clients_to_global(local_tree, mesh: Mesh, num_clients: int):
    """Builds client-sharded global arrays from each process's *own* clients.

    Each process passes the rows of the clients that live on its devices (in process order: process
    p holds clients ``[p·N/P, (p+1)·N/P)`` when every process has the same number of devices), so no
    host ever holds all N clients. ``num_clients`` must be a multiple of the mesh's device count.

    Args:
      local_tree: pytree of host arrays with a leading axis of this process's clients.
      mesh: a :func:`client_mesh` over every process's devices.
      num_clients: N, the global client count.
    """
    n_dev = mesh.devices.size
    if num_clients % n_dev:
        raise ValueError(
            f"num_clients={num_clients} must be a multiple of the mesh's {n_dev} devices to shard "
            "clients across processes; pad with more clients or use to_global on full copies"
        )
    sharding = NamedSharding(mesh, P(CLIENT_AXIS))

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, (num_clients,) + x.shape[1:])

    return jax.tree_util.tree_map(one, local_tree)


def host(tree):
    """Numpy copies of a pytree's arrays on this process (a replicated global array reads its local copy)."""

    def one(x):
        if isinstance(x, jax.Array):
            if not x.is_fully_addressable:
                if not x.is_fully_replicated:
                    raise ValueError(
                        f"cannot read a sharded global array of shape {x.shape} on one process; replicate it first"
                    )
                return np.asarray(x.addressable_data(0))
            return np.asarray(x)
        return x

    return jax.tree_util.tree_map(one, tree)
