"""Element-wise arithmetic and merges, both ways, with broadcasting, Python numbers and constants.

* Keras ``Add``, ``Subtract``, ``Multiply``, ``Average``, ``Maximum``, ``Minimum`` and the Keras ops
  of ``x + y``, ``x - 3.0``, ``x * (1 / 6)``, ``x / y``, ``-x`` in a functional model ⇄ PyTorch
  ``+ - * /`` (operators, ``torch.add``/``sub``/``mul``/``div``, tensor methods and their in-place
  forms ``add_``...), ``torch.maximum``/``minimum`` and ``-x``.
* Tensors of the same rank broadcast as in both frameworks (squeeze-and-excitation's
  ``(N, C, 1, 1) * (N, C, H, W)`` is ``(N, 1, 1, C) * (N, H, W, C)``).
* A Python number stays a number (a Keras op such as ``x * 0.5``; ``x * 0.5`` in PyTorch).
* A constant tensor — a PyTorch parameter or buffer read in ``forward`` (torchvision ConvNeXt's
  ``layer_scale``), a Keras weight (keras.applications' ``LayerScale``) — becomes bnkit's Keras
  ``ElementwiseConstant`` (the constant a weight, trainable as the parameter was) and, the other
  way, a parameter or buffer of the PyTorch module, its axes moved to the other layout.
* ``Concatenate(axis)`` ⇄ ``torch.cat(tensors, dim)``, the axis mapped between the layouts.

Each operation is the same IEEE operation on both sides, so the results agree to the bit
(except that CUDA divides by a scalar as a multiplication by its reciprocal in PyTorch).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import numpy as np
import torch

from bnkit.convert.families.tensor_ops import piece, python_arithmetic
from bnkit.convert.keras_layers import ElementwiseConstant
from bnkit.convert.layouts import inverse
from bnkit.convert.registry import from_keras, from_torch
from bnkit.convert.values import BATCH, Constant, KerasValue, Pieces, TorchValue, keras_array
from bnkit.keras import keras

if TYPE_CHECKING:
    from bnkit.convert.keras_walker import KerasToTorch
    from bnkit.convert.torch_walker import TorchToKeras

L = keras.layers
keras_numpy_ops = keras.src.ops.numpy  # the operations of `x + y` on Keras tensors (not exported as classes)

# operation name -> (the PyTorch function, which is also the one on Python numbers; the Keras op class;
# the Keras merge layer, if there is one)
_OPERATIONS = {
    "add": (operator.add, keras_numpy_ops.Add, L.Add),
    "subtract": (operator.sub, keras_numpy_ops.Subtract, L.Subtract),
    "multiply": (operator.mul, keras_numpy_ops.Multiply, L.Multiply),
    "divide": (operator.truediv, keras_numpy_ops.TrueDivide, None),
    "maximum": (torch.maximum, keras_numpy_ops.Maximum, L.Maximum),
    "minimum": (torch.minimum, keras_numpy_ops.Minimum, L.Minimum),
}

# ---- constants between the layouts ----------------------------------------------------------


def _trim(array: np.ndarray) -> np.ndarray:
    """Without leading size-1 axes (broadcasting puts them back)."""
    while array.ndim and array.shape[0] == 1:
        array = array[0]
    return array


def keras_constant(array: np.ndarray, value: KerasValue) -> np.ndarray:
    """A PyTorch constant broadcast against the torch side of ``value``, in Keras' layout."""
    array = np.asarray(array, dtype="float32")
    if array.ndim > value.rank:
        raise ValueError(f"a constant of shape {array.shape} has more axes than the rank-{value.rank} tensor")
    full = array.reshape((1,) * (value.rank - array.ndim) + array.shape)
    return _trim(np.ascontiguousarray(full.transpose(value.layout)))


