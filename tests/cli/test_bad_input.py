"""Bad input on the command line: one line on stderr, exit status 2, before any slow work.

Every case runs the real ``bnkit`` console script in a subprocess.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from _cli_batch import run_cli_batch
from conftest import SRC, _console_script

SEED = "bnkit.examples:torch_seed_model"


def _one_line_error(proc, command: str, *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"bnkit {command}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_an_input_shape_the_model_does_not_take_is_named_before_tracing(run_cli, tmp_path):
    proc = run_cli("convert", SEED, "o.keras", "--input-shape", "3,64,64")
    _one_line_error(proc, "convert", "does not take input of shape (3, 64, 64)", "layer '0' (Conv2d)", "1 channels")
    assert not (tmp_path / "o.keras").exists()


def test_bad_values_and_files_are_one_line_each(tmp_path):
    """Each case through bnkit.cli.main, all in one subprocess (see _cli_batch)."""
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    folder = tmp_path / "model.keras"
    folder.mkdir()
    empty = tmp_path / "empty.pt2"
    empty.write_bytes(b"")
    memory = ("needs about", "of memory, more than the", "available here")
    negative = "got '-1,3' (-1 is not a size: leave the batch dimension out"
    shape = ("--input-shape", "1,64,64")
    cases = [
        (("summary", SEED, "--input-shape", "1,32,32"), ("does not take input of shape (1, 32, 32)", "'4' (Linear)")),
        (("compare", SEED, SEED, *shape, "--seed=-5"), ("argument --seed: must be a non-negative",)),
        (("compare", SEED, SEED, *shape, "--seed", "-5"), ("got '-5'",)),
        (("compare", SEED, SEED, *shape, "--atol", "-1e-3"), ("argument --atol: must be a finite",)),
        (("summary", SEED, "--input-shape=-1,3"), (negative,)),
        (("summary", SEED, "--input-shape", "-1,3"), (negative,)),
        (("summary", SEED, "--input-shape", "100000,100000,1"), memory),
        (("compare", SEED, SEED, "--input-shape", "100000,100000,1"), memory),
        (("explain", "--channels", "100000", "--batch", "64", "--size", "64"), memory),
        (("walkthrough", "--out", existing), ("is a file, not a folder",)),
        (("summary", folder), ("is a folder, not a model file",)),
        (("lint", empty), ("the file is empty (0 bytes",)),
        (("convert", SEED, tmp_path, *shape), ("is a folder and not a tf-keras 2 SavedModel folder",)),
        (("fold", SEED, tmp_path / "absent" / "f.pt"), ("no such folder",)),
    ]  # fmt: skip
    for (args, fragments), proc in zip(cases, run_cli_batch([args for args, _ in cases], tmp_path), strict=True):
        _one_line_error(proc, args[0], *fragments)
    assert existing.read_text() == "keep me"


def test_a_factory_from_the_current_folder_imports_as_with_python_m(run_cli, tmp_path):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n\n"
        "def net():\n    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))\n\n"
        "def not_a_model():\n    return 42\n"
    )
    (tmp_path / "broken.py").write_text("raise RuntimeError('no GPU here')\n")
    proc = run_cli("summary", "mymodels:net", "--input-shape", "4", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert '"BatchNorm1d"' in proc.stdout
    _one_line_error(run_cli("summary", "mymodels:not_a_model", cwd=tmp_path), "summary", "returned int, not a model")
    _one_line_error(run_cli("summary", "broken:net", cwd=tmp_path), "summary", "importing 'broken' raised RuntimeError")


# ----------------------------------------------------------------------------- closed pipes


@pytest.mark.parametrize("args", [("explain", "--json"), ("explain",)], ids=["json", "rich"])
def test_a_closed_pipe_ends_quietly(args, tmp_path):
    """The reader is gone before bnkit writes (``| head -1`` after its line): no traceback."""
    proc = subprocess.Popen(
        [_console_script(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=tmp_path
    )
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 128 + signal.SIGPIPE
    assert stderr == ""


def test_head_reads_the_first_line(tmp_path):
    script = f"{_console_script()} explain --json | head -1"
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=_env(), cwd=tmp_path)
    assert proc.stdout == "{\n" and "Traceback" not in proc.stderr and "Error" not in proc.stderr


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    env.setdefault("KERAS_BACKEND", "torch")
    return env


# ------------------------------------------------------------------------- SIGTERM mid-write


@pytest.mark.slow
def test_sigterm_during_a_write_leaves_no_partial_file(tmp_path):
    from bnkit.examples import keras_seed_model
    from bnkit.io import save_model

    source = save_model(keras_seed_model(), tmp_path / "seed.keras")  # 52 MB of weights to write
    out = tmp_path / "out"
    out.mkdir()
    interrupted = 0
    for _ in range(3):
        proc = subprocess.Popen(
            [_console_script(), "fold", source, out / "folded.keras"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=tmp_path,
        )  # fmt: skip
        while proc.poll() is None and not list(out.glob(".folded.*.keras")):
            time.sleep(0.001)
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=300)
        stderr = proc.stderr.read().decode()
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [], "a hidden partial file is left"
        if status == 128 + signal.SIGTERM:
            assert stderr == "terminated\n" and not (out / "folded.keras").exists()
            interrupted += 1
            break
        assert status == 0, stderr  # it finished before the signal: try again
        (out / "folded.keras").unlink()
    assert interrupted, "SIGTERM never arrived during the write"


# ------------------------------------------------------------ a folder this user cannot write


def _unprivileged() -> tuple[list[str], object]:
    """``(command prefix, preexec_fn)`` that run the CLI without the power to write a 0555 folder.

    Not root: as we are. Root: as ``nobody`` when ``nobody`` can run this Python; otherwise (an
    interpreter under /root, as on this project's machine) as root without the capabilities that
    bypass file permissions (``setpriv``), which then applies the folder's mode to root too.
    """
    if os.geteuid() != 0:
        return [], None
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        user = None
    if user is not None:

        def drop():
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)

        try:
            probe = subprocess.run([sys.executable, "-c", "import bnkit"], preexec_fn=drop, capture_output=True,
                                   env=_env(), cwd="/", timeout=120)  # fmt: skip
        except OSError:  # the interpreter is not executable by nobody
            probe = None
        if probe is not None and probe.returncode == 0:
            return [], drop
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, and neither 'nobody' can run this Python nor setpriv is installed")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"], None


@pytest.fixture
def shared_dir():
    """A folder outside pytest's private (0700) temporary tree, readable by everyone."""
    folder = Path(tempfile.mkdtemp(prefix="bnkit-readonly-"))
    folder.chmod(0o755)
    yield folder
    for path in folder.rglob("*"):
        path.chmod(0o777) if path.is_dir() else None
    shutil.rmtree(folder)


@pytest.mark.slow
def test_a_folder_the_user_cannot_write_is_refused_before_any_work(shared_dir):
    prefix, preexec = _unprivileged()
    readonly = shared_dir / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    work = shared_dir / "work"  # the current folder: the factory, and the marker it writes when it runs
    work.mkdir()
    work.chmod(0o777)
    (work / "mymodels_ro.py").write_text(
        "import bnkit.examples\n\n"
        "def seed():\n"
        "    open('marker', 'w').write('loaded')\n"
        "    return bnkit.examples.torch_seed_model()\n"
    )
    unreadable = work / "secret.keras"
    unreadable.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip: readable, it would load as far as Keras
    unreadable.chmod(0o000)
    env = _env()
    env["HOME"] = str(work)
    cases = {
        "unreadable": ("summary", unreadable),
        "convert": ("convert", "mymodels_ro:seed", readonly / "seed.keras", "--input-shape", "1,64,64"),
        "fold": ("fold", "mymodels_ro:seed", readonly / "folded.pt2", "--input-shape", "1,64,64"),
        "compare": ("compare", "mymodels_ro:seed", "mymodels_ro:seed", "--input-shape", "1,64,64", "--report",
                    readonly / "report.html"),
        "walkthrough": ("walkthrough", "--out", readonly),
        "walkthrough-new": ("walkthrough", "--out", readonly / "new"),
    }  # fmt: skip
    for name, args in cases.items():
        proc = subprocess.run(
            [*prefix, _console_script(), *map(str, args)],
            capture_output=True, text=True, env=env, cwd=work, preexec_fn=preexec, timeout=300,
        )  # fmt: skip
        expected = {"walkthrough-new": "cannot make this folder", "unreadable": "cannot read the file"}.get(
            name, "cannot write in this folder"
        )
        _one_line_error(proc, args[0], expected, "Permission denied")
        assert not (work / "marker").exists(), f"{name}: the model was loaded before the folder was checked"
    assert list(readonly.iterdir()) == []
