"""Activations, both ways: Keras ``Activation``/``activation=``/``ReLU``/``LeakyReLU``/``ELU``/``Softmax``
⇄ ``torch.nn`` activation modules, ``torch.nn.functional`` and ``torch`` functions and tensor
methods, in-place forms included (``inplace=True``, ``relu_``, ``x.sigmoid_()``: the walker
rebinds the overwritten tensor).

Only functions with the same constants in both frameworks convert (Keras' ``leaky_relu`` has
slope 0.2, ``celu`` alpha 1, ``hard_tanh`` clips to [-1, 1], ``softplus`` has beta 1); other
settings are refused by name. The formulas agree where names match: Keras 3's ``hard_sigmoid``
is ``relu6(x + 3) / 6`` as PyTorch's ``hardsigmoid`` (Keras 2's was ``0.2·x + 0.5``), ``hard_silu``
(alias ``hard_swish``) is ``x · hard_sigmoid(x)`` as ``hardswish``, ``silu`` (alias ``swish``) is
``x · sigmoid(x)``, ``gelu`` is exact (erf) in both by default; GELU's tanh approximation is
``keras.activations.gelu(x, approximate=True)``, which Keras can only save as bnkit's registered
activation :func:`~bnkit.convert.keras_layers.gelu_tanh`. On Keras' torch backend these are
PyTorch's own kernels. All of them are element-wise (softmax reads its axis through the value's
layout), and the ones whose outputs are ``>= 0`` say so (max pooling pads with zeros after them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from bnkit.convert.keras_layers import gelu_tanh
from bnkit.convert.registry import from_keras, from_torch
from bnkit.convert.values import KerasValue, TorchValue
from bnkit.keras import keras

if TYPE_CHECKING:
    from bnkit.convert.keras_walker import KerasToTorch
    from bnkit.convert.torch_walker import TorchToKeras

L = keras.layers

# Keras activation name -> the torch.nn module computing the same function
KERAS_ACTIVATIONS = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,  # keras.activations.gelu defaults to approximate=False, as nn.GELU
    "elu": nn.ELU,  # alpha=1.0 in both
    "leaky_relu": lambda: nn.LeakyReLU(0.2),  # keras.activations.leaky_relu: negative_slope=0.2
    "silu": nn.SiLU,
    "relu6": nn.ReLU6,
    "selu": nn.SELU,  # the same alpha and scale constants
    "softplus": nn.Softplus,  # beta=1
    "softsign": nn.Softsign,
    "hard_sigmoid": nn.Hardsigmoid,  # relu6(x + 3) / 6 in both
    "hard_silu": nn.Hardswish,  # x * hard_sigmoid(x); Keras' hard_swish is the same function
    "mish": nn.Mish,
    "hard_tanh": nn.Hardtanh,  # clip to [-1, 1]
    "log_sigmoid": nn.LogSigmoid,
    "celu": nn.CELU,  # alpha=1.0 in both
    "bnkit>gelu_tanh": lambda: nn.GELU(approximate="tanh"),
}

# activations whose outputs are >= 0: zero padding cannot change a max pooling of them
NON_NEGATIVE = {"relu", "relu6", "sigmoid", "softmax", "hard_sigmoid", "softplus"}


def _keras_name(fn) -> str | None:
    """Keras' name of an activation function: ``"relu"``, or ``"package>name"`` for a registered one."""
    if fn is None:
        return None
    name = keras.activations.serialize(fn)
    return name if isinstance(name, str) else keras.saving.get_registered_name(fn)


def has_non_negative_activation(layer) -> bool:
    """Whether a Keras layer's ``activation`` (Conv2D(activation=...), Activation) gives values >= 0."""
    return _keras_name(getattr(layer, "activation", None)) in NON_NEGATIVE


# ---- Keras -> PyTorch ---------------------------------------------------------------------


def activation_module(b: KerasToTorch, layer, fn, x: TorchValue) -> nn.Module | None:
    """The torch module for the Keras activation function ``fn`` applied to ``x`` (None: linear)."""
    name = _keras_name(fn)
    if name in (None, "linear"):
        return None
    if name == "softmax":
        return nn.Softmax(dim=x.torch_dim(-1))
    if name == "log_softmax":
        return nn.LogSoftmax(dim=x.torch_dim(-1))
    if isinstance(name, str) and name in KERAS_ACTIVATIONS:
        return KERAS_ACTIVATIONS[name]()
    raise b.unsupported(layer, f"activation {name!r} is not supported")


def with_activation(b: KerasToTorch, layer, x: TorchValue) -> TorchValue:
    """``x`` followed by the ``activation=`` of ``layer`` (Conv2D, Dense), as a module ``<name>_activation``."""
    module = activation_module(b, layer, getattr(layer, "activation", None), x)
    if module is None:
        return x
    return x.like(b.add_module(f"{layer.name}_activation", module, x.node))


@from_keras(L.Activation, elementwise=True, non_negative=has_non_negative_activation)
def activation_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    (x,) = inputs
    module = activation_module(b, layer, layer.activation, x)
    return x if module is None else x.like(b.add_module(layer.name, module, x.node))


