"""fedbpt-jax: federated black-box prompt tuning (FedBPT) simulations on a frozen language model.

``fedbpt-jax`` with no arguments runs the embedded default (about 6-8 minutes on 2 CPU cores): a FedBPT
simulation of SmolLM2-135M-Instruct on Rotten Tomatoes review snippets (both fetched from the package
registry, no hub needed), 10 clients with Dirichlet label skew, and prints the test accuracy of the bare
template, of the manual prompt (z = 0), of the final and of the dev-selected global prompt (and, labelled
as such, the reference code's optimistic best-on-test).

Sub-commands:

* ``fedbpt-jax simulate [...]`` — any algorithm (fedbpt, fedavg_bbt, centralized_bbt, manual, fedprompt)
  on any model/task/data source (the default command is ``simulate`` with its defaults);
* ``fedbpt-jax bbt [...]`` — centralized BBT with dev-set selection (the same pycma-faithful CMA-ES as
  ``simulate --algorithm centralized_bbt``).
* ``fedbpt-jax report RUN_DIR...`` — tables and plots comparing finished runs' results folders, mean ± std
  over seeds (see :mod:`fedbpt_jax.report`).

Run ``fedbpt-jax simulate --help`` for every option. Errors are one line; ``--debug`` (or the environment
variable ``FEDBPT_JAX_DEBUG=1``) shows the full traceback. Ctrl-C or SIGTERM stops cleanly after the files
being written are complete (exit status 130 / 143).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# transformers announces at import that PyTorch is missing; this package never needs it.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _common(p: argparse.ArgumentParser, *, shots: int, n_prompt: int, d: int, test_size: int) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="registry name, hub id, local HF directory or .gguf file (default: %(default)s, offline)")
    p.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16", "auto"),
                   help="matmul precision of the backbone (default: %(default)s): 'bfloat16' stores weights and "
                        "feeds matmuls in bfloat16 with float32 accumulation; 'auto' picks the faster of the two "
                        "here (bfloat16 on GPU/TPU and on CPUs whose bfloat16 matmuls measure clearly faster). "
                        "bfloat16 changes fitness by ~1%% relative, enough to reorder close candidates")
    p.add_argument("--task", default="rotten_tomatoes", help="task name (default: %(default)s, embedded data)")
    p.add_argument("--data", default=None,
                   help="data source: a folder like ../shared/data, a csv/tsv/json/parquet file, a hub name, "
                        "'hub' or 'embedded' (default: the task's offline default)")
    p.add_argument("--shots", type=int, default=shots, help="few-shot examples per class (default: %(default)s)")
    p.add_argument("--n-prompt", type=int, default=None,
                   help=f"soft prompt tokens (default: the prompt start's token count, else {n_prompt})")
    p.add_argument("--d", type=int, default=d, help="intrinsic dimension d (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate each example's text part to this many tokens (default: no truncation, the "
                        "text is padded to the longest example; an example that does not fit the model's context "
                        "with the prompt and cue is an error that gives the largest value that fits)")
    p.add_argument("--layout", default=None,
                   help="prompt placement: decoders 'after' (default, prefix cache) or 'before' (paper); "
                        "encoders 'add' (default) or 'cat'")
    p.add_argument("--style", default=None,
                   help="decoder template style: 'completion' (default), 'chat', or 'bbt' (BBT's own template "
                        "'{text} It was' + ' terrible'/' great'; sentiment tasks)")
    p.add_argument("--template", default=None,
                   help="replace the template: decoders the text part of --style's template (with {text}, or "
                        "{text_a} and {text_b}), encoders BBT's template (with {prompt}, {mask} and the text slots)")
    p.add_argument("--cue", default=None, help="decoders: replace the answer cue (what precedes the label word)")
    p.add_argument("--verbalizer", default=None,
                   help="replace the label words, one per class separated by '|', spelled as they follow the cue "
                        "(e.g. ' bad| good')")
    p.add_argument("--first-token", action="store_true",
                   help="score a label word of several tokens by its first token (default: such a word is an error)")
    p.add_argument("--loss", default="ce", choices=("ce", "hinge", "accuracy"),
                   help="local loss of the label-word logits (default: %(default)s)")
    p.add_argument("--test-size", type=int, default=test_size,
                   help="evaluate on a seeded subset of this many test examples (0 = all; default %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the few-shot draw, the partition, the test subset, the projection and every "
                        "round's keys (default: %(default)s)")
    p.add_argument("--results-dir", default=None,
                   help="write config.json, metrics.json and rounds.csv here (atomically); checked before the "
                        "model loads; a folder that already holds a run's results is refused unless --overwrite "
                        "(or --checkpoint-dir resumes that run)")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --results-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="fedbpt-jax", description="\n\n".join(__doc__.split("\n\n")[:2]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command")
    sim = sub.add_parser("simulate", help="run a federated simulation (the default command)")
    _common(sim, shots=16, n_prompt=5, d=500, test_size=300)
    sim.add_argument("--algorithm", default="fedbpt",
                     choices=("fedbpt", "fedavg_bbt", "centralized_bbt", "manual", "fedprompt"),
                     help="the federated algorithm or baseline (default: %(default)s)")
    sim.add_argument("--prompt-start", default="auto",
                     help="the soft prompt at z = 0 (and the manual baseline's prompt): 'zeros', "
                          "'tokens:<id>,<id>,...', 'phrase:<text>' (its token count sets --n-prompt) or a .npy "
                          "file of shape [n, hidden]; 'auto' (default): the task's measured start for decoders "
                          "(movie-review tasks: 'phrase: (movie review)'), else 'zeros'")
    sim.add_argument("--fedavg-perturb", action="store_true",
                     help="FedAvg-BBT with FedBPT's perturbation-regularised local fitness (default: plain loss)")
    sim.add_argument("--clients", type=int, default=10, help="N clients (default: %(default)s)")
    sim.add_argument("--per-round", type=int, default=None, help="K clients sampled per round (default: N)")
    sim.add_argument("--alpha", type=float, default=1.0,
                     help="Dirichlet label-skew concentration; 0 means IID (default: %(default)s, the paper's)")
    sim.add_argument("--rounds", type=int, default=5,
                     help="communication rounds; a positive multiple of --eval-every (default: %(default)s)")
    sim.add_argument("--population", type=int, default=5, help="local CMA-ES population λ (default: %(default)s)")
    sim.add_argument("--local-generations", type=int, default=8, help="I (default: %(default)s)")
    sim.add_argument("--perturb-rate", type=float, default=0.5, help="r_p (default: %(default)s, reference)")
    sim.add_argument("--no-perturb", action="store_true", help="plain local loss (no perturbation term)")
    sim.add_argument("--fitness-form", default="ratio_of_means", choices=("ratio_of_means", "mean_of_ratios"),
                     help="how the clean and perturbed losses combine into a fitness (default: %(default)s, "
                          "the reference code's)")
    sim.add_argument("--server", default="reference", choices=("reference", "paper"),
                     help="the server CMA-ES step's σ' (default: %(default)s code's; 'paper': the paper's formula)")
    sim.add_argument("--client-keys", default="independent", choices=("independent", "shared"),
                     help="clients' random keys: independent (default) or the reference's shared draws")
    sim.add_argument("--dropout", type=float, default=0.0,
                     help="client dropout probability per round (default: %(default)s)")
    sim.add_argument("--sigma0", type=float, default=1.0,
                     help="initial server σ (accepted: [1e-6, 1e3]; default: %(default)s)")
    sim.add_argument("--learning-rate", type=float, default=0.3, help="FedPrompt's local Adam rate (default: %(default)s)")
    sim.add_argument("--tune-lr", action="store_true",
                     help="FedPrompt: pick the learning rate on the dev set from --lr-grid first (one run per value, "
                          "test set untouched), then run with it")
    sim.add_argument("--lr-grid", default=None,
                     help="comma-separated learning rates for --tune-lr (default: 0.001,0.003,0.01,0.03,0.1,0.3)")
    sim.add_argument("--norm-clip", action="store_true",
                     help="stabiliser (off by default): the reference's norm_prompt clip of ‖z‖, threshold 15, "
                          "+1 per round while the global ‖z‖ < 20")
    sim.add_argument("--sigma-schedule", default="none", choices=("none", "clamp"),
                     help="stabiliser for the server σ: 'none' (default, the reference's behaviour) or 'clamp' "
                          "(what the reference's no-op clamps intend: never above the previous σ, floor 0.5)")
    sim.add_argument("--save-uploads", default=None,
                     help="save every round's client uploads (means, fitness, σ histories) as .npz files in this "
                          "folder, to replay other aggregations (fedbpt, fedavg_bbt)")
    sim.add_argument("--eval-every", type=int, default=1,
                     help="rounds per compiled segment; the global prompt is evaluated (test and dev) after each "
                          "(default: %(default)s; --rounds must be a multiple of it)")
    sim.add_argument("--chunk-clients", type=int, default=2,
                     help="clients per vmapped chunk, bounds peak memory (0 = all K at once; default %(default)s)")
    sim.add_argument("--keep-clean-cache", choices=("auto", "on", "off"), default="auto",
                     help="keep each client's clean text-prefix cache across rounds (FedBPT, FedAvg-BBT; decoder, "
                          "layout 'after'): one prefix pass less per client per round, at ~46 KB per text token "
                          "with SmolLM2 in float32; 'auto' (default): when it fits 1 GiB and rounds x K >= N")
    sim.add_argument("--checkpoint-dir", default=None, help="orbax checkpoints; resumes if present")
    bbt = sub.add_parser("bbt", help="centralized black-box tuning with dev-set selection")
    _common(bbt, shots=16, n_prompt=5, d=500, test_size=500)
    bbt.add_argument("--population", type=int, default=10, help="CMA-ES population λ (default: %(default)s)")
    bbt.add_argument("--generations", type=int, default=30, help="CMA-ES generations (default: %(default)s)")
    bbt.add_argument("--eval-every", type=int, default=10,
                     help="generations between dev-set evaluations (default: %(default)s)")
    bbt.add_argument("--sigma0", type=float, default=1.0, help="initial σ (accepted: [1e-6, 1e3]; default: %(default)s)")
    for p in (sim, bbt):
        p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


class CliError(ValueError):
    """A bad command line or input, reported as one line (exit status 2)."""


def _one_line(err: BaseException, limit: int = 400) -> str:
    """An exception's message on one line (its type when it has none), shortened to ``limit`` characters."""
    msg = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, KeyError) and msg.startswith("'") and msg.endswith("'"):
        msg = msg[1:-1]
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


