"""Callbacks of :func:`fedbpt_jax.federated.run`: log a run's rows as they are made, or stop it early,
without editing the library.

A callback is any object with the methods ``on_round(row)`` and ``on_eval(row)`` (subclass
:class:`Callback` to get both as no-ops and override what you need); ``row`` is the dict that
:class:`~fedbpt_jax.federated.records.History` records (keys and units: ``docs/metrics.md``). A method that
returns ``True`` asks the run to stop early; any other return value (``None``, ``False``) lets it go on.

**When they fire.** :func:`~fedbpt_jax.federated.run` executes its rounds in compiled *segments* of
``eval_every`` rounds, each followed by one evaluation (test and dev) of the global prompt. Nothing leaves
the device inside a segment, so the callbacks fire on the host after each segment, in this order: the
initial evaluation (round 0) once, when it is computed (not again on resume); then for every segment
``on_round`` once per round of the segment, in round order, then ``on_eval`` once with that segment's
evaluation. Callbacks are called in the order given. Rows restored from a checkpoint are not replayed:
a resumed run fires for the rows it computes. Only process 0 of a multi-host run calls them.

**Early stop.** A stop requested by any callback during a segment's rows takes effect at the end of that
segment: every remaining callback still receives the segment's rows (each row is delivered exactly once),
then the run saves a checkpoint at that round (with ``checkpoint_dir``, whatever ``checkpoint_every``),
writes ``metrics.json`` / ``rounds.csv`` / ``metrics.png`` (with ``results_dir``) and returns normally,
with a history ending at that round. So with ``eval_every = E`` a stop asked at round r ends the run after
round ``E·⌈r/E⌉``; a stop asked from the initial evaluation ends it before round 1 (results hold the
initial evaluation alone; no checkpoint is saved, there is nothing to resume). A checkpointed run
stopped early resumes from that round when :func:`run` is called again with the same checkpoint folder.
:attr:`History.stopped_early` records the round (None when the run was not stopped).

``TensorBoardLogger`` needs ``tensorboardX`` (``pip install fedbpt-jax[tensorboard]``); ``WandbLogger``
needs ``wandb``; this module imports without either.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class RunCallback(Protocol):
    """What :func:`fedbpt_jax.federated.run` calls (see the module docstring for when)."""

    def on_round(self, row: dict) -> bool | None: ...

    def on_eval(self, row: dict) -> bool | None: ...


class Callback:
    """A :class:`RunCallback` whose methods do nothing; subclass it and override what you need.

    ``close()`` is called once when the run ends (normally, by an early stop, or by an error).
    """

    def on_round(self, row: dict) -> bool | None:
        return None

    def on_eval(self, row: dict) -> bool | None:
        return None

    def close(self) -> None:
        return None


def check_callbacks(callbacks) -> list:
    """The callbacks as a list; an object without callable ``on_round`` and ``on_eval`` is an error naming it."""
    if callbacks is None:
        return []
    if not isinstance(callbacks, Iterable) or isinstance(callbacks, (str, bytes, dict)):
        callbacks = [callbacks]
    out = list(callbacks)
    for cb in out:
        missing = [m for m in ("on_round", "on_eval") if not callable(getattr(cb, m, None))]
        if missing:
            raise TypeError(
                f"callback {cb!r} lacks {' and '.join(missing)}; accepted: objects with on_round(row) "
                "and on_eval(row) methods (e.g. subclasses of fedbpt_jax.callbacks.Callback)"
            )
    return out


def dispatch(callbacks: list, rounds: list[dict], evals: list[dict]) -> bool:
    """Calls ``on_round`` for each of ``rounds`` then ``on_eval`` for each of ``evals``, on every callback;
    True when any call asked to stop (every call is made either way)."""
    stop = False
    for row in rounds:
        for cb in callbacks:
            stop |= cb.on_round(row) is True
    for row in evals:
        for cb in callbacks:
            stop |= cb.on_eval(row) is True
    return stop


def close_all(callbacks: list) -> None:
    for cb in callbacks:
        close = getattr(cb, "close", None)
        if callable(close):
            close()


class StopWhen(Callback):
    """Stops the run when ``predicate(row)`` is true for an evaluation row (``on="eval"``) or a round row
    (``on="round"``). E.g. ``StopWhen(lambda e: e["dev_accuracy"] >= 0.9)``."""

    def __init__(self, predicate, on: str = "eval"):
        if on not in ("eval", "round"):
            raise ValueError(f"StopWhen(on={on!r}): accepted: 'eval' or 'round'")
        self.predicate, self.on = predicate, on

    def on_round(self, row: dict) -> bool:
        return self.on == "round" and bool(self.predicate(row))

    def on_eval(self, row: dict) -> bool:
        return self.on == "eval" and bool(self.predicate(row))


def scalars(row: dict, prefix: str) -> dict[str, float]:
    """A row's numeric values as ``{prefix/key: float}``: scalars as they are (booleans as 0/1), lists
    (``pred_dist``) as ``prefix/key/i``, per-client diagnostics as their mean over the round's active
    clients (``prefix/clients/key_mean``, numeric scalar fields only); ``round`` and ``None`` values are left
    out. Non-finite values are kept (TensorBoard shows them as gaps)."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if k == "round" or v is None:
            continue
        if k == "clients" and isinstance(v, list):
            for name, mean in client_means(v).items():
                out[f"{prefix}/clients/{name}_mean"] = mean
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                if isinstance(x, (int, float)):
                    out[f"{prefix}/{k}/{i}"] = float(x)
        elif isinstance(v, (int, float)):
            out[f"{prefix}/{k}"] = float(v)
    return out