def torch_constant(array: np.ndarray, value: TorchValue) -> np.ndarray:
    """A Keras constant broadcast against the Keras side of ``value``, in PyTorch's layout."""
    array = np.asarray(array, dtype="float32")
    if array.ndim > value.rank:
        raise ValueError(f"a constant of shape {array.shape} has more axes than the rank-{value.rank} tensor")
    full = array.reshape((1,) * (value.rank - array.ndim) + array.shape)
    return _trim(np.ascontiguousarray(full.transpose(inverse(value.layout))))


# ---- Keras -> PyTorch ---------------------------------------------------------------------


def same_layout(b: KerasToTorch, values: list[TorchValue]) -> list[TorchValue]:
    """``values`` in one layout: theirs when they share one, else the mapped one."""
    if len({v.layout for v in values}) == 1:
        return values
    return [b.mapped(v) for v in values]


def _check_ranks(b: KerasToTorch, layer, values) -> None:
    ranks = {v.rank for v in values if isinstance(v, TorchValue)}
    if len(ranks) > 1:
        raise b.unsupported(layer, f"tensors of different ranks {sorted(ranks)} (both must have the batch axis)")


def torch_operation(b: KerasToTorch, layer, operation: str, operands: list) -> TorchValue:
    """``operands[0] (op) operands[1] (op) ...`` in PyTorch: TorchValues, numbers, Keras constants."""
    _check_ranks(b, layer, operands)
    tensors = same_layout(b, [o for o in operands if isinstance(o, TorchValue)])
    if not tensors:
        raise b.unsupported(layer, "an operation without an input-dependent tensor")
    like = tensors[0]
    args, it = [], iter(tensors)
    for o in operands:
        if isinstance(o, TorchValue):
            args.append(next(it).node)
        elif isinstance(o, (int, float)) and not isinstance(o, bool):
            args.append(o)
        elif isinstance(o, Constant):
            try:
                array = torch_constant(o.array, like)
            except ValueError as e:
                raise b.unsupported(layer, str(e)) from None
            args.append(b.add_tensor(f"{layer.name}_{o.name}", array, o.trainable))
        else:
            raise b.unsupported(layer, f"an operand of type {type(o).__name__}")
    fn = _OPERATIONS[operation][0]
    out = args[0]
    for arg in args[1:]:
        if fn in (torch.maximum, torch.minimum) and not all(isinstance(a, torch.fx.Node) for a in (out, arg)):
            # torch.maximum takes tensors only: with a number, it is a clamp (NaN propagates in both)
            tensor, number = (out, arg) if isinstance(out, torch.fx.Node) else (arg, out)
            bound = {"min": number} if fn is torch.maximum else {"max": number}
            out = b.graph.call_function(torch.clamp, (tensor,), bound)
        else:
            out = b.graph.call_function(fn, (out, arg))
    return like.like(out)


@from_keras(L.Add, L.Subtract, L.Multiply, L.Maximum, L.Minimum, L.Average, permuted_input=True)
def merge_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    """Keras merges broadcast tensors of the same rank, as PyTorch's operators do."""
    if isinstance(layer, L.Average):
        total = torch_operation(b, layer, "add", inputs)
        return total.like(b.graph.call_function(operator.truediv, (total.node, len(inputs))))
    name = {L.Add: "add", L.Subtract: "subtract", L.Multiply: "multiply", L.Maximum: "maximum"}
    return torch_operation(b, layer, name.get(type(layer), "minimum"), inputs)


_KERAS_OPS = {
    keras_numpy_ops.Add: "add",
    keras_numpy_ops.Subtract: "subtract",
    keras_numpy_ops.Multiply: "multiply",
    keras_numpy_ops.TrueDivide: "divide",
    keras_numpy_ops.Divide: "divide",
    keras_numpy_ops.Maximum: "maximum",
    keras_numpy_ops.Minimum: "minimum",
}


