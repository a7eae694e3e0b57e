"""SIGINT and SIGTERM for the command line: stop, lose nothing, leave nothing behind.

The ``bnkit`` command installs :func:`_on_stop_signal` for the length of a command
(:func:`stop_signals_handled`); the library installs nothing, so ``import bnkit`` leaves a program's
own handlers alone. The handler raises ``KeyboardInterrupt`` (SIGINT) or :class:`Terminated`
(SIGTERM) in the main thread, so ``finally`` blocks remove partial files, and it also *remembers*
the signal. That memory is what survives code that swallows the exception: Keras' saving code has
bare ``except:`` clauses, and a SIGTERM raised inside one used to vanish (the file was written,
the command exited 0). :func:`raise_if_stop_requested` re-raises it where it matters — the atomic
writer calls it before renaming a finished file into place, the command before it exits 0.

Code that must not be cut in half (removing a temporary file, the rename) runs in a
:class:`deferred` section: a signal arriving there is remembered and raised when the section
ends. A flag consulted by the handler does this rather than ``pthread_sigmask``: the Python-level
handler always runs in the main thread, but the C-level signal may be delivered to any of
PyTorch's threads, which a mask set in the main thread would not cover. While a stop exception is
already being handled (an ``except``/``finally`` on its way out), further signals are remembered
but not raised again, so a second Ctrl-C does not cut the clean-up short; once swallowed code has
moved on, the next signal raises again.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

__all__ = [
    "Terminated",
    "deferred",
    "raise_if_stop_requested",
    "stop_requested",
    "stop_signals_handled",
]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread as ``KeyboardInterrupt`` is for SIGINT: ``finally`` blocks run."""


_STOP_EXCEPTIONS = (KeyboardInterrupt, Terminated)

_requested: int | None = None  # the first stop signal while the command's handler is installed
_deferring = 0  # depth of the main thread's deferred sections


def _exception_for(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def _on_stop_signal(signum, frame) -> None:
    global _requested
    if _requested is None:
        _requested = signum
    if _deferring or isinstance(sys.exc_info()[1], _STOP_EXCEPTIONS):
        return  # raised when the protected section ends / already on its way out
    raise _exception_for(signum)


def stop_requested() -> int | None:
    """The stop signal received since :func:`stop_signals_handled` began, or None."""
    return _requested


def raise_if_stop_requested() -> None:
    """Raise the exception for a stop signal already received (maybe swallowed on the way)."""
    if _requested is not None:
        raise _exception_for(_requested)


@contextlib.contextmanager
def stop_signals_handled():
    """Install the stop-signal handler for the ``with`` body, in the main thread (elsewhere: nothing).

    A signal the caller chose to ignore (``nohup``, a background job's SIGINT) stays ignored.
    """
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    _requested = None
    try:
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, _on_stop_signal)
        yield
    finally:
        with deferred(raise_at_end=False):
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            _requested = None


class deferred:  # lower case: used as ``with deferred():``, like contextlib's helpers
    """A section that a stop signal does not cut short: it is raised when the section ends.

    Only the main thread's sections matter (the Python handler runs there); in other threads this
    does nothing. Sections nest; the outermost raises (also in place of another error leaving it:
    the user asked to stop), unless a stop exception is already leaving it or ``raise_at_end`` is
    false.
    """

    def __init__(self, raise_at_end: bool = True) -> None:
        self.raise_at_end = raise_at_end
        self.counted = False

    def __enter__(self) -> deferred:
        global _deferring
        if threading.current_thread() is threading.main_thread():
            _deferring += 1
            self.counted = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        global _deferring
        if not self.counted:
            return
        _deferring -= 1
        if self.raise_at_end and not _deferring and not isinstance(exc, _STOP_EXCEPTIONS):
            raise_if_stop_requested()
