"""A results folder as one run's record: the claim on it, and metrics.json's account of the run's extent."""

import json
import multiprocessing
import time

import pytest

from fedbpt_jax.federated import records


def _hold(folder, ready, release):
    with records.claim(folder):
        ready.set()
        release.wait(30)


def test_a_claimed_folder_is_refused_to_a_second_run_and_free_after(tmp_path):
    d = tmp_path / "results"
    with records.claim(d) as held:
        assert held == d and d.is_dir()
        info = json.loads((d / records.LOCK_NAME).read_text())
        with pytest.raises(
            records.FolderInUse, match=rf"results folder '{d}' is in use by another run \(pid {info['pid']}"
        ):
            with records.claim(d):
                pass
    with records.claim(d):  # released: the next run may take it
        pass
    with records.claim(None) as nothing:
        assert nothing is None


def test_the_claim_holds_across_processes_and_ends_with_the_holder(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(str(tmp_path), ready, release))
    p.start()
    try:
        assert ready.wait(60)
        with pytest.raises(records.FolderInUse, match="in use by another run"):
            with records.claim(tmp_path, "uploads folder"):
                pass
    finally:
        release.set()
        p.join(30)
    deadline = time.time() + 10
    while True:  # the holder is gone: its claim went with it
        try:
            with records.claim(tmp_path):
                break
        except records.FolderInUse:
            assert time.time() < deadline
            time.sleep(0.1)


def test_completeness_says_whether_the_planned_rounds_were_reached():
    evals = [{"round": 0}, {"round": 2}, {"round": 4}]
    assert records.completeness(8, evals) == {"planned_rounds": 8, "rounds_reached": 4, "complete": False}
    assert records.completeness(4, evals)["complete"] is True
    assert records.completeness(None, evals)["complete"] is None
    assert records.completeness(8, evals, stopped_early=4)["complete"] is False
    assert records.completeness(None, evals, stopped_early=4)["complete"] is False  # known: it was stopped
    assert records.completeness(4, evals, stopped_early=4)["complete"] is True  # stopped at its last round
    assert records.completeness(3, [], None) == {"planned_rounds": 3, "rounds_reached": 0, "complete": False}


def test_a_resumed_run_records_which_rounds_ran_where(tmp_path):
    amd = {"git_revision": "aaa", "machine": {"cpu": "AMD EPYC"}, "args": {"seed": 1}, "noise": 1}
    intel = {"git_revision": "bbb", "machine": {"cpu": "Intel Xeon"}, "args": {"seed": 1}}
    # A fresh run: nothing added.
    assert records.resumed_record(amd, intel, 0) == intel
    # Resumed after round 10: rounds 1-10 ran with the earlier record's code and machine (only its provenance).
    once = records.resumed_record(amd, intel, 10)
    assert once["earlier_segments"] == [
        {"from_round": 0, "to_round": 10, "git_revision": "aaa", "machine": {"cpu": "AMD EPYC"}}
    ]
    assert {k: v for k, v in once.items() if k != "earlier_segments"} == intel
    # Resumed again after round 12 elsewhere: both earlier stretches, in order.
    twice = records.resumed_record(once, amd, 12)
    assert [(s["from_round"], s["to_round"], s["machine"]["cpu"]) for s in twice["earlier_segments"]] == [
        (0, 10, "AMD EPYC"),
        (10, 12, "Intel Xeon"),
    ]
    # Resumed from an older checkpoint (round 11): the stretch past it is cut, the one that began at it dropped.
    older = records.resumed_record(twice, amd, 11)
    assert [(s["from_round"], s["to_round"]) for s in older["earlier_segments"]] == [(0, 10), (10, 11)]
    assert [(s["from_round"], s["to_round"]) for s in records.resumed_record(twice, amd, 10)["earlier_segments"]] == [
        (0, 10)
    ]
    # No earlier record (or an unreadable one): the stretch is there, its provenance unknown.
    assert records.resumed_record(None, intel, 4)["earlier_segments"] == [{"from_round": 0, "to_round": 4}]
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert records.earlier_record(bad) is None and records.earlier_record(tmp_path / "none.json") is None
    bad.write_text(json.dumps(amd))
    assert records.earlier_record(bad) == amd
