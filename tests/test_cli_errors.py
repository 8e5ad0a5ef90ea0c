"""Bad input and interruptions through the CLI, as a user meets them: each case is one line on stderr that
names the value or file and what is accepted, before any compute; --debug shows the traceback; Ctrl-C and
SIGTERM stop cleanly; results are never silently replaced."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

import fedbpt_jax as fb
from fedbpt_jax import cli, interrupts, testing
from tokenizers_util import chatml_tokenizer


@pytest.fixture(scope="module")
def tiny_lm():
    return testing.tiny_decoder(0, num_layers=1, tokenizer=chatml_tokenizer())


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the CLI gets as far as loading a model."""

    def load(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(fb.models, "load", load)


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    return err


SMALL = [
    "--clients",
    "4",
    "--per-round",
    "2",
    "--rounds",
    "1",
    "--shots",
    "4",
    "--d",
    "8",
    "--n-prompt",
    "2",
    "--population",
    "4",
    "--local-generations",
    "1",
    "--test-size",
    "8",
    "--no-progress",
]


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--test-size", "-5"], "--test-size -5: accepted: 0 (the whole test set) or a positive count"),
        (["--per-round", "0"], "--per-round 0: accepted: 1 to --clients (10)"),
        (["--per-round", "11"], "--per-round 11: accepted: 1 to --clients (10)"),
        (["--rounds", "5", "--eval-every", "2"], "--rounds 5: accepted: a positive multiple of --eval-every (2)"),
        (["--eval-every", "0"], "--eval-every 0: accepted: a positive integer"),
        (["--layout", "sideways"], "--layout 'sideways': accepted: 'after' or 'before'"),
        (["--style", "poem"], "--style 'poem': accepted: 'completion', 'chat', 'bbt' or 'reference'"),
        (["--layout", "after", "--scorer-cache", "prompt"], "--scorer-cache 'prompt' cannot apply to --layout 'after'"),
        (["--scorer-cache", "prefix"], "--scorer-cache 'prefix' cannot apply to --layout 'before'"),
        (["--alpha", "-1"], "--alpha -1.0: accepted"),
        (["--population", "1"], "--population 1: accepted: 2 or more"),
        (["--eval-cache-gb", "-1"], "--eval-cache-gb -1.0: accepted: a finite number of GiB >= 0 (0: never cache)"),
        (["sweep", "--eval-cache-gb", "nan"], "--eval-cache-gb nan: accepted: a finite number of GiB >= 0"),
        (["bbt", "--eval-every", "0"], "--eval-every 0: accepted: a positive integer"),
        (["bbt", "--generations", "0"], "--generations 0: accepted: 1 or more"),
    ],
)
def test_bad_values_are_one_line_before_the_model_loads(argv, says, no_model, capsys):
    assert cli.main(argv) == 2
    assert says in _err(capsys)


def test_output_locations_are_checked_before_the_model_loads(tmp_path, no_model, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli.main(["--results-dir", str(a_file)]) == 2
    assert f"--results-dir {str(a_file)!r} is a file" in _err(capsys)
    assert cli.main(["--results-dir", str(a_file / "sub")]) == 2
    assert f"is under {str(a_file)!r}, which is a file" in _err(capsys)
    assert cli.main(["--checkpoint-dir", str(a_file)]) == 2
    assert f"--checkpoint-dir {str(a_file)!r} is a file" in _err(capsys)
    assert cli.main(["--save-uploads", "/proc/no-such-folder"]) == 2
    assert "--save-uploads '/proc/no-such-folder' is not writable" in _err(capsys)


def test_finished_results_are_not_replaced_without_overwrite(tmp_path, monkeypatch, capsys):
    (tmp_path / "metrics.json").write_text("{}")
    monkeypatch.setattr(fb.models, "load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop here")))
    assert cli.main(["--results-dir", str(tmp_path)]) == 2
    err = _err(capsys)
    assert "already holds a run's results (metrics.json); pass --overwrite" in err
    assert cli.main(["--results-dir", str(tmp_path), "--overwrite"]) == 2  # got as far as loading the model
    assert "cannot load model 'smollm2-135m-instruct': stop here" in _err(capsys)


