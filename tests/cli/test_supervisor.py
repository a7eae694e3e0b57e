"""The ``bnkit`` console script's supervising parent (``bnkit.cli.supervisor``), through real processes.

A reader stuck in C code that holds Python's lock, or whose memory grows past what reading may take,
is ended from the parent with one line and exit status 2; everything else (exit statuses, signals,
a closed pipe) is as when the command was one process. The stuck readers are real: HDF5 looping on a
damaged global heap (the check that prevents it switched off in the test's environment) and a
``crypt`` of a billion rounds called with Python's lock held (its premise checked first), driven
through the supervisor's own API. The memory case is a real legacy ``.h5`` whose name list points
3,000 times at one 1.5 MB heap object.
"""

from __future__ import annotations

import ctypes
import json
import os
import pty
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import SRC, _console_script

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
SAFETY_NET = 3 * 2**30  # RLIMIT_AS of every process here: a bnkit without its supervisor fails, not the machine


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    env.setdefault("KERAS_BACKEND", "torch")
    env["COLUMNS"] = "160"
    env.update(extra)
    return env


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (SAFETY_NET, SAFETY_NET))


def _run(argv: list, cwd: Path, timeout: float = 60, **extra_env) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, cwd=cwd, env=_env(**extra_env),
        timeout=timeout, stdin=subprocess.DEVNULL, preexec_fn=_limit_address_space,
    )  # fmt: skip
    return proc, time.monotonic() - start


def _script(body: str) -> list[str]:
    """``python -c`` of a program whose first act is the console script's: fork under supervision."""
    head = "from bnkit.cli.supervisor import supervise\nsupervise()  # returns in the child only\n"
    return [sys.executable, "-c", head + textwrap.dedent(body)]


@pytest.fixture(scope="module")
def small_h5(tmp_path_factory) -> Path:
    """``fuzz_models.small_keras`` saved by Keras 3 as a legacy ``.h5``."""
    sys.path.insert(0, str(FUZZ))
    from fuzz_models import small_keras

    path = tmp_path_factory.mktemp("h5") / "small.h5"
    small_keras().save(path)
    return path


# ------------------------------------------------------------------------- stuck in C code


_CRYPT = "$6$rounds={}$bnkit$"  # glibc's SHA-512 crypt: CPU-bound C, no signal check, no I/O


def _libcrypt():
    try:
        library = ctypes.PyDLL("libcrypt.so.1")  # PyDLL: the call holds Python's lock
    except OSError:
        pytest.skip("no libcrypt.so.1 on this machine")
    library.crypt.restype = ctypes.c_char_p
    return library


def test_the_stuck_call_holds_pythons_lock_and_runs_no_signal_handler():
    """The premise of the next test: while the call runs, neither a signal handler nor another
    thread runs (what bnkit's timer and a watchdog thread would need)."""
    library = _libcrypt()
    ticks: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.005):
            ticks.append(time.monotonic())

    handled: list[float] = []
    previous = signal.signal(signal.SIGALRM, lambda *_: handled.append(time.monotonic()))
    thread = threading.Thread(target=tick)
    thread.start()
    time.sleep(0.05)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        start = time.monotonic()
        library.crypt(b"password", _CRYPT.format(2_000_000).encode())
        end = time.monotonic()
        time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert end - start > 0.3, "too fast to tell"
    # due 0.05 s into a call of 0.3 s or more, it ran as the call returned (before `end` was taken)
    assert handled and handled[0] > end - 0.01, "the SIGALRM handler ran inside the call"
    assert not [t for t in ticks if start + 0.02 < t < end - 0.02], "another thread ran inside the call"


