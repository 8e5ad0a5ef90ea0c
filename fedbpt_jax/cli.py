"""fedbpt-jax: federated black-box prompt tuning (FedBPT) simulations on a frozen language model.

``fedbpt-jax`` with no arguments runs the embedded default: a FedBPT simulation of SmolLM2-135M-Instruct on
Rotten Tomatoes review snippets (both fetched from the package registry, no hub needed), 10 clients with
Dirichlet label skew, the soft prompt before the text as in the paper (5 rounds: about 20 minutes on 2 CPU
cores at ~130 GFLOP/s, longer on slower ones; ``--layout after`` is the fast variant, about 6 minutes), and
prints the test accuracy of the bare template, of the manual prompt (z = 0), of the final and of the
dev-selected global prompt (and, labelled as such, the reference code's optimistic best-on-test).

Sub-commands:

* ``fedbpt-jax simulate [...]`` — any algorithm (fedbpt, fedavg_bbt, centralized_bbt, manual, fedprompt)
  on any model/task/data source (the default command is ``simulate`` with its defaults);
* ``fedbpt-jax bbt [...]`` — centralized BBT with dev-set selection (the same pycma-faithful CMA-ES as
  ``simulate --algorithm centralized_bbt``).
* ``fedbpt-jax sweep --seeds 0,1,2 --hp NAME=V1,V2 [...]`` — seeds × hyperparameter points as one compiled
  program (see :mod:`fedbpt_jax.sweep_cli`, :func:`fedbpt_jax.sweep`).
* ``fedbpt-jax report RUN_DIR...`` — tables and plots comparing finished runs' results folders, mean ± std
  over seeds (see :mod:`fedbpt_jax.report`).

Every field of the configuration dataclasses (``FedConfig``, ``HParams``, ``BBTConfig``) and of the CLI's own
(:mod:`fedbpt_jax.cli_options`) is an option, with its docstring as help; ``--config FILE`` (TOML, YAML, JSON,
or a run's own ``config.json``) sets options by the same names and the command line overrides it;
``--devices N`` / ``--mesh`` shard the clients over local devices. ``fedbpt-jax report ...`` is handed to
:func:`fedbpt_jax.report.main`.

Run ``fedbpt-jax simulate --help`` for every option. Errors are one line; ``--debug`` (or the environment
variable ``FEDBPT_JAX_DEBUG=1``) shows the full traceback. Ctrl-C or SIGTERM stops cleanly after the files
being written are complete (exit status 130 / 143).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

from .errors import CliError, one_line
from .plan import (
    client_mesh_for,
    config_record,
    data_identity,
    load_inputs,
    local_device_count,
)

#: Sub-commands that live in their own module: ``fedbpt-jax NAME ...`` calls ``module.main(argv)`` with the
#: arguments after NAME (listed in the help only when the module is installed).
EXTERNAL_COMMANDS = {
    "report": ("fedbpt_jax.report", "summarise and plot finished runs' results"),
    "sweep": ("fedbpt_jax.sweep_cli", "seeds x hyperparameter points as one compiled program (fb.sweep)"),
}

COMMANDS = {
    "simulate": "run a federated simulation (the default command)",
    "bbt": "centralized black-box tuning with dev-set selection",
}


def _external_available(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def build_parser() -> argparse.ArgumentParser:
    """The parser: ``--version`` and one sub-parser per command, whose options are derived from the
    configuration dataclasses (:mod:`fedbpt_jax.cli_options`)."""
    from . import __version__
    from . import cli_options as co

    parser = co.OneLineParser(
        prog="fedbpt-jax",
        description="\n\n".join(__doc__.split("\n\n")[:2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command")
    parser.commands = {}
    for name, text in COMMANDS.items():
        p = parser.commands[name] = sub.add_parser(name, help=text, description=text)
        p.add_argument(
            "--config",
            default=None,
            metavar="FILE",
            help="read options from a TOML, YAML or JSON file whose keys are the option names (e.g. "
            "'clients = 4', or the field names such as 'num_clients'); the command line overrides "
            "it. A run's own results/config.json reproduces that run's settings",
        )
        co.add_options(p, name)
        if name == "simulate":
            p.add_argument(
                "--mesh",
                dest="devices",
                action="store_const",
                const=0,
                help="shard the clients over all local devices (the same as --devices 0)",
            )
    for name, (module, text) in EXTERNAL_COMMANDS.items():
        if _external_available(module):
            sub.add_parser(name, help=text, add_help=False)
    return parser


def check_args(args) -> None:
    """Values argparse accepts but no run could use: an error naming the value, before anything loads."""

    def need(ok, msg):
        if not ok:
            raise CliError(msg)

    need(args.test_size >= 0, f"--test-size {args.test_size}: accepted: 0 (the whole test set) or a positive count")
    if hasattr(args, "seed"):
        need(
            0 <= args.seed < 2**32,
            f"--seed {args.seed}: accepted: an integer 0..{2**32 - 1} (jax keeps 32 bits of a seed)",
        )
    need(args.shots >= 1, f"--shots {args.shots}: accepted: a positive number of examples per class")
    need(
        args.dev_shots is None or args.dev_shots >= 1,
        f"--dev-shots {args.dev_shots}: accepted: a positive number of dev examples per class",
    )
    need(args.d >= 1, f"--d {args.d}: accepted: a positive intrinsic dimension")
    need(
        args.max_length is None or args.max_length >= 1,
        f"--max-length {args.max_length}: accepted: a positive token count, or leave it out for no truncation",
    )
    need(args.n_prompt is None or args.n_prompt >= 1, f"--n-prompt {args.n_prompt}: accepted: a positive token count")
    need(args.eval_every >= 1, f"--eval-every {args.eval_every}: accepted: a positive integer")
    from .models.kinds import DECODER, KINDS
    from .tasks import DECODER_STYLES

    owner = {lay: k for k in KINDS.values() for lay in k.layouts}  # the backbone kind of each layout
    shown = [
        f"{' or '.join(map(repr, sorted(k.layouts)))} ({k.name}s)"
        for k in sorted(KINDS.values(), key=lambda k: not k.causal)  # the default model's kind first
    ]
    need(args.layout is None or args.layout in owner, f"--layout {args.layout!r}: accepted: {', '.join(shown)}")
    # without --layout, the default model's kind (a decoder) and its default layout
    cache, layout = getattr(args, "scorer_cache", "auto"), args.layout or DECODER.layouts[0]
    own = owner[layout].layout_caches.get(layout, "none")
    need(
        cache in ("auto", "none") or cache == own,
        f"--scorer-cache {cache!r} cannot apply to --layout {layout!r}: accepted 'auto' or 'none', or the "
        f"layout's own cache ({own})",
    )
    need(
        args.style is None or args.style in DECODER_STYLES,
        f"--style {args.style!r}: accepted: {', '.join(map(repr, DECODER_STYLES[:-1]))} or {DECODER_STYLES[-1]!r} "
        "(decoders)",
    )
    need(args.population >= 2, f"--population {args.population}: accepted: 2 or more candidates")
    if args.command in ("simulate", "sweep"):
        need(args.clients >= 1, f"--clients {args.clients}: accepted: a positive number of clients")
        need(
            args.per_round is None or 1 <= args.per_round <= args.clients,
            f"--per-round {args.per_round}: accepted: 1 to --clients ({args.clients}), or leave it out for all",
        )
        need(
            args.rounds >= 1 and args.rounds % args.eval_every == 0,
            f"--rounds {args.rounds}: accepted: a positive multiple of --eval-every ({args.eval_every})",
        )
        need(args.alpha >= 0, f"--alpha {args.alpha}: accepted: a Dirichlet concentration > 0, or 0 for IID")
        need(args.local_generations >= 1, f"--local-generations {args.local_generations}: accepted: 1 or more")
        need(args.chunk_clients >= 0, f"--chunk-clients {args.chunk_clients}: accepted: 0 (all at once) or more")
        need(args.eval_chunk >= 1, f"--eval-chunk {args.eval_chunk}: accepted: a positive number of examples")
        need(
            math.isfinite(args.eval_cache_gb) and args.eval_cache_gb >= 0,
            f"--eval-cache-gb {args.eval_cache_gb}: accepted: a finite number of GiB >= 0 (0: never cache)",
        )
    if args.command == "simulate":
        need(args.checkpoint_every >= 1, f"--checkpoint-every {args.checkpoint_every}: accepted: a positive integer")
        need(args.devices >= 0, f"--devices {args.devices}: accepted: 1 or more local devices, or 0 for all")
        if args.devices > 1:
            have = local_device_count()
            need(
                args.devices <= have,
                f"--devices {args.devices}: this machine has {have} local device(s); "
                f"accepted: 1 to {have}, or 0 for all",
            )
    if args.command == "bbt":
        need(args.generations >= 1, f"--generations {args.generations}: accepted: 1 or more")


def check_output_dir(path, flag: str) -> None:
    """``path`` is (or can be made) a writable folder: checked before the model loads, so a bad location
    costs nothing."""
    import tempfile
    from pathlib import Path

    p = Path(path)
    for parent in [p, *p.parents]:
        if parent.exists():
            if not parent.is_dir():
                where = "is a file" if parent == p else f"is under {str(parent)!r}, which is a file"
                raise CliError(f"{flag} {str(path)!r} {where}; accepted: a folder (it is created if missing)")
            break
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-test-"):
            pass
    except OSError as err:
        raise CliError(
            f"{flag} {str(path)!r} is not writable ({err.strerror or one_line(err)}); choose a folder you can write to"
        ) from None


def _resuming(args) -> bool:
    """Whether the run resumes: its ``--checkpoint-dir`` holds something."""
    ck = getattr(args, "checkpoint_dir", None)
    return bool(ck) and Path(ck).is_dir() and any(Path(ck).iterdir())


def _check_outputs(args) -> None:
    from pathlib import Path

    for flag, attr in (
        ("--results-dir", "results_dir"),
        ("--checkpoint-dir", "checkpoint_dir"),
        ("--save-uploads", "save_uploads"),
        ("--tensorboard-dir", "tensorboard_dir"),
    ):
        if getattr(args, attr, None):
            check_output_dir(getattr(args, attr), flag)
    resuming = _resuming(args)
    uploads = getattr(args, "save_uploads", None)
    if uploads and not args.overwrite and not resuming:
        held = sorted(p.name for p in Path(uploads).glob("round_*.npz"))
        if held:
            raise CliError(
                f"--save-uploads {uploads!r} already holds another run's uploads ({len(held)} files, {held[0]} …); "
                "pass --overwrite to replace them, --checkpoint-dir of that run to resume it, or another folder"
            )
    if args.results_dir and not args.overwrite:
        done = [n for n in ("metrics.json", "bbt.json") if (Path(args.results_dir) / n).exists()]
        if done and not resuming:
            raise CliError(
                f"--results-dir {args.results_dir!r} already holds a run's results ({done[0]}); pass "
                "--overwrite to replace them, --checkpoint-dir of that run to resume it, or another folder"
            )


def write_with_config(args, record: dict, results: dict) -> None:
    """The results files of a command that writes them once at its end (``bbt``, ``sweep``): ``results``
    (``{file name: JSON content or text}``) and ``config.json`` (``record``, :func:`config_record`, made
    before the run) in the results folder, one consistent set: the config is written with its results,
    never before them (a run that fails leaves no config describing results that do not exist), and a
    Ctrl-C / SIGTERM lands after all of them. ``simulate`` hands its record to
    :func:`fedbpt_jax.federated.run` instead, which writes it once a resume has been accepted."""
    if not args.results_dir:
        return
    from .checkpoint import write_json_atomic, write_text_atomic
    from .interrupts import deferred

    with deferred():
        for name, content in results.items():
            path = os.path.join(args.results_dir, name)
            write_text_atomic(path, content) if isinstance(content, str) else write_json_atomic(path, content)
        write_json_atomic(os.path.join(args.results_dir, "config.json"), record)


def cmd_bbt(args) -> int:
    import jax
    import numpy as np

    from . import bbt as bbt_lib
    from .cli_options import build, options

    def config(n_prompt: int):
        return build(bbt_lib.BBTConfig, args, options("bbt"), n_prompt_tokens=n_prompt)

    config(args.n_prompt or 1)  # validated before anything is loaded (n may come from the prompt start)
    lm, _, fed = load_inputs(args, num_clients=1, alpha=None)
    cfg = config(args.n_prompt)
    import dataclasses

    record = config_record(
        args,
        {
            "model": lm.name,
            "kind": lm.kind,
            "compute_dtype": str(lm.config.compute_dtype),
            "bbt_config": dataclasses.asdict(cfg),
            "dev_size": len(fed.dev.labels),
            "test_size": len(fed.test.labels),
            "data_source": data_identity(args, lm),
        },
    )
    train = jax.tree_util.tree_map(lambda a: np.asarray(a)[0], fed.train)
    result = bbt_lib.tune(jax.random.key(args.seed), lm, train, fed.spec, cfg, dev=fed.dev, progress=args.progress)
    from .objective import make_scorer

    ev = bbt_lib.Evaluator(lm, make_scorer(lm, args.layout, n_prompt_tokens=args.n_prompt), fed.test, fed.spec)
    manual = ev.metrics(None, None)
    z0 = ev.metrics(result.projection, np.zeros(args.d, np.float32))
    tuned = ev.metrics(result.projection, result.z)
    final = ev.metrics(result.projection, result.final_mean)
    dev_best = max(result.dev_history, key=lambda g: (g[1], -g[0]), default=(None, float("nan")))
    print(
        f"test accuracy  bare template (no prompt tokens): {manual['accuracy']:.4f}   "
        f"manual prompt (z=0): {z0['accuracy']:.4f}   "
        f"final (generation {args.generations}): {final['accuracy']:.4f}   "
        f"BBT dev-selected (generation {dev_best[0]}, dev {dev_best[1]:.4f}): {tuned['accuracy']:.4f}  "
        f"[{len(fed.test.labels)} test, {len(fed.dev.labels)} dev examples]"
    )
    write_with_config(
        args,
        record,
        {
            "bbt.json": {
                "args": vars(args),
                "manual": manual,
                "z0": z0,
                "final": final,
                "selected": tuned,
                "selected_generation": dev_best[0],
                "history": result.history,
                "dev_history": result.dev_history,
            }
        },
    )
    return 0


def _manual_accuracy(lm, fed, layout, n_prompt) -> float:
    """Test accuracy of the bare template (no prompt tokens); the manual prompt is z = 0 (the prompt start)."""
    from . import bbt as bbt_lib
    from .objective import make_scorer

    ev = bbt_lib.Evaluator(lm, make_scorer(lm, layout, n_prompt_tokens=n_prompt), fed.test, fed.spec)
    return ev.metrics(None, None)["accuracy"]


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def cmd_simulate(args) -> int:
    from . import federated as fl
    from .plan import prepare

    plan = prepare(args, "simulate")  # checks every option before the model loads
    mesh = client_mesh_for(args.devices)
    c = plan.algo.cost.comm
    print(
        f"{plan.algo.name}: N={args.clients} K={plan.config.clients_per_round} λ={args.population} "
        f"I={args.local_generations} d={args.d} | per client per round: {c.down_per_client} B down, "
        f"{c.up_per_client} B up (FedAvg of the full model: {c.fedavg_full_model_per_client / 1e6:.0f} MB each way)",
        flush=True,
    )
    hp = _tuned_hparams(args, plan, mesh) if args.tune_lr else plan.hp
    record = config_record(
        args,
        plan.resolved(
            hparams={k: float(v) for k, v in dataclasses.asdict(hp).items()},
            devices=1 if mesh is None else int(mesh.devices.size),
        ),
    )
    if args.save_uploads and args.overwrite and not _resuming(args):
        for old in Path(args.save_uploads).glob("round_*.npz"):  # --overwrite: another run's uploads go
            old.unlink()
    carry, hist = fl.run(
        plan.algo,
        plan.key_run,
        plan.data,
        plan.fed.test,
        plan.lm,
        plan.model,
        dev=plan.fed.dev,
        num_rounds=args.rounds,
        hp=hp,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        results_dir=args.results_dir,
        save_uploads=args.save_uploads,
        eval_every=args.eval_every,
        eval_chunk=args.eval_chunk,
        eval_cache_budget=int(args.eval_cache_gb * 2**30),
        mesh=mesh,
        progress=args.progress,
        tensorboard_dir=args.tensorboard_dir,
        plot=args.plot,
        keep_clean_context={"auto": None, "on": True, "off": False}[args.keep_clean_cache],
        run_config=record if args.results_dir else None,
    )
    _print_outcome(args, plan, hist, fl.summarize(hist, carry))
    return 0


def _tuned_hparams(args, plan, mesh):
    """``--tune-lr``: the hyperparameters with FedPrompt's learning rate picked on dev (one sweep over the
    rates, its lanes, not the clients, sharded over the devices); prints the rates' dev scores."""
    from . import federated as fl

    if args.algorithm != "fedprompt":
        raise ValueError(f"--tune-lr picks FedPrompt's learning rate; --algorithm is {args.algorithm!r}")
    grid = fl.LR_GRID if args.lr_grid is None else tuple(float(x) for x in args.lr_grid.split(","))
    lr, table = fl.tune_learning_rate(
        plan.algo,
        plan.key_run,
        plan.data,
        plan.fed.dev,
        plan.lm,
        plan.model,
        num_rounds=args.rounds,
        hp=plan.hp,
        grid=grid,
        eval_every=args.eval_every,
        eval_chunk=args.eval_chunk,
        eval_cache_budget=int(args.eval_cache_gb * 2**30),
        mesh=None if mesh is None else fl.lane_mesh(),
    )
    print(
        "learning rate on dev: "
        + "  ".join(f"{r['learning_rate']:g}: {_fmt(r['dev_accuracy'])}" for r in table)
        + f"  -> {lr:g}",
        flush=True,
    )
    return plan.hp.replace(learning_rate=lr)


