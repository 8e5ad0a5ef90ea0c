"""The command line's error contract: a bad command line or input is one line (exit status 2)."""

from __future__ import annotations


class CliError(ValueError):
    """A bad command line or input, reported as one line (exit status 2)."""


def one_line(err: BaseException, limit: int = 400) -> str:
    """An exception's message on one line (its type when it has none), shortened to ``limit`` characters."""
    msg = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, KeyError) and msg.startswith("'") and msg.endswith("'"):
        msg = msg[1:-1]
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"
