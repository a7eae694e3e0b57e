"""ONNX element-wise arithmetic and reductions → PyTorch operations with NumPy broadcasting, as ONNX's.

``Add/Sub/Mul/Div`` become ``operator.add`` ... (a constant operand holding one value becomes a Python
number, a larger one a buffer); ``Div`` of integers truncates, as ONNX's integer division does;
``ReduceMean/ReduceMax/ReduceSum`` take ``axes`` as an attribute (before opset 18; 13 for ReduceSum)
or an input, ``keepdims`` defaulting to 1.
"""

from __future__ import annotations

import operator

import torch

from bnkit.convert.onnx_ops.registry import from_onnx

_BINARY = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.truediv}


@from_onnx("Add", "Sub", "Mul", "Div")
def binary(b, node, inputs):
    left, right = inputs
    integers = not left.example.dtype.is_floating_point and not right.example.dtype.is_floating_point
    if node.op_type == "Div" and integers:  # ONNX integer division truncates
        return b.function(torch.div, left, right, rounding_mode="trunc")
    return b.function(_BINARY[node.op_type], left, right)


_UNARY = {
    "Sqrt": torch.sqrt,
    "Exp": torch.exp,
    "Log": torch.log,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Reciprocal": torch.reciprocal,
    "Erf": torch.erf,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
}


@from_onnx(*_UNARY)
def unary(b, node, inputs):
    return b.function(_UNARY[node.op_type], inputs[0])


@from_onnx("Pow")
def power(b, node, inputs):
    x, exponent = inputs
    if exponent.is_constant and exponent.example.numel() == 1:
        e = float(exponent.example.reshape(()))
        if e == 2.0:
            return b.function(operator.mul, x, x)
        if e == 1.0:
            return x
        if e == 0.5:
            return b.function(torch.sqrt, x)
    return b.function(torch.pow, x, exponent)


@from_onnx("Max", "Min", "Sum", "Mean")
def variadic(b, node, inputs):
    fn = {"Max": torch.maximum, "Min": torch.minimum, "Sum": operator.add, "Mean": operator.add}[node.op_type]
    out = inputs[0]
    for value in inputs[1:]:
        out = b.function(fn, out, value)
    if node.op_type == "Mean" and len(inputs) > 1:
        out = b.function(operator.truediv, out, float(len(inputs)))
    return out


def _axes(b, node, inputs, attr_until: int) -> list[int] | None:
    if b.opset < attr_until:
        axes = b.attrs(node).get("axes")
        return None if axes is None else [int(a) for a in axes]
    if len(inputs) > 1 and inputs[1] is not None:
        return b.ints(inputs[1], "axes")
    return None


_REDUCE = {"ReduceMean": (torch.mean, 18), "ReduceSum": (torch.sum, 13), "ReduceMax": (torch.amax, 18)}


@from_onnx(*_REDUCE)
def reduce(b, node, inputs):
    fn, attr_until = _REDUCE[node.op_type]
    a = b.attrs(node)
    x = inputs[0]
    axes = _axes(b, node, inputs, attr_until)
    keep = bool(a.get("keepdims", 1))
    if not axes:
        if int(a.get("noop_with_empty_axes", 0)):
            return x
        axes = list(range(x.rank))
    axes = sorted(int(ax) % x.rank for ax in axes)
    return b.function(fn, x, axes, keepdim=keep)
