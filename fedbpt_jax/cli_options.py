"""The command line's options, derived from the configuration dataclasses; ``--config FILE`` support.

Every field of :class:`~fedbpt_jax.federated.FedConfig`, :class:`~fedbpt_jax.federated.HParams` and
:class:`~fedbpt_jax.bbt.BBTConfig`, and of the CLI's own dataclasses below (:class:`CommonOptions`,
:class:`SimulateOptions`: what a run needs beyond the algorithm's configuration), becomes a flag:

* the flag is ``--field-name``; where the command line had a shorter name before (``--clients`` for
  ``num_clients``, ``--d`` for ``intrinsic_dim``, ...) that name is kept as the flag and the value's name
  in ``args``, and ``--field-name`` is accepted too (:data:`RENAMES`);
* the type comes from the type hint (``int``, ``float``, ``str``, ``bool``, ``X | None``); a ``bool``
  is a ``--name`` / ``--no-name`` pair; a field with ``metadata={"choices": ...}`` lists its values;
* the help text is the field's entry in the class's ``Attributes:`` docstring section, plus its default;
* a config file (``--config FILE``: TOML, YAML or JSON, including the ``config.json`` that a run writes
  into its results folder) uses the same names as keys; the command line overrides the file.

So a new field of a configuration dataclass is a flag and a config-file key without touching the CLI
(``cmd_simulate`` also passes every field through to the dataclass it builds).

Why an in-house generator over ``argparse`` rather than tyro or jsonargparse: both derive a CLI from
dataclasses, but (a) they name nested fields ``--fed.num-clients`` / ``--fed-config.num-clients``, so
keeping today's flags (``--clients``, ``--per-round``, ``--d``, ``--no-perturb``, ``--server``,
``--dropout``, ...) would need an alias annotation on every field of the configuration classes, which
would then depend on the CLI library; (b) their errors and help formatting replace the CLI's one-line
errors that name the value and what is accepted (``tests/test_cli_errors.py``); (c) the default
``simulate`` sub-command, ``--version`` and the dispatch of ``report`` to its own module are plain
argparse here; (d) they add a dependency (tyro: typeguard, docstring-parser, rich, shtab;
jsonargparse: its own YAML/typing stack) for what is ~300 lines over ``dataclasses.fields``, type hints
and the docstrings. The price is that only the types the configuration uses are supported (``int``,
``float``, ``str``, ``bool`` and their ``| None``); a field of another type is an error when the parser
is built (``tests/test_cli_config.py`` builds it for every command), not a silently missing flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping

from .federated.registry import COMMAND_ALGORITHMS

# --------------------------------------------------------------------------------------------------------------------
# The CLI's own settings: what a run needs beyond the algorithm's configuration dataclasses.


@dataclasses.dataclass(frozen=True)
class CommonOptions:
    """Options of both commands: model, task, data and outputs.

    Attributes:
      model: registry name, hub id, local HF directory or .gguf file (the default is offline).
      compute_dtype: matmul precision of the backbone: "bfloat16" stores weights and feeds matmuls in
        bfloat16 with float32 accumulation; "auto" picks the faster of the two here (bfloat16 on GPU/TPU
        and on CPUs whose bfloat16 matmuls measure clearly faster). bfloat16 changes fitness by ~1%
        relative, enough to reorder close candidates.
      task: task name (the default has embedded data).
      data: data source: a folder like ../shared/data, a csv/tsv/json/parquet file, a hub name, "hub" or
        "embedded" (default: the task's offline default).
      shots: few-shot examples per class.
      dev_shots: dev examples per class for dev-set selection, drawn from the training pool after the train
        shots (disjoint from them; never from test). 100 per class (200 on two classes) resolves about half
        a point of accuracy; BBT's convention (as many as --shots) is --dev-shots 16.
      max_length: truncate each example's text part to this many tokens (default: no truncation, the text
        is padded to the longest example; an example that does not fit the model's context with the
        prompt and cue is an error that gives the largest value that fits).
      style: decoder template style: "completion" (default), "chat", or "bbt" (BBT's own template
        "{text} It was" + " terrible"/" great"; sentiment tasks).
      template: replace the template: decoders the text part of --style's template (with {text}, or
        {text_a} and {text_b}), encoders BBT's template (with {prompt}, {mask} and the text slots).
      cue: decoders: replace the answer cue (what precedes the label word).
      verbalizer: replace the label words, one per class separated by "|", spelled as they follow the
        cue (e.g. " bad| good").
      first_token: score a label word of several tokens by its first token (default: such a word is an
        error).
      test_size: evaluate on a seeded subset of this many test examples (0 = all).
      seed: seeds the few-shot draw, the partition, the test subset, the projection and every round's keys.
      results_dir: write config.json, metrics.json and rounds.csv here (atomically); checked before the
        model loads; a folder that already holds a run's results is refused unless --overwrite (or
        --checkpoint-dir resumes that run).
      overwrite: replace the results already in --results-dir (command line only, never read from a
        config file).
      progress: show a progress bar.
      debug: show the full traceback of an error.
    """

    model: str = "smollm2-135m-instruct"
    compute_dtype: str = dataclasses.field(default="float32", metadata={"choices": ("float32", "bfloat16", "auto")})
    task: str = "rotten_tomatoes"
    data: str | None = None
    shots: int = 16
    dev_shots: int | None = 100
    max_length: int | None = None
    style: str | None = None
    template: str | None = None
    cue: str | None = None
    verbalizer: str | None = None
    first_token: bool = False
    test_size: int = 300
    seed: int = 0
    results_dir: str | None = None
    overwrite: bool = False
    progress: bool = True
    debug: bool = False


@dataclasses.dataclass(frozen=True)
class SimulateOptions:
    """Options of ``simulate`` beyond FedConfig and HParams: the algorithm, the data split and the run.

    Attributes:
      algorithm: the federated algorithm or baseline.
      prompt_start: the soft prompt at z = 0 (and the manual baseline's prompt): "zeros",
        "tokens:<id>,<id>,...", "phrase:<text>" (its token count sets --n-prompt) or a .npy file of shape
        [n, hidden]; "auto": the task's measured start for decoders (movie-review tasks:
        "phrase: (movie review)"), else "zeros".
      fedavg_perturb: FedAvg-BBT with FedBPT's perturbation-regularised local fitness (default: plain loss).
      alpha: Dirichlet label-skew concentration; 0 means IID (the default is the paper's).
      rounds: communication rounds; a positive multiple of --eval-every.
      eval_every: rounds per compiled segment; the global prompt is evaluated (test and dev) after each
        (--rounds must be a multiple of it).
      eval_chunk: test/dev examples per evaluation batch.
      eval_cache_gb: GiB for the test and dev sets' text-prefix caches (decoder, layout "after"): where they
        fit, each evaluation runs only the prompt and the cue over cached text; where they do not (a warning
        says so), every evaluation recomputes the text. SmolLM2 in float32 needs ~46 KB per text token
        (MR's 2,000 test snippets: ~6 GiB).
      tune_lr: FedPrompt: pick the learning rate on the dev set from --lr-grid first (one run per value,
        test set untouched), then run with it.
      lr_grid: comma-separated learning rates for --tune-lr (default: 0.001,0.003,0.01,0.03,0.1,0.3).
      save_uploads: save every round's client uploads (means, fitness, σ histories) as .npz files in this
        folder, to replay other aggregations (fedbpt, fedavg_bbt).
      keep_clean_cache: keep each client's clean text-prefix cache across rounds (FedBPT, FedAvg-BBT;
        decoder, layout "after"): one prefix pass less per client per round, at ~46 KB per text token with
        SmolLM2 in float32; "auto": when it fits 1 GiB and rounds x K >= N.
      checkpoint_dir: orbax checkpoints; resumes if present.
      checkpoint_every: save a checkpoint every this many rounds (at segment ends) and at the last round.
      devices: shard the clients over this many local devices (1: no sharding; 0: all local devices;
        --mesh is --devices 0). More than the local device count is an error.
      tensorboard_dir: write TensorBoard event files here (every round's and evaluation's metrics; needs
        tensorboardX, the extra "tensorboard").
      plot: write metrics.png (accuracy, loss, σ and ‖z‖ per round) next to metrics.json in --results-dir.
    """

    algorithm: str = dataclasses.field(default="fedbpt", metadata={"choices": COMMAND_ALGORITHMS})
    prompt_start: str = "auto"
    fedavg_perturb: bool = False
    alpha: float = 1.0
    rounds: int = 5
    eval_every: int = 1
    eval_chunk: int = 64
    eval_cache_gb: float = 2.0
    tune_lr: bool = False
    lr_grid: str | None = None
    save_uploads: str | None = None
    keep_clean_cache: str = dataclasses.field(default="auto", metadata={"choices": ("auto", "on", "off")})
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1
    devices: int = 1
    tensorboard_dir: str | None = None
    plot: bool = True


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """Options of ``sweep`` beyond ``simulate``'s (``--hp NAME=V1,V2`` is added by the command itself).

    Attributes:
      seeds: comma-separated seeds, one lane each per hyperparameter point (lane s runs its rounds from
        jax.random.key(s); --seed draws the data and projection every lane shares).
      grid: sweep the cartesian product of the --hp lists (default: zip them; they must have one length).
      lanes: "all": shard the lanes over every local device; "one": run them on the default device.
    """

    seeds: str = dataclasses.field(default="0", metadata={"comma_list": True})
    grid: bool = False
    lanes: str = dataclasses.field(default="all", metadata={"choices": ("all", "one")})


# --------------------------------------------------------------------------------------------------------------------
# Which dataclasses make up each command, and the CLI's own names and defaults for some of their fields.


@dataclasses.dataclass(frozen=True)
class Source:
    """One dataclass's fields as options of a command.

    Attributes:
      cls: the dataclass.
      title: the help section's title.
      defaults: the command's defaults where they differ from the dataclass's (None: resolved by the
        command, e.g. K = N, n from the prompt start).
      notes: text added to a field's help on this command (what the command line's default means).
      fixed: fields the command sets itself (no flag).
    """

    cls: type
    title: str
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    notes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    fixed: frozenset = frozenset()


#: Field name -> the command line's name for it (the flag ``--clients`` and ``args.clients`` for
#: ``FedConfig.num_clients``); ``--num-clients`` and the config-file key ``num_clients`` are accepted too.
RENAMES = {
    "num_clients": "clients",
    "clients_per_round": "per_round",
    "population_size": "population",
    "intrinsic_dim": "d",
    "n_prompt_tokens": "n_prompt",
    "server_variant": "server",
    "dropout_rate": "dropout",
    "num_generations": "generations",
}

#: Config-file keys of earlier ``config.json`` files -> (today's key, whether the value is negated).
LEGACY_KEYS = {"no_perturb": ("perturb", True), "no_progress": ("progress", True)}

#: Keys only the command line may set: ``overwrite`` replaces results, so a config file (in particular a
#: run's own ``config.json``) never turns it on; ``config`` does not chain files.
COMMAND_LINE_ONLY = ("overwrite", "config")

#: Where a run writes. A run's own ``config.json`` given as ``--config`` repeats that run's settings, not its
#: outputs: these entries of it are left out (a replay that took over the finished run's checkpoint folder would
#: resume at its last round and compute nothing); a hand-written config file may set them.
RUN_OUTPUTS = ("results_dir", "checkpoint_dir", "tensorboard_dir", "save_uploads")


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line naming the problem and where the help is (argparse
    prints the whole usage first: ~50 lines for ``simulate``). Its sub-parsers are of the same class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (options: '{self.prog} --help')\n")


def sources(command: str) -> list[Source]:
    """The dataclasses whose fields are ``command``'s options, in help order."""
    if command == "simulate":
        from .federated.config import FedConfig, HParams

        return [
            Source(CommonOptions, "model, task and outputs"),
            Source(
                FedConfig,
                "federated configuration (FedConfig)",
                defaults={"clients_per_round": None, "n_prompt_tokens": None, "chunk_clients": 2},
                notes={
                    "clients_per_round": "default: all N clients",
                    "n_prompt_tokens": "default: the prompt start's token count, else 5",
                },
            ),
            Source(HParams, "hyperparameters (HParams)"),
            Source(SimulateOptions, "algorithm and run"),
        ]
    if command == "bbt":
        from .bbt import BBTConfig

        return [
            Source(CommonOptions, "model, task and outputs", defaults={"test_size": 500}),
            Source(
                BBTConfig,
                "centralized BBT (BBTConfig)",
                defaults={"n_prompt_tokens": None, "population_size": 10, "num_generations": 30, "eval_every": 10},
                notes={"n_prompt_tokens": "default: 5"},
            ),
        ]
    if command == "sweep":
        from .federated.config import HParams

        return [
            *sources("simulate")[:2],
            Source(HParams, "hyperparameters (HParams): each lane's value where --hp does not sweep it"),
            Source(
                SimulateOptions,
                "algorithm and rounds",
                fixed=frozenset(
                    {
                        "tune_lr",
                        "lr_grid",
                        "save_uploads",
                        "checkpoint_dir",
                        "checkpoint_every",
                        "devices",
                        "tensorboard_dir",
                        "plot",
                    }
                ),
                notes={"alpha": "shared by every lane"},
            ),
            Source(SweepOptions, "sweep: lanes"),
        ]
    raise ValueError(f"unknown command {command!r}; accepted: 'simulate', 'bbt', 'sweep'")


