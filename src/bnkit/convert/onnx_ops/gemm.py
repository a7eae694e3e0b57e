"""ONNX ``Gemm`` and ``MatMul`` with a constant weight → ``torch.nn.Linear``.

``Gemm: Y = alpha * A' B' + beta * C`` (``A' = A^T`` if ``transA``, ``B'`` likewise) is
``Linear(weight = alpha * B'^T, bias = beta * C)`` for a 2-D ``A`` and a constant ``B``;
``MatMul(A, B)`` with a constant 2-D ``B`` is ``Linear(weight = B^T, bias=False)`` over A's last axis.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bnkit.convert.onnx_ops.registry import from_onnx


def _linear(b, node, x, weight: np.ndarray, bias: np.ndarray | None):
    module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")  # no random init
    module.weight = nn.Parameter(torch.from_numpy(np.ascontiguousarray(weight, dtype="float32")))
    if bias is not None:
        module.bias = nn.Parameter(torch.from_numpy(np.ascontiguousarray(bias, dtype="float32")))
    return b.module(b.name_for(node), module, x)


@from_onnx("Gemm")
def gemm(b, node, inputs):
    a = b.attrs(node)
    x = inputs[0]
    if int(a.get("transA", 0)):
        raise b.unsupported("transA=1 (the input transposed) is not supported")
    if x.rank != 2:
        raise b.unsupported(f"an input of rank {x.rank}; Gemm takes a matrix")
    weight = b.constant(inputs[1], "B (the weight)")
    weight = weight if int(a.get("transB", 0)) else weight.T  # Linear's weight is (out, in)
    weight = float(a.get("alpha", 1.0)) * weight
    bias = None
    if len(inputs) > 2 and inputs[2] is not None:
        c = b.constant(inputs[2], "C (the bias)")
        if c.ndim == 2 and c.shape[0] != 1:
            raise b.unsupported(f"C of shape {c.shape} varies over the batch; only a per-output bias is supported")
        bias = float(a.get("beta", 1.0)) * np.broadcast_to(
            c.reshape(-1) if c.size > 1 else c.reshape(()), (weight.shape[0],)
        )
    return _linear(b, node, x, weight, bias)


@from_onnx("MatMul")
def matmul(b, node, inputs):
    x, w = inputs
    if w.is_constant and w.rank == 2 and not x.is_constant:
        return _linear(b, node, x, b.constant(w, "B").T, None)
    return b.function(torch.matmul, x, w)
