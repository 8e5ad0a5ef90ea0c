"""``fedbpt-jax sweep``: seeds × hyperparameters of one algorithm as one compiled program.

    fedbpt-jax sweep --seeds 0,1,2 --hp sigma0=0.5,1.0 --hp perturb_rate=0.3,0.6 [--grid] [model/task options]

Every lane (seed, hyperparameter point) runs the same rounds, evaluations and dev selection as ``simulate``
(see :func:`fedbpt_jax.federated.sweep`); the data, the partition, the test subset and the projection are
drawn once from ``--seed`` and shared by every lane, and lane ``s`` of ``--seeds`` runs its rounds from
``jax.random.key(s)``. Without ``--grid`` the ``--hp`` lists are zipped (all the same length); with it, their
cartesian product. Prints a markdown table of mean ± std over the seeds per hyperparameter point;
``--results-dir`` receives ``sweep.json`` (every lane's curves and figures), ``sweep.md`` and ``config.json``.

:func:`add_arguments` and :func:`cmd_sweep` let the main ``fedbpt-jax`` parser host this command;
:func:`main` runs it on its own.
"""

from __future__ import annotations

import argparse
import sys

from . import cli


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: accepted: comma-separated integers, e.g. 0,1,2") from None
    if not out:
        raise argparse.ArgumentTypeError(f"{text!r}: accepted: comma-separated integers, e.g. 0,1,2")
    return out


def parse_hp(items: list[str] | None) -> dict[str, list[float]]:
    """``["sigma0=0.5,1.0", "perturb_rate=0.3"]`` → ``{"sigma0": [0.5, 1.0], "perturb_rate": [0.3]}``
    (a dash in a name counts as an underscore).

    Raises:
      cli.CliError: naming the bad item and the accepted form and names.
    """
    from .federated.lanes import HP_FIELDS

    out: dict[str, list[float]] = {}
    for item in items or []:
        name, sep, values = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise cli.CliError(f"--hp {item!r}: accepted: NAME=V1,V2,... with NAME one of {', '.join(HP_FIELDS)}")
        if name not in HP_FIELDS:
            raise cli.CliError(f"--hp {item!r}: unknown hyperparameter {name!r}; accepted: {', '.join(HP_FIELDS)}")
        if name in out:
            raise cli.CliError(f"--hp {item!r}: {name} is given twice; give all its values in one --hp {name}=V1,V2")
        try:
            vals = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise cli.CliError(f"--hp {item!r}: the values must be numbers separated by commas") from None
        if not vals:
            raise cli.CliError(f"--hp {item!r}: no values; accepted: {name}=V1,V2,...")
        out[name] = vals
    return out


def add_arguments(p: argparse.ArgumentParser) -> list:
    """The sweep command's options, derived like ``simulate``'s (:mod:`fedbpt_jax.cli_options`: the model and
    task options, every ``FedConfig`` and ``HParams`` field, ``simulate``'s algorithm options and
    :class:`~fedbpt_jax.cli_options.SweepOptions`), plus ``--hp`` and ``--config``; returns the derived options."""
    from . import cli_options as co

    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="read options from a TOML, YAML or JSON file whose keys are the option names (and 'hp': a "
        "mapping of names to value lists, or a list of 'NAME=V1,V2' strings); the command line "
        "overrides it. A sweep's own results/config.json reproduces that sweep's settings",
    )
    opts = co.add_options(p, "sweep")
    p.add_argument(
        "--hp",
        action="append",
        default=None,
        metavar="NAME=V1,V2,...",
        help="a swept hyperparameter (any HParams field: sigma0, perturb_rate, dropout_rate, "
        "learning_rate) and its values; repeat for several. Without --grid the lists are zipped and "
        "must have one length",
    )
    p.set_defaults(command="sweep")
    return opts


def _hp_from_file(value, where: str) -> list[str]:
    """A config file's ``hp``: a mapping ``{name: [values]}`` or a list of ``"NAME=V1,V2"`` strings, as the
    ``--hp`` items they stand for."""
    if isinstance(value, dict):
        items = []
        for name, vals in value.items():
            vals = vals if isinstance(vals, list) else [vals]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                raise cli.CliError(f"{where}: key 'hp': {name!r}: {vals!r} is not a list of numbers")
            items.append(f"{name}=" + ",".join(repr(float(v)) for v in vals))
        return items
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise cli.CliError(
        f"{where}: key 'hp': {value!r} ({type(value).__name__}) is not accepted; accepted: a mapping "
        "of hyperparameter names to value lists, or a list of 'NAME=V1,V2' strings"
    )


def _apply_config(p: argparse.ArgumentParser, opts: list, argv: list[str]) -> None:
    """Sets ``p``'s defaults from a ``--config`` file in ``argv`` (the command line overrides them)."""
    from . import cli_options as co

    path = co.find_config_arg(argv)
    if path is None:
        return
    data = co.read_config_file(path)
    where = f"--config {str(path)!r}"
    record = co.is_run_record(data)
    items = dict(data["args"] if record else data)
    hp = items.pop("hp", None)
    if record:
        items.pop("debug", None)
        data = {**data, "args": items}
    else:
        data = items
    values = co.values_from_file(path, "sweep", opts, data)
    if hp is not None:
        values["hp"] = _hp_from_file(hp, where)
    p.set_defaults(**values)