@from_keras(*_KERAS_OPS, permuted_input=True)
def keras_op_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    """``x + y``, ``x * 0.5``, ``2.0 - x`` written with Keras tensors in a functional model."""
    tensors = iter(inputs)
    operands = []
    for arg in node.arguments.args:
        if isinstance(arg, keras.KerasTensor):
            operands.append(next(tensors))
        elif isinstance(arg, np.ndarray) or keras.ops.is_tensor(arg) or isinstance(arg, keras.Variable):
            operands.append(Constant(np.asarray(keras.ops.convert_to_numpy(arg), dtype="float32")))
        else:
            operands.append(arg)
    if node.arguments.kwargs:
        raise b.unsupported(layer, f"keyword arguments {sorted(node.arguments.kwargs)}")
    return torch_operation(b, layer, _KERAS_OPS[type(layer)], operands)


@from_keras(keras_numpy_ops.Negative, elementwise=True)
def negative_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    (x,) = inputs
    return x.like(b.graph.call_function(operator.neg, (x.node,)))


@from_keras(ElementwiseConstant, permuted_input=True)
def elementwise_constant_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    constant = Constant(keras_array(layer.constant), layer.trainable, "constant")
    operands = [constant, inputs[0]] if layer.constant_first else [inputs[0], constant]
    return torch_operation(b, layer, layer.operation, operands)


@from_keras("keras.src.applications.convnext.LayerScale", permuted_input=True)
def layer_scale_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    """keras.applications ConvNeXt's ``x * gamma`` (a learned per-channel scale): a parameter."""
    gamma = Constant(keras_array(layer.gamma), layer.trainable and layer.gamma.trainable, "gamma")
    return torch_operation(b, layer, "multiply", [inputs[0], gamma])


@from_keras("keras.src.applications.inception_resnet_v2.CustomScaleLayer", permuted_input=True)
def custom_scale_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    """keras.applications Inception-ResNet's residual sum ``x + r * scale`` (``scale`` a number)."""
    if len(inputs) != 2 or not isinstance(layer.scale, (int, float)) or isinstance(layer.scale, bool):
        raise b.unsupported(layer, f"expected two inputs and a number as scale, got {len(inputs)} and {layer.scale!r}")
    x, residual = inputs
    return torch_operation(b, layer, "add", [x, torch_operation(b, layer, "multiply", [residual, layer.scale])])


@from_keras(L.Concatenate, permuted_input=True)
def concatenate_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    inputs = same_layout(b, inputs)
    out = b.graph.call_function(torch.cat, ([v.node for v in inputs],), {"dim": inputs[0].torch_dim(layer.axis)})
    return inputs[0].like(out)


# ---- PyTorch -> Keras ---------------------------------------------------------------------

_TORCH_OPS = {
    "add": (operator.add, torch.add, "add", "add_"),
    "subtract": (operator.sub, torch.sub, torch.subtract, "sub", "sub_", "subtract", "subtract_"),
    "multiply": (operator.mul, torch.mul, torch.multiply, "mul", "mul_", "multiply", "multiply_"),
    "divide": (
        operator.truediv, torch.div, torch.divide, torch.true_divide,
        "div", "div_", "divide", "divide_", "true_divide", "true_divide_",
    ),
    "maximum": (torch.maximum, "maximum"),
    "minimum": (torch.minimum, "minimum"),
}  # fmt: skip
_TORCH_OPERATION = {target: name for name, targets in _TORCH_OPS.items() for target in targets}


def same_layout_keras(b: TorchToKeras, values: list[KerasValue], name: str) -> list[KerasValue]:
    """``values`` in one layout: theirs when they share one, else the mapped one."""
    if len({v.layout for v in values}) == 1:
        return values
    return [b.mapped(v, f"{name}_{i}") for i, v in enumerate(values)]


