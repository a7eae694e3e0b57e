"""Several ``bnkit`` command lines in one subprocess, each through ``bnkit.cli.main``.

Each command's exit status, stdout and stderr are kept apart, as separate runs of the console
script would give them; only the interpreter start and the torch/Keras imports are shared, which
is most of a command's time when it stops early (a refusal) or works on a small model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import SRC

_DRIVER = r"""
import contextlib, io, json, sys
from bnkit.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as e:  # argparse
            status = e.code if isinstance(e.code, int) else 1
    results.append({"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()})
sys.__stdout__.write(json.dumps(results))
"""


def run_cli_batch(commands: list[list], cwd: Path, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Run each ``[command, arg, ...]`` (without ``bnkit``) in order in one subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    env.setdefault("KERAS_BACKEND", "torch")
    env["COLUMNS"] = "160"
    argvs = [[str(a) for a in command] for command in commands]
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(argvs)],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [
        subprocess.CompletedProcess(["bnkit", *argv], r["status"], r["stdout"], r["stderr"])
        for argv, r in zip(argvs, json.loads(proc.stdout), strict=True)
    ]
