"""Layer-by-layer conversion: the padding/stride/dilation/groups grid, pooling, activations,
batch-norm settings, Flatten order, and the errors for what cannot be converted exactly.

Tolerance 1e-5 (float32, different summation orders); weights are compared exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnkit.convert import UnsupportedLayerError, keras_to_torch, torch_to_keras
from bnkit.keras import BatchNormalization, keras

L = keras.layers
TOL = 1e-5


def _np(x):
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(keras.ops.convert_to_numpy(x))


def _check_keras(model, x_nhwc, semantics="source"):
    """keras -> torch agrees with Keras; torch -> keras again agrees too."""
    torch_model = keras_to_torch(model, semantics=semantics).eval()
    x_t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_nhwc, -1, 1)))
    expected = _np(model(x_nhwc))
    got = _np(torch_model(x_t))
    if expected.ndim > 2:
        got = np.moveaxis(got, 1, -1)
    np.testing.assert_allclose(got, expected, rtol=TOL, atol=TOL)
    back = torch_to_keras(torch_model, tuple(x_t.shape[1:]), semantics=semantics)
    np.testing.assert_allclose(_np(back(x_nhwc)), expected, rtol=TOL, atol=TOL)
    return torch_model


def _check_torch(module, shape, semantics="source"):
    module.eval()
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module(x).numpy()
    model = torch_to_keras(module, shape, semantics=semantics)
    got = _np(model(np.moveaxis(x.numpy(), 1, -1) if x.dim() > 2 else x.numpy()))
    if expected.ndim > 2:
        got = np.moveaxis(got, -1, 1)
    np.testing.assert_allclose(got, expected, rtol=TOL, atol=TOL)
    with torch.no_grad():
        np.testing.assert_allclose(keras_to_torch(model).eval()(x).numpy(), expected, rtol=TOL, atol=TOL)
    return model


def _x(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


# kernel, strides, dilation, padding, groups, bias: Keras 'same' with stride 2 pads asymmetrically
# on 9 and 10 wide inputs in different ways; even kernels pad asymmetrically even with stride 1.
KERAS_CONV_GRID = [
    (3, 1, 1, "same", 1, True),
    (3, 2, 1, "same", 1, False),
    (4, 2, 1, "same", 2, True),
    (2, 1, 1, "same", 1, True),
    (3, 1, 2, "same", 4, True),
    (3, 1, 2, "valid", 1, False),
    (5, 3, 1, "same", 1, True),
    (3, 2, 1, "valid", 2, True),
]


@pytest.mark.parametrize(("rank", "size"), [(1, 9), (2, 9), (2, 10)])
@pytest.mark.parametrize(("k", "s", "d", "padding", "groups", "bias"), KERAS_CONV_GRID)
def test_keras_conv_grid(rank, size, k, s, d, padding, groups, bias):
    keras.utils.set_random_seed(0)
    shape = (size,) * rank + (4,)
    cls = L.Conv1D if rank == 1 else L.Conv2D
    inputs = keras.Input(shape)
    conv = cls(8, k, strides=s, dilation_rate=d, padding=padding, groups=groups, use_bias=bias, name="conv")
    outputs = conv(inputs)
    model = keras.Model(inputs, outputs)
    if bias:
        conv.bias.assign(_x((8,), 5))
    _check_keras(model, _x((2, *shape)))


# kernel, stride, padding, dilation, groups, bias
TORCH_CONV_GRID = [
    (3, 1, 1, 1, 1, True),
    (3, 2, 1, 1, 1, False),
    (3, 1, "same", 2, 2, True),
    (4, 1, "same", 1, 1, True),
    (3, 2, 0, 1, 4, True),
    (5, 2, 2, 1, 1, True),
    (3, 1, 2, 1, 1, True),
    (3, 1, 0, 3, 1, False),
]


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize(("k", "s", "p", "d", "groups", "bias"), TORCH_CONV_GRID)
def test_torch_conv_grid(rank, k, s, p, d, groups, bias):
    torch.manual_seed(0)
    cls = nn.Conv1d if rank == 1 else nn.Conv2d
    module = cls(4, 8, k, stride=s, padding=p, dilation=d, groups=groups, bias=bias)
    _check_torch(module, (4,) + (9,) * rank)


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("cls", [L.MaxPooling2D, L.AveragePooling2D, L.MaxPooling1D, L.AveragePooling1D])
def test_keras_pooling(cls, padding):
    rank = 1 if cls.__name__.endswith("1D") else 2
    shape = (7,) * rank + (3,)
    inputs = keras.Input(shape)
    model = keras.Model(inputs, cls(3, strides=1, padding=padding)(inputs))
    _check_keras(model, _x((2, *shape)))


@pytest.mark.parametrize(
    ("cls", "pool", "stride", "shape"),
    [
        (L.MaxPooling2D, 2, 2, (7, 7, 3)),  # Keras pads one after: PyTorch ceil_mode lets the window overhang
        (L.MaxPooling1D, 3, 2, (8, 3)),
        (L.AveragePooling2D, 2, 2, (9, 9, 3)),  # a 2-wide overhanging window averages one real value
    ],
)
def test_keras_same_pooling_padded_after_becomes_ceil_mode(cls, pool, stride, shape):
    inputs = keras.Input(shape)
    torch_model = _check_keras(keras.Model(inputs, cls(pool, strides=stride, padding="same")(inputs)), _x((2, *shape)))
    assert next(m for m in torch_model.modules() if "Pool" in type(m).__name__).ceil_mode
    _check_torch(nn.Sequential(nn.MaxPool2d(2, ceil_mode=True)), (3, 9, 9))
    # 3-wide: Keras' torch backend averages a replicated edge value, TensorFlow the real values only
    inputs = keras.Input((8, 3))
    with pytest.raises(UnsupportedLayerError, match="average_pool"):
        keras_to_torch(
            keras.Model(inputs, L.AveragePooling1D(3, strides=2, padding="same", name="average_pool")(inputs))
        )


def test_torch_pooling_and_global_pooling():
    module = nn.Sequential(
        nn.MaxPool2d(3, stride=1, padding=1),
        nn.AvgPool2d(2),
        nn.AvgPool2d(3, stride=1, padding=1),  # count_include_pad=True: zero padding then 'valid'
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
    )
    _check_torch(module, (3, 8, 8))


def test_max_pooling_of_relu_outputs_pads_with_zeros_where_keras_same_cannot():
    """ResNet's stem MaxPool2d(3, 2, 1) on an even size pads 1 on both sides, Keras' 'same' (0, 1):
    after a ReLU, zeros never win the max, so explicit zero padding and 'valid' pooling are exact."""
    stem = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    model = _check_torch(stem, (3, 16, 16))
    assert any(isinstance(layer, L.ZeroPadding2D) for layer in model.layers)
    with pytest.raises(UnsupportedLayerError, match="MaxPool2d"):  # a negative input would lose to a zero
        torch_to_keras(nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, 2, 1)), (3, 16, 16))
    inputs = keras.Input((9, 9, 3))  # Keras 'same' pads (0, 1) here; PyTorch pooling pads symmetrically
    x = L.MaxPooling2D(2, padding="same")(L.Conv2D(4, 3, padding="same", activation="relu")(inputs))
    _check_keras(keras.Model(inputs, x), _x((2, 9, 9, 3)))


class _LeNet(nn.Module):
    """PyTorch's tutorial network: pooling written as F.max_pool2d calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn, self.conv2 = nn.Conv2d(1, 6, 5), nn.BatchNorm2d(6), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2 = nn.Linear(16 * 5 * 5, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv1(x))), (2, 2))
        x = F.avg_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def test_pooling_functions():
    _check_torch(_LeNet(), (1, 32, 32))


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), torch.sigmoid(self.b(x))], dim=1)
        y = F.leaky_relu(y, 0.1) + F.elu(y)
        flat = y.view(y.size(0), -1)
        return torch.cat([flat, y.mean(dim=(2, 3))], dim=1)  # a Flatten that feeds no Linear


