"""ONNX activations → ``torch.nn`` activation modules (the same formula, the same constants).

``HardSigmoid(alpha, beta) = max(0, min(1, alpha * x + beta))`` is ``nn.Hardsigmoid`` for
``alpha = 1/6, beta = 0.5`` and the composed clamp otherwise; ``Clip(min, max)`` is ``nn.ReLU``
(``[0, inf)``), ``nn.ReLU6`` (``[0, 6]``), ``nn.Hardtanh`` (``[-1, 1]``) or ``torch.clamp``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bnkit.convert.onnx_ops.registry import from_onnx

_SIMPLE = {
    "Relu": nn.ReLU,
    "Sigmoid": nn.Sigmoid,
    "Tanh": nn.Tanh,
    "HardSwish": nn.Hardswish,
    "Softsign": nn.Softsign,
    "Mish": nn.Mish,
}


def _simple(b, node, inputs):
    return b.module(b.name_for(node, None), _SIMPLE[node.op_type](), inputs[0])


for _op in _SIMPLE:
    from_onnx(_op)(_simple)


@from_onnx("Softplus")
def softplus(b, node, inputs):
    # ONNX: log(exp(x) + 1) everywhere; torch's Softplus switches to x above threshold=20, where
    # the two agree to float32 precision (log1p(exp(-20)) ~ 2e-9)
    return b.module(b.name_for(node, None), nn.Softplus(), inputs[0])


@from_onnx("LeakyRelu")
def leaky_relu(b, node, inputs):
    alpha = float(b.attrs(node).get("alpha", 0.01))
    return b.module(b.name_for(node, None), nn.LeakyReLU(alpha), inputs[0])


@from_onnx("Elu")
def elu(b, node, inputs):
    return b.module(b.name_for(node, None), nn.ELU(float(b.attrs(node).get("alpha", 1.0))), inputs[0])


@from_onnx("Selu")
def selu(b, node, inputs):
    a = b.attrs(node)
    alpha, gamma = float(a.get("alpha", 1.67326319217681884765625)), float(a.get("gamma", 1.05070102214813232421875))
    if not (
        math.isclose(alpha, 1.6732632423543772, rel_tol=1e-6) and math.isclose(gamma, 1.0507009873554805, rel_tol=1e-6)
    ):
        raise b.unsupported(f"alpha={alpha}, gamma={gamma}; only SELU's standard constants are supported")
    return b.module(b.name_for(node, None), nn.SELU(), inputs[0])


@from_onnx("Gelu")
def gelu(b, node, inputs):
    approximate = b.attrs(node).get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise b.unsupported(f"approximate={approximate!r}")
    return b.module(b.name_for(node, None), nn.GELU(approximate=approximate), inputs[0])


@from_onnx("HardSigmoid")
def hard_sigmoid(b, node, inputs):
    a = b.attrs(node)
    alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
    if math.isclose(alpha, 1 / 6, rel_tol=1e-6) and beta == 0.5:
        return b.module(b.name_for(node, None), nn.Hardsigmoid(), inputs[0])
    y = b.function(torch.add, b.function(torch.mul, inputs[0], alpha), beta)
    return b.function(torch.clamp, y, 0.0, 1.0)


@from_onnx("Clip")
def clip(b, node, inputs):
    x = inputs[0]
    if b.opset < 11:
        a = b.attrs(node)
        low, high = float(a.get("min", -math.inf)), float(a.get("max", math.inf))
    else:  # opset 11 made min and max optional inputs
        bounds = [
            None if v is None else float(b.constant(v, w).reshape(()))
            for v, w in zip([*inputs[1:3], None, None][:2], ("min", "max"), strict=True)
        ]
        low = -math.inf if bounds[0] is None else bounds[0]
        high = math.inf if bounds[1] is None else bounds[1]
    name = b.name_for(node, None)
    if low == 0.0 and high == math.inf:
        return b.module(name, nn.ReLU(), x)
    if low == 0.0 and high == 6.0:
        return b.module(name, nn.ReLU6(), x)
    if (low, high) == (-1.0, 1.0):
        return b.module(name, nn.Hardtanh(), x)
    return b.function(torch.clamp, x, None if math.isinf(low) else low, None if math.isinf(high) else high)


def _softmax(b, node, inputs, cls):
    x = inputs[0]
    a = b.attrs(node)
    if b.opset >= 13:
        axis = int(a.get("axis", -1)) % x.rank
    else:  # before opset 13: softmax over the flattened dims from axis (default 1); the last axis alone agrees
        axis = int(a.get("axis", 1)) % x.rank
        if any(d != 1 for d in x.shape[axis + 1 :]):
            raise b.unsupported(
                f"axis={axis} at opset {b.opset} normalises over the flattened axes {axis}.., "
                "which bnkit.convert supports only for the last axis"
            )
        # trailing axes of size 1 only: the flattened softmax is the one over axis itself
    return b.module(b.name_for(node, None), cls(dim=axis), x)


@from_onnx("Softmax")
def softmax(b, node, inputs):
    return _softmax(b, node, inputs, nn.Softmax)


@from_onnx("LogSoftmax")
def log_softmax(b, node, inputs):
    return _softmax(b, node, inputs, nn.LogSoftmax)
