"""The ``bnkit`` command's supervising process: it stops, from outside, a reader nothing inside can stop.

A reader stuck in C code that holds Python's lock (HDF5 looping on a damaged heap, a big-integer
computation) runs no signal handler and lets no other thread run: neither the timer of
:func:`~bnkit.formats.limits.deadline` nor a watchdog thread reaches it. And one part of an HDF5
file cannot be bounded before h5py reads it (a name list whose thousands of strings all point at one
heap object: gigabytes from a 2 MB file). So the console script (``bnkit``, ``python -m bnkit``),
before it imports a framework, forks (:func:`supervise`): the child runs the command as it always
did, and is the process that goes on; the parent, which imports nothing heavy, waits for it and
ends as it ends. While the child reads a model file it
says so through a pipe (:mod:`bnkit.cli.watchers` sends, :func:`tell` writes), and the parent
watches the clock and the child's memory (its anonymous resident pages, ``/proc/PID/statm``, every
:data:`POLL_SECONDS`). Past a limit it kills the child (``SIGKILL``), prints the one line the child
gave it for that limit, and exits with status 2.

The protocol: one JSON object per line, child to parent. ``{"event": "reading", "until": T,
"max_rss": B, "time_line": ..., "memory_line": ..., "killed_line": ...}`` when reading starts (``T``:
``time.monotonic()`` past which reading is stuck, the same clock in both processes; ``B``: the
anonymous resident bytes it may reach, or null; the lines as printed), ``{"event": "done"}`` when
it ends. The parent keeps no policy of its own: what the limits are is the child's to say.

Everything else is as without the parent:

* **exit status**: the child's; a child that a signal killed kills the parent with the same signal
  (a shell, or ``subprocess``, sees what it saw before). A child killed by ``SIGKILL`` from elsewhere
  while it read (the system's out-of-memory killer) gets its one line from the parent;
* **signals**: ``SIGINT``, ``SIGTERM``, ``SIGHUP`` and ``SIGQUIT`` sent to the parent by a process
  (``kill PID``) are passed on to the child, where :mod:`bnkit.interrupts` stops the command cleanly.
  Those a terminal sends (Ctrl-C, Ctrl-\\, a hang-up) already reach the whole foreground process
  group, the child too, and are not passed on again: the parent tells them apart by ``si_code``
  (the kernel's, not a process's), which is why it waits in ``sigtimedwait`` with them blocked;
* **the parent's death** kills the child (``PR_SET_PDEATHSIG``): ``kill -9`` on the ``bnkit`` PID
  ends the command, as it did when it was one process;
* **stdin, stdout and stderr** are shared; the parent writes nothing but the lines above.

Where the parent cannot do this (no ``fork``, ``sigtimedwait`` or ``/proc``: macOS, Windows), where a
framework is already imported (forking it is unsafe) or threads already run, and for
``bnkit.cli.main(argv)`` called inside a program (tests, scripts), there is no fork:
:mod:`bnkit.cli.watchers` falls back to a watchdog thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time

__all__ = ["POLL_SECONDS", "anon_rss", "can_supervise", "supervise", "supervised", "tell"]

POLL_SECONDS = 0.05  # how often the parent looks at the child: its messages, the clock, its memory
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
_FRAMEWORKS = ("torch", "keras", "tensorflow", "jax", "h5py")  # modules a fork must come before
_CORE_SIGNALS = {getattr(signal, name) for name in ("SIGQUIT", "SIGILL", "SIGTRAP", "SIGABRT", "SIGBUS",
                 "SIGFPE", "SIGSEGV", "SIGSYS", "SIGXCPU", "SIGXFSZ") if hasattr(signal, name)}  # fmt: skip
_PR_SET_PDEATHSIG = 1

_channel: tuple[int, int] | None = None  # (pid, fd of the pipe's write end) in the supervised child


def can_supervise() -> bool:
    """Whether this process can fork a supervised child now (see the module doc)."""
    return (
        _channel is None
        and sys.platform.startswith("linux")
        and hasattr(os, "fork")
        and hasattr(signal, "sigtimedwait")
        and os.path.exists(f"/proc/{os.getpid()}/statm")
        and not any(name in sys.modules for name in _FRAMEWORKS)
        and threading.current_thread() is threading.main_thread()
        and _threads() == 1  # a fork copies one thread: another's locks would stay held in the child
    )


def _threads() -> int:
    """The threads of this process, Python's and native ones (a BLAS pool), or 0 if unknown."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def supervised() -> bool:
    """Whether this process is a supervised child, whose parent reads what :func:`tell` says."""
    return _channel is not None and _channel[0] == os.getpid()


