"""What makes PyTorch -> Keras fast, checked for what it must not change: the module is traced on a
copy sharing its parameters (the user's module keeps its mode, its buffers and its memory), shapes are
recorded on the meta device (on the CPU for an operation without a meta implementation), and Keras
weights are created holding the PyTorch values (a copy), not initialised at random and overwritten.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from layer_checks import check_torch, to_numpy
from torch import fx, nn

from bnkit.convert import UnsupportedLayerError, keras_to_torch, torch_to_keras
from bnkit.convert.torch_walker import _record_shapes
from bnkit.convert.values import call_with_weights
from bnkit.keras import keras

L = keras.layers


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 5 * 5, 4))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def test_the_module_keeps_its_mode_and_shares_no_memory_with_the_keras_model():
    net = _net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model = torch_to_keras(net, (3, 7, 7))
    assert all(m.training for m in net.modules())  # traced in eval() on a copy of the structure
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key  # no running statistic moved
    conv = model.get_layer(index=1)
    np.testing.assert_array_equal(to_numpy(conv.kernel), net[0].weight.detach().numpy().transpose(2, 3, 1, 0))
    with torch.no_grad():  # the Keras weights are copies: changing the module leaves them as they were
        net[0].weight.zero_()
        net[0].bias.fill_(3.0)
    assert np.abs(to_numpy(conv.kernel)).min() > 0
    np.testing.assert_array_equal(to_numpy(conv.bias), before["0.bias"].numpy())
    conv.bias.assign(np.zeros(5, "float32"))  # and changing them leaves the module alone
    assert torch.all(net[0].bias == 3.0)


def test_weights_and_batch_norm_statistics_arrive_exactly():
    net = _net().eval()
    model = check_torch(net, (3, 7, 7))
    bn = next(layer for layer in model.layers if isinstance(layer, L.BatchNormalization))
    np.testing.assert_array_equal(to_numpy(bn.moving_mean), net[1].running_mean.numpy())
    np.testing.assert_array_equal(to_numpy(bn.moving_variance), net[1].running_var.numpy())
    assert int(to_numpy(bn.num_batches_tracked)) == int(net[1].num_batches_tracked)


class _DoubleOnCpuOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)  # written in place: the recording must not write the module's own buffer
        return torch.ops.bnkit_test.double_cpu_only(x)


def test_shapes_are_recorded_on_the_cpu_where_the_meta_device_cannot_run_an_operation():
    library = torch.library.Library("bnkit_test", "DEF")  # kept alive for the test
    library.define("double_cpu_only(Tensor x) -> Tensor")
    library.impl("double_cpu_only", lambda x: 2 * x, "CPU")  # no Meta kernel
    module = nn.Sequential(nn.Conv2d(3, 4, 3), _DoubleOnCpuOnly(), nn.Conv2d(4, 2, 1))
    gm = fx.symbolic_trace(module)
    _record_shapes(gm, [(3, 9, 9)])
    shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if "tensor_meta" in n.meta}
    assert shapes["_2"] == (2, 2, 7, 7)
    module = nn.Sequential(nn.Conv2d(3, 4, 3), _DoubleOnCpuOnly())
    with pytest.raises(UnsupportedLayerError, match="double_cpu_only"):  # no converter for it, but traced
        torch_to_keras(module, (3, 9, 9))
    assert module[1].calls.item() == 0  # traced and run on copies of the buffers


class _TrainableLast(L.Layer):
    """A layer that creates a non-trainable weight before a trainable one: ``layer.weights`` lists
    the trainable one first, so the creation order is not the order of ``set_weights``."""

    def build(self, input_shape):
        self.offset = self.add_weight(shape=(input_shape[-1],), initializer="zeros", trainable=False)
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.scale + self.offset


def test_weights_created_in_another_order_than_listed_are_still_set_exactly():
    layer = _TrainableLast()
    scale, offset = np.array([2.0, 3.0], "float32"), np.array([0.5, -1.0], "float32")
    out = call_with_weights(layer, keras.Input((2,)), [scale, offset])  # layer.weights order
    assert tuple(out.shape) == (None, 2)
    np.testing.assert_array_equal(to_numpy(layer.scale), scale)
    np.testing.assert_array_equal(to_numpy(layer.offset), offset)
    conv = L.Conv2D(2, 1)  # created in the listed order: taken as given, and a copy
    kernel, bias = np.ones((1, 1, 3, 2), "float32"), np.zeros(2, "float32")
    call_with_weights(conv, keras.Input((4, 4, 3)), [kernel, bias])
    kernel[...] = 7.0
    np.testing.assert_array_equal(to_numpy(conv.kernel), np.ones((1, 1, 3, 2)))
    dense = L.Dense(2)  # a read-only array (a broadcast view) and a transposed one
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call_with_weights(dense, keras.Input((3,)), [np.arange(6, dtype="float32").reshape(2, 3).T,
                                                      np.broadcast_to(np.float32(0.5), (2,))])  # fmt: skip
    np.testing.assert_array_equal(to_numpy(dense.kernel), [[0, 3], [1, 4], [2, 5]])
    np.testing.assert_array_equal(to_numpy(dense.bias), [0.5, 0.5])


def test_keras_to_torch_modules_hold_copies_of_the_keras_weights():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, name="conv")(inputs)
    model = keras.Model(inputs, L.Dense(2, name="dense")(L.Flatten()(x)))
    torch_model = keras_to_torch(model)
    conv, dense = torch_model.conv, torch_model.dense
    kernel = to_numpy(model.get_layer("conv").kernel)
    np.testing.assert_array_equal(conv.weight.detach().numpy(), kernel.transpose(3, 2, 0, 1))
    assert conv.weight.is_contiguous() and conv.weight.requires_grad and dense.weight.is_contiguous()
    model.get_layer("conv").kernel.assign(np.zeros_like(kernel))
    model.get_layer("dense").bias.assign(np.full(2, 5.0, "float32"))
    np.testing.assert_array_equal(conv.weight.detach().numpy(), kernel.transpose(3, 2, 0, 1))
    assert not torch.any(dense.bias == 5.0)
