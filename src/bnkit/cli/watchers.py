"""What ends a ``bnkit`` command whose reader is stuck past its limits, where no signal handler can.

:func:`~bnkit.formats.limits.deadline`'s timer stops Python code at ``--max-read-seconds``. A loop in
C code never returns to Python, where the timer's handler would run; and one reader's memory cannot
be bounded before it allocates (see :mod:`bnkit.cli.supervisor`). The command line sets one of these
:class:`~bnkit.formats.limits.ReadWatcher` on its :class:`~bnkit.formats.limits.ReadLimits`
(:func:`for_command`); the library sets none, and never ends its caller's process.

* :class:`SupervisorWatcher`, in the child of the ``bnkit`` console script: tells the supervising
  parent when reading starts (the deadline, the memory it may reach, the lines to print) and when it
  ends. The parent ends the child :func:`grace` seconds after the deadline, whatever the child is
  doing, or as soon as its memory has grown by more than :func:`memory_allowed` since reading began.
* :class:`ThreadWatchdog`, where there is no parent (``bnkit.cli.main(argv)`` called inside a
  program; macOS): a thread ends the process :func:`grace` seconds after the deadline. It helps with
  C code that lets other threads run (it releases Python's lock, as hashlib and most I/O do); C code
  that holds the lock holds the watchdog too, and there is no memory limit. It stays for those
  callers because it costs nothing and catches that half of the cases.

The memory allowed is twice the model's budget plus 1 GiB, because
:class:`~bnkit.formats.limits.Budget`'s charges are what a model's parts declare, not everything
reading them takes: the frameworks imported on the way take 250-300 MB, and Keras holds a weights
file in memory while it reads it. Measured with ``benchmarks/read_memory.py --cli`` at the lowest
``--max-model-bytes`` each file reads under, the reading child grew by at most 1.7 GB (VGG16 as
``.keras`` or ``.h5``, at 1453 and 935 MiB) and 842 MB for torchvision's VGG16 ``.pt2`` (at 534
MiB): well under twice the limit plus 1 GiB.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

from bnkit.cli import supervisor
from bnkit.formats.limits import ReadLimits, ReadWatcher, format_bytes, timeout_message

__all__ = [
    "MEMORY_FACTOR",
    "MEMORY_MARGIN",
    "SupervisorWatcher",
    "ThreadWatchdog",
    "for_command",
    "grace",
    "memory_allowed",
]

MEMORY_FACTOR = 2  # times --max-model-bytes that reading may add to the process (see the module doc)
MEMORY_MARGIN = 2**30  # and this much more: the frameworks' imports and their own objects
_MAX_GRACE = 10.0


def grace(seconds: float) -> float:
    """How long after a deadline of ``seconds`` a reader may still stop by itself: 1 to 10 s."""
    return min(_MAX_GRACE, max(seconds, 1.0))


def memory_allowed(limits: ReadLimits) -> int:
    """How much the process may grow while it reads a model under ``limits``."""
    return MEMORY_FACTOR * limits.max_model_bytes + MEMORY_MARGIN


def for_command(prefix: str) -> ReadWatcher:
    """The watcher for the command whose lines start with ``prefix`` (``bnkit summary``)."""
    return SupervisorWatcher(prefix) if supervisor.supervised() else ThreadWatchdog(prefix)


class SupervisorWatcher:
    """Tells the supervising parent process what reading may take (see the module doc)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._depth = 0  # a read inside a read is the outer one's

    @contextlib.contextmanager
    def reading(self, what: str, limits: ReadLimits):
        self._depth += 1
        try:
            if self._depth == 1:
                self._tell_reading(what, limits)
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                supervisor.tell("done")

    def _tell_reading(self, what: str, limits: ReadLimits) -> None:
        seconds = limits.max_seconds
        allowed = memory_allowed(limits)
        rss = supervisor.anon_rss()
        error = f"{self.prefix}: error: {what}"
        supervisor.tell(
            "reading",
            until=time.monotonic() + seconds + grace(seconds),
            max_rss=None if rss is None else rss + allowed,
            time_line=f"{self.prefix}: error: {timeout_message(what, seconds)}",
            memory_line=(
                f"{error}: reading took more than {format_bytes(allowed)} of memory, over what the limit of "
                f"{format_bytes(limits.max_model_bytes)} for a model allows ({MEMORY_FACTOR} × it + "
                f"{format_bytes(MEMORY_MARGIN)}; raise it with --max-model-bytes)"
            ),
            killed_line=(
                f"{error}: killed (SIGKILL) while reading: out of memory? (the system's out-of-memory killer "
                "sends it; a lower --max-model-bytes stops reading sooner)"
            ),
        )


class ThreadWatchdog:
    """Ends the process from a thread when reading outlives its deadline (see the module doc)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    @contextlib.contextmanager
    def reading(self, what: str, limits: ReadLimits):
        line = f"{self.prefix}: error: {timeout_message(what, limits.max_seconds)}"
        timer = threading.Timer(limits.max_seconds + grace(limits.max_seconds), _exit_stuck, (line,))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()


def _exit_stuck(line: str) -> None:
    with contextlib.suppress(OSError):
        sys.stderr.flush()
        os.write(2, (line + "\n").encode("utf-8", "replace"))
    os._exit(2)
