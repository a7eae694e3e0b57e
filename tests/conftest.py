"""Shared fixtures. Keras runs on its torch backend: no TensorFlow needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
# Triton reads this when it is first imported, and torch.export may import it early: set it
# before anything does, so the kernel tests run under the interpreter on this CPU-only machine.
os.environ.setdefault("TRITON_INTERPRET", "1")

SRC = Path(__file__).resolve().parents[1] / "src"


def _console_script() -> str:
    script = Path(sys.executable).parent / "bnkit"
    if not script.exists():
        pytest.skip("the bnkit console script is not installed (pip install -e .)")
    return str(script)


@pytest.fixture
def run_cli(tmp_path):
    """Run the real ``bnkit`` console script in a subprocess on this tree's sources."""

    def run(*args: str, check: bool | None = None, cwd=None, timeout: float = 300):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
        env.setdefault("KERAS_BACKEND", "torch")
        env["COLUMNS"] = "160"
        proc = subprocess.run(
            [_console_script(), *map(str, args)],
            capture_output=True,
            text=True,
            cwd=cwd or tmp_path,
            env=env,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check is True and proc.returncode != 0:
            raise AssertionError(f"bnkit {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run
