"""Flatten order, permutes, Concatenate, Add, Dropout and padding layers in small graphs, both ways.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from layer_checks import TOL, check_keras, check_torch, random_array, to_numpy
from torch import nn

from bnkit.convert import UnsupportedLayerError, keras_to_torch, torch_to_keras
from bnkit.keras import keras

L = keras.layers


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
    model = check_torch(_Functional(), (3, 5, 6))
    assert any(isinstance(layer, L.Permute) for layer in model.layers)  # the data were permuted


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
    x_np = random_array((2, 6, 3))
    expected = [to_numpy(t) for t in model(x_np)]
    got = torch_model(torch.from_numpy(np.moveaxis(x_np, -1, 1).copy()))
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(to_numpy(g), e, rtol=TOL, atol=TOL)


# ---- reshapes, permutes and splits across layouts -------------------------------------------


def _channel_shuffle(x, groups):
    """torchvision.models.shufflenetv2.channel_shuffle, as written there."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class _Shuffle(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.conv, self.groups = nn.Conv2d(3, channels, 1), groups
        self.after = nn.Conv2d(channels, 2, 3)

    def forward(self, x):
        return self.after(_channel_shuffle(self.conv(x), self.groups))


@pytest.mark.parametrize(("channels", "groups"), [(6, 2), (15, 3), (12, 4)])
def test_channel_shuffle_converts_exactly_as_reshape_permute_reshape_in_keras(channels, groups):
    model = check_torch(_Shuffle(channels, groups), (3, 5, 7))
    kinds = [type(layer).__name__ for layer in model.layers[2:-1]]
    assert kinds == ["Reshape", "Permute", "Reshape"]  # NHWC: (H, W, g, C/g) -> (H, W, C/g, g) -> (H, W, C)
    assert model.layers[3].dims == (1, 2, 4, 3)


def test_the_channel_order_of_a_shuffle_is_what_pytorch_computes():
    """Not only equal outputs after a conv: the shuffled channels themselves, in NHWC."""

    class Shuffle(nn.Module):
        def forward(self, x):
            return _channel_shuffle(x, 3)

    x = torch.arange(2 * 6 * 2 * 3, dtype=torch.float32).reshape(2, 6, 2, 3)
    keras_model = torch_to_keras(Shuffle(), (6, 2, 3))
    got = to_numpy(keras_model(np.moveaxis(x.numpy(), 1, -1)))
    np.testing.assert_array_equal(np.moveaxis(got, -1, 1), _channel_shuffle(x, 3).numpy())


class _ShufflenetUnit(nn.Module):
    """torchvision's InvertedResidual (stride 1): chunk, a branch, cat, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch2 = nn.Sequential(nn.Conv2d(half, half, 1), nn.ReLU(inplace=True), nn.Conv2d(half, half, 3, 1, 1))

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return _channel_shuffle(torch.cat((x1, self.branch2(x2)), dim=1), 2)


def test_chunk_cat_and_shuffle_of_a_shufflenet_unit_both_ways():
    check_torch(nn.Sequential(nn.Conv2d(3, 10, 1), _ShufflenetUnit(10), nn.Conv2d(10, 3, 1)), (3, 5, 7))


class _Splits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 7, 3)

    def forward(self, x):
        y = self.conv(x)  # (N, 7, 3, 5)
        a, b, c = torch.split(y, [2, 4, 1], dim=1)
        p, q, r = y.chunk(3, dim=1)  # 3, 3, 1 channels
        s = y.narrow(3, 1, 3)[:, 1:6, :, :-1]  # a window of the width, some channels, all but the last width
        t = torch.cat(y.split(2, dim=2), dim=2)  # pieces of 2, 1 rows, put back
        return torch.cat([a * c, b, p + q, r], 1), s.flatten(1), t


def test_split_chunk_narrow_and_slices_with_odd_sizes_both_ways():
    module = _Splits().eval()
    x = torch.randn(2, 3, 5, 7)
    keras_model = torch_to_keras(module, (3, 5, 7))
    with torch.no_grad():
        expected = [t.numpy() for t in module(x)]
    got = keras_model(np.moveaxis(x.numpy(), 1, -1))
    back = keras_to_torch(keras_model)
    with torch.no_grad():
        again = [t.numpy() for t in back(x)]
    for e, g, a in zip(expected, got, again, strict=True):
        g = to_numpy(g)
        np.testing.assert_allclose(np.moveaxis(g, -1, 1) if g.ndim > 2 else g, e, rtol=TOL, atol=TOL)
        np.testing.assert_array_equal(a, e)


class _Views(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(5, 3)

    def forward(self, x):
        y = self.conv(x)  # (N, 4, 5, 5)
        n = x.shape[0]
        z = y.reshape(n, 2, 2, 25).permute(0, 3, 1, 2)  # (N, 25, 2, 2)
        w = self.fc(y)  # a Linear over the width of an NCHW tensor
        u = y.mean((2, 3)).view(-1, 4, 1, 1) * y  # squeeze-and-excitation by a view
        v = torch.unsqueeze(y[:, 1], 1).squeeze(1).unsqueeze(-1)
        return z, w.transpose(1, 3), u, v


def test_reshapes_permutes_and_linear_over_any_axis_both_ways():
    module = _Views().eval()
    x = torch.randn(2, 3, 5, 5)
    keras_model = torch_to_keras(module, (3, 5, 5))
    with torch.no_grad():
        expected = [t.numpy() for t in module(x)]
        again = [t.numpy() for t in keras_to_torch(keras_model)(x)]
    for e, g, a in zip(expected, keras_model(np.moveaxis(x.numpy(), 1, -1)), again, strict=True):
        np.testing.assert_allclose(np.moveaxis(to_numpy(g), -1, 1), e, rtol=TOL, atol=TOL)
        np.testing.assert_allclose(a, e, rtol=TOL, atol=TOL)


class _ConvNeXtBlock(nn.Module):
    """torchvision's CNBlock without stochastic depth: permute, LayerNorm, Linear, GELU, Linear, permute."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.rand(dim, 1, 1) + 0.5)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y))))
        return x + self.layer_scale * y.permute(0, 3, 1, 2)