def test_torch_functional_calls_and_flatten_not_followed_by_linear():
    model = _check_torch(_Functional(), (3, 5, 6))
    assert any(isinstance(layer, L.Permute) for layer in model.layers)  # the data were permuted


KERAS_ACTIVATIONS = (
    "relu sigmoid tanh softmax gelu elu leaky_relu silu swish linear "
    "selu softplus softsign hard_sigmoid hard_silu mish hard_tanh log_sigmoid celu log_softmax"
).split()


@pytest.mark.parametrize("activation", KERAS_ACTIVATIONS)
def test_keras_activations(activation):
    inputs = keras.Input((4, 4, 3))
    x = L.Conv2D(3, 1, activation=activation)(inputs)
    model = keras.Model(inputs, L.Dense(4)(L.Flatten()(L.Activation(activation)(x))))
    _check_keras(model, _x((2, 4, 4, 3)))


def test_torch_activation_modules_and_functions():
    modules = [nn.SELU(), nn.Softplus(), nn.Softsign(), nn.Hardsigmoid(), nn.Hardswish(), nn.Mish()]
    modules += [nn.Hardtanh(), nn.LogSigmoid(), nn.CELU(), nn.LogSoftmax(dim=1)]
    functions = [F.selu, F.softplus, F.softsign, F.hardsigmoid, F.hardswish, F.mish, F.hardtanh, F.logsigmoid]

    class Functional(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fc, self.fn = nn.Linear(5, 4), fn

        def forward(self, x):
            return self.fn(self.fc(x))

    for net in [nn.Sequential(nn.Linear(5, 4), m) for m in modules] + [Functional(fn) for fn in functions]:
        _check_torch(net, (5,))
    for module in (nn.Softplus(beta=2), nn.CELU(alpha=0.5), nn.Hardtanh(0, 6)):  # other constants than Keras'
        with pytest.raises(UnsupportedLayerError, match=type(module).__name__):
            torch_to_keras(nn.Sequential(nn.Linear(5, 4), module), (5,))


def test_keras_activation_layers_dropout_concat_and_flatten_to_output():
    inputs = keras.Input((6, 3))
    a = L.LeakyReLU(negative_slope=0.2)(L.Conv1D(4, 3, padding="causal")(inputs))
    b = L.ELU(alpha=0.5)(L.Conv1D(2, 1)(inputs))
    x = L.Concatenate(axis=-1)([a, b])
    x = L.ReLU(max_value=6.0)(L.Dropout(0.5)(x))
    x = L.Softmax(axis=1)(x)
    x = L.Concatenate(axis=1)([x, L.ZeroPadding1D((1, 2))(x)])
    y = L.Identity()(x)
    model = keras.Model(inputs, [L.Flatten()(y), L.GlobalAveragePooling1D()(y)])
    torch_model = keras_to_torch(model).eval()
    x_np = _x((2, 6, 3))
    expected = [_np(t) for t in model(x_np)]
    got = torch_model(torch.from_numpy(np.moveaxis(x_np, -1, 1).copy()))
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(_np(g), e, rtol=TOL, atol=TOL)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"center": False},
        {"scale": False},
        {"center": False, "scale": False},
        {"momentum": 0.5, "epsilon": 1e-2},
        {"momentum": 1.25},  # Keras takes it (bnkit lint flags it)
    ],
)
@pytest.mark.parametrize("semantics", ["source", "target"])
def test_keras_batchnorm_settings(kwargs, semantics):
    inputs = keras.Input((3, 3, 4))
    bn = L.BatchNormalization(**kwargs, name="bn")
    model = keras.Model(inputs, bn(inputs))
    for w in bn.weights:
        w.assign(_x(w.shape, len(w.name)) ** 2 + 0.5)
    torch_model = _check_keras(model, _x((2, 3, 3, 4)), semantics)
    assert torch_model.bn.eps == pytest.approx(bn.epsilon)
    assert torch_model.bn.momentum == pytest.approx(bn.momentum if semantics == "source" else 1 - bn.momentum)


