"""The converter registry and the graph walkers: dispatch by type (subclasses included only when
they compute the same thing), converters registered from outside bnkit, refusals that name what
the user can find in their code, and layouts carried through element-wise layers.

Tolerance 1e-5 (float32, different summation orders in each framework).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bnkit.convert import UnsupportedLayerError, keras_to_torch, torch_to_keras
from bnkit.convert.registry import from_keras, from_torch, registered, torch_module_converter
from bnkit.convert.torch_walker import _Tracer
from bnkit.convert.values import KerasValue, TorchValue
from bnkit.keras import keras
from bnkit.torch import BatchNormAct2d, BatchNormAddAct2d, FrozenBatchNorm2d

L = keras.layers
TOL = 1e-5


def _np(x):
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(keras.ops.convert_to_numpy(x))


def _torch_vs_keras(module, shape, seed=0):
    """Converts ``module`` and returns max |difference| of the outputs (NCHW input ``shape``)."""
    module.eval()
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed))
    model = torch_to_keras(module, shape)
    with torch.no_grad():
        expected = module(x).numpy()
    got = _np(model(np.moveaxis(x.numpy(), 1, -1) if x.dim() > 2 else x.numpy()))
    if got.ndim > 2:
        got = np.moveaxis(got, -1, 1)
    return model, float(np.abs(got - expected).max())


def _randomize(module):
    gen = torch.Generator().manual_seed(3)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1, generator=gen)
                m.running_var.uniform_(0.5, 2, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.5, 0.5, generator=gen)
    return module


# ---- refusals name what the user wrote ------------------------------------------------------


class _FlattenLast(nn.Module):
    def forward(self, x):
        return torch.flatten(x)  # flattening from dim 0 merges the batch: refused


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(3, 4, 1), _FlattenLast())

    def forward(self, x):
        return self.layer1(x)


def test_a_refused_function_names_the_enclosing_module_the_operation_and_the_line():
    with pytest.raises(UnsupportedLayerError) as info:
        torch_to_keras(_Net(), (3, 6, 6))
    error = info.value
    assert (error.layer_name, error.layer_type, error.operation) == ("layer1.1", "_FlattenLast", "torch.flatten()")
    assert error.location == f"test_convert_registry.py:{_FlattenLast.forward.__code__.co_firstlineno + 1}"
    assert str(error).startswith("cannot convert torch.flatten() in the forward of 'layer1.1' (_FlattenLast), at ")
    assert "flattening from dim 0 merges the batch dimension" in str(error)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x) + x
        return y @ x  # a matrix product: refused


class _Features(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), _Block())

    def forward(self, x):
        return self.features(x)


def test_a_refused_operator_is_named_by_its_module_path_never_by_an_fx_node_name():
    with pytest.raises(UnsupportedLayerError) as info:
        torch_to_keras(_Features(), (3, 5, 5))
    message = str(info.value)
    assert "the @ operator (operator.matmul) in the forward of 'features.2' (_Block)" in message
    assert "this operation is not supported" in message
    assert "add_1" not in message and "call_function" not in message


def test_refusals_at_the_top_level_and_of_modules():
    class Index(nn.Module):
        def forward(self, x):
            return x[:, ::2]

    with pytest.raises(UnsupportedLayerError, match=r"^cannot convert indexing x\[\.\.\.\] in the forward of the "):
        torch_to_keras(Index(), (4,))
    features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, 2, 1))  # zeros could win a max of a conv
    with pytest.raises(UnsupportedLayerError, match=r"^cannot convert layer '1' \(MaxPool2d\): padding=\(1, 1\)"):
        torch_to_keras(features, (3, 16, 16))
    with pytest.raises(UnsupportedLayerError, match=r"'features\.1' \(MaxPool2d\)") as info:
        torch_to_keras(_WithFeatures(features), (3, 16, 16))
    assert info.value.operation is None


class _WithFeatures(nn.Module):
    def __init__(self, features) -> None:
        super().__init__()
        self.features = features

    def forward(self, x):
        return self.features(x)


def test_keras_refusals_name_the_layer_inside_nested_models_by_path():
    block_in = keras.Input((5, 4, 3))
    block = keras.Model(block_in, L.ConvLSTM1D(2, 3, return_sequences=True, name="rnn")(block_in), name="block")
    inputs = keras.Input((5, 4, 3))
    with pytest.raises(UnsupportedLayerError, match=r"^cannot convert layer 'block/rnn' \(ConvLSTM1D\): this layer"):
        keras_to_torch(keras.Model(inputs, block(inputs)))


# ---- dispatch by type -----------------------------------------------------------------------


class _DoubledConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class _PlainReLU(nn.ReLU):
    """A subclass that computes what its base computes (no forward of its own)."""


class _DoubledDense(L.Dense):
    def call(self, inputs):
        return super().call(inputs) * 2


def test_a_subclass_with_its_own_forward_is_not_translated_as_its_base():
    with pytest.raises(UnsupportedLayerError, match=r"'0' \(_DoubledConv\): a subclass of Conv2d with its own forward"):
        torch_to_keras(nn.Sequential(_DoubledConv(3, 3, 1)), (3, 4, 4))
    inputs = keras.Input((3,))
    with pytest.raises(UnsupportedLayerError, match=r"\(_DoubledDense\): a subclass of Dense with its own call"):
        keras_to_torch(keras.Model(inputs, _DoubledDense(2, name="d")(inputs)))
    _, error = _torch_vs_keras(nn.Sequential(nn.Linear(3, 4), _PlainReLU()), (3,))
    assert error <= TOL


def test_the_tracer_keeps_exactly_the_registered_modules_whole():
    tracer = _Tracer()
    for module in (nn.Conv2d(1, 1, 1), nn.BatchNorm2d(2), BatchNormAct2d(2), nn.Hardswish(), nn.Flatten()):
        assert torch_module_converter(module) is not None and tracer.is_leaf_module(module, "m")
    assert not tracer.is_leaf_module(_DoubledConv(1, 1, 1), "m")  # traced into: its forward is read
    names = registered()
    assert "torch.nn.modules.conv.Conv2d" in names["torch modules"] and "relu" in names["torch methods"]


def test_registering_a_type_twice_is_an_error():
    with pytest.raises(ValueError, match="already has a converter"):
        from_torch(nn.Conv2d)(lambda b, node, m: None)
    with pytest.raises(ValueError, match="already has a converter"):
        from_keras(L.Conv2D)(lambda b, layer, node, inputs: None)


class _Gain(nn.Module):
    """A user's own layer, converted by converters registered outside bnkit (both directions)."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = gain

    def forward(self, x):
        return x * self.gain