def test_a_convnext_block_converts_without_a_keras_permute():
    model = check_torch(_ConvNeXtBlock(5), (5, 9, 7))
    assert not any(isinstance(layer, L.Permute) for layer in model.layers)
    dense = [layer for layer in model.layers if isinstance(layer, L.Dense)]
    assert [len(layer.input.shape) for layer in dense] == [4, 4]  # Dense on the NHWC tensor


def test_keras_reshape_reads_its_target_shape_channels_last():
    inputs = keras.Input((6, 4, 3))
    x = L.Conv2D(6, 1)(inputs)
    se = L.Reshape((1, 1, 6))(L.GlobalAveragePooling2D()(x))  # EfficientNet's squeeze-and-excitation
    y = L.Multiply()([x, L.Conv2D(6, 1, activation="sigmoid")(se)])
    z = L.Reshape((4, 6, 6))(y)  # (H, W, C) read in Keras' order
    w = L.Reshape((-1, 3))(L.Permute((3, 1, 2))(y))
    model = keras.Model(inputs, [L.Conv2D(2, 3)(z), L.Dense(2)(w)])
    torch_model = keras_to_torch(model)
    x_np = random_array((2, 6, 4, 3))
    got = torch_model(torch.from_numpy(np.moveaxis(x_np, -1, 1).copy()))
    for e, g in zip(model(x_np), got, strict=True):
        np.testing.assert_allclose(np.moveaxis(to_numpy(g), 1, -1), to_numpy(e), rtol=TOL, atol=TOL)
    back = torch_to_keras(torch_model, (3, 6, 4))
    for e, g in zip(model(x_np), back(x_np), strict=True):
        np.testing.assert_allclose(to_numpy(g), to_numpy(e), rtol=TOL, atol=TOL)


def test_a_keras_permute_is_a_renaming_and_a_conv_after_it_gets_its_layout_back():
    inputs = keras.Input((5, 7, 3))
    x = L.Permute((2, 1, 3))(L.Conv2D(4, 1)(inputs))  # swap height and width
    model = keras.Model(inputs, L.Conv2D(2, (3, 1))(x))
    torch_model = check_keras(model, random_array((2, 5, 7, 3)))
    permutes = [n for n in torch_model.graph.nodes if n.target == "permute"]
    assert len(permutes) == 1  # one, in front of the second conv; none for the Permute layer itself


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (lambda x: x.view(2, -1), r"a reshape to \(2, -1\); the batch must stay first"),
        (lambda x: x.reshape(-1, 5), "moves values across the batch|batch must stay first"),
        (lambda x: x.permute(1, 0, 2, 3), "the batch dimension must stay first"),
        (lambda x: x.chunk(2, dim=0)[0], "splitting the batch dimension"),
        (lambda x: x[0], "indexing"),
        (lambda x: x[:, ::2], "step 1"),
        (lambda x: x.view(x.size(0) * 2, -1), "arithmetic on the batch size"),
        (lambda x: x.unsqueeze(0), "acts on the batch dimension"),
    ],
)
def test_reshapes_that_mix_the_batch_are_refused(module, match):
    class Op(nn.Module):
        def forward(self, x):
            return module(x)

    with pytest.raises(UnsupportedLayerError, match=match):
        torch_to_keras(Op(), (4, 3, 5))