def tell(event: str, **fields) -> None:
    """Send the parent one message (see the module doc); nothing where this process is not supervised."""
    if not supervised():
        return
    data = (json.dumps({"event": event, **fields}) + "\n").encode()
    with contextlib.suppress(OSError):  # the parent is gone: PR_SET_PDEATHSIG ends this process
        while data:
            data = data[os.write(_channel[1], data) :]


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def anon_rss(pid: int | str = "self") -> int | None:
    """The anonymous resident bytes of process ``pid`` (what it allocated, not the files it maps), or None."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * _PAGE  # resident - shared (file-backed and shmem)
    except (OSError, ValueError, IndexError):
        return None


def supervise() -> None:
    """Fork (see the module doc); return in the child, which goes on with the command (and with
    whatever the caller does after it), or where there is no fork. The parent never returns: it
    supervises the child and ends as the child ends, with its exit status or of the signal that
    killed it, without running the caller's code or exit handlers a second time."""
    global _channel
    if not can_supervise():
        return
    for stream in (sys.stdout, sys.stderr):  # nothing buffered is written twice
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
    watched = {*FORWARDED, signal.SIGCHLD}
    # blocked before the fork, so that none arrives before the parent waits for it in sigtimedwait
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    previous_chld = signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # SIG_IGN would reap the child unseen
    parent = os.getpid()
    read_fd, write_fd = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_fd)
        os.close(write_fd)
        signal.signal(signal.SIGCHLD, previous_chld)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        return
    if pid == 0:
        os.close(read_fd)
        _die_with(parent)
        _channel = (os.getpid(), write_fd)
        signal.signal(signal.SIGCHLD, previous_chld)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        return
    os.close(write_fd)
    try:
        status = _Parent(pid, read_fd, watched).run()
    except BaseException:  # a fault of the supervisor's own must not end the command: wait as a shell would
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        status = _wait(pid)
    os._exit(status)  # nothing of the parent's is buffered (flushed above)


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when ``parent`` dies (Linux's ``PR_SET_PDEATHSIG``)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


class _Parent:
    """The supervising parent: waits for the child, passes signals on, enforces what it is told."""

    def __init__(self, pid: int, channel: int, watched: set[int]) -> None:
        self.pid = pid
        self.channel: int | None = channel
        self.watched = watched
        self.received = b""
        self.reading: dict | None = None  # the child's last "reading" message, until its "done"
        os.set_blocking(channel, False)

    def run(self) -> int:
        while True:
            self._receive()
            status = self._reap()
            if status is not None:
                return self._exit_like(status)
            line = self._over_limit()
            if line is not None:
                return self._stop(line)
            info = signal.sigtimedwait(self.watched, POLL_SECONDS)
            if info is not None and info.si_signo != signal.SIGCHLD and info.si_code <= 0:
                # sent by a process (si_code <= 0: SI_USER, SI_QUEUE, SI_TKILL), to this process
                # alone as far as one can tell; the kernel's (a terminal's) reached the child too
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, info.si_signo)

    def _receive(self) -> None:
        while self.channel is not None:
            try:
                data = os.read(self.channel, 65536)
            except BlockingIOError:
                return
            if not data:  # the child closed it (it exited, or exec'd)
                os.close(self.channel)
                self.channel = None
                return
            self.received += data
            *lines, self.received = self.received.split(b"\n")
            for line in lines:
                with contextlib.suppress(ValueError, AttributeError):
                    message = json.loads(line)
                    if message.get("event") == "reading":
                        self.reading = message
                    elif message.get("event") == "done":
                        self.reading = None

    def _reap(self) -> int | None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by someone else: its status is lost
            return 1 << 8
        return status if pid else None

    def _over_limit(self) -> str | None:
        """The line for the limit the child's reading is past, or None."""
        reading = self.reading
        if reading is None:
            return None
        if time.monotonic() > reading["until"]:
            return reading["time_line"]
        if reading.get("max_rss") is not None:
            rss = anon_rss(self.pid)
            if rss is not None and rss > reading["max_rss"]:
                return reading["memory_line"]
        return None

    def _stop(self, line: str) -> int:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        _write_line(line)
        return 2

    def _exit_like(self, status: int) -> int:
        if not os.WIFSIGNALED(status):
            return os.waitstatus_to_exitcode(status)
        signum = os.WTERMSIG(status)
        self._receive()
        if signum == signal.SIGKILL and self.reading is not None:
            _write_line(self.reading["killed_line"])
        _die_of(signum)
        return 128 + signum


def _wait(pid: int) -> int:
    """Wait for the child as a shell would, without supervising it."""
    while True:
        try:
            status = os.waitpid(pid, 0)[1]
        except ChildProcessError:
            return 1
        except BaseException:  # a signal's exception: the child decides when this ends
            continue
        return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _write_line(line: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, (line + "\n").encode("utf-8", "replace"))


def _die_of(signum: int) -> None:
    """End this process with ``signum``, as the child ended: a shell tells the same story."""
    if signum in _CORE_SIGNALS:  # the child dumped its core already (if it could); not the parent's too
        with contextlib.suppress(ImportError, ValueError, OSError):
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    with contextlib.suppress(OSError, ValueError):
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
        os.kill(os.getpid(), signum)
