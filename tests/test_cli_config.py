"""The command line derived from the configuration dataclasses: every field is a flag, --config files
(TOML, YAML, JSON and a run's own config.json) with clear errors, --devices/--mesh, sub-command dispatch and
no PyTorch notice."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fedbpt_jax as fb
from fedbpt_jax import cli, cli_options, testing
from fedbpt_jax.bbt import BBTConfig
from fedbpt_jax.federated.config import FedConfig, HParams
from tokenizers_util import chatml_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--task",
    "rotten_tomatoes",
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
    "16",
    "--no-progress",
]


@pytest.fixture(scope="module")
def tiny_lm():
    return testing.tiny_decoder(0, num_layers=1, tokenizer=chatml_tokenizer())


@pytest.fixture
def no_model(monkeypatch):
    def load(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(fb.models, "load", load)


def _flags(command: str) -> set[str]:
    sub = cli.build_parser().commands[command]
    return {s for a in sub._actions for s in a.option_strings}


@pytest.mark.parametrize(
    "command, classes",
    [
        ("simulate", (cli_options.CommonOptions, FedConfig, HParams, cli_options.SimulateOptions)),
        ("bbt", (cli_options.CommonOptions, BBTConfig)),
    ],
)
def test_every_field_of_the_configuration_is_a_flag_with_its_doc(command, classes):
    flags = _flags(command)
    opts = {o.field: o for o in cli_options.options(command)}
    for cls in classes:
        docs = cli_options.field_docs(cls)
        for f in dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in flags, f"{cls.__name__}.{f.name} has no flag"
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no entry in the class's Attributes docstring"
            assert opts[f.name].help == docs[f.name] or opts[f.name].help.startswith(docs[f.name].rstrip("."))
    # Today's names are kept beside the field names.
    expected = (
        {
            "--clients",
            "--per-round",
            "--population",
            "--d",
            "--n-prompt",
            "--server",
            "--dropout",
            "--no-perturb",
            "--no-progress",
            "--sigma0",
            "--perturb-rate",
        }
        if command == "simulate"
        else {"--generations", "--population", "--d", "--n-prompt", "--sigma0", "--eval-every"}
    )
    assert expected <= flags


def test_a_new_config_field_appears_as_a_flag_and_a_file_key(monkeypatch, tmp_path):
    """No hand-copying: a field added to a configuration dataclass is a flag (help from its docstring) and
    a config-file key, and reaches the dataclass the command builds."""

    @dataclasses.dataclass(frozen=True)
    class Grown(FedConfig):
        """FedConfig with one more field.

        Attributes:
          warmup_rounds: rounds before the server step starts.
        """

        warmup_rounds: int = 3

    real = cli_options.sources

    def grown(command):
        return [dataclasses.replace(s, cls=Grown) if s.cls is FedConfig else s for s in real(command)]

    monkeypatch.setattr(cli_options, "sources", grown)
    parser = cli.build_parser()
    assert "rounds before the server step starts" in parser.commands["simulate"].format_help()
    args = cli.parse(["--warmup-rounds", "7", "--clients", "4"], parser)
    cfg = cli_options.build(Grown, args, cli_options.options("simulate"), clients_per_round=4, n_prompt_tokens=2)
    assert cfg.warmup_rounds == 7 and cfg.num_clients == 4
    f = tmp_path / "c.toml"
    f.write_text("warmup_rounds = 9\n")
    assert cli.parse(["--config", str(f)]).warmup_rounds == 9


def test_run_keywords_are_options_or_deliberately_fixed():
    """Every keyword of federated.run is reachable from the command line, or listed here as set by the
    CLI itself (so a new run option is noticed)."""
    set_by_cli = {
        "algo",
        "key",
        "data",
        "test",
        "lm",
        "model",
        "hp",
        "dev",
        "num_rounds",
        "mesh",
        "progress",
        "keep_clean_context",
        "log_clients",
        "stop_after",
        "cache_eval_prefix",
        "eval_cache_budget",
        "clean_context_budget",
        "callbacks",  # code: research scripts pass them to run; the CLI has --tensorboard-dir and --plot
        "run_config",  # the CLI's own config.json record, handed to run to write once a resume is accepted
    }
    params = set(inspect.signature(fb.federated.run).parameters)
    dests = {o.dest for o in cli_options.options("simulate")}
    assert params - set_by_cli <= dests, params - set_by_cli - dests
    assert {"rounds", "devices", "progress", "keep_clean_cache"} <= dests  # the CLI's names for the fixed ones


def test_options_reach_the_config_without_hand_mapping():
    args = cli.parse(
        [
            "--sampling",
            "weighted",
            "--perturb-every",
            "generation",
            "--exempt-special",
            "--projection",
            "uniform",
            "--projection-alpha",
            "0.5",
            "--no-perturb",
            "--server",
            "paper",
            "--dropout",
            "0.25",
            "--clients",
            "6",
            "--checkpoint-every",
            "3",
            "--devices",
            "1",
        ]
    )
    opts = cli_options.options("simulate")
    cfg = cli_options.build(FedConfig, args, opts, clients_per_round=6, n_prompt_tokens=2)
    assert (cfg.sampling, cfg.perturb_every, cfg.exempt_special, cfg.projection, cfg.projection_alpha) == (
        "weighted",
        "generation",
        True,
        "uniform",
        0.5,
    )
    assert (cfg.perturb, cfg.server_variant, cfg.num_clients, cfg.chunk_clients) == (False, "paper", 6, 2)
    assert cli_options.build(HParams, args, opts).dropout_rate == 0.25
    assert args.checkpoint_every == 3 and args.command == "simulate"
    bbt = cli.parse(["bbt", "--chunk-size", "4", "--projection", "uniform"])
    cfg = cli_options.build(BBTConfig, bbt, cli_options.options("bbt"), n_prompt_tokens=2)
    assert (cfg.chunk_size, cfg.projection, cfg.population_size, cfg.num_generations) == (4, "uniform", 10, 30)


@pytest.mark.parametrize(
    "name, text",
    [
        ("c.toml", 'clients = 4\nper-round = 2\nsampling = "weighted"\nperturb = false\nsigma0 = 2\n'),
        ("c.yaml", "clients: 4\nclients_per_round: 2\nsampling: weighted\nperturb: false\nsigma0: 2\n"),
        ("c.json", '{"num_clients": 4, "per_round": 2, "sampling": "weighted", "perturb": false, "sigma0": 2}'),
    ],
)
def test_config_file_sets_options_and_the_command_line_overrides(name, text, tmp_path):
    f = tmp_path / name
    f.write_text(text)
    args = cli.parse(["--config", str(f)])
    assert (args.clients, args.per_round, args.sampling, args.perturb, args.sigma0) == (4, 2, "weighted", False, 2.0)
    assert isinstance(args.sigma0, float) and args.rounds == 5  # untouched options keep their defaults
    args = cli.parse(["simulate", "--clients", "8", "--config", str(f), "--perturb", "--sampling", "uniform"])
    assert (args.clients, args.per_round, args.sampling, args.perturb) == (8, 2, "uniform", True)


@pytest.mark.parametrize(
    "text, says",
    [
        (
            "clents = 4\n",
            ["unknown key 'clents' for 'simulate'; did you mean 'clients'", "Accepted keys: ", "per_round"],
        ),
        ('clients = "ten"\n', ["key 'clients': 'ten' (str) is not an integer (expected int)"]),
        ("sigma0 = true\n", ["key 'sigma0': True (bool) is not a number (expected float)"]),
        ('perturb = "yes"\n', ["key 'perturb': 'yes' (str) is not true or false (expected bool)"]),
        ('sampling = "random"\n', ["key 'sampling': 'random' is not accepted; accepted: 'uniform', 'weighted'"]),
        ("overwrite = true\n", ["key 'overwrite' is accepted only on the command line"]),
        ("clients = 4\nnum_clients = 5\n", ["'clients' is given twice (as 'clients' and 'num_clients')"]),
        ('command = "bbt"\nclients = 4\n', ["is for the 'bbt' command, not 'simulate'"]),
        ("clients = [\n", ["not valid TOML"]),
        ("[1, 2]", None),
    ],
)
def test_bad_config_files_are_one_line_naming_the_key(text, says, tmp_path, no_model, capsys):
    f = tmp_path / ("c.json" if says is None else "c.toml")
    f.write_text(text)
    argv = ["simulate", "--config", str(f)] if "command" in text else ["--config", str(f)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"fedbpt-jax: error: --config {str(f)!r}"), err
    for s in says or ["the file holds a list; accepted: a mapping of option names to values"]:
        assert s in err, err


def test_config_file_of_unknown_type_or_missing(tmp_path, no_model, capsys):
    assert cli.main(["--config", str(tmp_path / "c.ini")]) == 2
    assert "unknown file type '.ini'; accepted: .toml, .yaml, .yml, .json" in capsys.readouterr().err
    assert cli.main(["--config", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert f"--config {str(tmp_path / 'missing.toml')!r}: cannot read it" in err


def test_run_config_json_reproduces_the_run(tiny_lm, monkeypatch, tmp_path, capsys):
    """A tiny run's config.json, read back with --config, gives the same options, the same resolved
    configuration and the same metrics; the command comes from the file."""
    monkeypatch.setattr(fb.models, "load", lambda name, **kw: tiny_lm)
    first, second = tmp_path / "first", tmp_path / "second"
    extra = [
        "--sampling",
        "weighted",
        "--perturb-every",
        "generation",
        "--exempt-special",
        "--seed",
        "3",
        "--server",
        "paper",
        "--chunk-clients",
        "0",
    ]
    ck = tmp_path / "ck"
    assert cli.main([*TINY, *extra, "--results-dir", str(first), "--checkpoint-dir", str(ck)]) == 0
    # the replay repeats the settings, not the outputs: the finished run's checkpoint folder is not taken over
    # (it would resume at the last round and compute nothing)
    assert cli.main(["--config", str(first / "config.json"), "--results-dir", str(second)]) == 0
    a, b = (json.loads((d / "config.json").read_text()) for d in (first, second))
    assert a["args"]["checkpoint_dir"] == str(ck) and b["args"]["checkpoint_dir"] is None
    for d in (a, b):
        d["args"].pop("results_dir"), d["args"].pop("config"), d["args"].pop("checkpoint_dir")
    assert a["args"] == b["args"] and a["resolved"] == b["resolved"]
    assert a["resolved"]["fed_config"]["sampling"] == "weighted" and a["resolved"]["fed_config"]["exempt_special"]
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (first, second))
    assert [e["accuracy"] for e in ma["evals"]] == [e["accuracy"] for e in mb["evals"]]
    assert [r["client_loss"] for r in ma["rounds"]] == [r["client_loss"] for r in mb["rounds"]]
    # bbt: the command is taken from its config.json when none is given.
    assert (
        cli.main(
            [
                "bbt",
                "--task",
                "rotten_tomatoes",
                "--shots",
                "4",
                "--d",
                "8",
                "--n-prompt",
                "2",
                "--population",
                "4",
                "--generations",
                "2",
                "--eval-every",
                "2",
                "--test-size",
                "8",
                "--no-progress",
                "--results-dir",
                str(tmp_path / "bbt"),
            ]
        )
        == 0
    )
    args = cli.parse(["--config", str(tmp_path / "bbt" / "config.json")])
    assert (args.command, args.generations, args.population) == ("bbt", 2, 4)


def test_overwrite_in_a_run_record_is_ignored(tmp_path, no_model, capsys):
    record = {
        "command": ["fedbpt-jax", "--overwrite"],
        "versions": {},
        "resolved": {},
        "args": {
            "command": "simulate",
            "overwrite": True,
            "config": "x.toml",
            "clients": 3,
            "no_perturb": True,
            "no_progress": True,
            "results_dir": str(tmp_path),
        },
    }
    f = tmp_path / "config.json"
    f.write_text(json.dumps(record))
    (tmp_path / "metrics.json").write_text("{}")
    args = cli.parse(["--config", str(f)])
    assert args.overwrite is False and args.clients == 3
    assert args.results_dir is None  # a run's outputs are not replayed
    assert args.perturb is False and args.progress is False  # keys of earlier config.json files
    assert cli.main(["--config", str(f), "--results-dir", str(tmp_path)]) == 2
    assert "already holds a run's results (metrics.json); pass --overwrite" in capsys.readouterr().err
    # two --config files: refused (they do not chain), naming both
    assert cli.main(["--config", str(f), "--config", str(f)]) == 2
    assert "--config given 2 times" in capsys.readouterr().err


def test_more_devices_than_here_is_an_error_naming_both(no_model, capsys):
    import jax

    have = jax.local_device_count()
    assert cli.main(["--devices", str(have + 1)]) == 2
    err = capsys.readouterr().err
    assert f"--devices {have + 1}: this machine has {have} local device(s); accepted: 1 to {have}, or 0 for all" in err
    assert cli.main(["--devices", "-1"]) == 2
    assert "--devices -1: accepted: 1 or more local devices, or 0 for all" in capsys.readouterr().err
    assert cli.parse(["--mesh"]).devices == 0


def _subprocess_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    env.update(
        JAX_PLATFORMS="cpu",
        OPENBLAS_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]),
        **extra,
    )
    return env


def test_devices_shard_the_clients_in_a_subprocess(tmp_path):
    """Two forced host devices: --devices 2 shards the clients (same first-round results as one device),
    --devices 3 is an error naming 3 and 2."""
    script = textwrap.dedent(f"""
        import json, sys
        import fedbpt_jax as fb
        from fedbpt_jax import cli, testing
        from tokenizers_util import chatml_tokenizer
        lm = testing.tiny_decoder(0, num_layers=1, tokenizer=chatml_tokenizer())
        fb.models.load = lambda name, **kw: lm
        tiny = {TINY!r}
        assert cli.main([*tiny, "--devices", "3"]) == 2
        for n in ("1", "2"):
            assert cli.main([*tiny, "--devices", n, "--chunk-clients", "0",
                             "--results-dir", {str(tmp_path)!r} + "/d" + n]) == 0
    """)
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=900,
        env=_subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--devices 3: this machine has 2 local device(s); accepted: 1 to 2" in out.stderr
    assert "clients sharded over 2 cpu devices" in out.stdout
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("d1", "d2"))
    assert json.loads((tmp_path / "d2" / "config.json").read_text())["resolved"]["devices"] == 2
    assert one["evals"][0]["accuracy"] == two["evals"][0]["accuracy"]
    assert two["rounds"][0]["client_loss"] == pytest.approx(one["rounds"][0]["client_loss"], rel=1e-4)


def test_no_pytorch_notice_on_stderr(tmp_path):
    """The CLI in a fresh process imports transformers (loading a model folder) without printing its
    'PyTorch was not found' notice (where PyTorch is absent, plain 'import transformers' prints it)."""
    data = tmp_path / "data.tsv"
    data.write_text("sentence\tlabel\n")
    fixture = ROOT / "tests" / "fixtures" / "decoder_tiny_tied"
    script = textwrap.dedent(f"""
        import sys
        from fedbpt_jax import cli
        rc = cli.main(["--model", {str(fixture)!r}, "--task", "sst2", "--data", {str(data)!r}, "--no-progress"])
        print("transformers imported:", "transformers" in sys.modules)
        sys.exit(rc)
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=_subprocess_env()
    )
    assert out.returncode == 2 and "transformers imported: True" in out.stdout, out.stdout + out.stderr
    assert out.stderr.startswith("fedbpt-jax: error: "), out.stderr  # the run's one-line error, nothing before it
    assert "PyTorch was not found" not in out.stderr, out.stderr
    import importlib.util

    if importlib.util.find_spec("torch") is None:  # the notice this guards against is real here
        plain = subprocess.run(
            [sys.executable, "-c", "import transformers"],
            capture_output=True,
            text=True,
            timeout=300,
            env=_subprocess_env(),
        )
        assert "PyTorch was not found" in plain.stderr


def test_external_subcommand_is_dispatched_with_its_arguments(monkeypatch, capsys):
    import types

    seen = []
    module = types.ModuleType("fedbpt_jax_fake_report")
    module.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "fedbpt_jax_fake_report", module)
    monkeypatch.setitem(cli.EXTERNAL_COMMANDS, "report", ("fedbpt_jax_fake_report", "summarise runs"))
    monkeypatch.setattr(cli, "_external_available", lambda name: name in sys.modules)
    assert cli.main(["report", "runs/a", "--out", "x"]) == 0 and seen == [["runs/a", "--out", "x"]]
    assert "report" in cli.build_parser().format_help()
    monkeypatch.setattr(cli, "_external_available", lambda name: False)
    assert cli.main(["report", "runs/a"]) == 2
    assert "the 'report' command needs fedbpt_jax_fake_report, which is not installed" in capsys.readouterr().err


def test_version():
    out = subprocess.run(
        [sys.executable, "-m", "fedbpt_jax.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_subprocess_env(),
    )
    assert out.returncode == 0 and out.stdout.strip() == f"fedbpt-jax {fb.__version__}"
