"""Reading a model file fails with one line: the frameworks' warnings are kept (shown with --verbose),
and the limits on memory and time are the command line's options."""

from __future__ import annotations

import json
import zipfile

import pytest

from _cli_batch import run_cli_batch
from conftest import SRC  # noqa: F401 - the sources the subprocesses run

INPUT_SHAPE = (8, 8, 3)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A real .keras file, and a copy whose config says its Dense has 3 units where the weights hold 2."""
    from bnkit.keras import keras

    folder = tmp_path_factory.mktemp("keras")
    inputs = keras.Input(INPUT_SHAPE)
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    outputs = keras.layers.Dense(2, name="fc")(keras.layers.Flatten()(x))
    good = folder / "good.keras"
    keras.Model(inputs, outputs).save(good)
    bad = folder / "mismatch.keras"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(bad, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename == "config.json":
                config = json.loads(data)
                for layer in config["config"]["layers"]:
                    if layer["class_name"] == "Dense":
                        layer["config"]["units"] = 3
                data = json.dumps(config).encode()
            target.writestr(info, data)
    return good, bad


def test_the_frameworks_warnings_are_kept_off_the_one_error_line(files, tmp_path):
    """Keras warns "Skipping nested container ..." before it fails on this file: today's stderr
    had that warning (two lines of it) before bnkit's error."""
    _, bad = files
    quiet, verbose = run_cli_batch([("summary", bad), ("summary", bad, "--verbose")], tmp_path)
    assert quiet.returncode == verbose.returncode == 2
    lines = quiet.stderr.splitlines()
    assert len(lines) == 1, quiet.stderr
    assert lines[0].startswith("bnkit summary: error: ") and "not a readable Keras model (ValueError:" in lines[0]
    assert "variable.shape=(144, 3)" in lines[0]  # Keras' own cause is kept
    shown = verbose.stderr.splitlines()
    assert shown[0] == lines[0]
    assert any(line.startswith("bnkit summary: while reading: UserWarning: Skipping") for line in shown[1:]), shown


def test_reading_limits_are_options_of_every_reading_command(files, tmp_path):
    good, _ = files
    commands = [
        ("summary", good, "--max-model-bytes", "1K"),
        ("lint", good, "--max-read-seconds", "0.001"),
        ("compare", good, good, "--max-model-bytes", "1K"),
        ("fold", good, tmp_path / "folded.keras", "--max-model-bytes", "1K"),
        ("convert", good, tmp_path / "converted.pt2", "--max-model-bytes", "1K"),
        ("summary", good, "--max-model-bytes", "lots"),
    ]
    procs = run_cli_batch(commands, tmp_path)
    for command, proc in zip(commands, procs, strict=True):
        assert proc.returncode == 2, proc
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"bnkit {command[0]}: error: "), proc.stderr
    over = "over the limit of 1 KiB for a model (raise it with --max-model-bytes)"
    for proc in (procs[0], procs[2], procs[3], procs[4]):
        assert over in proc.stderr, proc.stderr
    assert "reading took longer than 0.001 s (raise the limit with --max-read-seconds)" in procs[1].stderr
    assert "argument --max-model-bytes: expected a size such as 8G, 512M" in procs[5].stderr
    assert not (tmp_path / "folded.keras").exists() and not (tmp_path / "converted.pt2").exists()


def test_a_real_model_reads_within_the_default_limits(files, tmp_path):
    good, _ = files
    (proc,) = run_cli_batch([("summary", good, "--json")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["framework"] == "keras"
