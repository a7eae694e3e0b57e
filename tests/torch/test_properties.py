"""Hypothesis property tests: random shapes, values and settings, both conventions.

1. float64: bnkit.torch equals bnkit.reference (the spec) through two training steps and an
   inference step, whatever the shape, per-channel location/scale, momentum, eps and affine.
2. float32, hard data (a channel with mean 1e4 and std 1e-3, next to ordinary channels): bnkit
   is as accurate as torch.nn. Both are measured against the float64 reference on the very same
   float32 values; bnkit's error must stay within a small factor of torch.nn's. In this regime
   float32 cannot even hold the inputs to better than 1e4 * 2**-24 ~ 6e-4 (about the std), so
   the absolute errors are large for both; the point is that bnkit loses nothing on top of
   torch.nn's Welford statistics, in the Keras convention too (Keras' own E[x^2] - E[x]^2 does:
   see test_keras_own_formula_loses_what_bnkit_keeps).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import bnkit.torch as bt
from bnkit import reference as ref
from bnkit.conventions import KERAS, TORCH, get_convention, with_overrides

LAYERS = {2: bt.BatchNorm1d, 3: bt.BatchNorm1d, 4: bt.BatchNorm2d, 5: bt.BatchNorm3d}
NN_LAYERS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
# (mean, std) of a channel: ordinary, offset, tiny, and the hard one of the issue
CHANNEL_KINDS = [(0.0, 1.0), (3.0, 10.0), (-50.0, 0.5), (0.0, 1e-3), (1e4, 1e-3)]
PROPERTY_SETTINGS = settings(
    max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def batches(draw):
    """(shape, seed, channel kinds) with 2..6 values per channel at least."""
    rank = draw(st.integers(2, 5))
    channels = draw(st.integers(1, 4))
    batch = draw(st.integers(2, 6))
    spatial = [draw(st.integers(1, 3)) for _ in range(rank - 2)]
    kinds = [draw(st.sampled_from(CHANNEL_KINDS)) for _ in range(channels)]
    return (batch, channels, *spatial), draw(st.integers(0, 2**31 - 1)), kinds


def _values(shape, seed, kinds, step=0):
    x = np.random.default_rng([seed, step]).standard_normal(shape)
    for c, (mean, std) in enumerate(kinds):
        x[:, c] = x[:, c] * std + mean
    return x


# custom conventions exercise bnkit's own running update with every combination of knobs
CUSTOM_CONVENTIONS = [
    with_overrides(TORCH, name="torch-biased", running_var_estimator="biased"),
    with_overrides(KERAS, name="keras-unbiased", running_var_estimator="unbiased"),
    with_overrides(KERAS, name="keras-cumulative", cumulative_average_when_none=True),
]


@st.composite
def layer_settings(draw):
    convention = draw(st.sampled_from(["torch", "keras", *CUSTOM_CONVENTIONS]))
    cumulative = get_convention(convention).cumulative_average_when_none
    momenta = [0.0, 0.1, 0.5, 0.99, 1.0] + ([None] if cumulative else [])
    return {
        "convention": convention,
        "momentum": draw(st.sampled_from(momenta)),
        "eps": draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        "affine": draw(st.booleans()),
    }


@PROPERTY_SETTINGS
@given(batch=batches(), config=layer_settings())
def test_float64_equals_reference(batch, config):
    """Every convention, the presets and custom ones, follows the reference's update."""
    shape, seed, kinds = batch
    channels = shape[1]
    layer = LAYERS[len(shape)](channels, dtype=torch.float64, **config)
    gamma = beta = None
    if config["affine"]:
        rng = np.random.default_rng(seed + 1)
        gamma, beta = rng.uniform(0.5, 2.0, channels), rng.normal(size=channels)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(gamma))
            layer.bias.copy_(torch.from_numpy(beta))
    running = ref.RunningStats(np.zeros(channels), np.ones(channels), 0)
    # float64 rounding of x - mean for |mean| up to 1e4 next to a std of 1e-3 is ~1e4 * 2**-52 / 1e-3;
    # outputs are O(1) after normalisation, so this atol is ~1e-8 relative to them.
    rtol, atol = 1e-9, 1e-8
    for step in range(2):
        x = _values(shape, seed, kinds, step)
        y = layer(torch.from_numpy(x)).detach().numpy()
        y_ref, stats = ref.forward_train(x, gamma, beta, config["eps"])
        running = ref.update_running(running, stats, config["momentum"], config["convention"])
        np.testing.assert_allclose(y, y_ref, rtol=rtol, atol=atol)
        np.testing.assert_allclose(layer.running_mean.numpy(), running.mean, rtol=rtol, atol=1e-12)
        np.testing.assert_allclose(layer.running_var.numpy(), running.var, rtol=rtol, atol=1e-15)
    layer.eval()
    x = _values(shape, seed, kinds, 2)
    y_ref = ref.forward_eval(x, running.mean, running.var, gamma, beta, config["eps"])
    np.testing.assert_allclose(layer(torch.from_numpy(x)).detach().numpy(), y_ref, rtol=rtol, atol=atol)


