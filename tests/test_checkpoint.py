"""Atomic results files: content, permissions, and nothing lost or left behind when a write fails."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from fedbpt_jax import checkpoint


def test_json_and_csv_round_trip_with_arrays_and_non_finite(tmp_path):
    path = checkpoint.write_json_atomic(
        tmp_path / "sub" / "m.json",
        {
            "a": np.arange(3),
            "x": np.float32(0.5),
            "bad": float("nan"),
            "up": [np.float32("inf"), -np.inf],
            "ok": np.bool_(True),
        },
    )
    # strict JSON (no NaN/Infinity tokens), non-finite floats as strings: lossless
    assert json.loads(path.read_text()) == {"a": [0, 1, 2], "x": 0.5, "bad": "nan", "up": ["inf", "-inf"], "ok": True}
    back = checkpoint.read_json(path)
    assert np.isnan(back["bad"]) and back["up"] == [float("inf"), float("-inf")] and back["x"] == 0.5
    csv = checkpoint.write_csv_atomic(tmp_path / "r.csv", [{"round": 1, "acc": 0.5}, {"round": 2, "loss": np.nan}])
    assert csv.read_text().splitlines() == ["round,acc,loss", "1,0.5,", "2,,nan"]


def test_files_written_before_the_lossless_encoding_still_read(tmp_path):
    """Older results stored NaN as null and ±inf as ±1e308: they read as they always did."""
    old = tmp_path / "metrics.json"
    old.write_text(json.dumps({"evals": [{"accuracy": None, "loss": 1e308}, {"accuracy": 0.5, "loss": -1e308}]}))
    assert checkpoint.read_json(old) == {
        "evals": [{"accuracy": None, "loss": 1e308}, {"accuracy": 0.5, "loss": -1e308}]
    }


def test_results_files_get_the_umask_permissions_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = checkpoint.write_json_atomic(tmp_path / "m.json", {"k": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = checkpoint.write_json_atomic(tmp_path / "m.json", {"round": 1})

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.write_json_atomic(path, {"round": 2})
    assert json.loads(path.read_text()) == {"round": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_an_unreadable_latest_step_falls_back_to_the_previous_intact_one(tmp_path):
    import warnings

    import jax.numpy as jnp

    from fedbpt_jax.checkpoint import CheckpointCorrupt, Checkpointer

    ck = Checkpointer(tmp_path / "ck", "fp")
    ck.save(1, {"a": jnp.ones(3)}, {"x": 1})
    ck.save(2, {"a": 2 * jnp.ones(3)}, {"x": 2})
    (tmp_path / "ck" / "2" / "meta" / "metadata").write_text('{"x": 2, "fingerp')  # truncated
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step, carry, meta = Checkpointer(tmp_path / "ck", "fp").restore({"a": jnp.zeros(3)})
    assert step == 1 and meta["x"] == 1 and float(carry["a"][0]) == 1.0
    assert any("ck/2 is unreadable" in str(w.message) for w in caught)
    (tmp_path / "ck" / "1" / "meta" / "metadata").write_text("not json")
    with pytest.raises(CheckpointCorrupt, match=r"no readable checkpoint in .*ck \(step 1: .*delete that folder"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Checkpointer(tmp_path / "ck", "fp").restore({"a": jnp.zeros(3)})


def test_a_checkpoint_with_the_server_state_s_earlier_field_names_restores(tmp_path):
    """The server CMA-ES state's σ and p_σ were ``sigma`` and ``p_sigma`` (now ``std`` and ``p_std``, the client
    state's names): a checkpoint written under the earlier names restores into the current state, every
    value in its place; a checkpoint of another structure is still an error."""
    import flax.struct
    import jax
    import jax.numpy as jnp

    from fedbpt_jax import aggregation
    from fedbpt_jax.checkpoint import Checkpointer

    @flax.struct.dataclass
    class EarlierServer:  # aggregation.ServerCMAState's fields in their order, under the earlier names
        mean: jax.Array
        sigma: jax.Array
        C: jax.Array
        B: jax.Array
        D: jax.Array
        p_sigma: jax.Array
        p_c: jax.Array
        iteration: jax.Array
        last_eigen_update: jax.Array
        eigen_gap: jax.Array

    current = aggregation.server_init(3, 0.5, 2)
    values = {
        f: getattr(current, f) + (i + 1) * (1 if getattr(current, f).dtype == jnp.int32 else 0.25)
        for i, f in enumerate(
            ["mean", "std", "C", "B", "D", "p_std", "p_c", "iteration", "last_eigen_update", "eigen_gap"]
        )
    }
    old_name = {new: old for old, new in checkpoint.RENAMED_FIELDS.items()}
    earlier = EarlierServer(**{old_name.get(f, f): v for f, v in values.items()})
    ck = Checkpointer(tmp_path / "ck", "fp")
    ck.save(3, {"state": {"server": earlier, "round": jnp.asarray(3)}, "rounds_done": jnp.asarray(3)}, {"x": 1})
    template = {"state": {"server": current, "round": jnp.asarray(0)}, "rounds_done": jnp.asarray(0)}
    step, carry, meta = Checkpointer(tmp_path / "ck", "fp").restore(template)
    assert step == 3 and meta["x"] == 1 and int(carry["rounds_done"]) == 3
    assert isinstance(carry["state"]["server"], aggregation.ServerCMAState)
    for f, v in values.items():
        np.testing.assert_array_equal(np.asarray(getattr(carry["state"]["server"], f)), np.asarray(v), err_msg=f)
    assert float(carry["state"]["server"].std) == 1.0 and float(carry["state"]["server"].p_std[0]) == 1.5
    with pytest.raises(ValueError, match="do not match"):
        Checkpointer(tmp_path / "ck", "fp").restore({"state": {"other": jnp.zeros(3)}}, step=3)
