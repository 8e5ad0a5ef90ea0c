"""From options to a prepared run: the one way ``simulate``, ``sweep`` and ``bbt`` (and code that wants what
they run) turn parsed options into a model, data, a configuration and an algorithm.

:func:`prepare` is the whole path for the federated commands: it loads the model (:func:`load_model`),
resolves the prompt start (``auto``: :func:`auto_start`) and the prompt length (:func:`resolve_n_prompt`),
loads and partitions the data (:func:`load_data`), builds the :class:`~fedbpt_jax.federated.FedConfig` from
the command's options (:func:`fed_config`), draws the projection and the run key from ``--seed`` and builds
the algorithm; :meth:`Plan.resolved` is what ``config.json`` records of it (:func:`config_record`).
:func:`check` validates everything that needs no model first, so a bad option is a one-line error before
anything loads. ``options`` is a parsed namespace of :mod:`fedbpt_jax.cli_options`' options (every field of
the configuration dataclasses is one, by the same name).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

from .errors import CliError, one_line


@dataclasses.dataclass
class Plan:
    """A prepared run: what :func:`prepare` made from the options.

    Attributes:
      lm: the backbone bundle; start: the prompt start (:class:`~fedbpt_jax.prompt.PromptStart`);
      fed: the host-side data (train per client, dev, test, spec); data: the same as
      :class:`~fedbpt_jax.federated.FederatedData`; config: the ``FedConfig``; hp: the ``HParams`` of the
      options; model: :class:`~fedbpt_jax.federated.ModelInputs` (parameters, projection, start);
      key_run: the run key (``run(algo, key_run, ...)``); algo: the algorithm (built without a mesh).
    """

    options: Any
    lm: Any
    start: Any
    fed: Any
    data: Any
    config: Any
    hp: Any
    model: Any
    key_run: Any
    algo: Any

    def resolved(self, **extra) -> dict:
        """What ``config.json``'s ``resolved`` holds for this plan (``extra``: the command's own entries)."""
        lm, fed = self.lm, self.fed
        return {
            "model": lm.name,
            "kind": lm.kind,
            "compute_dtype": str(lm.config.compute_dtype),
            "prompt_start": self.start.describe(),
            "n_prompt": self.options.n_prompt,
            "algorithm": self.algo.name,
            "fed_config": dataclasses.asdict(self.config),
            "train_counts": fed.train_counts.tolist(),
            "dev_size": len(fed.dev.labels),
            "test_size": len(fed.test.labels),
            "data_source": data_identity(self.options, lm),
            **extra,
        }


def algorithm_name(options) -> str:
    """The built-in algorithm (a key of ``fedbpt_jax.federated.ALGORITHMS``) that ``--algorithm`` and
    ``--fedavg-perturb`` name."""
    perturbed = options.algorithm == "fedavg_bbt" and getattr(options, "fedavg_perturb", False)
    return "fedavg_bbt_perturbed" if perturbed else options.algorithm


def fed_config(options, command: str, n_prompt: int):
    """``FedConfig`` from every option of ``command`` that is one of its fields, with K = N unless
    ``--per-round``."""
    from . import federated as fl
    from .cli_options import build
    from .cli_options import options as options_of

    return build(
        fl.FedConfig,
        options,
        options_of(command),
        clients_per_round=options.per_round or options.clients,
        n_prompt_tokens=n_prompt,
    )


def hparams(options, command: str):
    """``HParams`` from the options of ``command``."""
    from . import federated as fl
    from .cli_options import build
    from .cli_options import options as options_of

    return build(fl.HParams, options, options_of(command))


def check(options, command: str):
    """Everything that needs no model: the prompt start's spelling, the hyperparameters' ranges and the
    configuration (with a provisional prompt length: it may come from the start); returns the ``HParams``.

    Raises:
      ValueError: naming the bad value and what is accepted.
    """
    from . import prompt

    if options.prompt_start != "auto":
        prompt.parse_start(options.prompt_start)
    hp = hparams(options, command)
    hp.validate()
    fed_config(options, command, options.n_prompt or 1)
    return hp


def prepare(
    options, command: str = "simulate", *, lm=None, algorithm_options: dict | None = None, make_algorithm=None
) -> Plan:
    """The run the options of ``command`` ("simulate" or "sweep") describe (see the module docstring); prints
    what it loaded and resolved, one line each. ``options.n_prompt`` is set to the resolved length.

    ``lm``: a backbone already loaded (a driver that runs many points on one model, e.g. the experiment grid),
    used instead of loading ``options.model``. ``algorithm_options``: keyword options of the algorithm's factory
    beyond the command's options (e.g. centralized BBT's ``population_size``). ``make_algorithm(name, config, lm,
    algorithm_options)``: what makes the algorithm (default :func:`fedbpt_jax.federated.make`); a driver that runs
    many points passes its cache, so that runs differing only in seed share one algorithm object (and so one
    compiled segment).

    Raises:
      CliError: a model or data source that cannot be loaded, in one line naming what is accepted.
      ValueError: a bad option (see :func:`check`).
    """
    import jax

    from . import federated as fl
    from .federated.core import FederatedData, ModelInputs

    hp = check(options, command)
    lm, start, fed = load_inputs(options, lm=lm, num_clients=options.clients, alpha=options.alpha or None)
    cfg = fed_config(options, command, options.n_prompt)
    key_proj, key_run = jax.random.split(jax.random.key(options.seed))
    model = ModelInputs.build(key_proj, lm, cfg, start=start)
    print(
        f"prompt start (the prompt at z = 0 and the manual baseline): {start.describe()}, {options.n_prompt} tokens",
        flush=True,
    )
    if make_algorithm is None:
        algo = fl.make(algorithm_name(options), cfg, lm, **(algorithm_options or {}))
    else:
        algo = make_algorithm(algorithm_name(options), cfg, lm, algorithm_options or {})
    return Plan(options, lm, start, fed, FederatedData.from_host(fed), cfg, hp, model, key_run, algo)


def load_inputs(options, *, lm=None, num_clients: int, alpha):
    """``(lm, start, fed)``: the backbone (``lm`` if given, else :func:`load_model`), the prompt start (None for a
    command without ``--prompt-start``, e.g. ``bbt``), the prompt length (``options.n_prompt`` is set to it) and
    the data over ``num_clients`` clients (Dirichlet ``alpha``, None: IID): what every command that runs a prompt
    search loads, in this order (:func:`prepare` for the federated commands; ``bbt`` with one client)."""
    from . import prompt

    lm = load_model(options) if lm is None else lm
    option = getattr(options, "prompt_start", None)
    start = None if option is None else auto_start(options, lm) if option == "auto" else prompt.parse_start(option)
    resolve_n_prompt(options, lm, start)
    return lm, start, load_data(options, lm, num_clients=num_clients, alpha=alpha)


def git_revision() -> str | None:
    import subprocess
    from pathlib import Path

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def config_record(args, resolved: dict) -> dict:
    """What ``config.json`` holds: the command line, every option, what was resolved from it, the package
    versions, the git revision and the machine (:func:`fedbpt_jax.machine.machine_record`)."""
    import importlib.metadata as md

    from .machine import machine_record

    versions = {}
    for name in ("fedbpt-jax", "jax", "jaxlib", "flax", "evosax", "optax", "transformers", "numpy", "orbax-checkpoint"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {
        "command": ["fedbpt-jax", *sys.argv[1:]],
        "args": vars(args),
        "resolved": resolved,
        "versions": versions,
        "git_revision": git_revision(),
        "machine": machine_record(),
    }


def load_model(args):
    from . import models

    t0 = time.perf_counter()
    try:
        lm = models.load(args.model, compute_dtype=args.compute_dtype)
    except Exception as err:  # noqa: BLE001  (any failure to load is the model argument's problem)
        if getattr(args, "debug", False):
            raise
        raise CliError(
            f"cannot load model {args.model!r}: {one_line(err).rstrip('.')}. --model takes a registry "
            "name (e.g. smollm2-135m-instruct), a local Hugging Face folder (config.json, *.safetensors, "
            "tokenizer), a .gguf file, or a hub id (needs network access)"
        ) from None
    print(
        f"model {lm.name}: {lm.kind}, {lm.num_params() / 1e6:.1f}M parameters, {lm.config.compute_dtype} "
        f"(loaded in {time.perf_counter() - t0:.1f}s)",
        flush=True,
    )
    return lm


def data_identity(args, lm) -> dict | None:
    """The data source's identity for ``config.json`` (path or name and content hashes); None when it cannot be
    read again (the run itself already loaded it, so this only loses the record, never the run)."""
    from .data.sources import source_identity

    try:
        return source_identity(task_of(args, lm), args.data)
    except (OSError, ValueError, KeyError):
        return None


def load_data(args, lm, *, num_clients: int, alpha):
    from . import data as data_lib

    kw = dict(
        num_clients=num_clients,
        shots_per_class=args.shots,
        dev_shots_per_class=args.dev_shots,
        alpha=alpha,
        seed=args.seed,
        n_prompt=args.n_prompt,
        source=args.data,
        style=args.style,
        first_token=args.first_token,
        max_length=args.max_length,
        test_size=args.test_size or None,
        max_positions=getattr(lm.config, "max_position_embeddings", None),
        # the pool without duplicate and test texts (every front end; the experiment grid may turn it off to
        # reproduce draws made before the rule)
        clean=getattr(args, "clean_data", True),
    )
    try:
        fed = data_lib.federated(task_of(args, lm), lm.tokenizer, lm.kind, **kw)
    except Exception as err:  # noqa: BLE001
        if getattr(args, "debug", False):
            raise
        # The data layer's ValueErrors already say what is accepted; anything else gets the general answer.
        hint = (
            ""
            if isinstance(err, ValueError) and not isinstance(err, UnicodeError)
            else (
                ". --data takes a folder like ../shared/data, a non-empty csv/tsv/json/parquet file with a header row, "
                "'embedded', or a hub name (needs network access)"
            )
        )
        raise CliError(f"task {args.task!r}, data {args.data or 'default source'!r}: {one_line(err)}{hint}") from None
    print(
        f"task {args.task}: {int(fed.train_counts.sum())} train examples over {num_clients} client(s) "
        f"(counts {fed.train_counts.tolist() if num_clients <= 20 else '…'}), {len(fed.dev.labels)} dev, "
        f"{len(fed.test.labels)} test",
        flush=True,
    )
    return fed


def task_of(args, lm):
    """The task, with --template/--cue/--verbalizer applied."""
    from . import tasks

    task = tasks.get(args.task)
    if args.template is None and args.cue is None and args.verbalizer is None:
        return task
    words = None if args.verbalizer is None else tuple(args.verbalizer.split("|"))
    from .models.kinds import get

    style = args.style if get(lm.kind).causal else None
    return tasks.override(task, kind=lm.kind, style=style, template=args.template, cue=args.cue, label_words=words)


def resolve_n_prompt(args, lm, start=None, default: int = 5) -> None:
    """Sets ``args.n_prompt``: as given, else the start's token count, else ``default``."""
    from . import prompt

    if args.n_prompt is None:
        args.n_prompt = prompt.start_length(start, lm.tokenizer) or default