def _relu_non_negative(layer) -> bool:
    return float(layer.negative_slope) == 0.0 and float(layer.threshold) >= 0.0


@from_keras(L.ReLU, elementwise=True, non_negative=_relu_non_negative)
def relu_layer_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    (x,) = inputs
    max_value = None if layer.max_value is None else float(layer.max_value)
    if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0 or max_value not in (None, 6.0):
        raise b.unsupported(layer, "only ReLU() and ReLU(max_value=6) (no negative_slope/threshold) convert")
    module = nn.ReLU() if max_value is None else nn.ReLU6()
    return x.like(b.add_module(layer.name, module, x.node))


@from_keras(L.LeakyReLU, elementwise=True)
def leaky_relu_layer_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    (x,) = inputs
    return x.like(b.add_module(layer.name, nn.LeakyReLU(float(layer.negative_slope)), x.node))


@from_keras(L.ELU, elementwise=True)
def elu_layer_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    (x,) = inputs
    return x.like(b.add_module(layer.name, nn.ELU(float(layer.alpha)), x.node))


@from_keras(L.Softmax, elementwise=True, non_negative=True)
def softmax_layer_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    (x,) = inputs
    return x.like(b.add_module(layer.name, nn.Softmax(dim=x.torch_dim(layer.axis)), x.node))


# ---- PyTorch -> Keras ---------------------------------------------------------------------

# modules, functions and tensor methods without settings -> the Keras activation of the same name
_PLAIN = {
    nn.ReLU: "relu",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.SiLU: "silu",
    nn.SELU: "selu",
    nn.Softsign: "softsign",
    nn.Hardsigmoid: "hard_sigmoid",
    nn.Hardswish: "hard_silu",
    nn.Mish: "mish",
    nn.LogSigmoid: "log_sigmoid",
    F.relu: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",  # also F.relu_
    F.sigmoid: "sigmoid",
    torch.sigmoid: "sigmoid",
    torch.sigmoid_: "sigmoid",
    F.tanh: "tanh",
    torch.tanh: "tanh",
    torch.tanh_: "tanh",
    F.relu6: "relu6",
    torch.selu_: "selu",  # also F.selu_
    F.silu: "silu",
    F.selu: "selu",
    F.softsign: "softsign",
    F.hardsigmoid: "hard_sigmoid",
    F.hardswish: "hard_silu",
    F.mish: "mish",
    F.logsigmoid: "log_sigmoid",
    "relu": "relu",
    "relu_": "relu",
    "sigmoid": "sigmoid",
    "sigmoid_": "sigmoid",
    "tanh": "tanh",
    "tanh_": "tanh",
}


def _plain_name(target) -> str:
    if not isinstance(target, nn.Module):
        return _PLAIN[target]
    # the nearest class in the MRO: a subclass (with the same forward) computes the same function
    return next(_PLAIN[cls] for cls in type(target).__mro__ if cls in _PLAIN)


@from_torch(
    *[k for k in _PLAIN if not isinstance(k, str)],
    methods=[k for k in _PLAIN if isinstance(k, str)],
    elementwise=True,
    non_negative=lambda target: _plain_name(target) in NON_NEGATIVE,
)
def plain_activation_to_keras(b: TorchToKeras, node, target) -> KerasValue:
    x = b.input(node)
    return x.like(L.Activation(_plain_name(target), name=b.name(node))(x.tensor))


@from_torch(nn.Softplus, F.softplus, elementwise=True, non_negative=True)
def softplus_to_keras(b: TorchToKeras, node, target) -> KerasValue:
    x = b.input(node)
    if isinstance(target, nn.Module):
        beta, threshold = target.beta, target.threshold
    else:
        beta, threshold = b.arg(node, 1, "beta", 1.0), b.arg(node, 2, "threshold", 20.0)
    if beta != 1 or threshold < 20:  # above 20, softplus(x) and x agree in float32
        raise b.unsupported(node, f"Softplus(beta={beta}, threshold={threshold}); Keras' softplus has beta=1")
    return x.like(L.Activation("softplus", name=b.name(node))(x.tensor))


def _hardtanh_non_negative(target) -> bool:
    return isinstance(target, nn.Module) and target.min_val >= 0


@from_torch(nn.Hardtanh, F.hardtanh, F.hardtanh_, elementwise=True, non_negative=_hardtanh_non_negative)
def hardtanh_to_keras(b: TorchToKeras, node, target) -> KerasValue:
    x = b.input(node)
    if isinstance(target, nn.Module):
        bounds = (target.min_val, target.max_val)
    else:
        bounds = (b.arg(node, 1, "min_val", -1.0), b.arg(node, 2, "max_val", 1.0))
    if bounds == (0.0, 6.0):  # relu6 written as a clip
        return x.like(L.ReLU(max_value=6.0, name=b.name(node))(x.tensor))
    if bounds != (-1.0, 1.0):
        raise b.unsupported(node, f"Hardtanh{bounds}; Keras' hard_tanh clips to [-1, 1] (and relu6 to [0, 6])")
    return x.like(L.Activation("hard_tanh", name=b.name(node))(x.tensor))