# --------------------------------------------------------------------------------------------------------------------
# Options from fields.


@dataclasses.dataclass(frozen=True)
class Option:
    """One flag: where its value goes and how it is read.

    Attributes:
      dest: the name in ``args`` and the config-file key.
      field: the dataclass field it fills (``owner.field``).
      owner: the dataclass.
      kind: ``int``, ``float``, ``str`` or ``bool``.
      optional: None is a valid value (leave the flag out).
      default: the command's default.
      choices: the accepted values, or None.
      help: the help text (from the docstring).
    """

    dest: str
    field: str
    owner: type
    kind: type
    optional: bool
    default: Any
    choices: tuple | None
    help: str

    @property
    def flags(self) -> tuple[str, ...]:
        names = [self.dest] + ([self.field] if self.field != self.dest else [])
        return tuple("--" + n.replace("_", "-") for n in names)


_SCALARS = (bool, int, float, str)


def _scalar_type(hint, where: str) -> tuple[type, bool]:
    """``(kind, optional)`` of a type hint among int/float/str/bool and their ``| None``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and rest[0] in _SCALARS:
            return rest[0], True
    elif hint in _SCALARS:
        return hint, False
    raise TypeError(f"{where}: type {hint!r} has no command-line form; accepted: int, float, str, bool and X | None")


def field_docs(cls) -> dict[str, str]:
    """Each field's entry in ``cls``'s ``Attributes:`` docstring section, on one line (entries naming several
    fields, ``a, b: text``, give each the text)."""
    lines = (inspect.getdoc(cls) or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return {}
    docs: dict[str, str] = {}
    names: list[str] = []
    indent = None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:
            break
        indent = depth if indent is None else indent
        m = re.match(r"\s*([A-Za-z_][\w]*(?:\s*,\s*[A-Za-z_][\w]*)*)\s*:\s(.*)", line)
        if depth == indent and m:
            names = [n.strip() for n in m.group(1).split(",")]
            for n in names:
                docs[n] = m.group(2).strip()
        elif names:
            for n in names:
                docs[n] += " " + line.strip()
    return docs


def options(command: str) -> list[Option]:
    """``command``'s options, one per field of its dataclasses (see :func:`sources`).

    Raises:
      TypeError: a field whose type has no command-line form.
      ValueError: two dataclasses giving the same option name a different meaning.
    """
    out: dict[str, Option] = {}
    for src in sources(command):
        hints = typing.get_type_hints(src.cls)
        docs = field_docs(src.cls)
        for f in dataclasses.fields(src.cls):
            if f.name in src.fixed or not f.init:
                continue
            kind, optional = _scalar_type(hints[f.name], f"{src.cls.__name__}.{f.name}")
            default = src.defaults.get(f.name, f.default)
            if default is dataclasses.MISSING:
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            text = docs.get(f.name, "")
            if src.notes.get(f.name):
                text = f"{text.rstrip('.')} ({src.notes[f.name]})"
            opt = Option(
                dest=RENAMES.get(f.name, f.name),
                field=f.name,
                owner=src.cls,
                kind=kind,
                optional=optional or default is None,
                default=default,
                choices=tuple(f.metadata["choices"]) if "choices" in f.metadata else None,
                help=text,
            )
            if opt.dest in out:
                raise ValueError(
                    f"option {opt.dest!r} comes from both {out[opt.dest].owner.__name__} and {src.cls.__name__}"
                )
            out[opt.dest] = opt
    return list(out.values())


def _plain(doc: str) -> str:
    """A docstring entry as help text: Sphinx roles and double backquotes dropped, no final full stop."""
    text = re.sub(r":\w+:`~?([^`]*)`", r"\1", doc).replace("``", "'")
    return text[:-1] if text.endswith(".") and not text.endswith("..") else text


def add_options(parser: argparse.ArgumentParser, command: str) -> list[Option]:
    """Adds ``command``'s options to ``parser`` (one help section per dataclass); returns them."""
    opts = options(command)
    groups = {src.cls: parser.add_argument_group(src.title) for src in sources(command)}
    for o in opts:
        text = _plain(o.help).replace("%", "%%")
        if o.kind is bool:
            groups[o.owner].add_argument(
                *o.flags,
                dest=o.dest,
                action=argparse.BooleanOptionalAction,
                default=o.default,
                help=f"{text} (default: {'on' if o.default else 'off'})",
            )
            continue
        if o.default is not None and "(default" not in text:
            text = f"{text} (default: %(default)s)"
        groups[o.owner].add_argument(
            *o.flags,
            dest=o.dest,
            type=o.kind,
            default=o.default,
            choices=o.choices,
            metavar=o.dest.upper() if o.choices is None else None,
            help=text,
        )
    return opts