def test_a_reader_stuck_in_c_code_holding_pythons_lock_is_ended_at_the_deadline(tmp_path):
    """Before, only a watchdog thread was there to end it: it waits for the lock as long as the call runs
    (here ~6 minutes); the parent process ends it at the deadline and its grace (0.5 s + 1 s)."""
    _libcrypt()
    code = _script(
        f"""
        import ctypes
        from bnkit.cli.watchers import for_command
        from bnkit.formats.limits import ReadLimits, deadline
        from bnkit.interrupts import stop_signals_handled

        library = ctypes.PyDLL("libcrypt.so.1")
        limits = ReadLimits(max_seconds=0.5, watcher=for_command("bnkit summary"))
        with stop_signals_handled(), deadline(limits, "stuck.h5"):
            print("reading", flush=True)
            library.crypt(b"password", {_CRYPT.format(999_999_999).encode()!r})
        print("finished")
        """
    )
    proc, elapsed = _run(code, tmp_path, timeout=60)
    assert (proc.returncode, proc.stdout) == (2, "reading\n"), proc.stderr
    assert proc.stderr.splitlines() == [
        "bnkit summary: error: stuck.h5: reading took longer than 0.5 s (raise the limit with --max-read-seconds)"
    ]
    assert elapsed < 15


SKIP_HEAP_CHECK = """
# sitecustomize of the test: bnkit's check of HDF5's global heaps switched off, as if it had a gap,
# so that HDF5 itself reads the damaged heap (and loops forever, in C, holding Python's lock)
import time
from pathlib import Path

try:
    from bnkit.formats import h5_checks
except ImportError:  # a bnkit without the check
    pass
else:
    def _skipped(*args):
        Path("reached").write_text(repr(time.monotonic()))

    h5_checks.check_global_heaps = _skipped
"""


def test_hdf5_looping_in_c_on_a_damaged_heap_is_ended_by_the_real_command(small_h5, tmp_path):
    """The real bug behind this: HDF5 2.0 loops forever on a global heap whose free space says 0
    bytes, holding Python's lock and ignoring SIGTERM (bnkit now refuses such heaps before HDF5
    reads one). With the check switched off, the real ``bnkit summary`` still ends, at the deadline
    and its grace, with the one line."""
    sys.path.insert(0, str(FUZZ))
    import h5_craft

    path = tmp_path / "loop.h5"
    path.write_bytes(h5_craft.looping_heap(small_h5.read_bytes()))
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SKIP_HEAP_CHECK)
    start = time.monotonic()
    try:
        proc, _ = _run(
            [_console_script(), "summary", path, "--max-read-seconds", "1"],
            tmp_path,
            timeout=30,
            PYTHONPATH=os.pathsep.join([str(SRC), str(site)]),
        )
    except subprocess.TimeoutExpired:
        pytest.fail("still reading 30 s later")
    ended = time.monotonic()
    assert (tmp_path / "reached").exists(), "HDF5 never read the damaged heap"
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"bnkit summary: error: {path}: reading took longer than 1 s (raise the limit with --max-read-seconds)"
    ]
    reached = float((tmp_path / "reached").read_text())
    assert ended - reached > 0.9, "it stopped by itself at the deadline: not stuck in C code"
    assert ended - start < 20


# ------------------------------------------------------------------------------- memory


def test_a_name_list_that_becomes_gigabytes_is_stopped_past_what_reading_may_take(small_h5, tmp_path):
    """3,000 names in a 1.6 MB file all point at one 1.5 MB heap object: h5py makes 4.5 GB of them
    before bnkit could count them (about 9 GB in all). At --max-model-bytes 1M reading may take
    2 MiB + 1 GiB; the parent ends it there. (Before: 9 GB, here the address-space limit's error.)"""
    sys.path.insert(0, str(FUZZ))
    import h5_craft

    path = tmp_path / "names.h5"
    path.write_bytes(h5_craft.shared_heap_names(small_h5.read_bytes(), "model_weights", "layer_names", 3000, 1_500_000))
    assert path.stat().st_size < 2 * 10**6
    proc, elapsed = _run([_console_script(), "summary", path, "--max-model-bytes", "1M"], tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"bnkit summary: error: {path}: reading took more than 1 GiB of memory, over what the limit of 1 MiB "
        "for a model allows (2 × it + 1 GiB; raise it with --max-model-bytes)"
    ]
    assert elapsed < 30


