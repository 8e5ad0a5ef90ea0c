"""docs/metrics.md lists every key a run records, per algorithm: the documented set must equal what a tiny
run of each algorithm emits (round rows, evaluation rows, per-client diagnostics, metrics.json), so the
page cannot drift from the code. Conditional keys are documented with their condition; the runs here
switch the conditions on (dev set, FedBPT with the ‖z‖ clip and the perturbation term, an early stop).
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import pytest

import federated_setup as fs
from fedbpt_jax import callbacks as cb
from fedbpt_jax import federated as fl
from fedbpt_jax.checkpoint import read_json
from fedbpt_jax.federated.registry import COMMAND_ALGORITHMS

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
ALGORITHMS = COMMAND_ALGORITHMS
SECTIONS = {
    "Round rows": "round",
    "Evaluation rows": "eval",
    "Per-client diagnostics": "clients",
    "metrics.json": "metrics",
}


def documented() -> dict[str, dict[str, set[str]]]:
    """``{section: {key: algorithms}}`` from the page's tables."""
    out: dict[str, dict[str, set[str]]] = {}
    section = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section = SECTIONS.get(line[3:].strip())
            continue
        m = re.match(r"^\| `([a-z_0-9]+)` \| ([a-z_, ]+) \|", line)
        if m and section is not None:
            algos = set(ALGORITHMS) if m.group(2).strip() == "all" else {a.strip() for a in m.group(2).split(",")}
            unknown = algos - set(ALGORITHMS)
            assert not unknown, f"docs/metrics.md: unknown algorithm(s) {unknown} for {m.group(1)}"
            assert m.group(1) not in out.setdefault(section, {}), f"docs/metrics.md: {m.group(1)} listed twice"
            out[section][m.group(1)] = algos
    return out


def test_the_page_has_every_section():
    doc = documented()
    assert set(doc) == set(SECTIONS.values())
    assert {"accuracy", "dev_accuracy", "z_norm"} <= set(doc["eval"]) and "sigma" in doc["round"]


@pytest.mark.parametrize("name", ALGORITHMS)
def test_documented_keys_equal_what_a_tiny_run_emits(name, tmp_path):
    cfg = fs.config_a(num_clients=4, clients_per_round=4, **({"norm_clip": True} if name == "fedbpt" else {}))
    algo = fl.make(name, cfg, fs.tiny_lm())
    train, counts = fs.host_data(4, seed=2)
    stop = cb.StopWhen(lambda row: row["round"] == 1, on="round")  # stopped_early is documented too
    carry, hist = fl.run(
        algo,
        jax.random.key(0),
        fs.make_data(4, train=train, counts=counts),
        fs.test_set(),
        fs.tiny_lm(),
        fs.model(),
        dev=fs.test_set(),
        num_rounds=2,
        eval_chunk=16,
        progress=False,
        results_dir=tmp_path,
        callbacks=[stop],
        plot=False,
    )
    assert hist.stopped_early == 1
    doc = {s: {k for k, algos in keys.items() if name in algos} for s, keys in documented().items()}
    emitted = {
        "round": set().union(*(r.keys() for r in hist.rounds)),
        "eval": set().union(*(e.keys() for e in hist.evals)),
        "clients": {k for r in hist.rounds for c in r.get("clients", []) for k in c},
        "metrics": set(read_json(tmp_path / "metrics.json")),
    }
    for section in SECTIONS.values():
        assert emitted[section] - doc[section] == set(), f"{name}: {section} keys missing from docs/metrics.md"
        assert doc[section] - emitted[section] == set(), f"{name}: documented {section} keys it does not emit"