def _check_args(args) -> None:
    """Values argparse accepts but no run could use: an error naming the value, before anything loads."""
    def need(ok, msg):
        if not ok:
            raise CliError(msg)

    need(args.test_size >= 0, f"--test-size {args.test_size}: accepted: 0 (the whole test set) or a positive count")
    need(args.shots >= 1, f"--shots {args.shots}: accepted: a positive number of examples per class")
    need(args.d >= 1, f"--d {args.d}: accepted: a positive intrinsic dimension")
    need(args.max_length is None or args.max_length >= 1,
         f"--max-length {args.max_length}: accepted: a positive token count, or leave it out for no truncation")
    need(args.n_prompt is None or args.n_prompt >= 1, f"--n-prompt {args.n_prompt}: accepted: a positive token count")
    need(args.eval_every >= 1, f"--eval-every {args.eval_every}: accepted: a positive integer")
    need(args.layout is None or args.layout in ("after", "before", "add", "cat"),
         f"--layout {args.layout!r}: accepted: 'after' or 'before' (decoders), 'add' or 'cat' (encoders)")
    need(args.style is None or args.style in ("completion", "chat", "bbt"),
         f"--style {args.style!r}: accepted: 'completion', 'chat' or 'bbt' (decoders)")
    need(args.population >= 2, f"--population {args.population}: accepted: 2 or more candidates")
    if args.command == "simulate":
        need(args.clients >= 1, f"--clients {args.clients}: accepted: a positive number of clients")
        need(args.per_round is None or 1 <= args.per_round <= args.clients,
             f"--per-round {args.per_round}: accepted: 1 to --clients ({args.clients}), or leave it out for all")
        need(args.rounds >= 1 and args.rounds % args.eval_every == 0,
             f"--rounds {args.rounds}: accepted: a positive multiple of --eval-every ({args.eval_every})")
        need(args.alpha >= 0, f"--alpha {args.alpha}: accepted: a Dirichlet concentration > 0, or 0 for IID")
        need(args.local_generations >= 1, f"--local-generations {args.local_generations}: accepted: 1 or more")
        need(args.chunk_clients >= 0, f"--chunk-clients {args.chunk_clients}: accepted: 0 (all at once) or more")
    else:
        need(args.generations >= 1, f"--generations {args.generations}: accepted: 1 or more")


