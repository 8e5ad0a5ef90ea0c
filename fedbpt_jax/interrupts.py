"""Clean stops: Ctrl-C (SIGINT) and SIGTERM never cut a results or checkpoint write in half.

:func:`deferred` marks a critical section (writing ``metrics.json`` + ``rounds.csv``, saving a checkpoint):
a SIGINT or SIGTERM that arrives inside it is held and delivered when the section ends, so the files on
disk always describe the same round. :func:`install` (the CLI calls it) turns both signals into
:class:`Interrupted`, which the CLI reports as "interrupted after round r" with exit status 128 + signal.
Outside the main thread (where Python cannot handle signals) both are no-ops.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Raised by the handlers of :func:`install`; ``signum`` is the signal received."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def _raise(signum, frame):
    raise Interrupted(signum)


def install() -> None:
    """SIGINT and SIGTERM raise :class:`Interrupted` (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        for s in _SIGNALS:
            signal.signal(s, _raise)


@contextlib.contextmanager
def deferred():
    """Holds SIGINT/SIGTERM until the block ends, then delivers the first one received to the handler that
    was in place (re-sent to this process when that handler is the default or ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.getsignal(s) for s in _SIGNALS}

    def hold(signum, frame):
        pending.append(signum)

    for s in _SIGNALS:
        signal.signal(s, hold)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if pending:
            signum = pending[0]
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler != signal.SIG_IGN:
                os.kill(os.getpid(), signum)
