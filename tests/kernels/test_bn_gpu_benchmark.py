"""benchmarks/bn_gpu.py off the GPU: its refusal without CUDA, and its arithmetic and
rendering (on hand-made rows, so that a long GPU run cannot die in its last step)."""

from __future__ import annotations

import importlib.util
import json
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the benchmark would run")
def test_without_cuda_no_table_is_written(bench, tmp_path):
    table = tmp_path / "sm90.json"
    assert bench.main(["--output", str(tmp_path / "p.md"), "--write-table", str(table)]) == 1
    assert not table.exists()


def test_margin_must_be_positive(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--margin", "0"])
    assert "--margin must be a positive ratio, got 0.0" in capsys.readouterr().err
    assert bench.parse_args(["--write-table"]).write_table == "default"
    assert bench.parse_args([]).write_table is None


def test_the_dispatch_table_turns_triton_on_only_where_it_wins(bench, tmp_path):
    """Synthetic timings (torch ms, bnkit ms) through the writer, then bnkit's own reader and lookup."""
    from bnkit.kernels.dispatch import Config, Dispatch

    def row(mode, n, c, hw, dtype, layout, torch_ms, bnkit_ms, matches=True):
        unfused = 1.2 * bnkit_ms if mode == "bn_relu" else None  # bnkit BN then ReLU, for the page
        return bench.Row(mode, n, c, hw, dtype, layout, bnkit_ms, torch_ms, None, unfused, 1, matches)

    rows = [
        row("train", 256, 64, 56, "bfloat16", "channels_last", 3.0, 2.0),  # 1.5×: on
        row("infer", 256, 64, 56, "bfloat16", "channels_last", 1.02, 1.0),  # 1.02×, inside the margin: off
        row("bn_relu", 256, 64, 56, "bfloat16", "channels_last", 3.0, 2.0, matches=False),  # wins, wrong: off
        row("train", 256, 64, 56, "float32", "nchw", 2.0, 2.5),  # 0.8×: off
        # two shapes of one class (C <= 64, <= 256Ki values per channel): the slower one decides
        row("train", 32, 64, 56, "float16", "nchw", 2.0, 1.0),
        row("train", 16, 48, 100, "float16", "nchw", 1.0, 1.0),
    ]
    env = {
        "device": "TEST GPU", "capability": (9, 0), "date": "2026-01-01 00:00 UTC",
        "bnkit": "0.1.0", "torch": "2.13.0", "triton": "3.9.0", "cuda": "12.8", "copy_gbps": 1000.0,
    }  # fmt: skip
    table = bench.dispatch_table(rows, env, margin=1.05)
    decisions = {c: (e.triton, e.ratio, e.shapes) for c, e in table.entries.items()}
    assert decisions == {
        Config("train", "float32", "nchw", "<=64", "<=2Mi"): (False, 0.8, ("256x64x56x56",)),
        Config("train", "bfloat16", "channels_last", "<=64", "<=2Mi"): (True, 1.5, ("256x64x56x56",)),
        Config("train", "float16", "nchw", "<=64", "<=256Ki"): (False, 1.0, ("32x64x56x56", "16x48x100x100")),
        Config("infer", "bfloat16", "channels_last", "<=64", "<=2Mi"): (False, 1.02, ("256x64x56x56",)),
        Config("bn_relu", "bfloat16", "channels_last", "<=64", "<=2Mi"): (False, 1.5, ("256x64x56x56",)),
    }
    assert list(decisions)[0].mode == "train" and list(decisions)[-1].mode == "bn_relu"  # a stable order
    bf16_train = Config("train", "bfloat16", "channels_last", "<=64", "<=2Mi")
    assert bench.dispatch_table(rows, env, margin=1.5).entries[bf16_train].triton  # equal to the margin: on
    assert not bench.dispatch_table(rows, env, margin=1.51).entries[bf16_train].triton

    text = bench.table_json(table)
    data = json.loads(text)
    assert data["device"] == "TEST GPU" and data["capability"] == [9, 0] and data["family"] == "sm90"
    assert data["versions"] == {"bnkit": "0.1.0", "torch": "2.13.0", "triton": "3.9.0", "cuda": "12.8"}
    assert data["date"] == "2026-01-01 00:00 UTC" and data["margin"] == 1.05
    (tmp_path / "sm90.json").write_text(text, encoding="utf-8")
    lookup = Dispatch(tables=tmp_path, capability_of=lambda index: (9, 0))
    x = torch.empty(256, 64, 56, 56, dtype=torch.bfloat16, device="meta").contiguous(memory_format=torch.channels_last)
    assert lookup.triton_wins(x, "train")
    assert not lookup.triton_wins(x, "infer") and not lookup.triton_wins(x, "bn_relu")
    assert not lookup.triton_wins(x.contiguous(), "train")  # bfloat16 NCHW was not measured

    page = bench.render_markdown(rows, env, table, "src/bnkit/kernels/tables/sm90.json")
    assert "Triton on for **1 of 5** measured configurations" in page
    assert "| train | bfloat16 | channels_last | <=64 | <=2Mi | 256x64x56x56 | 1.50 | on |" in page
