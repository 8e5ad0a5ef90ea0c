"""Clean stops: Ctrl-C (SIGINT) and SIGTERM never cut a results or checkpoint write in half, and never wait
for a long computation to end.

:func:`deferred` marks a critical section (writing ``metrics.json`` + ``rounds.csv``, saving a checkpoint):
a SIGINT or SIGTERM that arrives inside it is held and delivered when the section ends, so the files on
disk always describe the same round. :func:`install` (the CLI calls it) turns both signals into
:class:`Interrupted`, which the CLI reports as "interrupted after round r" with exit status 128 + signal.

Python runs a signal handler only between bytecodes, so a signal that arrives while the main thread waits in
one long compiled computation (an evaluation of a large test set, a cache build, a compilation) would wait for
it. :func:`install` therefore also routes both signals to a watchdog thread: it passes each one on to the main
thread at once and, if the main thread has not taken it within :data:`GRACE_SECONDS` (and is not inside a
critical section), or on a second signal, ends the process with the same status after saying so. What was
written before (results, checkpoints: all atomic) stays intact; the run resumes from its checkpoint.
Outside the main thread (where Python cannot handle signals) both are no-ops.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
import time

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Seconds the main thread gets to take a signal before the watchdog ends the process.
GRACE_SECONDS = 3.0

_taken = threading.Event()  # the main thread's handler ran for the latest signal
_critical = [0]  # depth of deferred() sections in the main thread
_watchdog: list[threading.Thread] = []


class Interrupted(KeyboardInterrupt):
    """Raised by the handlers of :func:`install`; ``signum`` is the signal received."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def _raise(signum, frame):
    _taken.set()
    raise Interrupted(signum)


def install(watchdog: bool = True) -> None:
    """SIGINT and SIGTERM raise :class:`Interrupted` (main thread only); with ``watchdog`` (POSIX), a signal the
    main thread cannot take within :data:`GRACE_SECONDS`, or a second one, ends the process (see the module)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in _SIGNALS:
        signal.signal(s, _raise)
    if watchdog and hasattr(signal, "pthread_sigmask") and not _watchdog:
        # Blocked in this thread and in every thread started from now on; only the watchdog receives them.
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        t = threading.Thread(target=_watch, name="fedbpt-interrupt-watchdog", daemon=True)
        t.start()
        _watchdog.append(t)


def _watch() -> None:
    received = 0
    while True:
        signum = signal.sigwait(_SIGNALS)
        received += 1
        _taken.clear()
        _thread.interrupt_main(signum)  # as if it had arrived in the main thread: its handler runs there
        deadline = time.monotonic() + (0.0 if received > 1 else GRACE_SECONDS)
        while True:
            if _taken.wait(0.05) and received == 1:
                break  # the main thread took it and stops cleanly
            if time.monotonic() >= deadline and not _critical[0]:  # never while a results file is written
                why = "a second signal" if received > 1 else f"still computing after {GRACE_SECONDS:g} s"
                print(
                    f"fedbpt-jax: {signal.Signals(signum).name} ({why}): quitting now; results and checkpoints "
                    "written so far are intact (rerun with the same --checkpoint-dir to resume)",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(128 + signum)


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
        _taken.set()
        pending.append(signum)

    for s in _SIGNALS:
        signal.signal(s, hold)
    _critical[0] += 1
    try:
        yield
    finally:
        _critical[0] -= 1
        for s, h in previous.items():
            signal.signal(s, h)
        if pending:
            signum = pending[0]
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler != signal.SIG_IGN:
                os.kill(os.getpid(), signum)
