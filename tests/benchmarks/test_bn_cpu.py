"""benchmarks/bn_cpu.py runs, and its equality check passes on real torch.nn and Keras layers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bn_cpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("bn_cpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_checks_results_and_prints_ratios(capsys):
    bench = _load()
    # exit status 1 would mean bnkit and torch.nn / Keras disagree on some shape
    assert bench.main(["--quick", "--batch", "1", "--repeats", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    for text in ("64@56x56", "2048@7x7", "geometric mean", "bnkit-keras / torch.nn", "results equal"):
        assert text in out, text


def test_equality_check_catches_a_wrong_layer():
    import torch

    bench = _load()
    contenders = bench.make_contenders(3)
    nn_bn = contenders["torch.nn"][0]
    nn_bn.eps = 0.5  # a different layer: its outputs must be reported as differing
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    problems = bench.check_equal(contenders, x, torch.randn(2, 3, 4, 4))
    assert any("bnkit-torch vs torch.nn: output" in p for p in problems), problems
