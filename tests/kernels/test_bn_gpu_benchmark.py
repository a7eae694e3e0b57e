"""benchmarks/bn_gpu.py off the GPU: its refusal without CUDA, and its arithmetic and
rendering (on hand-made rows, so that a long GPU run cannot die in its last step)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bn_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bn_gpu", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bn_gpu"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bn_gpu", None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the benchmark would run")
def test_without_cuda_it_says_so_writes_nothing_and_fails(bench, tmp_path, capsys):
    out = tmp_path / "performance.md"
    assert bench.main(["--output", str(out)]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not out.exists()


def test_bandwidth_counts_the_minimum_bytes_and_tables_render(bench, capsys):
    # hand-made timings, only to exercise the arithmetic and the rendering
    nbytes = 256 * 64 * 56 * 56 * 2  # one bfloat16 tensor
    rows = [
        bench.Row("train", 256, 64, 56, "bfloat16", "channels_last", 2.0, 3.0, 2.5, None, 5 * nbytes, True),
        bench.Row("infer", 256, 64, 56, "bfloat16", "channels_last", 0.5, 0.6, None, None, 2 * nbytes, True),
        bench.Row(
            "bn_relu", 256, 64, 56, "bfloat16", "channels_last", 2.0, 4.0, None, 3.0, 5 * nbytes, False
        ),
    ]
    assert rows[0].gbps(2.0) == pytest.approx(5 * nbytes / 2e-3 / 1e9)
    env = {
        "device": "TEST DEVICE",
        "date": "D",
        "torch": "T",
        "triton": "X",
        "cuda": "C",
        "copy_gbps": 1000.0,
    }
    text = bench.render_markdown(rows, env)
    assert "TEST DEVICE" in text and "1000 GB/s" in text
    assert "| 256×64×56×56 | bfloat16 | channels_last | 2.000 | 3.000 | 2.500 | — | 1.50 |" in text
    assert "MISMATCH" in text and "2/3 configurations match" in text
    summary = bench.summary_lines(rows, 1000.0)
    assert "speed-up geomean 1.50×" in summary[0]
    assert "vs bnkit BN then ReLU: geomean 1.50×" in summary[-2]
    bench.print_tables(rows, env)
    assert "training forward + backward" in capsys.readouterr().out


def test_docs_page_states_that_nothing_was_measured(bench):
    doc = (PATH.parents[1] / "docs" / "performance.md").read_text(encoding="utf-8")
    if "## Results\n\nMeasured by" not in doc:
        assert doc == bench.render_markdown(None, None)
        assert "No GPU figures have been measured yet" in doc