def _errors(layer, x32, momentum, convention, eps):
    """Errors of one training step of ``layer`` against the float64 reference on the same values:
    (max abs output error, max relative running-variance error, max abs running-mean error)."""
    x64 = x32.double().numpy()
    y = layer(x32).detach().double().numpy()
    y_ref, stats = ref.forward_train(x64, eps=eps)
    channels = x32.shape[1]
    expected = ref.update_running(
        ref.RunningStats(np.zeros(channels), np.ones(channels), 0), stats, momentum, convention
    )
    var = layer.running_var.double().numpy()
    mean = layer.running_mean.double().numpy()
    return (
        float(np.abs(y - y_ref).max()),
        float((np.abs(var - expected.var) / expected.var).max()),
        float(np.abs(mean - expected.mean).max()),
    )


@PROPERTY_SETTINGS
@given(batch=batches(), convention=st.sampled_from(["torch", "keras"]), momentum=st.sampled_from([0.1, 0.5, 0.9]))
def test_float32_hard_channel_as_accurate_as_torch_nn(batch, convention, momentum):
    shape, seed, kinds = batch
    kinds = [(1e4, 1e-3), *kinds[1:]]  # always include the hard channel
    channels = shape[1]
    x32 = torch.from_numpy(_values(shape, seed, kinds)).float()
    eps = 1e-5
    ours = LAYERS[len(shape)](channels, eps=eps, momentum=momentum, affine=False, convention=convention)
    # torch.nn in its own convention with the same weights of old and new statistics
    torch_momentum = momentum if convention == "torch" else 1.0 - momentum
    theirs = NN_LAYERS[len(shape)](channels, eps=eps, momentum=torch_momentum, affine=False)
    ours_err = _errors(ours, x32, momentum, convention, eps)
    theirs_err = _errors(theirs, x32, torch_momentum, "torch", eps)
    # a small factor (2) and a floor of a few float32 ulps for the cases where torch.nn is exact
    floors = (1e-6, 1e-6, 1e-7 * 1e4)
    names = ("output", "running var", "running mean")
    for what, ours_e, theirs_e, floor in zip(names, ours_err, theirs_err, floors, strict=True):
        assert ours_e <= 2 * theirs_e + floor, f"{what}: bnkit {ours_e:.3g} vs torch.nn {theirs_e:.3g}"
    if convention == "torch":  # torch.nn's own code path: the same errors exactly
        assert ours_err == theirs_err


def test_keras_own_formula_loses_what_bnkit_keeps():
    """On the hard channel Keras 3's E[x^2] - E[x]^2 in float32 cancels catastrophically (here a
    negative variance: NaN outputs); bnkit's Keras convention, with Welford statistics, keeps the
    running variance to ~1e-7 relative and finite outputs."""
    keras = pytest.importorskip("keras")
    shape, kinds = (64, 3), [(1e4, 1e-3), (1.0, 2.0), (-300.0, 1e-3)]
    x32 = torch.from_numpy(_values(shape, 0, kinds)).float()
    ours = bt.BatchNorm1d(3, eps=1e-3, momentum=0.9, convention="keras")
    k = keras.layers.BatchNormalization(axis=1, momentum=0.9, epsilon=1e-3)
    k.build(shape)
    out_err, var_err, _ = _errors(ours, x32, 0.9, "keras", 1e-3)
    y_keras = k(x32, training=True)
    assert var_err < 1e-6 and np.isfinite(out_err)
    _, stats = ref.forward_train(x32.double().numpy(), eps=1e-3)
    expected_var = ref.update_running(ref.RunningStats(np.zeros(3), np.ones(3), 0), stats, 0.9, "keras").var
    keras_var_err = np.abs(k.moving_variance.value.detach().double().numpy() - expected_var) / expected_var
    assert torch.isnan(y_keras).any() or keras_var_err.max() > 100 * var_err
