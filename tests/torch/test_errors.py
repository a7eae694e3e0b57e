"""Bad inputs and bad arguments fail as in torch.nn, with clearer errors; NaN/Inf propagate as in torch.nn.

In the torch convention a layer fails where, when and with the exception type torch.nn fails;
every input error names the layer (its class, channel count and convention), what it expected
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
    """torch.nn raises RuntimeError (after counting the batch); bnkit the same type, saying more."""
    layer = bt.BatchNorm2d(3, convention=convention).train(training)
    theirs = nn.BatchNorm2d(3).train(training)
    with pytest.raises(bt.ChannelMismatchError) as info:
        layer(torch.zeros(2, 4, 5, 5))
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ValueError)
    assert str(info.value) == (
        f"BatchNorm2d(3, convention={convention!r}): expected 3 channels on axis 1, got 4 (input shape (2, 4, 5, 5))"
    )
    with pytest.raises(RuntimeError, match="should contain 4 elements not 3"):  # torch.nn's wording
        theirs(torch.zeros(2, 4, 5, 5))
    assert int(layer.num_batches_tracked) == int(theirs.num_batches_tracked) == int(training)


@pytest.mark.parametrize("cls, shape", [(bt.BatchNorm1d, (1, 4)), (bt.BatchNorm2d, (1, 4, 1, 1))])
def test_one_value_per_channel_in_training_torch_convention(cls, shape):
    """torch.nn counts the batch, then refuses it: with momentum=None the count is the cumulative
    average's divisor, so counting it or not changes the running statistics that follow."""
    layer, theirs = cls(4, momentum=None), getattr(nn, cls.__name__)(4, momentum=None)
    with pytest.raises(ValueError) as info:
        layer(torch.ones(shape))
    message = str(info.value)
    assert message.startswith(f"{cls.__name__}(4, convention='torch'): expected more than 1 value")
    assert f"got input shape {shape}" in message and ".eval()" in message
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        theirs(torch.ones(shape))
    assert int(layer.num_batches_tracked) == int(theirs.num_batches_tracked) == 1
    x = torch.randn((3, *shape[1:]), generator=torch.Generator().manual_seed(0))
    assert torch.equal(layer(x), theirs(x))
    assert torch.equal(layer.running_mean, theirs.running_mean) and torch.equal(layer.running_var, theirs.running_var)

    # eval() normalises with the running statistics: one value is fine, as in torch.nn
    layer.eval()
    theirs.eval()
    x = torch.randn(shape)
    assert torch.equal(layer(x), theirs(x))

    # without running statistics eval() still uses the batch's: refused, as in torch.nn
    untracked = cls(4, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        untracked(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        getattr(nn, cls.__name__)(4, track_running_stats=False).eval()(x)


@pytest.mark.parametrize("eps", [1e-3, 0.0])
@pytest.mark.parametrize("cls, shape", [(bt.BatchNorm1d, (1, 4)), (bt.BatchNorm2d, (1, 4, 1, 1))])
def test_one_value_per_channel_in_training_keras_convention_is_keras_result(cls, shape, eps):
    """Keras trains on one value per channel: the variance is 0, the output beta (NaN if eps is 0
    too), the moving variance decays towards 0; x gets a zero gradient."""
    keras = pytest.importorskip("keras")
    layer = cls(4, eps=eps, momentum=0.9, convention="keras")
    theirs = keras.layers.BatchNormalization(axis=1, momentum=0.9, epsilon=eps)
    theirs.build(shape)
    beta = torch.tensor([0.5, -1.0, 2.0, 0.0])
    with torch.no_grad():
        layer.bias.copy_(beta)
        layer.weight.copy_(torch.tensor([2.0, 3.0, -1.0, 0.5]))
    theirs.set_weights([layer.weight.detach().numpy(), beta.numpy(), layer.running_mean.numpy(),
                        layer.running_var.numpy()])
    x = torch.tensor([3.0, -7.0, 0.25, 1e4]).reshape(shape).requires_grad_()
    y = layer(x)
    expected = theirs(x.detach(), training=True)
    torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)
    if eps > 0:
        assert torch.equal(y.detach().reshape(-1), beta)
        y.sum().backward()
        assert torch.equal(x.grad, torch.zeros_like(x))
    for ours, keras_stat in ((layer.running_mean, theirs.moving_mean), (layer.running_var, theirs.moving_variance)):
        torch.testing.assert_close(ours, keras_stat.value.detach(), rtol=1e-6, atol=0)
    assert int(layer.num_batches_tracked) == 1


def test_one_sample_with_spatial_extent_is_fine():
    """(1, C, H, W) has H*W values per channel: torch.nn trains on it, and so do we."""
    x = torch.randn(1, 2, 3, 3)
    for convention in CONVENTIONS:
        ours, theirs = bt.BatchNorm2d(2, eps=1e-5, convention=convention), nn.BatchNorm2d(2)
        assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_non_floating_input(dtype, convention):
    """torch.nn raises NotImplementedError; bnkit's class is that and a TypeError, naming the layer."""
    layer = bt.BatchNorm2d(3, convention=convention)
    with pytest.raises(bt.NonFloatingInputError) as info:
        layer(torch.ones(2, 3, 2, 2, dtype=dtype))
    assert isinstance(info.value, NotImplementedError) and isinstance(info.value, TypeError)
    message = str(info.value)
    assert message.startswith(f"BatchNorm2d(3, convention={convention!r}): expected a floating-point input")
    assert f"got dtype {dtype}" in message and "x.float()" in message
    with pytest.raises(NotImplementedError):
        nn.BatchNorm2d(3)(torch.ones(2, 3, 2, 2, dtype=dtype))


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "input_dtype, layer_dtype",
    [(torch.float64, torch.float32), (torch.float32, torch.float64), (torch.float32, torch.float16)],
)
def test_input_dtype_that_the_layer_cannot_take(input_dtype, layer_dtype, training, convention):
    """torch.nn: RuntimeError "mixed dtype (CPU)"; bnkit: the same type, naming layer and dtypes."""
    layer = bt.BatchNorm2d(3, convention=convention).to(layer_dtype).train(training)
    theirs = nn.BatchNorm2d(3).to(layer_dtype).train(training)
    x = torch.randn(2, 3, 4, 4, dtype=input_dtype)
    with pytest.raises(bt.DtypeMismatchError) as info:
        layer(x)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, TypeError)
    message = str(info.value)
    assert message.startswith(f"BatchNorm2d(3, convention={convention!r}): input of dtype {input_dtype}")
    assert str(layer_dtype) in message
    with pytest.raises(RuntimeError, match="mixed dtype"):
        theirs(x)
    assert int(layer.num_batches_tracked) == int(theirs.num_batches_tracked)