def _print_outcome(args, plan, hist, s: dict) -> None:
    """The end of ``simulate``'s console output: the round's cost and time, the accuracies (bare template,
    manual prompt, final, dev-selected, the labelled best-on-test) and warnings of non-finite values."""
    fed = plan.fed
    last = hist.rounds[-1]
    print(
        f"per round: {last['forward_calls']} model forward calls over local batches, "
        f"{last['model_flops'] / 1e12:.2f} TFLOP, {last['active_clients']} active clients, "
        f"{last['bytes_up_per_client']} B up per client; "
        + (
            f"steady round time {last['seconds']:.1f}s"
            if len(hist.rounds) > args.eval_every
            else f"round time {last['seconds']:.1f}s (one segment: compilation included)"
        )
    )
    manual = _manual_accuracy(plan.lm, fed, args.layout, args.n_prompt)
    print(
        f"test accuracy  bare template (no prompt tokens): {manual:.4f}   "
        f"manual prompt (z=0, the prompt start): {s['initial_test_accuracy']:.4f}   "
        f"final (round {s['final_round']}): {s['final_test_accuracy']:.4f}   "
        f"dev-selected (round {s['selected_round']}, dev {_fmt(s['selected_dev_accuracy'])}): "
        f"{_fmt(s['selected_test_accuracy'])}  [{len(fed.test.labels)} test, {len(fed.dev.labels)} dev examples]"
    )
    print(
        f"reference-compatibility figure (best test accuracy over rounds, selected on test: optimistic): "
        f"{_fmt(s['best_test_reference'])} (round {s['best_test_reference_round']})"
    )
    if s["fitness_all_nonfinite"]:
        print(
            "warning: every client's fitness was non-finite in every round: the global prompt never moved",
            file=sys.stderr,
        )
    if s["nonfinite_evals"]:
        print(f"warning: {s['nonfinite_evals']} evaluation(s) were non-finite (NaN, never selected)", file=sys.stderr)