# ----------------------------------------------------------------- exit statuses, signals


# a model whose reading imports torch only (a Keras file would import Keras too, 5 s more per process)
TORCH_MODEL = "bnkit.examples:torch_seed_model"


def test_exit_statuses_are_the_commands(tmp_path):
    proc, _ = _run([_console_script(), "summary", TORCH_MODEL, "--json"], tmp_path)
    assert (proc.returncode, proc.stderr) == (0, "") and json.loads(proc.stdout)["name"] == "Sequential"
    proc, _ = _run([_console_script(), "lint", TORCH_MODEL, "--for-inference"], tmp_path)
    assert proc.returncode == 1 and "error bn-training-mode" in proc.stdout, proc.stderr
    proc, _ = _run([_console_script(), "summary", tmp_path / "missing.h5"], tmp_path)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == f"bnkit summary: error: {tmp_path / 'missing.h5'}: no such file\n"


WAITING = """
import os
import time
from pathlib import Path


def net():
    Path("started").write_text(f"{os.getpid()} {os.getppid()}")
    time.sleep(60)
"""


@pytest.mark.parametrize(("signum", "status", "stderr"), [(signal.SIGTERM, 143, "terminated\n"),
                                                          (signal.SIGHUP, -signal.SIGHUP, "")])  # fmt: skip