class _KerasGain(L.Layer):
    def __init__(self, gain: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.gain = gain

    def call(self, x):
        return x * self.gain


@from_torch(_Gain, elementwise=True)
def _gain_to_keras(b, node, m) -> KerasValue:
    x = b.input(node)
    return x.like(_KerasGain(m.gain, name=b.name(node))(x.tensor))


@from_keras(_KerasGain, elementwise=True)
def _gain_to_torch(b, layer, node, inputs) -> TorchValue:
    (x,) = inputs
    return x.like(b.add_module(layer.name, _Gain(layer.gain), x.node))


def test_converters_registered_outside_bnkit_convert_a_user_layer_both_ways():
    module = nn.Sequential(nn.Conv2d(3, 4, 3), _Gain(0.5), nn.Flatten(), _Gain(3.0), nn.Linear(64, 2))
    model, error = _torch_vs_keras(module, (3, 6, 6))
    assert error <= TOL
    assert [type(layer).__name__ for layer in model.layers].count("_KerasGain") == 2
    assert not any(isinstance(layer, L.Permute) for layer in model.layers)  # the Flatten order passed through
    back = keras_to_torch(model)
    assert sum(isinstance(m, _Gain) for m in back.modules()) == 2
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        np.testing.assert_allclose(back(x).numpy(), module(x).numpy(), rtol=TOL, atol=TOL)


# ---- bnkit's own batch norms ------------------------------------------------------------------


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = BatchNormAddAct2d(3)

    def forward(self, x):
        return self.bn(self.conv(x), x)


@pytest.mark.parametrize(
    "build",
    [
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4)),
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act=None)),
        _Residual,
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), _randomize(FrozenBatchNorm2d.from_batchnorm(nn.BatchNorm2d(4)))),
    ],
)
def test_bnkit_fused_and_frozen_batch_norms_convert_exactly(build):
    module = _randomize(build())
    model, error = _torch_vs_keras(module, (3, 7, 7))
    assert error <= TOL
    (bn,) = [layer for layer in model.layers if isinstance(layer, L.BatchNormalization)]
    frozen = any(isinstance(m, FrozenBatchNorm2d) for m in module.modules())
    assert bn.trainable is not frozen  # a frozen batch norm is Keras' inference-mode BN


def test_a_frozen_batch_norm_with_batch_statistics_in_training_is_refused():
    frozen = FrozenBatchNorm2d.from_batchnorm(nn.BatchNorm2d(4), batch_stats_in_train=True)
    with pytest.raises(UnsupportedLayerError, match=r"'1' \(FrozenBatchNorm2d\): batch_stats_in_train=True"):
        torch_to_keras(nn.Sequential(nn.Conv2d(3, 4, 1), frozen), (3, 4, 4))


# ---- layouts through element-wise layers ----------------------------------------------------


def test_softmax_after_a_keras_permute_reads_its_axis_in_the_permuted_layout():
    inputs = keras.Input((4, 5, 3))
    x = L.Permute((3, 1, 2))(L.Conv2D(3, 1)(inputs))  # (C, H, W) in Keras: the same tensor in PyTorch
    x = L.Activation("softmax")(L.Softmax(axis=-1)(x))
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(x)))
    x_nhwc = np.random.default_rng(0).standard_normal((2, 4, 5, 3)).astype("float32")
    with torch.no_grad():
        got = keras_to_torch(model)(torch.from_numpy(np.moveaxis(x_nhwc, -1, 1).copy()))
    np.testing.assert_allclose(_np(got), _np(model(x_nhwc)), rtol=TOL, atol=TOL)


class _ChannelsLastHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 3, 1), nn.Linear(60, 2)

    def forward(self, x):
        y = torch.softmax(self.conv(x).permute(0, 2, 3, 1), dim=-1)
        return self.fc(torch.flatten(torch.relu(y), 1))


def test_element_wise_ops_may_follow_a_permute_to_channels_last():
    _, error = _torch_vs_keras(_ChannelsLastHead(), (3, 4, 5))
    assert error <= TOL
