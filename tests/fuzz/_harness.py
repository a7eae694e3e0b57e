"""Run many ``bnkit`` command lines on untrusted files, and tell whether each ended clean.

Starting Python and importing torch and Keras is most of a command's time (4 s, against
30 ms for summarising a small model), so a :class:`Harness` runs its cases one after another
through ``bnkit.cli.main`` in a long-lived *worker* process, with ``tests/fuzz`` as the working
folder (``fuzz_models:small`` imports from there). For each case the worker points file
descriptors 1 and 2 at files of their own, so what C code prints (torch's logging, HDF5's error
stack, ``terminate called``) is caught as the console script's user would see it.

A case ends *clean* (:func:`problems` is empty) when

* the exit status is 0 with nothing on stderr, or 2 with exactly one line on stderr that starts
  with ``bnkit <command>: error: `` and holds no control character (nothing else: no warning,
  no traceback, no C library's message);
* it ends within ``seconds``: past it, the worker is killed (a hang), the case recorded, and a
  new worker started for the cases left;
* the worker's peak RSS (``VmHWM``) grows by less than ``max_rss_growth`` during it, and no
  allocation failed: the worker runs under an address-space limit (``RLIMIT_AS``), so that a
  blow-up fails the case instead of the machine, and a ``MemoryError`` or a refused allocation,
  which bnkit would otherwise report as one tidy line, is caught by its text;
* the case's ``marker`` file (what a payload would write) does not exist afterwards, and none of
  its ``forbidden`` strings, nor the harness's canary, appears in stdout or stderr. The canary is
  the value of ``BNKIT_FUZZ_CANARY`` in the worker's environment: a file that makes bnkit print
  the environment shows it;
* it leaves nothing in the temporary folder (the worker's own ``TMPDIR``): a reader that unpacks
  a file there must remove what it unpacked, failed or not (a worker killed mid-case cannot).

A case that hangs or crashes the worker is run again alone, as the console script (``python -m
bnkit``), and judged by that run: the worker calls ``bnkit.cli.main`` inside a program, where bnkit
can stop a stuck reader only from a thread, which C code holding Python's lock never lets run; the
console script runs the command in a supervised child process that it stops from outside, with one
line (``bnkit.cli.supervisor``). What the worker saw is kept (:attr:`Outcome.worker`). Memory is
judged by the worker's run (the console run is not measured; ``RLIMIT_AS`` applies to it too).

A case may also name a *reference* reader, ``("module:function", args)``, called in the worker
(after the command, with its output discarded) when the command exits 0: an independent reading
of the same file that a test compares with bnkit's output. It is bounded by the same time limit;
a reference that fails or hangs is reported in :attr:`Outcome.reference`, not as bnkit's problem.

The cases run in the same process one after another, so a case could in principle be affected by
what an earlier one left behind (Keras' registered objects, imported modules); the real console
script starts fresh. A problem found here is reproduced with the command line alone.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the bnkit this process imports (another tree's with PYTHONPATH=OTHER/src), else this tree's
_SPEC = importlib.util.find_spec("bnkit")
SRC = Path(_SPEC.origin).resolve().parents[1] if _SPEC and _SPEC.origin else HERE.parents[1] / "src"
MiB = 2**20
GiB = 2**30
# measured (Linux, torch 2.13 CPU, Keras 3.15): a worker that has read a .pt2, a .keras and an .h5 and
# loaded them with torch.export and Keras maps ~1.3 GiB of address space with 0.5 GiB resident
DEFAULT_ADDRESS_SPACE = 3 * GiB
DEFAULT_RSS_GROWTH = 768 * MiB
DEFAULT_SECONDS = 60.0
_START_SECONDS = 180.0  # a worker's start: interpreter and torch/Keras imports (4 s on an idle machine)
_KEPT_OUTPUT = 1 << 20  # bytes of a case's stdout and stderr read back
CANARY_VARIABLE = "BNKIT_FUZZ_CANARY"
# what an allocation that RLIMIT_AS refused looks like, once bnkit has turned it into its one line
_ALLOCATION_FAILED = re.compile(r"MemoryError|can't allocate memory|Cannot allocate memory|bad_alloc|out of memory")
# Unicode's Bidi_Control characters: they reorder what a terminal shows (a name that reads as another)
_BIDI_CONTROLS = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


@dataclass(frozen=True)
class Case:
    """One ``bnkit`` command line (without ``bnkit``) and what must not happen while it runs."""

    argv: tuple[str, ...]
    name: str = ""
    marker: Path | None = None  # a file a payload would create
    forbidden: tuple[str, ...] = ()  # text that must appear in neither stdout nor stderr
    reference: tuple[str, tuple] | None = None  # ("module:function", args): an independent reader, on exit 0


@dataclass
class Outcome:
    """What one case did. ``status`` is None when the worker was killed (``killed`` says why)."""

    case: Case
    status: int | None
    stdout: str
    stderr: str
    seconds: float
    rss_growth: int  # bytes the worker's peak RSS grew by during the command
    peak_address_space: int = 0  # the worker's peak virtual size (VmPeak) after the command, in bytes
    temporary_files: list[str] = field(default_factory=list)  # what the command left in its TMPDIR
    worker: str | None = None  # set when the console script judged the case: what the worker saw
    killed: str | None = None
    reference: object = None  # the reference reader's result, or {"error": ...}; None when not run
    problems: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        """A few lines for a failure report: the command, the problems, what it printed."""
        lines = [f"{self.case.name or '(case)'}: bnkit {' '.join(self.case.argv)}"]
        lines += [f"    {p}" for p in self.problems]
        lines.append(f"    exit {self.status}, {self.seconds:.2f} s, peak RSS +{self.rss_growth / MiB:.0f} MiB")
        if self.worker:
            lines.append(f"    (judged as the console script; in the worker: {self.worker})")
        for label, text in (("stdout", self.stdout), ("stderr", self.stderr)):
            if text:
                shown = text if len(text) < 600 else text[:300] + " [...] " + text[-300:]
                lines.append(f"    {label}: {shown!r}")
        return "\n".join(lines)


def control_characters(text: str) -> list[str]:
    """The control characters in ``text`` (C0, C1, DEL, line/paragraph separators, bidi controls)."""
    return [
        c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in _BIDI_CONTROLS
    ]  # fmt: skip


def problems(outcome: Outcome, canary: str, seconds: float, max_rss_growth: int) -> list[str]:
    """Every way ``outcome`` did not end clean (see the module doc); empty when it did."""
    case, found = outcome.case, []
    if outcome.killed:
        found.append(outcome.killed)
    command = case.argv[0] if case.argv else ""
    err_lines = outcome.stderr.splitlines()
    if outcome.status == 0:
        if outcome.stderr:
            found.append(f"exit 0 with {len(err_lines)} line(s) on stderr")
    elif outcome.status == 2:
        prefix = f"bnkit {command}: error: "
        if len(err_lines) != 1 or not outcome.stderr.endswith("\n"):
            found.append(f"exit 2 with {len(err_lines)} line(s) on stderr, not one")
        if not outcome.stderr.startswith(prefix):
            found.append(f"the error does not start with {prefix!r}")
        bad = control_characters(outcome.stderr.rstrip("\n"))
        if bad:
            found.append(f"control characters in the error: {''.join(bad)!r}")
    elif outcome.status is not None:
        found.append(f"exit status {outcome.status}, not 0 or 2")
    if outcome.seconds > seconds and not outcome.killed:
        found.append(f"took {outcome.seconds:.1f} s, over the limit of {seconds:g} s")
    if outcome.rss_growth > max_rss_growth:
        found.append(
            f"memory: peak RSS grew by {outcome.rss_growth / MiB:.0f} MiB, over {max_rss_growth / MiB:.0f} MiB"
        )
    if outcome.status not in (0, None) and _ALLOCATION_FAILED.search(outcome.stderr):
        found.append("memory: an allocation failed (the worker's address-space limit stopped a blow-up)")
    if outcome.temporary_files:
        found.append(f"left temporary files: {', '.join(outcome.temporary_files)}")
    if case.marker is not None and Path(case.marker).exists():
        found.append(f"the payload ran: {case.marker} exists")
    for text in (*case.forbidden, canary):
        if text and (text in outcome.stdout or text in outcome.stderr):
            shown = "the environment canary" if text == canary else repr(text)
            found.append(f"printed forbidden text: {shown}")
    return found


class Harness:
    """A worker process that runs :class:`Case` s (see the module doc); a context manager.

    ``seconds``: the most one case (and, separately, its reference reader) may take.
    ``max_rss_growth``: the most one case may raise the worker's peak RSS by.
    ``address_space``: the worker's ``RLIMIT_AS``, a safety net for the machine.
    ``warm``: modules the worker imports before its first case, so that the first case's time and
    memory are its own. ``entry``: the ``module:function`` that takes an argv list and returns the
    exit status (bnkit's command line; the harness's own tests give one that misbehaves on purpose).
    ``console``: the command line of the same program as its users run it (``python -m bnkit``),
    which judges a case that hung, crashed or grew too much in the worker (see the module doc);
    None judges the worker's run.
    """

    def __init__(
        self,
        seconds: float = DEFAULT_SECONDS,
        max_rss_growth: int = DEFAULT_RSS_GROWTH,
        address_space: int = DEFAULT_ADDRESS_SPACE,
        cwd: Path = HERE,
        warm: tuple[str, ...] = ("torch", "bnkit.keras", "h5py", "bnkit.cli"),
        entry: str = "bnkit.cli:main",
        console: tuple[str, ...] | None = (sys.executable, "-m", "bnkit"),
    ) -> None:
        self.seconds = seconds
        self.max_rss_growth = max_rss_growth
        self.address_space = address_space
        self.cwd = Path(cwd)
        self.warm = warm
        self.entry = entry
        self.console = console
        self.canary = secrets.token_hex(16)
        self.folder = Path(tempfile.mkdtemp(prefix="bnkit-harness-"))
        self.workers_started = 0
        self._proc: subprocess.Popen | None = None

    # ------------------------------------------------------------------------- the worker

    def _environment(self, scratch: Path) -> dict:
        """The environment of a worker or a console script: this tree's bnkit, the canary, its own TMPDIR."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), str(HERE), env.get("PYTHONPATH")]))
        env["KERAS_BACKEND"] = "torch"
        env["COLUMNS"] = "160"
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env[CANARY_VARIABLE] = self.canary
        shutil.rmtree(scratch, ignore_errors=True)  # what a killed process left
        scratch.mkdir()
        env["TMPDIR"] = str(scratch)  # what a command leaves there is seen
        return env

    def _start(self) -> None:
        env = self._environment(self.folder / "tmp")
        commands_r, commands_w = os.pipe()
        results_r, results_w = os.pipe()
        self.log = self.folder / f"worker-{self.workers_started}.log"
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), str(commands_r), str(results_w),
                 str(self.address_space), ",".join(self.warm), self.entry],
                cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                pass_fds=(commands_r, results_w), start_new_session=True,
            )  # fmt: skip
        os.close(commands_r)
        os.close(results_w)
        self._commands = os.fdopen(commands_w, "w", buffering=1)
        self._results = os.fdopen(results_r, "rb", buffering=0)
        self._pending = b""
        self.workers_started += 1
        ready = self._receive(_START_SECONDS)
        if ready is None or ready.get("ready") is not True:
            log_text = self.log.read_text(errors="replace")[-3000:]
            self._kill()
            raise RuntimeError(f"the harness worker did not start ({ready}):\n{log_text}")

    def _kill(self) -> int | None:
        """Kill the worker and everything it started; its exit status (negative: a signal)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        status = proc.wait()
        self._commands.close()
        self._results.close()
        return status

    def _receive(self, timeout: float) -> dict | None:
        """The worker's next line; None when it did not come in ``timeout`` s (``self.ended``: the worker exited)."""
        end = time.monotonic() + timeout
        self.ended = False
        while b"\n" not in self._pending:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self._results], [], [], left)[0]:
                return None
            chunk = self._results.read(65536)
            if not chunk:  # the worker exited
                self.ended = True
                return None
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        if self._proc is not None:
            try:
                self._commands.write("null\n")
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self._kill()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------------- the cases

    def run(self, cases: list[Case], progress=None) -> list[Outcome]:
        """Run ``cases`` in order; one :class:`Outcome` each. ``progress(i, outcome)`` after each."""
        outcomes = []
        for i, case in enumerate(cases):
            outcome = self.run_one(case)
            outcomes.append(outcome)
            if progress is not None:
                progress(i, outcome)
        return outcomes

    def run_one(self, case: Case) -> Outcome:
        if self._proc is None:
            self._start()
        out, err = self.folder / "stdout", self.folder / "stderr"
        request = {"argv": list(case.argv), "stdout": str(out), "stderr": str(err), "reference": case.reference}
        try:
            self._commands.write(json.dumps(request) + "\n")
        except BrokenPipeError:  # the worker ended between two cases: the case runs in a new one
            self._kill()
            self._start()
            self._commands.write(json.dumps(request) + "\n")
        started = time.monotonic()
        result = self._receive(self.seconds)
        if result is None:  # a hang, or the worker died (a crash, or bnkit's stuck-reader exit)
            seconds = time.monotonic() - started
            hung = not self.ended
            if self.ended:
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:  # closed its pipe but lives on: stuck all the same
                    hung = True
            status = self._kill()
            result = {"status": None if hung else status, "seconds": seconds, "rss_growth": 0}
            if hung:
                result["killed"] = f"hang: still running after {self.seconds:g} s (the worker was killed)"
            elif status is None or status < 0:
                result["killed"] = f"the worker died of signal {-(status or 0)}"
            elif status != 2:  # os._exit(2) with one line is what bnkit's watchdog does for a stuck reader
                result["killed"] = f"the worker exited with status {status} during the command"
        outcome = Outcome(
            case=case,
            status=result["status"],
            stdout=_read_text(out),
            stderr=_read_text(err),
            seconds=result["seconds"],
            rss_growth=result["rss_growth"],
            peak_address_space=result.get("vm_peak", 0),
            temporary_files=result.get("temporary_files", []),
            killed=result.get("killed"),
        )
        if self._proc is not None and result.get("reference_follows"):
            reference = self._receive(self.seconds)
            if reference is None:
                status = self._kill()
                reference = {"error": f"the reference reader hung or died (status {status})"}
            outcome.reference = reference.get("result", reference)
        if self.console is not None and self._needs_console(outcome):
            judged = self._run_console(case, outcome)
            judged.reference = outcome.reference if judged.status == 0 else None
            outcome = judged
        outcome.problems = problems(outcome, self.canary, self.seconds, self.max_rss_growth)
        return outcome

    def _needs_console(self, outcome: Outcome) -> bool:
        return outcome.killed is not None  # a hang or a crash; memory is the worker's to measure

    def _run_console(self, case: Case, seen: Outcome) -> Outcome:
        """``case`` run again alone, as the console script, under the same limits; its outcome, with
        what the worker saw in :attr:`Outcome.worker`."""
        out, err = self.folder / "stdout", self.folder / "stderr"
        scratch = self.folder / "console-tmp"
        env = self._environment(scratch)
        # RLIMIT_AS set by a small launcher that then becomes the console script (no preexec_fn:
        # this process may run threads)
        launcher = "import os, resource, sys; resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]),) * 2); " \
            "os.execv(sys.argv[2], sys.argv[2:])"  # fmt: skip
        argv = [sys.executable, "-c", launcher, str(self.address_space), *self.console, *case.argv]
        started = time.monotonic()
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            proc = subprocess.Popen(argv, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                                    stderr=stderr, start_new_session=True)  # fmt: skip
            try:
                status, killed = proc.wait(timeout=self.seconds), None
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                status, killed = None, f"hang: still running after {self.seconds:g} s (the console script was killed)"
        if status is not None and status < 0:
            status, killed = None, f"the console script died of signal {-status}"
        left = sorted(os.listdir(scratch)) if killed is None else []
        return Outcome(
            case=case,
            status=status,
            stdout=_read_text(out),
            stderr=_read_text(err),
            seconds=time.monotonic() - started,
            rss_growth=0,  # not measured: the console script's supervisor bounds its own memory
            killed=killed,
            temporary_files=left,
            worker=seen.killed,
        )