def test_model_files_that_cannot_be_read_are_one_line_naming_them(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_json = tmp_path / "badjson"
    bad_json.mkdir()
    (bad_json / "config.json").write_text('{"model_type": "llama", "hidden')
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    fixture = Path(__file__).parent / "fixtures" / "decoder_tiny_tied"
    truncated, no_tokenizer = tmp_path / "truncated", tmp_path / "no_tokenizer"
    shutil.copytree(fixture, truncated)
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(3000)
    shutil.copytree(fixture, no_tokenizer)
    for f in no_tokenizer.glob("tokenizer*"):
        f.unlink()
    for path in (empty, bad_json, junk, tmp_path / "missing.gguf", truncated, no_tokenizer):
        assert cli.main(["--model", str(path)]) == 2
        err = _err(capsys)
        assert err.startswith(f"fedbpt-jax: error: cannot load model {str(path)!r}: "), err
        assert "--model takes a registry name" in err


@pytest.mark.parametrize("content", ["", "sentence\tlabel\n"])
def test_data_files_without_rows_are_one_line_naming_task_and_file(content, tiny_lm, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fb.models, "load", lambda *a, **k: tiny_lm)
    f = tmp_path / "data.tsv"
    f.write_text(content)
    assert cli.main(["--task", "sst2", "--data", str(f), *SMALL]) == 2
    err = _err(capsys)
    assert f"task 'sst2', data {str(f)!r}: " in err, err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(fb.models, "load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["--debug"])
    monkeypatch.setenv("FEDBPT_JAX_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        cli.main([])


def test_interrupt_is_a_clean_stop_with_the_last_round_and_how_to_resume(tiny_lm, tmp_path, monkeypatch, capsys):
    """A SIGTERM in the middle of a run: exit 143, one line naming the last round on disk and how to resume;
    metrics.json and rounds.csv describe the same round."""
    monkeypatch.setattr(fb.models, "load", lambda *a, **k: tiny_lm)
    real_write = fb.federated.run.__globals__["write_results"]
    calls = []

    def write_then_signal(d, history, carry, **kw):
        real_write(d, history, carry, **kw)
        calls.append(len(history.rounds))
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives after the first round's results are on disk

    monkeypatch.setitem(fb.federated.run.__globals__, "write_results", write_then_signal)
    res, ck = tmp_path / "res", tmp_path / "ck"
    argv = [
        "--task",
        "rotten_tomatoes",
        *SMALL,
        "--rounds",
        "3",
        "--results-dir",
        str(res),
        "--checkpoint-dir",
        str(ck),
    ]
    try:
        rc = cli.main(argv)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert rc == 143
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fedbpt-jax: interrupted after round 1 (results in "), err
    assert "resume with the same command" in err
    metrics = json.loads((res / "metrics.json").read_text())
    csv_rounds = (res / "rounds.csv").read_text().strip().splitlines()[1:]
    assert len(metrics["rounds"]) == len(csv_rounds) == 1
    assert not list(Path(ck).glob("*tmp*"))
    config = json.loads((res / "config.json").read_text())
    assert config["args"]["rounds"] == 3 and config["versions"]["jax"] and "fed_config" in config["resolved"]


def test_deferred_holds_a_signal_until_the_section_ends():
    got = []
    previous = signal.signal(signal.SIGINT, lambda s, f: got.append("handled"))
    try:
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            got.append("section finished")
        assert got == ["section finished", "handled"]
    finally:
        signal.signal(signal.SIGINT, previous)


_BLOCKED_IN_C = """
import os, sys
from fedbpt_jax import interrupts
interrupts.install()
r, w = os.pipe()
print("ready", flush=True)
try:
    os.read(r, 1)  # one long call that returns only when the process ends (like one long XLA computation)
except interrupts.Interrupted:
    print("clean stop", flush=True)
"""

_IN_PYTHON = """
import time
from fedbpt_jax import interrupts
interrupts.install()
print("ready", flush=True)
try:
    while True:
        time.sleep(0.01)
except interrupts.Interrupted as err:
    print("clean stop", flush=True)
    raise SystemExit(err.exit_status)
"""


@pytest.mark.parametrize("script, stops_cleanly", [(_BLOCKED_IN_C, False), (_IN_PYTHON, True)])
def test_ctrl_c_ends_a_long_computation_within_seconds(script, stops_cleanly):
    """SIGINT while Python code runs: the clean stop (Interrupted). SIGINT while the main thread waits in one
    long C call: the watchdog ends the process after its grace period, saying so, with status 130."""
    import subprocess
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    # "ready" is read while the child may still be inside print(): give it time to reach its loop or call,
    # else the signal lands in print() itself (outside the try) and the test measures that race
    time.sleep(0.5)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    if stops_cleanly:  # the handler runs at once (the interpreter's own shutdown afterwards is not timed)
        assert p.stdout.readline().strip() == "clean stop"
        assert time.monotonic() - t0 < interrupts.GRACE_SECONDS
        out, err = p.communicate(timeout=60)
        assert p.returncode == 130 and "quitting now" not in err
    else:
        out, err = p.communicate(timeout=60)
        waited = time.monotonic() - t0
        assert p.returncode == 130 and interrupts.GRACE_SECONDS - 0.5 <= waited < interrupts.GRACE_SECONDS + 5
        assert "clean stop" not in out and "SIGINT (still computing after 3 s): quitting now" in err


@pytest.mark.parametrize("argv", [["--no-such-option"], ["simulate", "--clients", "many"], ["sweep", "--bogus"]])
def test_usage_errors_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and "--help" in err[0], err


def test_files_that_are_not_what_they_claim_are_named(tmp_path):
    from fedbpt_jax import cli_options, data, prompt

    toml = tmp_path / "c.toml"
    toml.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(cli_options.ConfigFileError, match=r"c\.toml'?: not UTF-8 text"):
        cli_options.read_config_file(toml)
    npy = tmp_path / "start.npy"
    npy.write_text("not an array")
    with pytest.raises(ValueError, match=r"start\.npy'?: not a NumPy \.npy array file"):
        prompt.parse_start(str(npy))
    (tmp_path / "d" / "sst2").mkdir(parents=True)
    (tmp_path / "d" / "sst2" / "train.tsv").write_bytes(b"text\tlabel\ngood \xff film\t1\n")
    with pytest.raises(ValueError, match=r"train\.tsv: not UTF-8 text"):
        data.load_task_data("sst2", tmp_path / "d")
