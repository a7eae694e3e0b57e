"""The bnkit command makes PyTorch's OpenMP threads wait passively unless the user chose otherwise
(bnkit.cli._passive_openmp_threads): spinning threads slow a shared machine's runs many times over."""

from __future__ import annotations

import os
import subprocess
import sys

CODE = (
    "import os, sys; from bnkit.cli import _passive_openmp_threads; _passive_openmp_threads(); "
    "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
)


def _run(env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, check=True).stdout


def test_passive_unless_the_user_chose():
    assert _run({}).split() == ["PASSIVE", "False"]  # set before PyTorch is imported
    assert _run({"OMP_WAIT_POLICY": "ACTIVE"}).split() == ["ACTIVE", "False"]
