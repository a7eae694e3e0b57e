"""Layout operations, both ways: ``Flatten`` ⇄ ``nn.Flatten``/``torch.flatten``/``x.flatten(1)``/
``x.view(x.size(0), -1)``, ``Permute`` ⇄ ``x.permute``, and the identities.

Keras flattens ``(*spatial, C)``, PyTorch ``(C, *spatial)``. When a flattened tensor reaches only
Dense/Linear layers (through element-wise ones), the order is left pending in the value and the
Dense/Linear kernel rows are reordered (:mod:`bnkit.convert.families.dense`); otherwise the data
are permuted before flattening, so every consumer sees the same order. A permute to
channels-last written in the model makes the tensors identical in both frameworks; it converts
when only element-wise layers and a flatten follow it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from bnkit.convert.registry import from_keras, from_torch
from bnkit.convert.values import KerasValue, TorchValue
from bnkit.keras import keras

if TYPE_CHECKING:
    from bnkit.convert.keras_walker import KerasToTorch
    from bnkit.convert.torch_walker import TorchToKeras

L = keras.layers


# ---- identities ---------------------------------------------------------------------------


@from_keras(L.InputLayer, L.Identity, elementwise=True)
def identity_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    return inputs[0]


@from_torch(nn.Identity, elementwise=True)
def identity_to_keras(b: TorchToKeras, node, m) -> KerasValue:
    return b.input(node)


# ---- Flatten ------------------------------------------------------------------------------


@from_keras(L.Flatten, permuted_input=True)
def flatten_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    (x,) = inputs
    b.check_channels_last(layer)
    if x.rank == 2:
        return x
    shape = tuple(node.input_tensors[0].shape[1:])
    if any(d is None for d in shape):
        raise b.unsupported(layer, f"input shape {shape} is not fully known")
    if x.layout == "same":
        return TorchValue(b.add_module(layer.name, nn.Flatten(), x.node), 2)
    torch_shape = (shape[-1], *shape[:-1])
    if b.feeds_only_dense(node.outputs[0]):
        return TorchValue(b.add_module(layer.name, nn.Flatten(), x.node), 2, pending_flat=torch_shape)
    # Keras flattens channels-last: permute the data back before flattening.
    permuted = b.graph.call_method("permute", (x.node, 0, *range(2, x.rank), 1))
    return TorchValue(b.add_module(layer.name, nn.Flatten(), permuted), 2)


def flatten_keras(b: TorchToKeras, node, x: KerasValue) -> KerasValue:
    """Keras' Flatten of ``x`` giving PyTorch's ``(N, C*H*W)`` (data permuted, or the order left pending)."""
    if x.rank <= 2:
        return x
    name = b.name(node)
    features = (math.prod(x.shape),)
    if x.channels_last:  # already in Keras' order
        return KerasValue(L.Flatten(name=name)(x.tensor), features)
    if b.feeds_only_linear(node):
        return KerasValue(L.Flatten(name=name)(x.tensor), features, pending_flat=x.shape)
    # PyTorch flattens channels-first: permute the Keras data to (C, *spatial) first.
    permuted = L.Permute((x.rank - 1, *range(1, x.rank - 1)), name=b.unique_name(f"{name}_to_channels_first"))
    return KerasValue(L.Flatten(name=name)(permuted(x.tensor)), features)


@from_torch(nn.Flatten, permuted_input=True)
def flatten_module_to_keras(b: TorchToKeras, node, m) -> KerasValue:
    if m.start_dim != 1 or m.end_dim != -1:
        raise b.unsupported(node, f"Flatten(start_dim={m.start_dim}, end_dim={m.end_dim})")
    return flatten_keras(b, node, b.input(node))


@from_torch(torch.flatten, methods=("flatten",), permuted_input=True)
def flatten_call_to_keras(b: TorchToKeras, node, target) -> KerasValue:
    x = b.input(node)
    if b.arg(node, 1, "start_dim", 0) != 1 or b.arg(node, 2, "end_dim", -1) != -1:
        raise b.unsupported(node, "only flattening from dim 1 (torch.flatten(x, 1), x.flatten(1)) converts")
    return flatten_keras(b, node, x)


@from_torch(methods=("view", "reshape"), permuted_input=True)
def view_to_keras(b: TorchToKeras, node, method) -> KerasValue:
    x = b.input(node)
    out = b.out_shape(node)
    if out != (math.prod(x.shape),):
        raise b.unsupported(node, f"a {method} to {out}; only flattening to (N, features) converts")
    return flatten_keras(b, node, x)


@from_torch(methods=("size",), permuted_input=True)
def size_to_keras(b: TorchToKeras, node, method) -> str:
    return "size"  # only feeds view/reshape, whose output shape is checked


# ---- Permute ------------------------------------------------------------------------------


@from_keras(L.Permute)
def permute_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    (x,) = inputs
    if x.layout != "mapped" or x.rank <= 2:
        raise b.unsupported(layer, "only one Permute of a channels-last tensor")
    r = x.rank
    keras_of_torch = (0, r - 1, *range(1, r - 1))  # torch dim j holds Keras axis keras_of_torch[j]
    where = {k: j for j, k in enumerate(keras_of_torch)}
    perm = [where[d] for d in (0, *layer.dims)]
    return TorchValue(b.graph.call_method("permute", (x.node, *perm)), r, layout="same")


@from_torch(torch.permute, torch.ops.aten.permute.default, methods=("permute",))
def permute_to_keras(b: TorchToKeras, node, target) -> KerasValue:
    x = b.input(node)
    if target == "permute" and not (len(node.args) == 2 and isinstance(node.args[1], (tuple, list))):
        dims = tuple(node.args[1:])  # x.permute(0, 2, 3, 1)
    else:
        dims = tuple(b.arg(node, 1, "dims"))
    to_channels_last = (0, *range(2, x.rank), 1)
    if x.channels_last or tuple(d % x.rank for d in dims) != to_channels_last:
        raise b.unsupported(node, f"permute{dims}; only a permute to channels-last before a flatten converts")
    return KerasValue(x.tensor, (*x.shape[1:], x.shape[0]), channels_last=True)