def auto_start(args, lm):
    """``--prompt-start auto``: the task's measured decoder start (``Task.decoder_prompt_start``), unless the
    backbone is an encoder (BBT's placeholders: "zeros" in "add" mode), the task has none, or an explicit
    ``--n-prompt`` differs from its token count (then "zeros", said on the console)."""
    from . import prompt, tasks
    from .models.kinds import get

    chosen = tasks.get(args.task).decoder_prompt_start if get(lm.kind).causal else None
    if chosen is None:
        return prompt.parse_start("zeros")
    length = prompt.start_length(chosen, lm.tokenizer)
    if args.n_prompt is not None and args.n_prompt != length:
        print(
            f"prompt start: --n-prompt {args.n_prompt} differs from the task's default start {chosen!r} "
            f"({length} tokens): using 'zeros'",
            flush=True,
        )
        return prompt.parse_start("zeros")
    return prompt.parse_start(chosen)


def local_device_count() -> int:
    import jax

    return jax.local_device_count()


def client_mesh_for(devices: int):
    """The client mesh over the first ``devices`` local devices (0: all of them); None for one device."""
    if devices == 1 or (devices == 0 and local_device_count() == 1):
        return None
    import jax

    from .federated import client_mesh

    chosen = jax.local_devices() if devices == 0 else jax.local_devices()[:devices]
    print(f"clients sharded over {len(chosen)} {chosen[0].platform} devices", flush=True)
    return client_mesh(chosen)