#: Per-client fields that are identifiers or flags, not quantities to average.
_CLIENT_NOT_AVERAGED = ("index", "active", "rank", "repaired", "usable", "label_counts")


def client_means(clients: list[dict]) -> dict[str, float]:
    """Mean of each numeric per-client field over the round's active clients (those with ``active``),
    skipping ``None`` (a client that sent nothing); fields with no value are left out."""
    active = [c for c in clients if c.get("active", True)]
    out = {}
    names = [k for k in (clients[0] if clients else {}) if k not in _CLIENT_NOT_AVERAGED]
    for name in names:
        xs = [float(c[name]) for c in active if isinstance(c.get(name), (int, float)) and not isinstance(c[name], bool)]
        if xs:
            out[name] = sum(xs) / len(xs)
    return out


class TensorBoardLogger(Callback):
    """Writes every round row's scalars under ``round/…`` and every evaluation row's under ``eval/…`` to a
    TensorBoard event file in ``logdir`` (global step = the row's round), with :func:`scalars`' naming
    (e.g. ``round/sigma``, ``round/clients/fitness_mean``, ``eval/accuracy``, ``eval/dev_accuracy``,
    ``eval/pred_dist/0``). Needs ``tensorboardX``; ``flush_secs``: how often the writer flushes."""

    def __init__(self, logdir, flush_secs: int = 10):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ImportError(
                "TensorBoardLogger needs tensorboardX: pip install 'fedbpt-jax[tensorboard]' "
                "(or pip install tensorboardX)"
            ) from None
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(logdir=str(self.logdir), flush_secs=flush_secs)

    def _write(self, row: dict, prefix: str) -> None:
        step = int(row["round"])
        for tag, v in scalars(row, prefix).items():
            self.writer.add_scalar(tag, v, global_step=step)

    def on_round(self, row: dict) -> None:
        self._write(row, "round")

    def on_eval(self, row: dict) -> None:
        self._write(row, "eval")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger(Callback):
    """Logs the same scalars as :class:`TensorBoardLogger` to Weights & Biases (``wandb.log`` with
    ``step`` = the row's round). Optional: needs ``wandb`` installed (not a dependency of this package).
    ``run``: an existing ``wandb`` run; otherwise ``wandb.init(**init_kwargs)`` starts one."""

    def __init__(self, run=None, **init_kwargs):
        try:
            import wandb
        except ImportError:
            raise ImportError(
                "WandbLogger needs the wandb package, which fedbpt-jax does not install: "
                "pip install wandb (or use TensorBoardLogger)"
            ) from None
        self._own = run is None
        self.run = wandb.init(**init_kwargs) if run is None else run

    def on_round(self, row: dict) -> None:
        self.run.log(scalars(row, "round"), step=int(row["round"]))

    def on_eval(self, row: dict) -> None:
        self.run.log(scalars(row, "eval"), step=int(row["round"]))

    def close(self) -> None:
        if self._own:
            self.run.finish()


def _masked_crc(data: bytes) -> int:
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """The scalars of every TensorBoard event file in ``logdir`` (``events.out.tfevents.*``, read in name
    order) as ``{tag: [(step, value), ...]}`` in file order. Reads the TFRecord framing itself and
    checks each record's CRC (a corrupt or truncated file is an error naming it); needs ``tensorboardX``
    for the protobuf classes."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    files = sorted(Path(logdir).glob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"no TensorBoard event file (events.out.tfevents.*) in {str(logdir)!r}")
    out: dict[str, list[tuple[int, float]]] = {}
    for path in files:
        buf = path.read_bytes()
        pos = 0
        while pos < len(buf):
            if len(buf) - pos < 12:
                raise ValueError(f"{path}: truncated record header at byte {pos}")
            header = buf[pos : pos + 8]
            (length,), (hcrc,) = struct.unpack("<Q", header), struct.unpack("<I", buf[pos + 8 : pos + 12])
            data = buf[pos + 12 : pos + 12 + length]
            end = pos + 12 + length + 4
            if len(data) < length or end > len(buf):
                raise ValueError(f"{path}: truncated record at byte {pos}")
            (dcrc,) = struct.unpack("<I", buf[end - 4 : end])
            if hcrc != _masked_crc(header) or dcrc != _masked_crc(data):
                raise ValueError(f"{path}: CRC mismatch in the record at byte {pos}")
            event = Event.FromString(data)
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
            pos = end
    return out