def test_half_input_to_a_float32_layer_is_fine_as_in_torch_nn():
    x = torch.randn(4, 3, 5, 5).half()
    for training in (True, False):
        ours, theirs = bt.BatchNorm2d(3).train(training), nn.BatchNorm2d(3).train(training)
        assert torch.equal(ours(x), theirs(x))


def test_eps_zero_builds_runs_in_eval_and_is_refused_in_training_as_in_torch_nn():
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    ours, theirs = bt.BatchNorm2d(3, eps=0.0), nn.BatchNorm2d(3, eps=0.0)
    assert ours.eps == 0.0
    with pytest.raises(ValueError, match=r"^BatchNorm2d\(3, convention='torch'\): eps must be positive during"):
        ours(x)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        theirs(x)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 1
    ours.eval()
    theirs.eval()
    assert torch.equal(ours(x), theirs(x))
    negative = bt.BatchNorm2d(3, eps=-1.0).eval()
    with pytest.raises(ValueError, match="eps must be non-negative, got eps=-1.0"):
        negative(x)


@pytest.mark.parametrize("momentum", [1.5, -0.1, 2, torch.tensor(0.3), True])
def test_momentum_is_not_range_checked_as_in_torch_nn(momentum):
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    ours, theirs = bt.BatchNorm2d(3, momentum=momentum), nn.BatchNorm2d(3, momentum=momentum)
    assert torch.equal(ours(x), theirs(x))
    assert torch.equal(ours.running_mean, theirs.running_mean) and torch.equal(ours.running_var, theirs.running_var)
    assert repr(ours) == repr(theirs)


@pytest.mark.parametrize(
    "kwargs, error",
    [({"eps": "1e-3"}, TypeError), ({"eps": None}, None), ({"momentum": "0.1"}, TypeError),
     ({"momentum": torch.tensor([0.1])}, TypeError)],
)
def test_arguments_torch_refuses_only_in_the_forward_pass(kwargs, error):
    """torch.nn builds these and fails in forward(); bnkit too (eps=None is bnkit's default)."""
    ours = bt.BatchNorm2d(3, **kwargs)
    x = torch.randn(2, 3, 2, 2)
    if error is None:
        ours(x)
        return
    theirs = nn.BatchNorm2d(3, **kwargs)
    with pytest.raises(error):
        theirs(x)
    with pytest.raises(error):
        ours(x)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"momentum": None, "convention": "keras"}, ValueError,
         "BatchNorm2d: momentum=None (a cumulative average) is not part of the keras convention; "
         "give a float in [0, 1] (its default is 0.99)"),
        ({"momentum": "fast", "convention": "keras"}, ValueError,
         "BatchNorm2d: momentum must be a float, got str 'fast'"),
        ({"eps": [1e-3], "convention": "keras"}, TypeError, "BatchNorm2d: eps must be a float, got list [0.001]"),
        ({"convention": "tensorflow"}, ValueError,
         "BatchNorm2d: convention must be one of 'torch', 'keras', 'tf_keras_fused', 'onnx', 'flax' or a "
         "bnkit.Convention, got 'tensorflow'"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message) + "$"):
        bt.BatchNorm2d(3, **kwargs)


def test_keras_convention_reads_eps_and_momentum_with_float_as_keras():
    layer = bt.BatchNorm1d(2, eps="1e-3", momentum=torch.tensor(0.5), convention="keras")
    assert (layer.eps, layer.momentum) == (1e-3, 0.5)
    assert type(layer.eps) is float and type(layer.momentum) is float


@pytest.mark.parametrize("num_features, error", [(-2, bt.NumFeaturesError), (2.5, TypeError), ("3", TypeError),
                                                 (True, TypeError)])
def test_bad_num_features(num_features, error):
    with pytest.raises(error, match=r"^BatchNorm1d: num_features must be"):
        bt.BatchNorm1d(num_features)
    # torch.nn refuses them with the base type
    with pytest.raises(RuntimeError if error is bt.NumFeaturesError else TypeError):
        nn.BatchNorm1d(num_features)


def test_zero_features_build_as_in_torch_nn():
    assert repr(bt.BatchNorm1d(0)) == repr(nn.BatchNorm1d(0))


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