def test_a_stop_signal_sent_to_the_bnkit_process_reaches_the_command(tmp_path, signum, status, stderr):
    """SIGTERM stops the command cleanly (bnkit.interrupts: one line, 143); SIGHUP, which bnkit does
    not handle, ends it as it always did. The command runs in the child of the process signalled."""
    (tmp_path / "waiting.py").write_text(WAITING)
    proc = subprocess.Popen(
        [_console_script(), "convert", "waiting:net", tmp_path / "out.pt2", "--input-shape", "3,8,8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=_env(),
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (tmp_path / "started").exists(), proc.communicate()[1] if proc.poll() is not None else "not started"
        time.sleep(0.1)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert (proc.returncode, err) == (status, stderr)
    child, parent = map(int, (tmp_path / "started").read_text().split())
    assert parent == proc.pid != child, "the command did not run under a supervising parent"
    assert not (tmp_path / "out.pt2").exists()


@pytest.mark.parametrize("reading", [True, False])
def test_a_child_killed_by_a_signal_kills_the_parent_with_it(tmp_path, reading):
    """As a shell saw it before (``Killed``, 137); killed while reading (the out-of-memory killer's
    SIGKILL), the parent says so in one line."""
    code = _script(
        f"""
        import os, signal
        from bnkit.cli.watchers import for_command
        from bnkit.formats.limits import ReadLimits, deadline

        if {reading}:
            with deadline(ReadLimits(watcher=for_command("bnkit summary")), "big.h5"):
                os.kill(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc, _ = _run(code, tmp_path)
    assert proc.returncode == -signal.SIGKILL
    expected = [
        "bnkit summary: error: big.h5: killed (SIGKILL) while reading: out of memory? (the system's "
        "out-of-memory killer sends it; a lower --max-model-bytes stops reading sooner)"
    ]
    assert proc.stderr.splitlines() == (expected if reading else [])


def test_a_fault_of_the_supervisors_own_leaves_the_command_to_end_as_it_would(tmp_path):
    code = _script(
        """
        import sys, time
        from bnkit.cli import supervisor

        supervisor.tell("reading", until="not a time")  # the parent's comparison fails
        time.sleep(0.3)
        print("finished", flush=True)
        sys.exit(3)
        """
    )
    proc, _ = _run(code, tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "finished\n", "")


_COUNT_SIGINTS = """
import json, os, signal, time
from pathlib import Path

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
Path("ready").write_text("")
got, until = [], time.monotonic() + 20
while time.monotonic() < until:
    info = signal.sigtimedwait({signal.SIGINT}, until - time.monotonic())
    if info is None:
        break
    got.append({"kernel": info.si_code > 0, "from_parent": info.si_pid == os.getppid()})
    until = min(until, time.monotonic() + 1.0)  # a second one would come within microseconds
Path("got").write_text(json.dumps(got))
"""


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, f"no {path.name}"
        time.sleep(0.01)


def test_ctrl_c_at_a_terminal_reaches_the_command_once_and_kill_int_is_passed_on(tmp_path):
    """Ctrl-C: the terminal signals the whole foreground process group, the command included; the
    parent does not pass it on again. ``kill -INT`` on the bnkit process: the parent passes it on."""
    master, slave = pty.openpty()

    def controlling_terminal() -> None:
        os.setsid()
        import fcntl
        import termios

        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    try:
        proc = subprocess.Popen(
            _script(_COUNT_SIGINTS), stdin=slave, stdout=slave, stderr=slave, cwd=tmp_path, env=_env(),
            preexec_fn=controlling_terminal,
        )  # fmt: skip
        os.close(slave)
        _wait_for(tmp_path / "ready", proc)
        os.write(master, b"\x03")  # Ctrl-C
        assert proc.wait(timeout=30) == 0
        assert json.loads((tmp_path / "got").read_text()) == [{"kernel": True, "from_parent": False}]

        for name in ("ready", "got"):
            (tmp_path / name).unlink()
        proc = subprocess.Popen(_script(_COUNT_SIGINTS), cwd=tmp_path, env=_env(), stdin=subprocess.DEVNULL)
        _wait_for(tmp_path / "ready", proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert json.loads((tmp_path / "got").read_text()) == [{"kernel": False, "from_parent": True}]
    finally:
        os.close(master)


# ----------------------------------------------------------------- pipes, in-process calls


def test_a_closed_pipe_ends_the_command_as_before(tmp_path):
    shell = f"{_console_script()} summary {TORCH_MODEL} | head -1; echo status ${{PIPESTATUS[0]}} >&2"
    proc = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=60)
    assert proc.stdout.startswith('Model: "Sequential" (PyTorch)') and len(proc.stdout.splitlines()) == 1
    assert proc.stderr == f"status {128 + signal.SIGPIPE}\n"
    proc = subprocess.run(["bash", "-c", f"{_console_script()} --help | head -1"], capture_output=True, text=True)
    assert (proc.returncode, proc.stderr) == (0, "") and proc.stdout.startswith("usage: bnkit")


_COUNT_FORKS = """
import os, sys
forks = []
real_fork = os.fork


def fork():
    forks.append(os.getpid())
    return real_fork()


os.fork = fork
from bnkit.cli import main

how = sys.argv[1]
if how == "console, torch imported":
    import torch  # a fork after it is unsafe (its threads, its allocator)
sys.argv = ["bnkit", "summary", "missing.h5"]
status = main(["summary", "missing.h5"]) if how == "main(argv)" else main()
if forks == [os.getppid()]:  # the child, which goes on (the parent never returns from main)
    print("forked", status)
elif not forks:
    print("in process", status)
sys.exit(status)  # as the console script does
"""


@pytest.mark.parametrize(
    ("how", "expected"),
    [("main(argv)", "in process 2\n"), ("console", "forked 2\n"), ("console, torch imported", "in process 2\n")],
)
def test_main_with_an_argv_runs_in_the_calling_process(tmp_path, how, expected):
    """Tests, the fuzz harness and users' scripts call ``bnkit.cli.main(argv)``: no fork, no parent.
    The console script (``main()``) forks, unless torch is imported already."""
    proc = subprocess.run(
        [sys.executable, "-c", _COUNT_FORKS, how],
        capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=60,
    )  # fmt: skip
    assert proc.stdout == expected, proc.stderr
    assert proc.stderr == "bnkit summary: error: missing.h5: no such file\n"