def _interrupted(args, err) -> int:
    """The one-line report of a Ctrl-C / SIGTERM: the last round whose results are on disk, how to resume."""
    from pathlib import Path

    from .interrupts import Interrupted

    status = err.exit_status if isinstance(err, Interrupted) else 130
    done = None
    if getattr(args, "results_dir", None) and (Path(args.results_dir) / "metrics.json").exists():
        try:
            rounds = json.loads((Path(args.results_dir) / "metrics.json").read_text()).get("rounds", [])
            done = rounds[-1]["round"] if rounds else 0
        except (OSError, ValueError, KeyError, IndexError):
            done = None
    where = f"interrupted after round {done}" if done is not None else "interrupted"
    if getattr(args, "checkpoint_dir", None):
        how = "; resume with the same command (it continues from the last checkpoint in --checkpoint-dir)"
    else:
        how = "; give --checkpoint-dir to make a run resumable"
    print(
        f"fedbpt-jax: {where}{' (results in ' + args.results_dir + ')' if done is not None else ''}{how}",
        file=sys.stderr,
    )
    return status


def _run_external(name: str, argv: list[str]) -> int:
    """``fedbpt-jax NAME ...`` for a sub-command in its own module: ``module.main(argv)``."""
    import importlib

    module, _ = EXTERNAL_COMMANDS[name]
    if not _external_available(module):
        print(
            f"fedbpt-jax: error: the {name!r} command needs {module}, which is not installed; accepted commands: "
            f"{', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    return importlib.import_module(module).main(argv)


def _with_config_file(parser, argv: list[str]) -> list[str]:
    """``argv`` with the sub-command first (``simulate``, or the one a ``--config`` file names), after
    applying the ``--config`` file's values as the sub-command's defaults (the command line overrides them).
    A bad file raises :class:`~fedbpt_jax.cli_options.ConfigFileError`."""
    from . import cli_options as co

    path = co.find_config_arg(argv)
    data = co.read_config_file(path) if path is not None else None
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = [(data and co.file_command(data)) or "simulate", *argv]
    if data is not None and argv[0] in COMMANDS:
        values = co.values_from_file(path, argv[0], co.options(argv[0]), data)
        parser.commands[argv[0]].set_defaults(**values)
    return argv


def parse(argv: list[str], parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The options of a command line (``--config`` file applied, the default command filled in), as
    :func:`main` sees them before it checks and runs them.

    Raises:
      fedbpt_jax.cli_options.ConfigFileError: a ``--config`` file that cannot be used.
      SystemExit: argparse's own errors (unknown flag, a value that is not a number, ...).
    """
    parser = build_parser() if parser is None else parser
    return parser.parse_args(_with_config_file(parser, list(argv)))


def debugging(argv=()) -> bool:
    """Whether errors show their traceback: ``--debug`` in ``argv`` or ``FEDBPT_JAX_DEBUG`` set (not 0)."""
    return "--debug" in argv or os.environ.get("FEDBPT_JAX_DEBUG", "") not in ("", "0")


def guarded(prog: str, args, command, on_interrupt) -> int:
    """Runs ``command(args)`` under the CLI's error contract: signals deferred while files are written
    (:mod:`fedbpt_jax.interrupts`), Ctrl-C/SIGTERM handed to ``on_interrupt(args, err)``, any other error one
    line on stderr and exit status 2 (with ``args.debug`` both raise instead)."""
    from .interrupts import install

    args.debug = args.debug or debugging()
    install()
    try:
        return command(args)
    except KeyboardInterrupt as err:
        if args.debug:
            raise
        return on_interrupt(args, err)
    except Exception as err:  # noqa: BLE001  (every error is one line unless --debug)
        if args.debug:
            raise
        expected = isinstance(err, (CliError, ValueError, KeyError, FileNotFoundError))
        hint = "" if expected else " (--debug shows the traceback)"
        print(f"{prog}: error: {one_line(err, 600)}{hint}", file=sys.stderr)
        return 2


def _command(args) -> int:
    check_args(args)
    _check_outputs(args)
    return {"simulate": cmd_simulate, "bbt": cmd_bbt}[args.command](args)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTERNAL_COMMANDS:
        return _run_external(argv[0], argv[1:])
    if argv and argv[0].startswith("-"):  # no command: a --config file may name one that lives in its own module
        from . import cli_options as co

        try:
            path = co.find_config_arg(argv)
            named = co.file_command(co.read_config_file(path)) if path is not None else None
        except ValueError as err:
            print(f"fedbpt-jax: error: {one_line(err, 1200)}", file=sys.stderr)
            return 2
        if named in EXTERNAL_COMMANDS:
            return _run_external(named, argv)
    parser = build_parser()
    try:
        args = parse(argv, parser)
    except ValueError as err:  # a --config file: one line naming the key and what is accepted
        if debugging(argv):
            raise
        print(f"fedbpt-jax: error: {one_line(err, 1200)}", file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 0
    return guarded("fedbpt-jax", args, _command, _interrupted)


if __name__ == "__main__":
    raise SystemExit(main())
