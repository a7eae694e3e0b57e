"""Per-layer tolerances (bnkit.diagnose.tolerance): they grow with the magnitude of the values and the
rounding the layers behind them may accumulate, are measured on the network itself, and each row
says what it was held to."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from bnkit.convert import torch_to_keras
from bnkit.diagnose.compare import compare
from bnkit.diagnose.tolerance import SAFETY, diff, rounding_noise
from bnkit.diagnose.trace_torch import trace_torch


def batch(shape, scale=1.0, seed=0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype("float32")


def deep_net(width=16, depth=6, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, width, 3, padding=1)]
    for _ in range(depth):
        layers += [nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)]
    net = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
    return net


def test_diff_reports_the_ratio_the_verdict_is_made_from():
    a = np.array([1.0, 10.0, 0.0], dtype=np.float32)
    b = np.array([1.0 + 2e-5, 10.0, 3e-5], dtype=np.float32)
    max_abs, max_rel, ratio, diverges = diff(a, b, atol=1e-5, rtol=1e-4)
    assert max_abs == pytest.approx(3e-5, rel=1e-3)
    assert ratio == pytest.approx(3.0, rel=1e-3)  # 3e-5 against atol 1e-5 at the zero
    assert diverges and max_rel == pytest.approx(1.0)  # a relative difference of 1 at the zero...
    assert not diff(a, b, atol=4e-5, rtol=1e-4)[3]  # ...is within an absolute tolerance of 4e-5
    assert diff(np.zeros(3), np.zeros(4), 1e-5, 0)[2] == math.inf


def test_rows_say_which_tolerance_they_were_held_to_and_it_scales_with_magnitude():
    net = deep_net()
    converted = torch_to_keras(net, (3, 8, 8))
    small = compare(net, converted, batch((2, 3, 8, 8)))
    large = compare(net, converted, batch((2, 3, 8, 8), scale=1000.0))
    assert small.agree and large.agree, str(large)
    for s in small.rows:
        assert s.atol == pytest.approx(small.atol + s.rounding) and s.rounding > 0
        assert s.rtol == small.rtol and s.tolerance_ratio <= 1
        data = s.to_dict()["tolerance"]
        assert data["atol"] == s.atol and data["rounding"] == s.rounding and data["reduction_length"] >= 0
    # rounding grows with the values: 1000 times the input, about 1000 times the first layer's allowance
    assert large.rows[0].rounding == pytest.approx(1000 * small.rows[0].rounding, rel=0.5)
    assert all(big.rounding > s.rounding for s, big in zip(small.rows, large.rows, strict=True))
    assert large.rows[0].reduction_length == 3 * 3 * 3 and large.rows[-1].reduction_length == 16 * 3 * 3


def test_allowance_grows_with_the_length_of_the_reduction():
    """A convolution summing 64·3·3 terms per output may round sqrt(16) = 4 times further (relative to
    its outputs) than one summing 4·3·3: the allowance follows."""

    def relative_allowance(channels: int) -> float:
        torch.manual_seed(0)
        conv = nn.Conv2d(channels, 8, 3, bias=False)
        with torch.no_grad():
            conv.weight.normal_(0, 1 / math.sqrt(channels * 9))
        x = batch((2, channels, 8, 8))
        report = compare(conv, torch_to_keras(conv, (channels, 8, 8)), x)
        (row,) = report.rows
        assert report.agree and row.reduction_length == channels * 9
        return row.rounding / float(conv(torch.from_numpy(x)).detach().abs().max())

    assert 2 < relative_allowance(64) / relative_allowance(4) < 8


def test_the_rounding_noise_is_what_the_docs_say():
    net = deep_net(depth=1)
    clean = trace_torch(net, batch((2, 3, 8, 8)), training=False)
    perturb = rounding_noise("torch", clean.dtype_eps, seed=0)
    conv = clean.entries[0]
    y = conv.canonical
    noisy = perturb(conv, "conv", y)
    change = np.abs(noisy.astype(np.float64) - y)
    bound = 6 * clean.dtype_eps * math.sqrt(27) * (np.abs(y) + np.sqrt(np.mean(np.square(y, dtype=np.float64))))
    assert (change <= bound).all() and change.max() > 0
    assert perturb(clean.entries[0], "flatten", y) is None  # moved values are not rounded


def test_safety_factor_is_small():
    """The allowance is a small multiple of the measured rounding: loose enough never to cry wolf on
    exact conversions (tests/diagnose/test_networks.py), tight enough to name a changed eps there."""
    assert 1 <= SAFETY <= 4