@from_torch(
    torch.clamp, torch.clamp_min, torch.clamp_max,
    methods=("clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_"),
    elementwise=True,
)  # fmt: skip
def clamp_to_keras(b: TorchToKeras, node, target) -> KerasValue:
    """``x.clamp(min=0)`` is a ReLU, ``x.clamp(0, 6)`` a ReLU6; other numbers Keras' ``maximum``/``minimum``."""
    x = b.input(node)
    name = getattr(target, "__name__", target)
    low = None if "clamp_max" in name else b.arg(node, 1, "min")
    high = None if "clamp_min" in name else b.arg(node, 1 if "clamp_max" in name else 2, "max")
    if any(isinstance(v, torch.fx.Node) for v in (low, high)):
        raise b.unsupported(node, "clamp to tensor bounds (only numbers convert)")
    if (low, high) in ((0, None), (0, 6)):
        return x.like(L.ReLU(max_value=None if high is None else 6.0, name=b.name(node))(x.tensor))
    ops = keras.src.ops.numpy
    tensor = x.tensor
    if low is not None:
        tensor = ops.Maximum(name=b.name(node) if high is None else b.unique_name(f"{b.name(node)}_min"))(tensor, low)
    if high is not None:
        tensor = ops.Minimum(name=b.name(node))(tensor, high)
    return x.like(tensor)


@from_torch(nn.CELU, F.celu, F.celu_, torch.celu_, elementwise=True)
def celu_to_keras(b: TorchToKeras, node, target) -> KerasValue:
    x = b.input(node)
    alpha = target.alpha if isinstance(target, nn.Module) else b.arg(node, 1, "alpha", 1.0)
    if alpha != 1.0:
        raise b.unsupported(node, f"CELU(alpha={alpha}); Keras' 'celu' activation has alpha=1")
    return x.like(L.Activation("celu", name=b.name(node))(x.tensor))


@from_torch(nn.GELU, F.gelu, elementwise=True)
def gelu_to_keras(b: TorchToKeras, node, target) -> KerasValue:
    """Exact GELU is Keras' ``gelu``; the tanh approximation bnkit's registered ``gelu_tanh``."""
    x = b.input(node)
    approximate = target.approximate if isinstance(target, nn.Module) else b.arg(node, 1, "approximate", "none")
    if approximate not in ("none", "tanh"):
        raise b.unsupported(node, f"GELU(approximate={approximate!r})")
    activation = "gelu" if approximate == "none" else gelu_tanh
    return x.like(L.Activation(activation, name=b.name(node))(x.tensor))


@from_torch(nn.ReLU6, elementwise=True, non_negative=True)
def relu6_to_keras(b: TorchToKeras, node, target) -> KerasValue:
    x = b.input(node)
    return x.like(L.ReLU(max_value=6.0, name=b.name(node))(x.tensor))


@from_torch(nn.ELU, F.elu, F.elu_, elementwise=True)
def elu_to_keras(b: TorchToKeras, node, target) -> KerasValue:
    x = b.input(node)
    alpha = target.alpha if isinstance(target, nn.Module) else b.arg(node, 1, "alpha", 1.0)
    return x.like(L.ELU(alpha=alpha, name=b.name(node))(x.tensor))


@from_torch(nn.LeakyReLU, F.leaky_relu, F.leaky_relu_, elementwise=True)
def leaky_relu_to_keras(b: TorchToKeras, node, target) -> KerasValue:
    x = b.input(node)
    slope = target.negative_slope if isinstance(target, nn.Module) else b.arg(node, 1, "negative_slope", 0.01)
    return x.like(L.LeakyReLU(negative_slope=slope, name=b.name(node))(x.tensor))


def _softmax_dim(b: TorchToKeras, node, target):
    dim = target.dim if isinstance(target, nn.Module) else b.arg(node, 1, "dim")
    if dim is None:
        raise b.unsupported(node, f"{type(target).__name__}(dim=None) has an implicit dimension; give dim")
    return dim


@from_torch(nn.Softmax, F.softmax, torch.softmax, methods=("softmax",), elementwise=True, non_negative=True)
def softmax_to_keras(b: TorchToKeras, node, target) -> KerasValue:
    x = b.input(node)
    axis = x.keras_axis(_softmax_dim(b, node, target))
    return x.like(L.Softmax(axis=axis, name=b.name(node))(x.tensor))


@from_torch(nn.LogSoftmax, F.log_softmax, torch.log_softmax, methods=("log_softmax",), elementwise=True)
def log_softmax_to_keras(b: TorchToKeras, node, target) -> KerasValue:
    x = b.input(node)
    dim = _softmax_dim(b, node, target)
    if x.keras_axis(dim) != x.rank - 1:
        raise b.unsupported(node, f"LogSoftmax(dim={dim}); Keras' log_softmax is over the channels")
    return x.like(L.Activation("log_softmax", name=b.name(node))(x.tensor))
