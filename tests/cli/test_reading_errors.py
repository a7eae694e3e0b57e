"""Reading a model file fails with one line: the frameworks' warnings are kept (shown with --verbose),
and the limits on memory and time are the command line's options."""

from __future__ import annotations

import json
import subprocess
import zipfile

import pytest
import torch

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


def _main(capsys, *argv) -> subprocess.CompletedProcess:
    """``bnkit ARGV`` through ``bnkit.cli.main`` in this process, as ``run_cli_batch`` runs it in its
    subprocess (without the start: the reading tests import Keras here anyway, for ``files``)."""
    from bnkit.cli import main

    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["bnkit", *argv], status, out, err)


def test_the_frameworks_warnings_are_kept_off_the_one_error_line(files, capsys):
    """Keras warns "Skipping nested container ..." before it fails on this file: today's stderr
    had that warning (two lines of it) before bnkit's error."""
    _, bad = files
    quiet, verbose = _main(capsys, "summary", bad), _main(capsys, "summary", bad, "--verbose")
    assert quiet.returncode == verbose.returncode == 2
    lines = quiet.stderr.splitlines()
    assert len(lines) == 1, quiet.stderr
    assert lines[0].startswith("bnkit summary: error: ") and "not a readable Keras model (ValueError:" in lines[0]
    assert "variable.shape=(144, 3)" in lines[0]  # Keras' own cause is kept
    shown = verbose.stderr.splitlines()
    assert shown[0] == lines[0]
    assert any(line.startswith("bnkit summary: while reading: UserWarning: Skipping") for line in shown[1:]), shown


def test_reading_limits_are_options_of_every_reading_command(files, tmp_path):
    """In a subprocess: past a deadline of 1 ms, were its timer's exception swallowed, bnkit's
    watchdog thread would end the process a second later (not pytest's, then)."""
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


def test_a_real_model_reads_within_the_default_limits(files, capsys):
    good, _ = files
    proc = _main(capsys, "summary", good, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["framework"] == "keras"


class _Flattening(torch.nn.Module):
    """torch.flatten called in forward: the program keeps it as a call, not a layer bnkit rebuilds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(144, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.bn(self.conv(x)), 1))


def test_what_a_framework_prints_while_a_command_runs_is_kept_off_the_error_line(tmp_path, capsys):
    """torch.fx prints a traceback of the generated code (25 lines) to stderr whenever a traced
    module raises: a .pt2 whose program fails when run put it before bnkit's one line."""
    import sys

    from bnkit.cli import main
    from bnkit.io import save_model

    fuzz = str(SRC.parent / "tests" / "fuzz")
    sys.path.insert(0, fuzz)
    try:
        from crafted_pt2 import _floor_of_two, _with_json
    finally:
        sys.path.remove(fuzz)
    source = tmp_path / "small.pt2"
    torch.manual_seed(0)
    save_model(_Flattening().eval(), source, input_shape=(3, 8, 8))
    path = _with_json(source, tmp_path / "fails.pt2", "models/model.json", _floor_of_two)
    expected = "math.floor() takes exactly one argument (2 given)"
    assert main(["summary", str(path), "--input-shape", "3,8,8"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnkit summary: error: ") and expected in lines[0], lines
    assert main(["summary", str(path), "--input-shape", "3,8,8", "--verbose"]) == 2
    shown = capsys.readouterr().err.splitlines()
    assert shown[0] == lines[0]
    assert any("FX-traced Module" in line for line in shown[1:]), shown
    assert all(line.startswith("bnkit summary: framework output: ") for line in shown[1:])
