"""Bad inputs and bad arguments give clear errors; NaN/Inf propagate exactly as in torch.nn.

Every input error names the layer (its class, channel count and convention), what it expected
and what it got; torch.nn's own messages for the same mistakes are less clear (semantics.md).
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import bnkit.torch as bt

CONVENTIONS = ["torch", "keras"]


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize(
    "cls, shape, expected",
    [
        (bt.BatchNorm1d, (2, 3, 4, 5), "expected 2D (N, C) or 3D (N, C, L) input, got 4D input of shape (2, 3, 4, 5)"),
        (bt.BatchNorm1d, (3,), "expected 2D (N, C) or 3D (N, C, L) input, got 1D input of shape (3,)"),
        (bt.BatchNorm2d, (2, 3, 4), "expected 4D (N, C, H, W) input, got 3D input of shape (2, 3, 4)"),
        (bt.BatchNorm3d, (2, 3, 4, 5), "expected 5D (N, C, D, H, W) input, got 4D input of shape (2, 3, 4, 5)"),
    ],
)
def test_wrong_rank(cls, shape, expected, convention):
    layer = cls(3, convention=convention)
    with pytest.raises(ValueError) as info:
        layer(torch.zeros(shape))
    assert str(info.value) == f"{cls.__name__}(3, convention={convention!r}): {expected}"
    # torch.nn refuses the same input
    with pytest.raises(ValueError):
        getattr(nn, cls.__name__)(3)(torch.zeros(shape))


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_wrong_channel_count(convention, training):
    layer = bt.BatchNorm2d(3, convention=convention).train(training)
    with pytest.raises(ValueError) as info:
        layer(torch.zeros(2, 4, 5, 5))
    assert str(info.value) == (
        f"BatchNorm2d(3, convention={convention!r}): expected 3 channels on axis 1, got 4 (input shape (2, 4, 5, 5))"
    )
    with pytest.raises(RuntimeError, match="should contain 4 elements not 3"):  # torch.nn's wording
        nn.BatchNorm2d(3).train(training)(torch.zeros(2, 4, 5, 5))


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("cls, shape", [(bt.BatchNorm1d, (1, 4)), (bt.BatchNorm2d, (1, 4, 1, 1))])
def test_one_value_per_channel_in_training(cls, shape, convention):
    layer = cls(4, eps=1e-5, convention=convention)
    with pytest.raises(ValueError) as info:
        layer(torch.ones(shape))
    message = str(info.value)
    assert message.startswith(f"{cls.__name__}(4, convention={convention!r}): expected more than 1 value")
    assert f"got input shape {shape}" in message and ".eval()" in message
    assert int(layer.num_batches_tracked) == 0  # nothing was updated
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        getattr(nn, cls.__name__)(4)(torch.ones(shape))

    # eval() normalises with the running statistics: one value is fine, as in torch.nn
    layer.eval()
    theirs = getattr(nn, cls.__name__)(4).eval()
    x = torch.randn(shape)
    assert torch.equal(layer(x), theirs(x))

    # without running statistics eval() still uses the batch's: refused, as in torch.nn
    untracked = cls(4, convention=convention, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        untracked(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        getattr(nn, cls.__name__)(4, track_running_stats=False).eval()(x)


def test_one_sample_with_spatial_extent_is_fine():
    """(1, C, H, W) has H*W values per channel: torch.nn trains on it, and so do we."""
    x = torch.randn(1, 2, 3, 3)
    for convention in CONVENTIONS:
        ours, theirs = bt.BatchNorm2d(2, eps=1e-5, convention=convention), nn.BatchNorm2d(2)
        assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_input_is_a_type_error(dtype, convention):
    layer = bt.BatchNorm2d(3, convention=convention)
    with pytest.raises(TypeError) as info:
        layer(torch.ones(2, 3, 2, 2, dtype=dtype))
    message = str(info.value)
    assert message.startswith(f"BatchNorm2d(3, convention={convention!r}): expected a floating-point input")
    assert f"got dtype {dtype}" in message and "x.float()" in message


def test_complex_input_is_a_type_error():
    with pytest.raises(TypeError, match="expected a floating-point input .* got dtype torch.complex64"):
        bt.BatchNorm1d(3)(torch.ones(2, 3, dtype=torch.complex64))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"eps": 0}, ValueError, "BatchNorm2d: eps must be a positive float, got 0"),
        ({"eps": -1e-5}, ValueError, "BatchNorm2d: eps must be a positive float, got -1e-05"),
        ({"eps": float("nan")}, ValueError, "BatchNorm2d: eps must be a positive float, got nan"),
        ({"eps": "1e-3"}, TypeError, "BatchNorm2d: eps must be a positive float, got str '1e-3'"),
        ({"momentum": 1.5}, ValueError, "BatchNorm2d: momentum must be in [0, 1], got 1.5"),
        ({"momentum": -0.1}, ValueError, "BatchNorm2d: momentum must be in [0, 1], got -0.1"),
        ({"momentum": "0.1"}, TypeError, "BatchNorm2d: momentum must be a float or None, got str '0.1'"),
        (
            {"momentum": None, "convention": "keras"},
            ValueError,
            "BatchNorm2d: momentum=None (a cumulative average) is not part of the keras convention; "
            "give a float in [0, 1] (its default is 0.99)",
        ),
        (
            {"convention": "tensorflow"},
            ValueError,
            "BatchNorm2d: convention must be 'torch', 'keras' or a bnkit.Convention, got 'tensorflow'",
        ),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message) + "$"):
        bt.BatchNorm2d(3, **kwargs)


@pytest.mark.parametrize(
    "num_features, error", [(0, ValueError), (-2, ValueError), (2.5, TypeError), ("3", TypeError), (True, TypeError)]
)
def test_bad_num_features(num_features, error):
    with pytest.raises(error, match=r"^BatchNorm1d: num_features must be a positive int, got"):
        bt.BatchNorm1d(num_features)


def test_good_edge_arguments_are_accepted():
    assert bt.BatchNorm1d(2, momentum=0).momentum == 0
    assert bt.BatchNorm1d(2, momentum=1, convention="keras").momentum == 1
    assert bt.BatchNorm1d(2, momentum=None).momentum is None
    np = pytest.importorskip("numpy")
    layer = bt.BatchNorm1d(np.int64(2), eps=np.float32(1e-3), momentum=np.float64(0.2))
    assert (layer.num_features, layer.eps, layer.momentum) == (2, pytest.approx(1e-3), 0.2)


# --- NaN and Inf ------------------------------------------------------------------------------


def _poisoned(shape=(4, 3, 2, 2)):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x[0, 1, 0, 0] = float("nan")
    x[1, 2, 1, 1] = float("inf")
    return x


def test_nan_inf_propagate_as_in_torch_nn():
    """A NaN or Inf poisons its channel's batch statistics, hence that channel's whole output
    and running statistics; other channels are untouched. Bit for bit torch.nn's result."""
    x = _poisoned()
    ours, theirs = bt.BatchNorm2d(3, momentum=0.5), nn.BatchNorm2d(3, momentum=0.5)
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(y_ours[:, 1:]).all() and torch.isfinite(y_ours[:, 0]).all()
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=0, atol=0, equal_nan=True)
    # in eval() with finite statistics a NaN/Inf stays where it is
    ours.eval()
    theirs.eval()
    clean = bt.BatchNorm2d(3).eval()
    torch.testing.assert_close(clean(x), nn.BatchNorm2d(3).eval()(x), rtol=0, atol=0, equal_nan=True)
    assert int(torch.isnan(clean(x)).sum()) == 1 and int(torch.isinf(clean(x)).sum()) == 1


def test_nan_inf_keras_convention_same_pattern_as_torch_nn_and_keras():
    keras = pytest.importorskip("keras")
    x = _poisoned()
    ours = bt.BatchNorm2d(3, eps=1e-3, momentum=0.5, convention="keras")
    theirs = nn.BatchNorm2d(3, eps=1e-3)
    k = keras.layers.BatchNormalization(axis=1, momentum=0.5)
    k.build(x.shape)
    y = ours(x)
    torch.testing.assert_close(y, theirs(x), rtol=0, atol=0, equal_nan=True)  # the same kernel
    y_keras = k(x, training=True)
    assert torch.equal(torch.isnan(y), torch.isnan(y_keras))
    # the moving statistics are NaN/Inf in the same places as Keras' (mean Inf, var NaN)
    for ours_stat, keras_stat in ((ours.running_mean, k.moving_mean), (ours.running_var, k.moving_variance)):
        value = keras_stat.value.detach()
        assert torch.equal(torch.isnan(ours_stat), torch.isnan(value))
        assert torch.equal(torch.isinf(ours_stat), torch.isinf(value))
