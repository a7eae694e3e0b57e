"""The Keras backend bnkit runs on does not change between two runs in a fresh home.

Keras writes ``keras.json`` on its first import where there is none, naming ``"tensorflow"``: read
back as a choice, the second run of a command would use TensorFlow where the first used torch
(with TensorFlow installed: other numbers; without: a failure)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
