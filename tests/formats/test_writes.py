"""Writing model files and reports: a full disk, a signal or a killed run loses nothing and leaves nothing.

Every case runs the real ``bnkit`` command (``convert``, ``fold``, ``compare --report``) in a
subprocess on real PyTorch and Keras models. A full disk is a real write error: a file-size limit
(``RLIMIT_FSIZE``; Python ignores SIGXFSZ, so ``write`` fails with ``EFBIG``) everywhere, and a full
tmpfs (``ENOSPC``) where this machine lets a user namespace mount one. Signals are real signals,
sent while the command is inside the write: the test's own Keras layer (a ``package.module:factory``
model, as a user's would be) says when its weights are being saved, and swallows the exception
there as Keras' own saving code does with a bare ``except:``. A command that is signalled or killed
runs as the console script, in a process of its own; the others (the library's own writes, full
disks, the usual writes, the write after a killed one) run one after another in one subprocess (the
:func:`batch` fixture).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from conftest import SRC, _console_script

SIZE_LIMIT = 4096  # bytes: every output below is larger (the smallest, the HTML report, is ~10 KB)

# The models, as a user's module: small networks, and a Keras layer that swallows an exception
# while its weights are saved (what Keras' saving code does with a bare ``except:``).
MODELS = r'''
import time
from pathlib import Path

import keras
import torch

MARKS = Path(__file__).parent / "marks"


def torch_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(16 * 8 * 8, 10),
    )


def keras_net(*extra):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(16, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    for layer in extra:
        x = layer(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


@keras.saving.register_keras_serializable(package="test_writes")
class Stubborn(keras.layers.Layer):
    """Saving its weights: marks "saving", sleeps; an exception there (a signal's) is swallowed;
    marks "swallowed", then sleeps ``then_wait`` seconds more."""

    def __init__(self, then_wait=0.0, **kwargs):
        super().__init__(**kwargs)
        self.then_wait = then_wait

    def get_config(self):
        return {**super().get_config(), "then_wait": self.then_wait}

    def call(self, x):
        return x

    def save_own_variables(self, store):
        super().save_own_variables(store)
        try:
            MARKS.mkdir(exist_ok=True)
            (MARKS / "saving").touch()  # inside: a signal sent once it exists lands in the try
            time.sleep(300)  # longer than the test waits: a lost signal fails it
        except BaseException:  # as keras.src.saving.saving_lib does around its weights store
            pass
        (MARKS / "swallowed").touch()
        time.sleep(self.then_wait)


def swallowing():
    return keras_net(Stubborn())


def swallowing_then_waiting():
    return keras_net(Stubborn(then_wait=60.0))
'''

# First, before anything imports bnkit, the library's own writes (two paths: a model, a report)
# from a thread, and the signal handlers before and after. Then several command lines in the same
# interpreter (the imports are most of a small command's time), each through bnkit.cli.main as the
# console script runs it; after each, what its output folder holds. A command given a file size runs
# under that file-size limit (RLIMIT_FSIZE's soft limit, raised again after it): its writes fail
# with EFBIG. An exception out of main is recorded with its traceback; a crash (abort) ends the run.
DRIVER = r"""
import contextlib, io, json, os, resource, signal, sys, threading, traceback
import torch

job = json.loads(sys.argv[1])
before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
import bnkit, bnkit.io
errors = []
def write():
    try:
        bnkit.io.save_model(torch.nn.BatchNorm1d(3), job["library"][0])
        with bnkit.io.atomic_path(job["library"][1]) as tmp:
            tmp.write_text("report")
    except BaseException as e:
        errors.append(repr(e))
thread = threading.Thread(target=write)
thread.start()
thread.join()
after = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
library = {"errors": errors, "handlers kept": before == after, "handlers": [repr(before), repr(after)]}

from bnkit.cli import main

results = []
for argv, folder, file_size in job["runs"]:
    out, err = io.StringIO(), io.StringIO()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    if file_size is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, limits[1]))
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
        except BaseException:
            status = "raised"
            traceback.print_exc()
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    listing = {
        name: oct(os.stat(os.path.join(folder, name)).st_mode & 0o777) for name in sorted(os.listdir(folder))
    }
    results.append({"status": status, "stdout": out.getvalue(), "stderr": err.getvalue(), "listing": listing})
