"""Subprocess worker of tests/test_federated.py (run with ``sys.executable``).

    python federated_worker.py sharded OUT.json
        (with XLA_FLAGS=--xla_force_host_platform_device_count=8) configuration A on a mesh of all 8
        CPU devices, and on 3 of them (K = 8 and N = 10,000 not divisible by 3).
    python federated_worker.py multihost PORT PROCESS_ID OUT.json
        one of two processes on 127.0.0.1:PORT; each holds only its own half of the clients.

Each writes the run summaries as JSON (process 0 only, for multihost).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def sharded(out: str) -> None:
    import jax

    import federated_setup as fs
    from fedbpt_jax import federated as fl

    assert len(jax.devices()) == 8, jax.devices()
    mesh8 = fl.client_mesh()
    mesh3 = fl.client_mesh(jax.devices()[:3])
    result = {"devices": len(jax.devices())}

    # The client axis really is sharded: the lowered round constrains it over the 8 devices, and the
    # N clients' data are laid out on the "clients" axis.
    algo8 = fl.fedbpt(fs.config_a(), fs.tiny_lm(), mesh=mesh8)
    hp = fl.HParams().validate()
    state = algo8.init(None, hp)
    text = jax.jit(algo8.round).lower(jax.random.key(0), state, fs.data_a(), hp, fs.model()).as_text()
    result["round_constrains_clients"] = (
        '"clients"=8' in text and "sharding_constraint" in text and '[{"clients"}, {}, {}]' in text
    )  # [K, E, T] on the axis
    placed = fl.to_global(fs.data_a().train, mesh8, clients=True)
    result["data_sharding"] = list(placed.input_ids.sharding.spec)
    result["uneven_data_sharding"] = list(fl.to_global(fs.data_a().train, mesh3, clients=True).input_ids.sharding.spec)

    def run8(**kw):
        return fl.run(
            algo8,
            jax.random.key(0),
            fs.data_a(),
            fs.test_set(),
            fs.tiny_lm(),
            fs.model(),
            num_rounds=2,
            eval_chunk=16,
            progress=False,
            **kw,
        )

    carry, hist = run8()
    result["carry_sharding"] = list(carry.state.server.mean.sharding.spec)
    result["mesh8"] = fs.summary(carry, hist)
    # Checkpoint and resume of sharded (global) arrays: bit-identical, and no recompilation.
    ckpt = os.path.join(os.path.dirname(out), "ckpt")
    run8(checkpoint_dir=ckpt, stop_after=1)
    resumed = fs.summary(*run8(checkpoint_dir=ckpt))
    result["resume_identical"] = resumed == result["mesh8"]
    result["segment_compiles"] = fl.compile_count("fedbpt")
    # run(mesh=...) on an algorithm built without one: the ambient mesh shards the round.
    carry, hist = fl.run(
        fs.algo_a(),
        jax.random.key(0),
        fs.data_a(),
        fs.test_set(),
        fs.tiny_lm(),
        fs.model(),
        num_rounds=2,
        eval_chunk=16,
        progress=False,
        mesh=mesh3,
    )
    result["mesh3"] = fs.summary(carry, hist)
    with open(out, "w") as f:
        json.dump(result, f)


def multihost(port: str, pid: str, out: str) -> None:
    import jax
    import numpy as np

    from fedbpt_jax import federated as fl

    index, count = fl.init_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid), timeout_s=60)
    import federated_setup as fs

    assert count == 2 and len(jax.devices()) == 2 and len(jax.local_devices()) == 1
    mesh = fl.client_mesh()
    train, counts = fs.host_data()
    half = fs.N_A // 2
    mine = slice(index * half, (index + 1) * half)  # this process's clients only
    local = jax.tree_util.tree_map(lambda a: np.asarray(a)[mine], train)
    g_train = fl.clients_to_global(local, mesh, fs.N_A)
    g_counts = fl.clients_to_global(counts[mine], mesh, fs.N_A)
    assert not g_train.input_ids.is_fully_addressable
    data = fl.FederatedData(train=g_train, counts=g_counts, spec=fs.spec())
    carry, hist = fs.run_a(0, num_rounds=2, mesh=mesh, data=data)
    summary = fs.summary(carry, hist)
    if index == 0:
        with open(out, "w") as f:
            json.dump({"processes": count, "summary": summary}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"sharded": sharded, "multihost": multihost}[mode](*args)