def build_parser() -> argparse.ArgumentParser:
    from .cli_options import OneLineParser

    p = OneLineParser(
        prog="fedbpt-jax sweep",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.options = add_arguments(p)
    return p


def _check(args):
    """Checks everything that needs no model: the options, the hyperparameter points, the output folder."""
    from pathlib import Path

    from . import federated as fl
    from . import plan

    cli.check_args(args)  # the same checks and messages as simulate's
    try:
        seeds = _ints(args.seeds) if isinstance(args.seeds, str) else list(args.seeds)
    except argparse.ArgumentTypeError as err:
        raise cli.CliError(f"--seeds {err}") from None
    hp = parse_hp(args.hp)
    try:
        base = plan.check(args, "sweep")
        fl.hp_points(hp, grid=args.grid, base=base)
        _seeds(seeds)
        cfg = plan.fed_config(args, "sweep", args.n_prompt or 1)  # n: maybe the start's, once the model loads
        name = plan.algorithm_name(args)
        _check_swept(name, fl.hparams_read(name, cfg), list(hp))
    except ValueError as err:
        raise cli.CliError(f"{cli.one_line(err)}") from None
    if args.results_dir:
        cli.check_output_dir(args.results_dir, "--results-dir")
        if not args.overwrite and (Path(args.results_dir) / "sweep.json").exists():
            raise cli.CliError(
                f"--results-dir {args.results_dir!r} already holds a sweep's results (sweep.json); "
                "pass --overwrite to replace them, or another folder"
            )
    return hp, base, seeds


def _check_swept(name, reads, swept):
    from .federated.lanes import check_swept

    check_swept(name, reads, swept)


def _seeds(seeds):
    from .federated.lanes import check_seeds

    return check_seeds(seeds)


def cmd_sweep(args) -> int:
    """Runs the sweep of parsed ``args`` (see :func:`add_arguments`); returns the exit status."""
    from .federated.records import claim

    checked = _check(args)  # before the folder is claimed (created): a bad location is a one-line error
    with claim(args.results_dir):  # one sweep (or run) writes a folder at a time
        return _sweep(args, checked)


def _sweep(args, checked) -> int:
    """:func:`cmd_sweep` once it holds its results folder (``checked``: :func:`_check`'s result)."""
    import jax

    from . import federated as fl
    from .plan import prepare

    hp, base, seeds = checked
    p = prepare(args, "sweep")  # the model, data, projection and algorithm simulate --seed would use
    algo, fed = p.algo, p.fed
    mesh = fl.lane_mesh() if args.lanes == "all" and len(jax.devices()) > 1 else None
    points = fl.hp_points(hp, grid=args.grid, base=base)
    print(
        f"{algo.name}: {len(seeds)} seed(s) x {len(points)} hyperparameter point(s) = "
        f"{len(seeds) * len(points)} lanes, {args.rounds} rounds each, one compiled program"
        f"{f' over {mesh.devices.size} devices' if mesh is not None else ''}",
        flush=True,
    )
    record = cli.config_record(args, p.resolved(seeds=seeds, hp=hp, grid=args.grid, points=points))
    res = fl.sweep(
        algo,
        p.data,
        fed.test,
        p.lm,
        p.model,
        seeds=seeds,
        hp=hp,
        grid=args.grid,
        base=base,
        dev=fed.dev,
        num_rounds=args.rounds,
        eval_every=args.eval_every,
        eval_chunk=args.eval_chunk,
        eval_cache_budget=int(args.eval_cache_gb * 2**30),
        mesh=mesh,
        keep_clean_context={"auto": None, "on": True, "off": False}[args.keep_clean_cache],
    )
    table = res.markdown()
    print(
        f"test accuracy over {len(seeds)} seed(s) per point (mean ± sample std; dev-selected: "
        f"{res.selection_rule}) [{len(fed.test.labels)} test, {len(fed.dev.labels)} dev examples]"
    )
    print(table, end="")
    cli.write_with_config(args, record, {"sweep.json": res.to_json(), "sweep.md": table})
    bad = sum(r["nonfinite_evals"] for r in res.lanes)
    if bad:
        print(f"warning: {bad} evaluation(s) over all lanes were non-finite (NaN, never selected)", file=sys.stderr)
    return 0


def _interrupted(args, err) -> int:
    print("fedbpt-jax sweep: interrupted (a sweep is one program: no results were written)", file=sys.stderr)
    return getattr(err, "exit_status", 130)


def main(argv=None) -> int:
    """``fedbpt-jax sweep`` on its own: parses ``argv`` (without the word ``sweep``), runs, returns the exit
    status (2 with a one-line message for a bad input; ``--debug`` shows the traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        _apply_config(parser, parser.options, argv)
    except ValueError as err:  # a --config file: one line naming the key and what is accepted
        if cli.debugging(argv):
            raise
        print(f"fedbpt-jax sweep: error: {cli.one_line(err, 1200)}", file=sys.stderr)
        return 2
    return cli.guarded("fedbpt-jax sweep", parser.parse_args(argv), cmd_sweep, _interrupted)


if __name__ == "__main__":
    raise SystemExit(main())