sys.__stdout__.write(json.dumps({"library": library, "results": results}))
"""


@pytest.fixture
def models(tmp_path) -> Path:
    """``tmp_path`` holding the models' module (``models:torch_net``...), the commands' working folder."""
    (tmp_path / "models.py").write_text(MODELS)
    return tmp_path


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    env.setdefault("KERAS_BACKEND", "torch")
    env["COLUMNS"] = "160"
    return env


def _commands(out: Path) -> list[list[str]]:
    """A write of every kind bnkit makes, into ``out``."""
    shape = ["--input-shape", "3,8,8"]
    return [
        ["convert", "models:torch_net", out / "torch.keras", *shape],
        ["convert", "models:keras_net", out / "keras.pt2"],
        ["convert", "models:keras_net", out / "keras.pt"],
        ["convert", "models:keras_net", out / "keras.safetensors"],
        ["fold", "models:keras_net", out / "folded.keras"],
        ["fold", "models:torch_net", out / "folded.pt2", *shape],
        ["compare", "models:torch_net", "models:torch_net", *shape, "--report", out / "report.html"],
    ]


def _run_batch(library: Path, runs: list[tuple[list, Path, int | None]], cwd: Path, wrap=None, preexec_fn=None):
    """``DRIVER``: the library's writes into ``library``, then ``runs`` (command, its output folder,
    a file-size limit or None) in order, in one subprocess."""
    job = {
        "library": [str(library / "bn.safetensors"), str(library / "r.txt")],
        "runs": [[[str(a) for a in command], str(folder), file_size] for command, folder, file_size in runs],
    }
    proc = subprocess.run(
        [*(wrap or []), sys.executable, "-c", DRIVER, json.dumps(job)],
        capture_output=True, text=True, cwd=cwd, env=_env(), timeout=300, stdin=subprocess.DEVNULL,
        preexec_fn=preexec_fn,
    )  # fmt: skip
    return proc


def _usual_umask():
    os.umask(0o022)


# ---------------------------------------------------------------------------- one subprocess


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> dict:
    """The writes of the tests below that need no process of their own, in one subprocess under umask
    022 (starting Python and importing torch and Keras is most of a small command's time), in order:

    * ``"library"``: ``save_model`` and ``atomic_path`` from a thread, before anything imports bnkit
      (what they did, and the folder they wrote in);
    * ``"full"``: a write of every kind under a file-size limit (EFBIG), an older bnkit's hidden
      file beside one target;
    * ``"tmpfs"``: the same on a full tmpfs (ENOSPC), where this machine lets a user namespace mount
      one: then the whole subprocess runs in that private mount namespace (else None);
    * ``"usual"``: a write of every kind, then the ``.pt2`` once more (refused without --force);
    * ``"again"``: the write to the same file after a run killed inside it (``"killed"``: its
      leftover and the other hidden files put beside it).

    Each a list of (command, result, folder); ``"proc"``: the subprocess.
    """
    models = tmp_path_factory.mktemp("writes")
    (models / "models.py").write_text(MODELS)
    killed = _killed_write(models, models / "killed")

    full = models / "full"
    full.mkdir()
    (full / ".keras.0123abcd.pt").write_bytes(b"")  # an older bnkit's temporary name: nobody's in particular
    runs = {"full": [(command, full, SIZE_LIMIT) for command in _commands(full)]}

    disk, wrap = models / "disk", None
    disk.mkdir()
    if _can_mount_tmpfs(disk):
        out = disk / "out"  # made inside the namespace, on the tmpfs, which a file then fills
        mount = f"mount -t tmpfs -o size=64k tmpfs '{disk}' && mkdir '{out}'"
        fill = f"{mount} && {{ cat /dev/zero > '{disk}/full'; true; }}"
        wrap = ["unshare", "-rm", "sh", "-c", f'{fill} 2>/dev/null && exec "$@"', "sh"]
        runs["tmpfs"] = [(command, out, None) for command in _commands(out)]

    usual = models / "usual"
    usual.mkdir()
    commands = _commands(usual)
    runs["usual"] = [(command, usual, None) for command in [*commands, commands[1]]]  # keras.pt2, once more
    runs["again"] = [(["fold", "models:keras_net", killed["folder"] / "folded.keras"], killed["folder"], None)]

    library = models / "library"
    library.mkdir()
    order = [run for part in runs.values() for run in part]
    proc = _run_batch(library, order, models, wrap=wrap, preexec_fn=_usual_umask)
    assert proc.returncode == 0, f"the run crashed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    done = json.loads(proc.stdout)
    results = iter(done["results"])
    found = {name: [(command, next(results), folder) for command, folder, _ in part] for name, part in runs.items()}
    return {"proc": proc, "library": (done["library"], library), "killed": killed, "tmpfs": None, **found}


# ---------------------------------------------------------------------------- a full disk


def _assert_cannot_write(proc, runs, reason: str, leftovers: dict[str, str] | None = None) -> None:
    """Every write ended in one line naming the file and the reason (and the hidden files earlier
    writes left beside it: ``leftovers``, target name -> leftover name), exit 2, and left nothing."""
    leftovers = leftovers or {}
    assert "terminate called" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for command, result, _ in runs:
        target = _target(command)
        expected = f"bnkit {command[0]}: error: {target}: cannot write the file ({reason})"
        if target.name in leftovers:
            expected += f"; beside it, hidden files of earlier writes: {leftovers[target.name]}"
        assert result["status"] == 2, (command, result["status"], result["stderr"][-3000:])
        assert result["stderr"].splitlines() == [expected], command
        assert sorted(result["listing"]) == sorted(leftovers.values()), (command, "left behind:", result["listing"])


def _target(command) -> Path:
    return Path(command[command.index("--report") + 1] if "--report" in command else command[2])


@pytest.mark.slow
def test_a_full_disk_ends_every_write_in_one_line_and_leaves_nothing(batch):
    """A file-size limit (EFBIG) under each writer: one line, exit 2, no output, no temporary file;
    the hidden file an older bnkit left (it may be what fills a disk) is named, not removed.

    Before, each format gave a traceback (torch: "iostream error" or "unexpected pos"; safetensors:
    "os error 27"), and the .pt2 writer's C++ destructor threw: "terminate called", exit 134.
    """
    _assert_cannot_write(batch["proc"], batch["full"], os.strerror(27), {"keras.pt": ".keras.0123abcd.pt"})  # EFBIG


def _can_mount_tmpfs(folder: Path) -> bool:
    if shutil.which("unshare") is None or sys.platform != "linux":
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{folder}'"],
        capture_output=True, timeout=30,
    )  # fmt: skip
    return probe.returncode == 0


@pytest.mark.slow
def test_a_full_tmpfs_ends_every_write_in_one_line_and_leaves_nothing(batch):
    """The same on a real full file system (ENOSPC): a small tmpfs, filled up, in a private mount namespace."""
    if batch["tmpfs"] is None:
        pytest.skip("this machine does not let a user namespace mount a tmpfs")
    _assert_cannot_write(batch["proc"], batch["tmpfs"], os.strerror(28))  # ENOSPC: "No space left on device"


# ---------------------------------------------------------------------------- what a write keeps


@pytest.mark.slow
def test_every_write_makes_a_usual_file_and_refuses_to_replace_one_without_force(batch):
    """Mode 0644 under umask 022 for every format (safetensors made its own 0600 file), nothing
    hidden left beside it, a .pt2 archive not named after a temporary file, no replacing without --force."""
    *written, (_, refused, out) = batch["usual"]
    for command, result, _ in written:
        assert result["status"] in (0, 1) if command[0] == "compare" else result["status"] == 0, result["stderr"]
    names = {_target(command).name for command, _, _ in written}
    assert refused["listing"] == dict.fromkeys(sorted(names), "0o644")
    assert refused["status"] == 2 and "already exists; pass --force" in refused["stderr"], refused
    with zipfile.ZipFile(out / "keras.pt2") as archive:
        roots = {name.split("/")[0] for name in archive.namelist()}
    assert roots == {"archive"}, roots  # before: ".keras.<random>", the temporary file's name


# ---------------------------------------------------------------------------- signals inside the write


def _as_from_a_shell() -> None:
    """SIGINT and SIGTERM as a shell starts a foreground command: default, unblocked. A test worker
    may have inherited SIGINT ignored (in CI the SIGINT case failed twice, the child never raising),
    and bnkit rightly keeps an ignored SIGINT ignored (a background job's, nohup's)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _start(models: Path, *args) -> subprocess.Popen:
    return subprocess.Popen(
        [_console_script(), *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=models,
        stdin=subprocess.DEVNULL, preexec_fn=_as_from_a_shell,
    )  # fmt: skip


def _wait_for(mark: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not mark.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {mark.name}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {mark.name} after {timeout} s")
        time.sleep(0.01)


def _finish(proc: subprocess.Popen, timeout: float, marks: Path | None = None, note: str = "") -> tuple[int, str]:
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
        seen = sorted(p.name for p in marks.iterdir()) if marks is not None else "?"
        raise AssertionError(
            f"still running {timeout} s after the signal: it was ignored (marks: {seen}; stderr: "
            f"{stderr[-2000:]!r}; {note})"
        ) from None
    return proc.returncode, stderr


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "status", "word"), [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_a_signal_swallowed_inside_the_keras_saving_code_still_stops_the_write(models, signum, status, word):
    """Before, the exception was swallowed, the file written and the command exited 0."""
    out = models / "out"
    out.mkdir()
    proc = _start(models, "fold", "models:swallowing", out / "folded.keras")
    _wait_for(models / "marks" / "saving", proc)
    proc.send_signal(signum)
    inherited = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, set()))
    returncode, stderr = _finish(proc, 120, models / "marks", f"this test process's SIGINT: {inherited}")
    assert (models / "marks" / "swallowed").exists()  # the writer's code did swallow it
    assert (returncode, stderr) == (status, f"{word}\n")
    assert list(out.iterdir()) == [], "a file was written after the signal, or a partial one left"


@pytest.mark.slow
def test_a_second_sigterm_after_a_swallowed_one_is_not_ignored(models):
    """Before, the first SIGTERM set SIGTERM to be ignored: swallowed, it left the command unstoppable."""
    out = models / "out"
    out.mkdir()
    proc = _start(models, "fold", "models:swallowing_then_waiting", out / "folded.keras")
    _wait_for(models / "marks" / "saving", proc)
    proc.send_signal(signal.SIGTERM)
    _wait_for(models / "marks" / "swallowed", proc)
    proc.send_signal(signal.SIGTERM)
    assert _finish(proc, 30, models / "marks") == (143, "terminated\n")
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------- a killed run's leftovers


def _killed_write(models: Path, out: Path) -> dict:
    """A ``fold`` into ``out`` killed (SIGKILL) inside the write, and hidden files that are not
    provably a dead bnkit's of this host (or not for this target) put beside what it left."""
    out.mkdir()
    proc = _start(models, "fold", "models:swallowing", out / "folded.keras")
    _wait_for(models / "marks" / "saving", proc)
    proc.kill()
    proc.communicate()
    left = _hidden(out)  # the killed run's, e.g. .folded.bnkit-<host>-<pid>-<random>.keras
    machine = left[0][len(".folded.") :].partition("-")[2].split("-")[0] if len(left) == 1 else "unknown"
    others = [
        f".folded.bnkit-elsewhere-{proc.pid}-0123abcd.keras",  # another host: its PIDs are not ours
        f".folded.bnkit-{machine}-{os.getpid()}-0123abcd.keras",  # a live process
        ".folded.zzzzzzzz.keras",  # not bnkit's name
        f".other.bnkit-{machine}-{proc.pid}-0123abcd.keras",  # another target's
    ]
    for name in others:
        (out / name).write_bytes(b"")
    return {"folder": out, "left": left, "others": others}


@pytest.mark.slow
def test_what_a_killed_write_left_is_removed_by_the_next_write_to_the_same_file(batch):
    """SIGKILL inside the write leaves the hidden temporary behind; the next run removes it, as it is
    provably a dead bnkit's on this host, and leaves what it cannot prove dead or its own."""
    killed = batch["killed"]
    (left,) = killed["left"]
    assert left.startswith(".folded.") and left.endswith(".keras"), left
    mark, _, _ = left[len(".folded.") :].partition("-")
    assert mark == "bnkit", left  # before: ".folded.<random>.keras", nobody's in particular
    ((_, again, out),) = batch["again"]
    assert again["status"] == 0, again["stderr"]
    assert _hidden(out) == sorted(killed["others"])
    assert (out / "folded.keras").is_file()


# ---------------------------------------------------------------------------- the library


@pytest.mark.slow
def test_the_library_installs_no_signal_handler_and_writes_from_a_thread(batch):
    """``import bnkit`` and ``save_model`` leave a program's signal handlers alone; ``atomic_path``
    works outside the main thread (where no signal handler can be installed). Run first in the
    batch's interpreter, before anything there imports bnkit."""
    library, folder = batch["library"]
    assert not library["errors"], library["errors"]
    assert library["handlers kept"], library["handlers"]
    assert sorted(p.name for p in folder.iterdir()) == ["bn.safetensors", "r.txt"]
    assert (folder / "r.txt").read_text() == "report"


def test_a_write_error_names_the_os_reason_behind_a_framework_error():
    from bnkit.formats.atomic import write_error

    def chained() -> RuntimeError:
        try:
            try:
                raise OSError(28, os.strerror(28))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None
        except RuntimeError as e:
            e.__suppress_context__ = False  # torch raises it during the OSError's handling: its context
            return e

    assert str(write_error("m.pt", chained())) == "m.pt: cannot write the file (No space left on device)"
    rust = ValueError("Error while serializing: I/O error: File too large (os error 27)")
    assert str(write_error("m.safetensors", rust)) == "m.safetensors: cannot write the file (File too large)"
    other = ValueError("unable to serialize\nlayer 'x'")
    expected = "m.keras: cannot write the file (ValueError: unable to serialize layer 'x')"
    assert str(write_error("m.keras", other)) == expected


def test_a_signal_inside_a_deferred_section_is_raised_when_it_ends():
    """The clean-up sections of a write are not cut short: the signal waits for their end."""
    from bnkit import interrupts

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are handled in the main thread")
    steps = []
    with pytest.raises(interrupts.Terminated), interrupts.stop_signals_handled():
        with interrupts.deferred():
            signal.raise_signal(signal.SIGTERM)
            steps.append("cleaned up")
        steps.append("not reached")
    assert steps == ["cleaned up"]
    assert interrupts.stop_requested() is None  # forgotten once the command's handling ends
