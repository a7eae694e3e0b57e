"""The Keras backend bnkit runs on does not change between two runs in a fresh home.

Keras writes ``keras.json`` on its first import where there is none, naming ``"tensorflow"``: read
back as a choice, the second run of a command would use TensorFlow where the first used torch
(with TensorFlow installed: other numbers; without: a failure)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bnkit.keras import KERAS_WRITTEN_CONFIG
from conftest import SRC, _console_script


def _env(home) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["KERAS_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    return env


def test_the_file_keras_writes_is_what_bnkit_takes_for_no_choice(tmp_path):
    env = _env(tmp_path) | {"KERAS_BACKEND": "torch"}
    subprocess.run([sys.executable, "-c", "import keras"], env=env, check=True, capture_output=True)
    assert json.loads((tmp_path / "keras.json").read_text()) == KERAS_WRITTEN_CONFIG


def test_a_keras_file_reads_on_the_same_backend_in_a_fresh_home_and_after(tmp_path):
    from bnkit.keras import keras

    inputs = keras.Input((6, 6, 3))
    outputs = keras.layers.BatchNormalization(name="bn")(keras.layers.Conv2D(4, 3, name="conv")(inputs))
    keras.Model(inputs, outputs).save(tmp_path / "m.keras")
    home = tmp_path / "home"
    home.mkdir()
    runs = [
        subprocess.run(
            [_console_script(), "summary", "m.keras", "--json"],
            capture_output=True, text=True, cwd=tmp_path, env=_env(home), timeout=300,
        )  # fmt: skip
        for _ in range(2)
    ]
    assert (home / "keras.json").exists()  # Keras wrote it in the first run
    for proc in runs:
        assert proc.returncode == 0, proc.stderr
    assert runs[0].stdout == runs[1].stdout


def _python(code: str, backend: str, tmp_path) -> subprocess.CompletedProcess:
    env = _env(tmp_path) | {"KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


_EXPORT = """
import torch
module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
torch.export.export(module, (torch.ones(1, 3, 8, 8),))
print("exported")
"""


def test_torch_export_runs_beside_tensorflow(tmp_path):
    """TensorFlow loaded before Triton (which torch.export imports where it is installed) aborted the
    process ("LLVM ERROR: inconsistency in registered CommandLine options"): on the TensorFlow backend,
    and where the user imported TensorFlow before bnkit."""
    pytest.importorskip("tensorflow")
    for code in ("import bnkit.keras" + _EXPORT, "import tensorflow, bnkit.keras" + _EXPORT):
        proc = _python(code, "tensorflow", tmp_path)
        assert proc.returncode == 0 and "exported" in proc.stdout, proc.stderr[-2000:]


def test_saving_off_the_tensorflow_backend_does_not_load_tensorflow(tmp_path):
    """Keras asks whether an object is a TensorFlow type by importing TensorFlow where it is installed
    (seconds); bnkit answers "no" while TensorFlow is not loaded, which is then always right."""
    code = f"""
import sys

import pytest
from bnkit.keras import keras
inputs = keras.Input((6, 6, 3))
outputs = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(inputs))
keras.Model(inputs, outputs).save({str(tmp_path / "m.keras")!r})
print("tensorflow" in sys.modules)
"""
    for backend in ("torch", "jax"):
        proc = _python(code, backend, tmp_path)
        assert proc.returncode == 0 and proc.stdout.split() == ["False"], proc.stderr[-2000:]