@pytest.mark.parametrize(
    "module",
    [
        nn.BatchNorm1d(4, affine=False),
        nn.BatchNorm1d(4, bias=False, eps=1e-2),
        nn.BatchNorm1d(4, momentum=None),
        nn.BatchNorm1d(4, momentum=1.5),  # both frameworks take it (bnkit lint flags it)
        nn.BatchNorm1d(4, momentum=torch.tensor(0.25)),
    ],
)
def test_torch_batchnorm1d_settings(module):
    with torch.no_grad():
        module.running_mean.uniform_(-1, 1)
        module.running_var.uniform_(0.5, 2)
        module.num_batches_tracked.fill_(7)
    model = _check_torch(nn.Sequential(module, nn.Linear(4, 2)), (4,))
    (bn,) = [layer for layer in model.layers if isinstance(layer, L.BatchNormalization)]
    assert isinstance(bn, BatchNormalization)
    assert bn.momentum == (None if module.momentum is None else float(module.momentum))
    assert int(_np(bn.num_batches_tracked.value)) == 7
    assert (bn.scale, bn.center) == (module.affine, module.bias is not None)


def test_frozen_keras_batchnorm_is_converted_in_eval():
    inputs = keras.Input((4,))
    bn = L.BatchNormalization(name="bn")
    model = keras.Model(inputs, bn(inputs))
    bn.trainable = False
    with pytest.warns(UserWarning, match="frozen") as record:
        torch_model = keras_to_torch(model)
    (frozen,) = [w for w in record if "frozen" in str(w.message)]
    assert frozen.filename == __file__  # the warning points at the user's call, not bnkit's code
    assert not torch_model.bn.training and not torch_model.bn.weight.requires_grad