def build(cls, args, opts: list[Option], **resolved):
    """An instance of ``cls`` from ``args``: every field that is an option, then ``resolved`` (values the
    command worked out, e.g. K = N); so a new field of ``cls`` needs no change here."""
    kw = {o.field: getattr(args, o.dest) for o in opts if o.owner is cls}
    kw.update(resolved)
    return cls(**kw)


# --------------------------------------------------------------------------------------------------------------------
# Config files.


class ConfigFileError(ValueError):
    """A config file that cannot be used: unreadable, an unknown key, a value of the wrong type."""


def read_config_file(path) -> dict:
    """The mapping in a TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON (``.json``) file."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigFileError(
            f"--config {str(path)!r}: unknown file type {suffix or '(none)'!r}; accepted: .toml, "
            ".yaml, .yml, .json (the config.json a run writes into --results-dir included)"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigFileError(f"--config {str(path)!r}: cannot read it ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ConfigFileError(
            f"--config {str(path)!r}: not UTF-8 text (byte {err.start}); accepted: a TOML, YAML or JSON text file"
        ) from None
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except ModuleNotFoundError as err:
        raise ConfigFileError(
            f"--config {str(path)!r}: reading TOML on Python 3.10 needs the tomli package ({err})"
        ) from None
    except Exception as err:  # noqa: BLE001  (each parser has its own error type)
        msg = " ".join(str(err).split())
        raise ConfigFileError(f"--config {str(path)!r}: not valid {suffix[1:].upper()}: {msg}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigFileError(
            f"--config {str(path)!r}: the file holds a {type(data).__name__}; accepted: a mapping "
            "of option names to values (e.g. 'clients = 4' in TOML)"
        )
    return data


def is_run_record(data: Mapping) -> bool:
    """Whether ``data`` is the ``config.json`` a run writes (its options are under ``"args"``)."""
    return isinstance(data.get("args"), dict) and isinstance(data.get("command"), list) and "versions" in data


def file_command(data: Mapping) -> str | None:
    """The sub-command a config file names (``command`` key; in a run's ``config.json``, ``args.command``)."""
    value = data["args"].get("command") if is_run_record(data) else data.get("command")
    return value if isinstance(value, str) else None


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def values_from_file(path, command: str, opts: list[Option], data: Mapping | None = None) -> dict[str, Any]:
    """The option values in config file ``path`` for ``command``: ``{dest: value}``, checked.

    Keys are the option names (``clients``, ``per_round``; ``-`` and ``_`` alike) or the dataclass field
    names (``num_clients``, ``clients_per_round``). A run's ``config.json`` is read from its ``"args"``
    (its ``overwrite`` and ``config`` entries and its output folders, :data:`RUN_OUTPUTS`, are left out).

    Raises:
      ConfigFileError: an unknown key (with close matches and the accepted keys), a key given twice, a
        value of the wrong type or outside the accepted values (naming the key, the value and what is
        accepted), a file for another command.
    """
    data = read_config_file(path) if data is None else data
    where = f"--config {str(path)!r}"
    named = file_command(data)
    if named is not None and named != command:
        raise ConfigFileError(
            f"{where} is for the {named!r} command, not {command!r}; run "
            f"'fedbpt-jax {named} --config {path}' or leave the command out"
        )
    record = is_run_record(data)
    items = dict(data["args"]) if record else dict(data)
    items.pop("command", None)
    if record:
        for key in (*COMMAND_LINE_ONLY, *RUN_OUTPUTS):
            items.pop(key, None)
    by_key = {}
    for o in opts:
        by_key[o.dest] = o
        by_key.setdefault(o.field, o)
    accepted = sorted(o.dest for o in opts)
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for raw_key, value in items.items():
        key = str(raw_key).replace("-", "_")
        negate = False
        if key in LEGACY_KEYS and key not in by_key:
            key, negate = LEGACY_KEYS[key]
        if key in COMMAND_LINE_ONLY:
            raise ConfigFileError(f"{where}: key {raw_key!r} is accepted only on the command line")
        if key not in by_key:
            close = difflib.get_close_matches(key, list(by_key), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigFileError(
                f"{where}: unknown key {raw_key!r} for {command!r}{hint} Accepted keys: {', '.join(accepted)}"
            )
        o = by_key[key]
        if o.dest in origin:
            raise ConfigFileError(f"{where}: {o.dest!r} is given twice (as {origin[o.dest]!r} and {raw_key!r})")
        origin[o.dest] = str(raw_key)
        out[o.dest] = _checked(where, raw_key, value, o, negate)
    return out


def _comma_list(o: Option) -> bool:
    """Whether the option is a comma-separated list on the command line (a config file may give a list)."""
    f = {x.name: x for x in dataclasses.fields(o.owner)}.get(o.field)
    return bool(f is not None and f.metadata.get("comma_list"))


def _checked(where: str, key, value, o: Option, negate: bool):
    if isinstance(value, list) and o.kind is str and _comma_list(o):
        if value and all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in value):
            return ",".join(str(v) for v in value)
        raise ConfigFileError(f"{where}: key {key!r}: {value!r} is not a non-empty list of values")
    expected = _TYPE_NAMES[o.kind] + (" or null" if o.optional else "")
    if value is None:
        if o.optional:
            return None
    elif o.kind is bool:
        if isinstance(value, bool):
            return not value if negate else value
    elif o.kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, o.kind) and not isinstance(value, bool):
        if o.choices is None or value in o.choices:
            return value
        raise ConfigFileError(
            f"{where}: key {key!r}: {value!r} is not accepted; accepted: {', '.join(repr(c) for c in o.choices)}"
        )
    raise ConfigFileError(
        f"{where}: key {key!r}: {value!r} ({type(value).__name__}) is not {expected} "
        f"(expected {o.kind.__name__}{' | None' if o.optional else ''})"
    )


def find_config_arg(argv: list[str]) -> str | None:
    """The ``--config`` value in ``argv`` (``--config F`` or ``--config=F``), or None.

    Raises:
      ConfigFileError: ``--config`` given more than once (files do not chain, and a second one would
        silently replace the first).
    """
    found = []
    for i, a in enumerate(argv):
        if a == "--":
            break
        if a == "--config" and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif a.startswith("--config="):
            found.append(a.split("=", 1)[1])
    if len(found) > 1:
        raise ConfigFileError(
            f"--config given {len(found)} times ({', '.join(repr(f) for f in found)}); config files do not chain: "
            "give one file and set the other values as options"
        )
    return found[0] if found else None
