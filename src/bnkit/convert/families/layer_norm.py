"""Layer normalization, both ways: Keras ``LayerNormalization`` ⇄ ``nn.LayerNorm``, ``F.layer_norm``
and torchvision's ``LayerNorm2d`` (ConvNeXt's layer norm over the channels of an NCHW tensor).

Both normalize each sample over the given axes with the biased variance:
``(x - mean) / sqrt(var + eps) * gamma + beta``, eps inside the square root in both. PyTorch
normalizes the *last* dimensions; Keras' axes convert when they are the last ones too (on
Keras' torch backend ``LayerNormalization`` itself calls ``F.layer_norm`` over the trailing axes
then). Where the layout puts the normalized axes elsewhere, the tensor is permuted first (the
PyTorch way of ConvNeXt: ``permute → LayerNorm → permute``), and gamma and beta are transposed to
the order of the axes. Keras' ``center`` without ``scale`` becomes a frozen PyTorch weight of ones,
which converts back to ``scale=False``; ``rms_scaling`` (deprecated in Keras) is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bnkit.convert.layouts import identity
from bnkit.convert.registry import from_keras, from_torch
from bnkit.convert.values import Constant, KerasValue, TorchValue, keras_array, torch_array
from bnkit.keras import keras

if TYPE_CHECKING:
    from bnkit.convert.keras_walker import KerasToTorch
    from bnkit.convert.torch_walker import TorchToKeras

L = keras.layers


# ---- Keras -> PyTorch ---------------------------------------------------------------------


@from_keras(L.LayerNormalization, permuted_input=True)
def layer_norm_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    (x,) = inputs
    r = x.rank
    axes = sorted(a % r for a in (layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]))
    if getattr(layer, "rms_scaling", False):
        raise b.unsupported(layer, "rms_scaling=True (deprecated in Keras; use RMSNormalization)")
    k = len(axes)
    if axes != list(range(r - k, r)) or 0 in axes:
        raise b.unsupported(layer, f"axis={layer.axis} of a rank-{r} input; only the last axes (not the batch) convert")
    if {x.torch_dim(a) for a in axes} != set(range(r - k, r)):
        x = b.to_layout(x, identity(r))  # the normalized axes last, in Keras' order
    keras_axes = [x.layout.index(d) for d in range(r - k, r)]  # the Keras axis of each normalized torch dim
    shape = tuple(node.input_tensors[0].shape)
    order = [axes.index(a) for a in keras_axes]
    norm = nn.LayerNorm(
        [shape[a] for a in keras_axes],
        eps=float(layer.epsilon),
        elementwise_affine=bool(layer.scale or layer.center),
        bias=bool(layer.center),
    )
    with torch.no_grad():
        if layer.scale:
            norm.weight.copy_(torch.from_numpy(np.ascontiguousarray(keras_array(layer.gamma).transpose(order))))
        elif layer.center:  # PyTorch has no beta-only affine: a frozen weight of ones
            norm.weight.requires_grad_(False)
        if layer.center:
            norm.bias.copy_(torch.from_numpy(np.ascontiguousarray(keras_array(layer.beta).transpose(order))))
    return x.like(b.add_module(layer.name, norm, x.node))


# ---- PyTorch -> Keras ---------------------------------------------------------------------


def keras_layer_norm(b: TorchToKeras, node, x: KerasValue, dims: list[int], weight, bias, eps: float) -> KerasValue:
    """Keras' LayerNormalization of ``x`` over PyTorch dims ``dims`` (with ``weight`` and ``bias``
    as float arrays over them, in PyTorch's order, or ``None``)."""
    r = x.rank
    if 0 in dims:
        raise b.unsupported(node, "normalizing over the batch dimension")
    if {x.keras_axis(d) for d in dims} != set(range(r - len(dims), r)):
        x = b.to_layout(x, identity(r), b.name(node))  # the normalized dims last in Keras, in PyTorch order
    axes = sorted(x.keras_axis(d) for d in dims)
    order = [dims.index(x.layout[a]) for a in axes]  # PyTorch's order -> Keras' sorted axes
    frozen_ones = weight is not None and bias is not None and getattr(weight, "frozen_ones", False)
    scale, center = weight is not None and not frozen_ones, bias is not None
    layer = L.LayerNormalization(
        axis=-1 if len(axes) == 1 else axes, epsilon=eps, center=center, scale=scale, name=b.name(node)
    )
    tensor = layer(x.tensor)
    weights = [weight] if scale else []
    weights += [bias] if center else []
    layer.set_weights([np.asarray(getattr(w, "array", w)).transpose(order) for w in weights])
    return x.like(tensor)


class _Weight:
    """A PyTorch LayerNorm weight, with whether it is a frozen weight of ones (a Keras beta-only norm)."""

    def __init__(self, parameter: torch.Tensor) -> None:
        self.array = torch_array(parameter)
        self.frozen_ones = not parameter.requires_grad and bool(torch.all(parameter == 1))


@from_torch(nn.LayerNorm, permuted_input=True)
def layer_norm_module_to_keras(b: TorchToKeras, node, m) -> KerasValue:
    x = b.input(node)
    dims = list(range(x.rank - len(m.normalized_shape), x.rank))
    weight = _Weight(m.weight) if m.weight is not None else None
    bias = torch_array(m.bias) if m.bias is not None else None
    return keras_layer_norm(b, node, x, dims, weight, bias, float(m.eps))


@from_torch(F.layer_norm, permuted_input=True)
def layer_norm_function_to_keras(b: TorchToKeras, node, fn) -> KerasValue:
    x = b.input(node)
    shape = b.arg(node, 1, "normalized_shape")
    shape = [shape] if isinstance(shape, int) else list(shape)
    weight, bias = (b.operand(b.arg(node, i, key), node) for i, key in ((2, "weight"), (3, "bias")))
    for w in (weight, bias):
        if w is not None and not isinstance(w, Constant):
            raise b.unsupported(node, "a weight or bias computed in forward (only parameters and buffers convert)")
    dims = list(range(x.rank - len(shape), x.rank))
    return keras_layer_norm(b, node, x, dims, weight, bias, float(b.arg(node, 4, "eps", 1e-5)))


@from_torch("torchvision.models.convnext.LayerNorm2d", permuted_input=True)
def layer_norm_2d_to_keras(b: TorchToKeras, node, m) -> KerasValue:
    """torchvision's ``LayerNorm2d``: ``F.layer_norm`` over the channels (dim 1) of an NCHW tensor."""
    x = b.input(node)
    weight = _Weight(m.weight) if m.weight is not None else None
    bias = torch_array(m.bias) if m.bias is not None else None
    return keras_layer_norm(b, node, x, [1], weight, bias, float(m.eps))
