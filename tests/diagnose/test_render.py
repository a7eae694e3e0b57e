"""Renderings of a comparison of a network with hundreds of layers: the terminal table shows the first
divergence and its neighbourhood (every row with all_rows / --all) and fits 80 columns; the HTML
chart stays about a screen tall and the layer table folds the runs of agreeing rows."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

from bnkit.diagnose.compare import compare
from bnkit.diagnose.render import MAX_ROWS


def deep(blocks: int = 60, seed: int = 0):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 4, 3, padding=1)]
    for _ in range(blocks):
        layers += [nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)]
    net = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2)
    return net


@pytest.fixture(scope="module")
def reports():
    a = deep()
    b = deep()
    b[3 * 30 + 1].eps = 0.5  # the 31st batch norm of 60
    x = np.random.default_rng(0).normal(size=(2, 3, 6, 6)).astype("float32")
    return compare(a, a, x), compare(a, b, x)


def text(report, width=80, **kwargs) -> list[str]:
    out = io.StringIO()
    report.render(Console(file=out, width=width, color_system=None), **kwargs)
    return out.getvalue().splitlines()


def test_a_large_network_shows_the_first_divergence_and_its_neighbourhood(reports):
    _, bad = reports
    assert len(bad.rows) > 4 * MAX_ROWS
    lines = text(bad)
    assert max(len(line.rstrip()) for line in lines) <= 80
    shown = [int(m.group(1)) for line in lines if (m := re.match(r"\s*(\d+)\s+\S+ \(", line))]
    first = bad.first_divergence.index
    assert first in shown and len(shown) <= 2 * 4 + 1
    assert all(abs(k - first) <= 4 for k in shown)
    assert sum("rows agree" in line for line in lines) == 2  # the runs left out, before and after
    assert any(f"of {len(bad.rows)} paired layers shown" in line for line in lines)
    everything = text(bad, all_rows=True)
    shown_all = [int(m.group(1)) for line in everything if (m := re.match(r"\s*(\d+)\s+\S+ \(", line))]
    assert shown_all == list(range(len(bad.rows)))


def test_agreeing_large_network_shows_the_rows_closest_to_their_tolerance(reports):
    good, _ = reports
    lines = text(good)
    shown = [int(m.group(1)) for line in lines if (m := re.match(r"\s*(\d+)\s+\S+ \(", line))]
    assert 0 < len(shown) <= MAX_ROWS
    assert "The models agree." in lines[-1]


def test_verdict_figure_is_in_the_table(reports):
    _, bad = reports
    row = bad.first_divergence
    line = next(line for line in text(bad, width=120) if line.strip().startswith(f"{row.index} "))
    assert "✗ first" in line
    ratio = row.max_abs_diff / (row.atol + row.rtol * 0)  # an upper bound of the printed ratio
    assert row.tolerance_ratio > 1 and row.tolerance_ratio <= ratio * 1.0001
    assert f"{row.tolerance_ratio:,.0f}" in line or f"{row.tolerance_ratio:.2g}" in line


def test_html_of_hundreds_of_layers_stays_legible(reports, tmp_path):
    _, bad = reports
    path = tmp_path / "deep.html"
    bad.to_html(path)
    page = path.read_text(encoding="utf-8")
    svg = page.split("<svg", 1)[1].split("</svg>", 1)[0]
    height = int(re.search(r'height="(\d+)"', svg).group(1))
    assert height < 1600  # 181 rows on about one screen, not 181 × 18 px
    assert svg.count("<rect") >= len(bad.rows)  # still one bar per layer
    assert "▶ " + bad.first_divergence.name in svg
    assert page.count("<details>") >= 1 and "all agree" in page
    shown_rows = page.split("<details>", 1)[0].count('<tr class="')
    assert shown_rows < len(bad.rows)