def _check_output_dir(path, flag: str) -> None:
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
        raise CliError(f"{flag} {str(path)!r} is not writable ({err.strerror or _one_line(err)}); "
                       "choose a folder you can write to") from None


def _check_outputs(args) -> None:
    from pathlib import Path

    for flag, attr in (("--results-dir", "results_dir"), ("--checkpoint-dir", "checkpoint_dir"),
                       ("--save-uploads", "save_uploads")):
        if getattr(args, attr, None):
            _check_output_dir(getattr(args, attr), flag)
    if args.results_dir and not args.overwrite:
        done = [n for n in ("metrics.json", "bbt.json") if (Path(args.results_dir) / n).exists()]
        resuming = getattr(args, "checkpoint_dir", None) and any(Path(args.checkpoint_dir).iterdir())
        if done and not resuming:
            raise CliError(f"--results-dir {args.results_dir!r} already holds a run's results ({done[0]}); pass "
                           "--overwrite to replace them, --checkpoint-dir of that run to resume it, or another folder")


def _git_revision() -> str | None:
    import subprocess
    from pathlib import Path

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _write_config(args, resolved: dict) -> None:
    """``config.json`` in the results folder: the command line, every option, what was resolved from it, the
    package versions and the git revision."""
    if not args.results_dir:
        return
    import importlib.metadata as md

    from .checkpoint import write_json_atomic

    versions = {}
    for name in ("fedbpt-jax", "jax", "jaxlib", "flax", "evosax", "optax", "transformers", "numpy", "orbax-checkpoint"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    write_json_atomic(os.path.join(args.results_dir, "config.json"),
                      {"command": ["fedbpt-jax", *sys.argv[1:]], "args": vars(args), "resolved": resolved,
                       "versions": versions, "git_revision": _git_revision()})


def _load(args):
    from . import models

    t0 = time.perf_counter()
    try:
        lm = models.load(args.model, compute_dtype=args.compute_dtype)
    except Exception as err:  # noqa: BLE001  (any failure to load is the model argument's problem)
        if getattr(args, "debug", False):
            raise
        raise CliError(f"cannot load model {args.model!r}: {_one_line(err).rstrip('.')}. --model takes a registry "
                       "name (e.g. smollm2-135m-instruct), a local Hugging Face folder (config.json, *.safetensors, "
                       "tokenizer), a .gguf file, or a hub id (needs network access)") from None
    print(f"model {lm.name}: {lm.kind}, {lm.num_params() / 1e6:.1f}M parameters, {lm.config.compute_dtype} "
          f"(loaded in {time.perf_counter() - t0:.1f}s)", flush=True)
    return lm


def _data(args, lm, *, num_clients: int, alpha):
    from . import data as data_lib

    kw = dict(num_clients=num_clients, shots_per_class=args.shots, alpha=alpha, seed=args.seed,
              n_prompt=args.n_prompt, source=args.data, style=args.style, first_token=args.first_token,
              max_length=args.max_length,
              test_size=args.test_size or None, max_positions=getattr(lm.config, "max_position_embeddings", None))
    try:
        fed = data_lib.federated(_task(args, lm), lm.tokenizer, lm.kind, **kw)
    except Exception as err:  # noqa: BLE001
        if getattr(args, "debug", False):
            raise
        # The data layer's ValueErrors already say what is accepted; anything else gets the general answer.
        hint = "" if isinstance(err, ValueError) and not isinstance(err, UnicodeError) else (
            ". --data takes a folder like ../shared/data, a non-empty csv/tsv/json/parquet file with a header row, "
            "'embedded', or a hub name (needs network access)")
        raise CliError(f"task {args.task!r}, data {args.data or 'default source'!r}: {_one_line(err)}{hint}") from None
    print(f"task {args.task}: {int(fed.train_counts.sum())} train examples over {num_clients} client(s) "
          f"(counts {fed.train_counts.tolist() if num_clients <= 20 else '…'}), {len(fed.dev.labels)} dev, "
          f"{len(fed.test.labels)} test", flush=True)
    return fed


def _task(args, lm):
    """The task, with --template/--cue/--verbalizer applied."""
    from . import tasks

    task = tasks.get(args.task)
    if args.template is None and args.cue is None and args.verbalizer is None:
        return task
    words = None if args.verbalizer is None else tuple(args.verbalizer.split("|"))
    style = args.style if lm.kind == "decoder" else None
    return tasks.override(task, kind=lm.kind, style=style, template=args.template, cue=args.cue, label_words=words)


def _n_prompt(args, lm, start=None, default: int = 5) -> None:
    """Sets ``args.n_prompt``: as given, else the start's token count, else ``default``."""
    from . import prompt

    if args.n_prompt is None:
        args.n_prompt = prompt.start_length(start, lm.tokenizer) or default


def _auto_start(args, lm):
    """``--prompt-start auto``: the task's measured decoder start (``Task.decoder_prompt_start``), unless the
    backbone is an encoder (BBT's placeholders: "zeros" in "add" mode), the task has none, or an explicit
    ``--n-prompt`` differs from its token count (then "zeros", said on the console)."""
    from . import prompt, tasks

    chosen = tasks.get(args.task).decoder_prompt_start if lm.kind == "decoder" else None
    if chosen is None:
        return prompt.parse_start("zeros")
    length = prompt.start_length(chosen, lm.tokenizer)
    if args.n_prompt is not None and args.n_prompt != length:
        print(f"prompt start: --n-prompt {args.n_prompt} differs from the task's default start {chosen!r} "
              f"({length} tokens): using 'zeros'", flush=True)
        return prompt.parse_start("zeros")
    return prompt.parse_start(chosen)


def cmd_bbt(args) -> int:
    import jax
    import numpy as np

    from . import bbt as bbt_lib

    def config(n_prompt: int):
        return bbt_lib.BBTConfig(intrinsic_dim=args.d, n_prompt_tokens=n_prompt, population_size=args.population,
                                 num_generations=args.generations, sigma0=args.sigma0, loss=args.loss,
                                 layout=args.layout, eval_every=args.eval_every)

    config(args.n_prompt or 1)  # validated before anything is loaded (n may come from the prompt start)
    lm = _load(args)
    _n_prompt(args, lm)
    cfg = config(args.n_prompt)
    fed = _data(args, lm, num_clients=1, alpha=None)
    import dataclasses

    _write_config(args, {"model": lm.name, "kind": lm.kind, "compute_dtype": str(lm.config.compute_dtype),
                         "bbt_config": dataclasses.asdict(cfg), "dev_size": len(fed.dev.labels),
                         "test_size": len(fed.test.labels)})
    train = jax.tree_util.tree_map(lambda a: np.asarray(a)[0], fed.train)
    result = bbt_lib.tune(jax.random.key(args.seed), lm, train, fed.spec, cfg, dev=fed.dev,
                          progress=not args.no_progress)
    from .objective import make_scorer

    ev = bbt_lib.Evaluator(lm, make_scorer(lm, args.layout, n_prompt_tokens=args.n_prompt), fed.test, fed.spec)
    manual = ev.metrics(None, None)
    z0 = ev.metrics(result.projection, np.zeros(args.d, np.float32))
    tuned = ev.metrics(result.projection, result.z)
    final = ev.metrics(result.projection, result.final_mean)
    dev_best = max(result.dev_history, key=lambda g: (g[1], -g[0]), default=(None, float("nan")))
    print(f"test accuracy  bare template (no prompt tokens): {manual['accuracy']:.4f}   "
          f"manual prompt (z=0): {z0['accuracy']:.4f}   "
          f"final (generation {args.generations}): {final['accuracy']:.4f}   "
          f"BBT dev-selected (generation {dev_best[0]}, dev {dev_best[1]:.4f}): {tuned['accuracy']:.4f}  "
          f"[{len(fed.test.labels)} test, {len(fed.dev.labels)} dev examples]")
    if args.results_dir:
        from .checkpoint import write_json_atomic

        write_json_atomic(os.path.join(args.results_dir, "bbt.json"),
                          {"args": vars(args), "manual": manual, "z0": z0, "final": final, "selected": tuned,
                           "selected_generation": dev_best[0], "history": result.history,
                           "dev_history": result.dev_history})
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
    import jax

    from . import federated as fl
    from . import prompt
    from .federated.core import FederatedData, ModelInputs

    auto = args.prompt_start == "auto"
    start = None if auto else prompt.parse_start(args.prompt_start)  # a bad option fails before the model loads
    hp = fl.HParams(sigma0=args.sigma0, perturb_rate=args.perturb_rate, dropout_rate=args.dropout,
                    learning_rate=args.learning_rate)
    hp.validate()  # before loading anything: a bad value is an error naming it and its range
    lm = _load(args)
    if auto:
        start = _auto_start(args, lm)
    _n_prompt(args, lm, start)
    alpha = None if not args.alpha else args.alpha
    fed = _data(args, lm, num_clients=args.clients, alpha=alpha)
    k = args.per_round or args.clients
    cfg = fl.FedConfig(num_clients=args.clients, clients_per_round=k, population_size=args.population,
                       local_generations=args.local_generations, intrinsic_dim=args.d,
                       n_prompt_tokens=args.n_prompt, loss=args.loss, perturb=not args.no_perturb,
                       fitness_form=args.fitness_form, server_variant=args.server, client_keys=args.client_keys,
                       layout=args.layout, chunk_clients=args.chunk_clients, norm_clip=args.norm_clip,
                       sigma_schedule=args.sigma_schedule)
    key_proj, key_run = jax.random.split(jax.random.key(args.seed))
    model = ModelInputs.build(key_proj, lm, cfg, start=start)
    print(f"prompt start (the prompt at z = 0 and the manual baseline): {start.describe()}, "
          f"{args.n_prompt} tokens", flush=True)
    data = FederatedData.from_host(fed)
    kwargs = {"perturb": True} if args.algorithm == "fedavg_bbt" and args.fedavg_perturb else {}
    algo = fl.make(args.algorithm, cfg, lm, **kwargs)
    c = algo.cost.comm
    print(f"{algo.name}: N={args.clients} K={k} λ={args.population} I={args.local_generations} d={args.d} "
          f"| per client per round: {c.down_per_client} B down, {c.up_per_client} B up "
          f"(FedAvg of the full model: {c.fedavg_full_model_per_client / 1e6:.0f} MB each way)", flush=True)
    import dataclasses

    _write_config(args, {"model": lm.name, "kind": lm.kind, "compute_dtype": str(lm.config.compute_dtype),
                         "prompt_start": start.describe(), "n_prompt": args.n_prompt, "algorithm": algo.name,
                         "fed_config": dataclasses.asdict(cfg),
                         "hparams": {k: float(v) for k, v in dataclasses.asdict(hp).items()},
                         "train_counts": fed.train_counts.tolist(), "dev_size": len(fed.dev.labels),
                         "test_size": len(fed.test.labels)})
    if args.tune_lr:
        if args.algorithm != "fedprompt":
            raise ValueError(f"--tune-lr picks FedPrompt's learning rate; --algorithm is {args.algorithm!r}")
        grid = fl.LR_GRID if args.lr_grid is None else tuple(float(x) for x in args.lr_grid.split(","))
        lr, table = fl.tune_learning_rate(algo, key_run, data, fed.dev, lm, model, num_rounds=args.rounds, hp=hp,
                                          grid=grid, eval_every=args.eval_every)
        print("learning rate on dev: " + "  ".join(f"{r['learning_rate']:g}: {_fmt(r['dev_accuracy'])}"
                                                   for r in table) + f"  -> {lr:g}", flush=True)
        hp = hp.replace(learning_rate=lr)
    carry, hist = fl.run(algo, key_run, data, fed.test, lm, model, dev=fed.dev, num_rounds=args.rounds, hp=hp,
                         eval_every=args.eval_every, checkpoint_dir=args.checkpoint_dir,
                         results_dir=args.results_dir, save_uploads=args.save_uploads,
                         progress=not args.no_progress,
                         keep_clean_context={"auto": None, "on": True, "off": False}[args.keep_clean_cache])
    last = hist.rounds[-1]
    print(f"per round: {last['forward_calls']} model forward calls over local batches, "
          f"{last['model_flops'] / 1e12:.2f} TFLOP, {last['active_clients']} active clients, "
          f"{last['bytes_up_per_client']} B up per client; steady round time {last['seconds']:.1f}s")
    s = fl.summarize(hist, carry)
    manual = _manual_accuracy(lm, fed, args.layout, args.n_prompt)
    print(f"test accuracy  bare template (no prompt tokens): {manual:.4f}   "
          f"manual prompt (z=0, the prompt start): {s['initial_test_accuracy']:.4f}   "
          f"final (round {s['final_round']}): {s['final_test_accuracy']:.4f}   "
          f"dev-selected (round {s['selected_round']}, dev {_fmt(s['selected_dev_accuracy'])}): "
          f"{_fmt(s['selected_test_accuracy'])}  [{len(fed.test.labels)} test, {len(fed.dev.labels)} dev examples]")
    print(f"reference-compatibility figure (best test accuracy over rounds, selected on test: optimistic): "
          f"{_fmt(s['best_test_reference'])} (round {s['best_test_reference_round']})")
    if s["fitness_all_nonfinite"]:
        print("warning: every client's fitness was non-finite in every round: the global prompt never moved",
              file=sys.stderr)
    if s["nonfinite_evals"]:
        print(f"warning: {s['nonfinite_evals']} evaluation(s) were non-finite (NaN, never selected)", file=sys.stderr)
    return 0


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
    print(f"fedbpt-jax: {where}{' (results in ' + args.results_dir + ')' if done is not None else ''}{how}",
          file=sys.stderr)
    return status


def main(argv=None) -> int:
    from .interrupts import install

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "report":  # its own parser and errors: fedbpt_jax.report
        from .report import main as report_main

        return report_main(argv[1:])
    parser = build_parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["simulate", *argv]
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    debug = args.debug or os.environ.get("FEDBPT_JAX_DEBUG", "") not in ("", "0")
    args.debug = debug
    install()
    try:
        _check_args(args)
        _check_outputs(args)
        return {"simulate": cmd_simulate, "bbt": cmd_bbt}[args.command](args)
    except KeyboardInterrupt as err:
        if debug:
            raise
        return _interrupted(args, err)
    except Exception as err:  # noqa: BLE001  (every error is one line unless --debug)
        if debug:
            raise
        hint = "" if isinstance(err, (CliError, ValueError, KeyError, FileNotFoundError)) else " (--debug shows the traceback)"
        print(f"fedbpt-jax: error: {_one_line(err, 600)}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
