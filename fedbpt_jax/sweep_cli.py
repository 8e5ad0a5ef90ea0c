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
import os
import sys

from . import cli

ALGORITHMS = ("fedbpt", "fedavg_bbt", "centralized_bbt", "manual", "fedprompt")


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
    from .federated.sweep import HP_FIELDS

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


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep command's options (the model/task options are ``simulate``'s)."""
    cli._common(p, shots=16, n_prompt=5, d=500, test_size=300)
    for action in p._actions:  # --seed draws the shared data and projection; --seeds the lanes' keys
        if action.dest == "seed":
            action.help = ("seeds the few-shot draw, the partition, the test subset and the projection, shared by "
                           "every lane (default: %(default)s); the lanes' round keys come from --seeds")
    p.add_argument("--seeds", type=_ints, default=[0],
                   help="comma-separated seeds, one lane each per hyperparameter point (lane s runs its rounds from "
                        "jax.random.key(s); default: 0)")
    p.add_argument("--hp", action="append", default=None, metavar="NAME=V1,V2,...",
                   help="a swept hyperparameter (sigma0, perturb_rate, dropout_rate, learning_rate) and its values; "
                        "repeat for several. Without --grid the lists are zipped and must have one length")
    p.add_argument("--grid", action="store_true", help="sweep the cartesian product of the --hp lists")
    p.add_argument("--algorithm", default="fedbpt", choices=ALGORITHMS,
                   help="the federated algorithm or baseline (default: %(default)s)")
    p.add_argument("--prompt-start", default="auto",
                   help="the soft prompt at z = 0, as for simulate: 'zeros', 'tokens:…', 'phrase:…', a .npy file, "
                        "or 'auto' (default: the task's measured start for decoders, else 'zeros')")
    p.add_argument("--fedavg-perturb", action="store_true", help="FedAvg-BBT with FedBPT's perturbed fitness")
    p.add_argument("--clients", type=int, default=10, help="N clients (default: %(default)s)")
    p.add_argument("--per-round", type=int, default=None, help="K clients sampled per round (default: N)")
    p.add_argument("--alpha", type=float, default=1.0,
                   help="Dirichlet label-skew concentration; 0 means IID (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds per lane; a positive multiple of --eval-every (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=1,
                   help="rounds between evaluations of the global prompt (test and dev) (default: %(default)s)")
    p.add_argument("--population", type=int, default=5, help="local CMA-ES population λ (default: %(default)s)")
    p.add_argument("--local-generations", type=int, default=8, help="I (default: %(default)s)")
    p.add_argument("--no-perturb", action="store_true", help="plain local loss (no perturbation term)")
    p.add_argument("--fitness-form", default="ratio_of_means", choices=("ratio_of_means", "mean_of_ratios"))
    p.add_argument("--server", default="reference", choices=("reference", "paper"))
    p.add_argument("--client-keys", default="independent", choices=("independent", "shared"))
    p.add_argument("--norm-clip", action="store_true", help="the reference's ‖z‖ clip (off by default)")
    p.add_argument("--sigma-schedule", default="none", choices=("none", "clamp"))
    p.add_argument("--chunk-clients", type=int, default=2,
                   help="clients per vmapped chunk, bounds peak memory (0 = all K at once; default %(default)s)")
    p.add_argument("--keep-clean-cache", choices=("auto", "on", "off"), default="auto",
                   help="keep the clients' clean text-prefix caches across rounds (as for simulate)")
    p.add_argument("--sigma0", type=float, default=1.0, help="σ₀ where --hp does not sweep it (default: %(default)s)")
    p.add_argument("--perturb-rate", type=float, default=0.5, help="r_p where not swept (default: %(default)s)")
    p.add_argument("--dropout", type=float, default=0.0, help="client dropout where not swept (default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=0.3, help="FedPrompt's rate where not swept")
    p.add_argument("--devices", choices=("one", "all"), default="all",
                   help="'all' (default): shard the lanes over every device; 'one': the default device")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedbpt-jax sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def _check(args):
    """Checks everything that needs no model: the options, the hyperparameter points, the output folder."""
    from pathlib import Path

    from . import federated as fl

    def need(ok, msg):
        if not ok:
            raise cli.CliError(msg)

    need(args.test_size >= 0, f"--test-size {args.test_size}: accepted: 0 (the whole test set) or a positive count")
    need(args.shots >= 1, f"--shots {args.shots}: accepted: a positive number of examples per class")
    need(args.d >= 1, f"--d {args.d}: accepted: a positive intrinsic dimension")
    need(args.n_prompt is None or args.n_prompt >= 1, f"--n-prompt {args.n_prompt}: accepted: a positive token count")
    need(args.eval_every >= 1, f"--eval-every {args.eval_every}: accepted: a positive integer")
    need(args.rounds >= 1 and args.rounds % args.eval_every == 0,
         f"--rounds {args.rounds}: accepted: a positive multiple of --eval-every ({args.eval_every})")
    need(args.clients >= 1, f"--clients {args.clients}: accepted: a positive number of clients")
    need(args.per_round is None or 1 <= args.per_round <= args.clients,
         f"--per-round {args.per_round}: accepted: 1 to --clients ({args.clients}), or leave it out for all")
    need(args.alpha >= 0, f"--alpha {args.alpha}: accepted: a Dirichlet concentration > 0, or 0 for IID")
    need(args.population >= 2, f"--population {args.population}: accepted: 2 or more candidates")
    need(args.local_generations >= 1, f"--local-generations {args.local_generations}: accepted: 1 or more")
    need(args.chunk_clients >= 0, f"--chunk-clients {args.chunk_clients}: accepted: 0 (all at once) or more")
    base = fl.HParams(sigma0=args.sigma0, perturb_rate=args.perturb_rate, dropout_rate=args.dropout,
                      learning_rate=args.learning_rate)
    hp = parse_hp(args.hp)
    try:
        fl.hp_points(hp, grid=args.grid, base=base)
        _seeds(args.seeds)
    except ValueError as err:
        raise cli.CliError(f"{cli._one_line(err)}") from None
    if args.results_dir:
        cli._check_output_dir(args.results_dir, "--results-dir")
        if not args.overwrite and (Path(args.results_dir) / "sweep.json").exists():
            raise cli.CliError(f"--results-dir {args.results_dir!r} already holds a sweep's results (sweep.json); "
                               "pass --overwrite to replace them, or another folder")
    return hp, base


def _seeds(seeds):
    import importlib

    return importlib.import_module("fedbpt_jax.federated.sweep")._check_seeds(seeds)


def cmd_sweep(args) -> int:
    """Runs the sweep of parsed ``args`` (see :func:`add_arguments`); returns the exit status."""
    import dataclasses
    from pathlib import Path

    import jax

    from . import federated as fl
    from . import prompt
    from .checkpoint import _write_atomic
    from .federated.core import FederatedData, ModelInputs

    hp, base = _check(args)
    auto = args.prompt_start == "auto"
    start = None if auto else prompt.parse_start(args.prompt_start)
    lm = cli._load(args)
    if auto:
        start = cli._auto_start(args, lm)
    cli._n_prompt(args, lm, start)
    fed = cli._data(args, lm, num_clients=args.clients, alpha=None if not args.alpha else args.alpha)
    k = args.per_round or args.clients
    cfg = fl.FedConfig(num_clients=args.clients, clients_per_round=k, population_size=args.population,
                       local_generations=args.local_generations, intrinsic_dim=args.d, n_prompt_tokens=args.n_prompt,
                       loss=args.loss, perturb=not args.no_perturb, fitness_form=args.fitness_form,
                       server_variant=args.server, client_keys=args.client_keys, layout=args.layout,
                       chunk_clients=args.chunk_clients, norm_clip=args.norm_clip, sigma_schedule=args.sigma_schedule)
    key_proj, _ = jax.random.split(jax.random.key(args.seed))  # the projection simulate --seed draws
    model = ModelInputs.build(key_proj, lm, cfg, start=start)
    kwargs = {"perturb": True} if args.algorithm == "fedavg_bbt" and args.fedavg_perturb else {}
    algo = fl.make(args.algorithm, cfg, lm, **kwargs)
    mesh = fl.lane_mesh() if args.devices == "all" and len(jax.devices()) > 1 else None
    points = fl.hp_points(hp, grid=args.grid, base=base)
    print(f"{algo.name}: {len(args.seeds)} seed(s) x {len(points)} hyperparameter point(s) = "
          f"{len(args.seeds) * len(points)} lanes, {args.rounds} rounds each, one compiled program"
          f"{f' over {mesh.devices.size} devices' if mesh is not None else ''}", flush=True)
    cli._write_config(args, {"model": lm.name, "kind": lm.kind, "compute_dtype": str(lm.config.compute_dtype),
                             "prompt_start": start.describe(), "n_prompt": args.n_prompt, "algorithm": algo.name,
                             "fed_config": dataclasses.asdict(cfg), "seeds": args.seeds, "hp": hp, "grid": args.grid,
                             "points": points, "train_counts": fed.train_counts.tolist(),
                             "dev_size": len(fed.dev.labels), "test_size": len(fed.test.labels)})
    res = fl.sweep(algo, FederatedData.from_host(fed), fed.test, lm, model, seeds=args.seeds, hp=hp, grid=args.grid,
                   base=base, dev=fed.dev, num_rounds=args.rounds, eval_every=args.eval_every, mesh=mesh,
                   keep_clean_context={"auto": None, "on": True, "off": False}[args.keep_clean_cache])
    table = res.markdown()
    print(f"test accuracy over {len(args.seeds)} seed(s) per point (mean ± sample std; dev-selected: "
          f"{res.selection_rule}) [{len(fed.test.labels)} test, {len(fed.dev.labels)} dev examples]")
    print(table, end="")
    if args.results_dir:
        res.write(Path(args.results_dir) / "sweep.json")
        _write_atomic(Path(args.results_dir) / "sweep.md", table)
    bad = sum(r["nonfinite_evals"] for r in res.lanes)
    if bad:
        print(f"warning: {bad} evaluation(s) over all lanes were non-finite (NaN, never selected)", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """``fedbpt-jax sweep`` on its own: parses ``argv`` (without the word ``sweep``), runs, returns the exit
    status (2 with a one-line message for a bad input; ``--debug`` shows the traceback)."""
    from .interrupts import install

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("FEDBPT_JAX_DEBUG", "") not in ("", "0")
    args.debug = debug
    install()
    try:
        return cmd_sweep(args)
    except KeyboardInterrupt as err:
        if debug:
            raise
        print("fedbpt-jax sweep: interrupted (a sweep is one program: no results were written)", file=sys.stderr)
        return getattr(err, "exit_status", 130)
    except Exception as err:  # noqa: BLE001  (every error is one line unless --debug)
        if debug:
            raise
        hint = "" if isinstance(err, (cli.CliError, ValueError, KeyError, FileNotFoundError)) else \
            " (--debug shows the traceback)"
        print(f"fedbpt-jax sweep: error: {cli._one_line(err, 600)}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
