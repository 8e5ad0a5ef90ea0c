"""Atomic results files: content, permissions, and nothing lost or left behind when a write fails."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from fedbpt_jax import checkpoint


def test_json_and_csv_round_trip_with_arrays_and_non_finite(tmp_path):
    path = checkpoint.write_json_atomic(tmp_path / "sub" / "m.json",
                                        {"a": np.arange(3), "x": np.float32(0.5), "bad": float("nan"),
                                         "up": [np.float32("inf"), -np.inf], "ok": np.bool_(True)})
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
    assert checkpoint.read_json(old) == {"evals": [{"accuracy": None, "loss": 1e308}, {"accuracy": 0.5, "loss": -1e308}]}


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
