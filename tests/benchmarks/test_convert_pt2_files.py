"""benchmarks/convert_pt2_files.py takes a network through a .pt2 file and prints both errors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "convert_pt2_files.py"


def test_a_network_through_a_pt2_file(capsys):
    spec = importlib.util.spec_from_file_location("convert_pt2_files", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    assert bench.main(["--networks", "squeezenet1_0"]) == 0
    *_, row = capsys.readouterr().out.strip().splitlines()
    name, save, load, convert, program_error, keras_error = row.split()
    assert name == "squeezenet1_0" and min(float(save), float(load), float(convert)) > 0
    assert float(program_error) == 0  # the same operations, rebuilt from the file
    assert float(keras_error) <= 1e-5