class _Multiply(nn.Module):
    def forward(self, x):
        return x * 2


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.gain


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: torch_to_keras(nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4)), (4,)), r"'1' \(LSTM\)"),
        (lambda: torch_to_keras(_Multiply(), (4,)), "mul"),
        (lambda: torch_to_keras(nn.Sequential(nn.Linear(4, 4), _Scale()), (4,)), r"'1' \(_Scale\)"),
        (lambda: torch_to_keras(nn.Sequential(nn.GroupNorm(2, 4)), (4, 3)), r"'0' \(GroupNorm\)"),
        (
            lambda: torch_to_keras(nn.Sequential(nn.BatchNorm1d(4, track_running_stats=False)), (4,)),
            "track_running_stats=False",
        ),
        (
            lambda: torch_to_keras(nn.Sequential(nn.BatchNorm1d(4, momentum=None)), (4,), semantics="target"),
            "momentum=None",
        ),
        (lambda: torch_to_keras(nn.Conv2d(3, 3, 3, stride=2, dilation=2), (3, 9, 9)), "dilation"),
        (lambda: torch_to_keras(nn.MaxPool2d(3, 2, ceil_mode=True), (3, 9, 9)), "ceil_mode"),
    ],
)
def test_torch_unsupported_errors(build, match):
    with pytest.raises(UnsupportedLayerError, match=match) as info:
        build()
    assert isinstance(info.value, ValueError)


def _keras_model(layer, shape):
    inputs = keras.Input(shape)
    return keras.Model(inputs, layer(inputs))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: _keras_model(L.LSTM(3, name="rnn"), (5, 2)), r"'rnn' \(LSTM\)"),
        (lambda: _keras_model(L.DepthwiseConv2D(3, name="dw"), (5, 5, 2)), r"'dw' \(DepthwiseConv2D\)"),
        (lambda: _keras_model(L.MaxPooling2D(2, strides=1, padding="same", name="mp"), (5, 5, 2)), "'mp'"),
        (lambda: _keras_model(L.Dense(3, name="d3"), (5, 2)), "rank-3"),
        (
            lambda: _keras_model(L.Conv2D(2, 3, data_format="channels_first", name="cf"), (2, 5, 5)),
            "channels_first",
        ),
        (lambda: _keras_model(L.BatchNormalization(axis=1, name="bn_h"), (5, 5, 2)), "axis=1"),
        (lambda: _keras_model(L.Dense(3, activation="exponential", name="hs"), (4,)), "exponential"),
    ],
)
def test_keras_unsupported_errors(build, match):
    with pytest.raises(UnsupportedLayerError, match=match):
        keras_to_torch(build())


def test_bad_arguments():
    with pytest.raises(ValueError, match="'both'"):
        keras_to_torch(_keras_model(L.Dense(2), (3,)), semantics="both")
    with pytest.raises(ValueError, match="input_shape"):
        torch_to_keras(nn.Linear(3, 2), 3)
    with pytest.raises(ValueError, match="1 inputs, got 2"):
        torch_to_keras(nn.Linear(3, 2), [(3,), (3,)])
