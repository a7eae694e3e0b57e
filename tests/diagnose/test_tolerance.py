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
from bnkit.diagnose.tolerance import SAFETY, diff, local_terms, measure_rounding, rounding_noise
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


def test_rows_say_which_tolerance_they_were_held_to():
    net = deep_net()
    converted = torch_to_keras(net, (3, 8, 8))
    small = compare(net, converted, batch((2, 3, 8, 8)))
    # every layer within atol alone: agreement whatever rounding would allow, so it is not measured
    assert small.agree and not small.rounding_measured, str(small)
    assert all(r.atol == small.atol and r.rounding == 0 for r in small.rows)
    assert small.to_dict()["tolerance"]["rounding_measured"] is False
    # 1000 times the values: differences past atol, so each layer is held to atol plus its measured rounding
    large = compare(net, converted, batch((2, 3, 8, 8), scale=1000.0))
    assert large.agree and large.rounding_measured, str(large)
    for r in large.rows:
        assert r.atol == pytest.approx(large.atol + r.rounding) and r.rounding > 0
        assert r.rtol == large.rtol and r.tolerance_ratio <= 1
        data = r.to_dict()["tolerance"]
        assert data["atol"] == r.atol and data["rounding"] == r.rounding and data["reduction_length"] >= 0
    assert large.rows[0].reduction_length == 3 * 3 * 3 and large.rows[-1].reduction_length == 16 * 3 * 3
    assert any(r.max_abs_diff > large.atol for r in large.rows)  # a fixed atol would have cried wolf


def test_measured_rounding_scales_with_magnitude():
    net = deep_net()
    x = batch((2, 3, 8, 8))
    small = _measured(net, x)
    large = _measured(net, 1000 * x)
    assert large.layers[0] == pytest.approx(1000 * small.layers[0], rel=0.5)  # the first convolution
    assert all(big > s for s, big in zip(small.layers, large.layers, strict=True))


def _measured(model, x):
    clean = trace_torch(model, x, training=False)
    return measure_rounding(lambda perturb: trace_torch(model, x, False, perturb), clean)


def test_allowance_grows_with_the_length_of_the_reduction():
    """A convolution summing 64·3·3 terms per output may round sqrt(16) = 4 times further (relative to
    its outputs) than one summing 4·3·3: the measured rounding follows."""

    def relative_rounding(channels: int) -> float:
        torch.manual_seed(0)
        conv = nn.Conv2d(channels, 8, 3, bias=False)
        with torch.no_grad():
            conv.weight.normal_(0, 1 / math.sqrt(channels * 9))
        x = batch((2, channels, 8, 8))
        (entry,) = trace_torch(conv, x, training=False).entries
        assert local_terms(entry, "torch", 1.0)[1] == channels * 9
        return _measured(conv, x).layers[0] / entry.scale

    assert 2 < relative_rounding(64) / relative_rounding(4) < 8


def test_the_rounding_noise_is_what_the_docs_say():
    net = deep_net(depth=1)
    clean = trace_torch(net, batch((2, 3, 8, 8)), training=False)
    perturb = rounding_noise("torch", clean.dtype_eps, seed=0)
    conv = clean.entries[0]
    y = conv.canonical
    noisy = perturb(conv, "conv", y)
    change = np.abs(noisy.astype(np.float64) - y)
    # uniform with standard deviation eps·sqrt(n)·(|y| + rms(y)): at most sqrt(3) times that, plus the
    # rounding of the sum itself
    rms = np.sqrt(np.mean(np.square(y, dtype=np.float64)))
    bound = math.sqrt(3) * clean.dtype_eps * math.sqrt(27) * (np.abs(y) + rms) + 2 * clean.dtype_eps * np.abs(y)
    assert (change <= bound * 1.001).all() and change.max() > 0.2 * bound.max()
    assert perturb(clean.entries[0], "flatten", y) is None  # moved values are not rounded


def test_safety_factor_is_small():
    """The allowance is a small multiple of the measured rounding: loose enough never to cry wolf on
    exact conversions (tests/diagnose/test_networks.py), tight enough to name a changed eps there."""
    assert 1 <= SAFETY <= 4
