"""Callbacks of run(): when they fire (after each segment, rounds then its evaluation), early stop at the
segment boundary (results, plot and checkpoint written; a resume continues bit-identically), bad
callbacks, the TensorBoard logger read back from its event file, and the optional loggers' clear errors.
Tiny decoder, N = K = 4 clients.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest

import federated_setup as fs
from fedbpt_jax import callbacks as cb
from fedbpt_jax import federated as fl
from fedbpt_jax.checkpoint import Checkpointer, read_json


@pytest.fixture(scope="module")
def algo():
    return fl.fedbpt(fs.config_a(num_clients=4, clients_per_round=4), fs.tiny_lm())


@pytest.fixture(scope="module")
def data():
    train, counts = fs.host_data(4, seed=2)
    return fs.make_data(4, train=train, counts=counts)


def _run(algo, data, **kw):
    kw.setdefault("num_rounds", 4)
    kw.setdefault("eval_every", 2)
    return fl.run(
        algo,
        jax.random.key(0),
        data,
        fs.test_set(),
        fs.tiny_lm(),
        fs.model(),
        dev=fs.test_set(),
        eval_chunk=16,
        progress=False,
        **kw,
    )


class Recorder(cb.Callback):
    def __init__(self, stop_at_round=None, stop_at_eval=None):
        self.calls, self.closed = [], 0
        self.stop_at_round, self.stop_at_eval = stop_at_round, stop_at_eval

    def on_round(self, row):
        self.calls.append(("round", row["round"], row))
        return row["round"] == self.stop_at_round

    def on_eval(self, row):
        self.calls.append(("eval", row["round"], row))
        return row["round"] == self.stop_at_eval

    def close(self):
        self.closed += 1


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_callbacks_fire_per_round_then_per_evaluation_after_each_segment(algo, data):
    rec, plain = Recorder(), []

    class Plain:  # no base class: any object with the two methods is accepted
        def on_round(self, row):
            plain.append(row["round"])

        def on_eval(self, row):
            plain.append(("eval", row["round"]))

    carry, hist = _run(algo, data, callbacks=[rec, Plain()])
    assert [(k, r) for k, r, _ in rec.calls] == [
        ("eval", 0),
        ("round", 1),
        ("round", 2),
        ("eval", 2),
        ("round", 3),
        ("round", 4),
        ("eval", 4),
    ]
    # The rows are the history's rows, each delivered once.
    assert [row for k, _, row in rec.calls if k == "round"] == hist.rounds
    assert [row for k, _, row in rec.calls if k == "eval"] == hist.evals
    assert plain == [("eval", 0), 1, 2, ("eval", 2), 3, 4, ("eval", 4)]
    assert rec.closed == 1
    assert hist.stopped_early is None


def test_early_stop_ends_at_the_segment_boundary_and_resumes_bit_identically(algo, data, tmp_path):
    full_carry, full = _run(algo, data, num_rounds=6)
    rec = Recorder(stop_at_round=3)  # asked mid-segment (rounds 3-4)
    ckpt, res = tmp_path / "ckpt", tmp_path / "res"
    carry, hist = _run(
        algo, data, num_rounds=6, callbacks=[rec], checkpoint_dir=ckpt, results_dir=res, checkpoint_every=100
    )
    # The segment finishes (round 4), its remaining rows still reach the callback, then the run stops.
    assert [(k, r) for k, r, _ in rec.calls][-3:] == [("round", 3), ("round", 4), ("eval", 4)]
    assert hist.stopped_early == 4 and int(carry.rounds_done) == 4
    assert [r["round"] for r in hist.rounds] == [1, 2, 3, 4] and [e["round"] for e in hist.evals] == [0, 2, 4]
    m = read_json(res / "metrics.json")
    assert m["stopped_early"] == 4 and m["final_round"] == 4 and len(m["rounds"]) == 4
    assert (res / "rounds.csv").read_text().count("\n") == 5
    assert (res / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Saved at the stop although checkpoint_every=100 does not fall there.
    saved = Checkpointer(ckpt, "any")
    assert saved.latest_step() == 4
    saved.close()
    # Resuming (no callback) finishes the run exactly as an uninterrupted one.
    carry2, hist2 = _run(algo, data, num_rounds=6, checkpoint_dir=ckpt)
    assert _strip(hist2.rounds) == _strip(full.rounds) and hist2.evals == full.evals
    np.testing.assert_array_equal(np.asarray(carry2.state.server.mean), np.asarray(full_carry.state.server.mean))


def test_stop_from_the_initial_evaluation_runs_no_round(algo, data, tmp_path):
    stop = cb.StopWhen(lambda e: e["round"] == 0)
    carry, hist = _run(algo, data, callbacks=stop, results_dir=tmp_path)
    assert hist.rounds == [] and [e["round"] for e in hist.evals] == [0] and hist.stopped_early == 0
    m = read_json(tmp_path / "metrics.json")
    assert m["stopped_early"] == 0 and m["final_round"] == 0


def test_stop_when_checks_its_argument_and_bad_callbacks_are_named():
    with pytest.raises(ValueError, match=r"StopWhen\(on='evals'\): accepted: 'eval' or 'round'"):
        cb.StopWhen(lambda r: True, on="evals")
    with pytest.raises(TypeError, match=r"callback 'log' lacks on_round and on_eval"):
        cb.check_callbacks(["log"])
    with pytest.raises(TypeError, match=r"lacks on_eval"):
        cb.check_callbacks([type("OnlyRound", (), {"on_round": lambda self, r: None})()])


def test_tensorboard_logger_event_file_holds_the_rows(algo, data, tmp_path):
    carry, hist = _run(algo, data, tensorboard_dir=tmp_path / "tb")
    tb = cb.read_tensorboard_scalars(tmp_path / "tb")
    assert tb["eval/accuracy"] == [(e["round"], pytest.approx(e["accuracy"])) for e in hist.evals]
    assert [s for s, _ in tb["eval/dev_accuracy"]] == [0, 2, 4]
    assert tb["round/sigma"] == [(r["round"], pytest.approx(r["sigma"], rel=1e-6)) for r in hist.rounds]
    assert tb["eval/pred_dist/1"] == [(e["round"], pytest.approx(e["pred_dist"][1])) for e in hist.evals]
    want = [np.mean([c["fitness"] for c in r["clients"] if c["active"]]) for r in hist.rounds]
    assert [v for _, v in tb["round/clients/fitness_mean"]] == pytest.approx(want, rel=1e-6)
    assert "round/round" not in tb and "round/clients/index_mean" not in tb
    # Every scalar of a round row is there.
    scalars = {k for k, v in hist.rounds[0].items() if isinstance(v, (int, float)) and k != "round"}
    assert {t[len("round/") :] for t in tb if t.startswith("round/") and "/clients/" not in t[5:]} >= scalars


def test_event_reader_rejects_a_corrupt_file(tmp_path):
    w = cb.TensorBoardLogger(tmp_path)
    w.on_eval({"round": 1, "accuracy": 0.5})
    w.close()
    (f,) = tmp_path.glob("events.out.tfevents.*")
    raw = bytearray(f.read_bytes())
    raw[-6] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="CRC mismatch"):
        cb.read_tensorboard_scalars(tmp_path)
    with pytest.raises(FileNotFoundError, match="no TensorBoard event file"):
        cb.read_tensorboard_scalars(tmp_path / "none")


def test_optional_loggers_say_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails
    with pytest.raises(ImportError, match="WandbLogger needs the wandb package.*pip install wandb"):
        cb.WandbLogger(project="x")
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(
        ImportError, match=r"TensorBoardLogger needs tensorboardX: pip install 'fedbpt-jax\[tensorboard\]'"
    ):
        cb.TensorBoardLogger(tmp_path)


def test_wandb_logger_logs_the_same_scalars_to_a_given_run():
    class FakeRun:
        def __init__(self):
            self.logged = []

        def log(self, values, step):
            self.logged.append((step, values))

    import types

    fake = types.ModuleType("wandb")
    sys.modules.setdefault("wandb", fake)
    try:
        run = FakeRun()
        w = cb.WandbLogger(run=run)
        w.on_round(
            {
                "round": 3,
                "sigma": 0.5,
                "hsig": True,
                "clients": [{"active": True, "loss": 1.0}, {"active": False, "loss": None}],
            }
        )
        w.on_eval({"round": 3, "accuracy": 0.75, "pred_dist": [0.25, 0.75]})
        w.close()
    finally:
        if sys.modules.get("wandb") is fake:
            del sys.modules["wandb"]
    assert run.logged == [
        (3, {"round/sigma": 0.5, "round/hsig": 1.0, "round/clients/loss_mean": 1.0}),
        (3, {"eval/accuracy": 0.75, "eval/pred_dist/0": 0.25, "eval/pred_dist/1": 0.75}),
    ]


def test_the_package_imports_without_the_optional_loggers():
    code = (
        "import sys; sys.modules['tensorboardX'] = None; sys.modules['wandb'] = None\n"
        "import fedbpt_jax.callbacks, fedbpt_jax.plots, fedbpt_jax.report, fedbpt_jax.federated.driver, fedbpt_jax.cli\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
