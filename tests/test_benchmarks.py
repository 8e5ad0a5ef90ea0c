"""The benchmark scripts run end to end on the tiny model (smallest settings) and their built-in checks
pass: the vectorized fitness equals the reference-style one, batched logits equal per-candidate logits,
cached equal uncached. No timing is asserted (figures are printed, never tested)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    # the scripts import fedbpt_jax first, which sets OPENBLAS_NUM_THREADS
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_round_throughput_quick_runs_and_checks_agree(tmp_path):
    out, png = tmp_path / "round.json", tmp_path / "round.png"
    proc = _run(
        "round_throughput.py",
        "--quick",
        "--ks",
        "1",
        "--rounds",
        "1",
        "--peak-samples",
        "1",
        "--peak-repeats",
        "1",
        "--ref-clients",
        "1",
        "--ref-before-clients",
        "1",
        "--json",
        str(out),
        "--plot",
        str(png),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert [(r["K"], r["dtype"]) for r in res] == [(1, "float32"), (1, "bfloat16")]
    assert all(r["model"] == "tiny" for r in res)
    for r in res:
        assert r["check_ok"] and r["check_max_rel_diff"] <= r["check_tolerance"]
        assert r["round_s"] > 0 and r["ref_round_s"] > 0 and r["speedup"] > 0 and 0 < r["es_share"] < 1
        assert r["gflop_per_round"] > 0 and r["evals_per_round"] == 8 * 5 + 1
        assert r["pure_s"] > 0 and r["frac_pure_inference"] > 0
    assert res[0]["check_tolerance"] == 1e-4 and res[0]["check_max_rel_diff"] <= 1e-4  # float32: to rounding
    assert res[0]["gflop_per_round"] == res[1]["gflop_per_round"]  # one cost model, whatever the dtype
    assert res[1]["speed_vs_float32"] > 0 and res[1]["peak_rss_vs_float32"] > 0
    assert res[1]["model_bytes"] < 0.6 * res[0]["model_bytes"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| tiny | float32 | 1 |" in proc.stdout and "| tiny | bfloat16 | 1 |" in proc.stdout


def test_forward_throughput_quick_runs_and_checks_agree(tmp_path):
    out = tmp_path / "fwd.json"
    proc = _run("forward_throughput.py", "--quick", "--repeats", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["checks_ok"]
    layouts = {(r["layout"], r["mode"]) for r in d["rows"]}
    assert {("after+cache", "batched"), ("after (no cache)", "batched"), ("before", "batched")} <= layouts
    assert all(r["gflops"] > 0 and r["gflop"] > 0 for r in d["rows"])
    assert {r["dtype"] for r in d["rows"]} == {"float32", "bfloat16"}
    assert set(d["peak_gflops_best"]) == {"float32", "bfloat16"}
    bf = [s for s in d["summary"] if s["dtype"] == "bfloat16"]
    assert bf and all(s["speed_vs_float32[after+cache]"] > 0 for s in bf)


def test_architecture_folder_rebuilds_the_model_with_random_weights(tmp_path, monkeypatch):
    """What travels to a machine without the checkpoint: config + tokenizer, no weights. The rebuilt model has
    the same config (in the asked dtype), the same parameter tree and shapes, the same tokenizer."""
    import dataclasses

    import jax

    from fedbpt_jax import testing, testing_tokenizers

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    common = __import__("common")

    lm = dataclasses.replace(testing.tiny_decoder(0), tokenizer=testing_tokenizers.chatml_tokenizer(), name="tiny-chat")
    folder = common.write_architecture(lm, tmp_path / "arch")
    assert not list(folder.glob("*.safetensors")) and (folder / "decoder_config.json").exists()
    rebuilt = common.random_weights_model(folder, "bfloat16")
    assert rebuilt.config == dataclasses.replace(lm.config, compute_dtype="bfloat16")
    shapes = lambda p: jax.tree_util.tree_map(lambda x: x.shape, p)  # noqa: E731
    assert shapes(rebuilt.params) == shapes(lm.params)
    assert "random weights" in rebuilt.name
    text = "Review: a fine film\nSentiment:"
    assert rebuilt.tokenizer(text)["input_ids"] == lm.tokenizer(text)["input_ids"]
    monkeypatch.setenv(common.RANDOM_WEIGHTS_ENV, str(folder))
    assert common.load_model("smollm2").name == rebuilt.name
    assert common.weights_note("smollm2").startswith("random")
    with pytest.raises(ValueError, match="decoder_config.json"):
        common.random_weights_model(tmp_path / "missing")