def _read_text(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(_KEPT_OUTPUT)
    except FileNotFoundError:
        return ""
    return data.decode("utf-8", errors="backslashreplace")


# ------------------------------------------------------------------------------ the worker side


def _worker(commands_fd: int, results_fd: int, address_space: int, warm: list[str], entry: str) -> None:
    import importlib
    import resource
    import traceback

    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    for name in warm:
        importlib.import_module(name)
    module, _, function = entry.partition(":")
    main = getattr(importlib.import_module(module), function)

    commands = os.fdopen(commands_fd, "r")
    results = os.fdopen(results_fd, "w", buffering=1)

    def send(message: dict) -> None:
        results.write(json.dumps(message, default=repr) + "\n")

    def redirected(stdout: str, stderr: str):
        """fd 1 and 2 (and so sys.stdout, sys.stderr and C code's output) into the two files."""
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        for fd, path in ((1, stdout), (2, stderr)):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(target, fd)
            os.close(target)
        return saved

    def restore(saved) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__  # a command that swapped them
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)

    send({"ready": True})
    for line in commands:
        request = json.loads(line)
        if request is None:
            break
        saved = redirected(request["stdout"], request["stderr"])
        scratch = tempfile.gettempdir()
        present = set(os.listdir(scratch))
        before = _status("VmHWM")
        started = time.monotonic()
        try:
            status = main(request["argv"])
        except SystemExit as e:  # argparse, and what the interpreter would make of any other code
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=sys.stderr)
        except BaseException:  # what the console script would show: a traceback, exit status 1
            traceback.print_exc()
            status = 1
        finally:
            restore(saved)
        seconds = time.monotonic() - started
        growth = _status("VmHWM") - before
        reference = request.get("reference")
        follows = bool(reference) and status == 0
        left = sorted(set(os.listdir(scratch)) - present)
        for name in left:  # reported, then removed: the next command starts from a clean folder
            path = os.path.join(scratch, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        message = {"status": status, "seconds": seconds, "rss_growth": growth, "vm_peak": _status("VmPeak")}
        message["temporary_files"] = left
        send({**message, "reference_follows": follows})
        if follows:
            saved = redirected(os.devnull, os.devnull)
            try:
                target, args = reference
                module, _, function = target.partition(":")
                result = {"result": getattr(importlib.import_module(module), function)(*args)}
            except BaseException as e:  # noqa: BLE001 - a reference reader's failure is a result too
                result = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
            finally:
                restore(saved)
            send(result)


def _status(field: str) -> int:
    """A size from /proc/self/status, in bytes: ``VmHWM`` (peak RSS), ``VmPeak`` (peak address space).

    Not ``ru_maxrss``: Linux keeps a process's peak RSS across exec, so a worker started by a test
    process that holds torch (1 GB resident) would show no growth below that.
    """
    try:
        with open("/proc/self/status") as status:
            line = next(x for x in status if x.startswith(field + ":"))
    except (OSError, StopIteration):
        return 0
    return int(line.split()[1]) * 1024


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), [m for m in sys.argv[4].split(",") if m], sys.argv[5])