def keras_operation(b: TorchToKeras, node, operation: str, operands: list):
    """``operands[0] (op) operands[1]`` in Keras: KerasValues, Python numbers, PyTorch constants."""
    tensors = [o for o in operands if isinstance(o, KerasValue)]
    constants = [o for o in operands if isinstance(o, Constant)]
    if not tensors:
        if constants:
            raise b.unsupported(node, "arithmetic on constant tensors only (compute it once, outside forward)")
        return python_arithmetic(b, node, _OPERATIONS[operation][0], operands)
    if any(o is BATCH or isinstance(o, Pieces) for o in operands):
        raise b.unsupported(node, "arithmetic with the batch size")
    name = b.name(node)
    out_shape = b.out_shape(node)
    _, op_class, merge = _OPERATIONS[operation]
    if len(tensors) == 2:
        if tensors[0].rank != tensors[1].rank:
            shapes = " and ".join(str(t.shape) for t in tensors)
            raise b.unsupported(node, f"broadcasting tensors of different ranks ({shapes}; both have the batch)")
        x, y = same_layout_keras(b, tensors, name)
        layer = merge(name=name) if merge is not None else None
        tensor = layer([x.tensor, y.tensor]) if layer is not None else op_class(name=name)(x.tensor, y.tensor)
        return KerasValue(tensor, out_shape, layout=x.layout)
    x = tensors[0]
    if x.pending_flat is not None:
        raise b.unsupported(node, "arithmetic on a flattened tensor whose order is left to the next Linear")
    first = operands[0] is not x
    other = operands[0] if first else operands[1]
    if isinstance(other, Constant):
        try:
            array = keras_constant(other.array, x)
        except ValueError as e:
            raise b.unsupported(node, str(e)) from None
        layer = ElementwiseConstant(operation, array.shape, first, trainable=other.trainable, name=name)
        tensor = layer(x.tensor)
        layer.set_weights([array])
    elif isinstance(other, (int, float)) and not isinstance(other, bool):
        args = (other, x.tensor) if first else (x.tensor, other)
        tensor = op_class(name=name)(*args)
    else:
        raise b.unsupported(node, f"an operand of type {type(other).__name__}")
    return KerasValue(tensor, out_shape, layout=x.layout)


@from_torch(*[t for t in _TORCH_OPERATION if not isinstance(t, str)],
            methods=[t for t in _TORCH_OPERATION if isinstance(t, str)], permuted_input=True)  # fmt: skip
def arithmetic_to_keras(b: TorchToKeras, node, target):
    operation = _TORCH_OPERATION[target]
    first, second = b.arg(node, 0, "input"), b.arg(node, 1, "other")
    if operation in ("add", "subtract") and b.arg(node, 2, "alpha", 1) != 1:
        raise b.unsupported(node, f"alpha={b.arg(node, 2, 'alpha')}; write the multiplication out")
    if operation == "divide" and b.arg(node, 2, "rounding_mode") is not None:
        raise b.unsupported(node, f"rounding_mode={b.arg(node, 2, 'rounding_mode')!r} (only true division converts)")
    operands = [b.operand(first, node), b.operand(second, node)]
    return keras_operation(b, node, operation, operands)


@from_torch(operator.neg, torch.neg, methods=("neg",), elementwise=True)
def negative_to_keras(b: TorchToKeras, node, target):
    x = b.operand(b.arg(node, 0, "input"), node)
    if not isinstance(x, KerasValue):
        return python_arithmetic(b, node, operator.neg, [x])
    return x.like(keras_numpy_ops.Negative(name=b.name(node))(x.tensor))


@from_torch(torch.cat, torch.concat, torch.concatenate, permuted_input=True)
def cat_to_keras(b: TorchToKeras, node, fn) -> KerasValue:
    tensors = b.arg(node, 0, "tensors")
    if isinstance(tensors, (list, tuple)):
        values = [b.value(t, node) for t in tensors]
    else:  # torch.cat(x.chunk(2)): every piece
        pieces = b.operand(tensors, node)
        if not isinstance(pieces, Pieces):
            raise b.unsupported(node, f"concatenating {type(pieces).__name__}")
        values = [piece(b, pieces, i, node) for i in range(len(pieces.bounds))]
    dim = b.arg(node, 1, "dim", 0)
    if len(values) == 1:
        return values[0]
    values = same_layout_keras(b, values, b.name(node))
    axis = values[0].keras_axis(dim)
    tensor = L.Concatenate(axis=axis, name=b.name(node))([v.tensor for v in values])
    return KerasValue(tensor, b.out_shape(node), layout=values[0].layout)
