"""SIGTERM as an exit: what a process holds is given back when a batch system cancels it.

Light on purpose (no torch): the CLI wraps every command in :func:`terminating`.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Callable, Iterator


stopping = threading.Event()
"""Set once SIGTERM came (:func:`terminate_as_exit`): the console script then drops libraries' shutdown noise."""


class Terminated(SystemExit):
    """The SystemExit a SIGTERM raises (:func:`terminate_as_exit`): only it makes :func:`terminating` say its line."""


def terminate_as_exit() -> Callable[[], None]:
    """Make SIGTERM end this process by SystemExit(143), so what it holds is given back on the way out (the
    ranks it launched stopped, an output's lock released, temporaries removed, a dask cluster it started
    closed): a plain SIGTERM (a batch system's cancel or time limit, ``kill``) ended it at once and left them,
    a lock that a resumed job on another host was refused by; returns the undo.

    Only in the main thread (where Python delivers signals) and where SIGTERM has its default action or is
    already ours (an outer :func:`terminating`, the CLI's); elsewhere a no-op: a SIGTERM ignored (``nohup``,
    a supervisor) stays ignored, and a handler the program set stays its own.
    """
    current = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or not (current is signal.SIG_DFL or getattr(current, "tilefuse", False)):
        return lambda: None

    def terminate(signum, _frame) -> None:
        stopping.set()
        raise Terminated(128 + signum)

    terminate.tilefuse = True  # type: ignore[attr-defined]
    previous = signal.signal(signal.SIGTERM, terminate)
    return lambda: signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def terminating(say: str | None = None) -> Iterator[None]:
    """:func:`terminate_as_exit` for the block. ``say``: a line printed on stderr (after ``tilefuse: ``) when
    SIGTERM ended the block, e.g. what is kept and how to go on; printed once the block has unwound (ranks
    stopped, lock released, their last output flushed), so it is the command's last line. A nested block that
    says nothing leaves the line to the outer one."""
    restore = terminate_as_exit()
    try:
        yield
    except Terminated:
        if say:
            print(f"tilefuse: {say}", file=sys.stderr, flush=True)  # progress bars are closed by now: no line to end
        raise
    finally:
        restore()


@contextlib.contextmanager
def held() -> Iterator[None]:
    """SIGTERM and Ctrl-C wait until the block is done, then are taken, once: for steps that must not be cut in
    two, such as swapping an output folder for its new version (a SIGTERM between the moves left
    ``.state.old-...`` beside a run's state). Only in the main thread, where Python takes signals (a signal mask
    would not do: another thread takes the signal for the process); elsewhere the block just runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list = []
    previous = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(number)
        if handler is not None:  # None: set outside Python, which cannot be put back
            previous[number] = handler
            signal.signal(number, lambda signum, frame: pending.append((signum, frame)))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for signum, frame in pending[:1]:
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)

