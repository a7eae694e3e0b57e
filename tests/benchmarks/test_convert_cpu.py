"""benchmarks/convert_cpu.py converts there and back, measures, and lists refusals with the reason."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from torch import nn

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "convert_cpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("convert_cpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_rows_for_a_converted_and_a_refused_network(capsys):
    bench = _load()
    from real_networks import Network

    def small():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2)).eval()

    def refused():
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")).eval()

    networks = [Network("small", "torch", small, (3, 6, 6)), Network("reflect", "torch", refused, (3, 6, 6))]
    rows = list(bench.run(networks, 1, isolate=False))
    there, back, reflect = rows
    assert (there.direction, there.leg) == ("torch_to_keras", "there")
    assert (back.direction, back.leg) == ("keras_to_torch", "back")
    assert there.error <= 1e-5 and back.error <= 1e-5 and there.seconds > 0 and there.python_peak_mib > 0
    assert reflect.refused == "cannot convert layer '0' (Conv2d): padding_mode='reflect'; only 'zeros' converts"
    # after "there": compare's verdicts and a training forward of both sides
    assert (there.compare_inference, there.compare_training, there.batch_norms) == ("agree", "agree", 1)
    assert there.training_error <= 1e-4 and there.statistics_error <= 1e-4 and back.compare_inference is None
    bench.print_table(rows)
    out = capsys.readouterr().out
    assert "refused: cannot convert layer '0' (Conv2d)" in out and "converted 1 of 2 networks; refused: reflect" in out
