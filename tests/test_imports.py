"""Importing bnkit's core loads no framework; bnkit.torch loads no Keras.

Each check runs in a fresh interpreter (a subprocess) so that modules other tests imported
do not hide an eager import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
FRAMEWORKS = ("torch", "keras", "tensorflow", "jax")


def _modules_after(code: str) -> set[str]:
    """Top-level module names loaded after running ``code`` in a fresh interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_import_bnkit_loads_no_framework():
    loaded = _modules_after(
        "import bnkit\n"
        "bnkit.Convention, bnkit.TORCH, bnkit.KERAS, bnkit.get_convention('keras')\n"
        "bnkit.translate_momentum(0.99, 'keras', 'torch'), bnkit.translate_settings('torch', 'keras')\n"
        "import numpy as np\n"
        "ref = bnkit.reference\n"
        "y, stats = ref.forward_train(np.ones((2, 3)) * np.arange(2)[:, None])\n"
        "assert ref is __import__('bnkit.reference').reference"
    )
    assert "bnkit" in loaded and "numpy" in loaded
    assert not loaded & set(FRAMEWORKS), sorted(loaded & set(FRAMEWORKS))


def test_bnkit_torch_loads_torch_but_no_keras():
    loaded = _modules_after(
        "import bnkit, torch\n"
        "assert bnkit.torch.BatchNorm1d(2).convention is bnkit.TORCH  # the lazy attribute\n"
        "bnkit.torch.BatchNorm2d(3, convention='keras')(torch.randn(2, 3, 2, 2))"
    )
    assert "torch" in loaded
    assert not loaded & {"keras", "tensorflow", "jax"}, sorted(loaded & {"keras", "tensorflow", "jax"})
