"""Shared fixtures. Keras runs on its torch backend: no TensorFlow needed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
# Triton reads this when it is first imported, and torch.export may import it early: set it
# before anything does, so the kernel tests run under the interpreter on this CPU-only machine.
os.environ.setdefault("TRITON_INTERPRET", "1")
# As the bnkit command does (bnkit.cli._passive_openmp_threads): PyTorch's OpenMP threads spinning
# while another process holds a core made the real-network tests run ten times slower on the shared
# 2-core machine. Read when PyTorch is first imported, so set here, before any test module imports it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_torchvision_schemas = None  # the Library that defines them must stay alive


def import_torchvision():
    """``torchvision`` (0.28.0, pinned in the test extra), importable on the CPU build of torch.

    The registry's wheel links its C extension against CUDA, which torch 2.13.0+cpu lacks, so
    ``import torchvision`` fails registering the fake kernel of ``torchvision::nms`` ("operator
    torchvision::nms does not exist"). Defining the schemas of ``torchvision::nms`` and
    ``torchvision::qnms`` first lets the import through; the classification models are pure
    Python and work (the detection ops nms, roi_align, ... do not, and no test uses them).
    """
    global _torchvision_schemas
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018 - present when the extension loaded on its own
    except (AttributeError, RuntimeError):
        if _torchvision_schemas is None:
            _torchvision_schemas = torch.library.Library("torchvision", "DEF")
            _torchvision_schemas.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _torchvision_schemas.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision

    return torchvision


@pytest.fixture(scope="session")
def torchvision():
    """The ``torchvision`` package (see :func:`import_torchvision`)."""
    return import_torchvision()


# the sources this test process imports (``-o pythonpath=OTHER/src`` runs the tests on another tree,
# subprocesses included: how a new test is shown to fail on the code before a change)
SRC = Path(importlib.util.find_spec("bnkit").origin).resolve().parents[1]


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
