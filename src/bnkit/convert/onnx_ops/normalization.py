"""ONNX ``BatchNormalization`` → ``bnkit.torch.BatchNorm{1,2,3}d(convention="onnx")``;
``LayerNormalization`` → ``torch.nn.LayerNorm``.

ONNX's batch norm: ``y = scale * (x - mean) / sqrt(var + epsilon) + B`` per channel (axis 1). In
training it normalises with the batch mean and the *biased* batch variance and updates
``running = momentum * running + (1 - momentum) * batch`` (momentum weighs the old value, default 0.9),
with the biased variance: the "onnx" convention, kept with the node's exact ``epsilon`` and ``momentum``.
A node in training mode (``training_mode=1`` from opset 14, more than one output before: what
onnxruntime runs) normalises with batch statistics even in inference: it becomes a batch norm with
``track_running_stats=False``, which computes exactly that in ``eval()`` too.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bnkit.convert.onnx_ops.registry import from_onnx


def onnx_convention():
    """The "onnx" convention of :mod:`bnkit.conventions` (momentum on the old value, biased running variance)."""
    from bnkit.conventions import Convention, get_convention

    try:
        return get_convention("onnx")
    except ValueError:  # a bnkit without the named convention: the same knobs
        return Convention("onnx", 1e-5, 0.9, "old", False, "biased", 1)


def training_mode(b, node, attrs) -> bool:
    """Whether the node computes with batch statistics: ``training_mode`` (opset 14+); before opset 14,
    more than one output (opset 9 dropped the ``is_test`` attribute; onnxruntime reads the outputs)."""
    if b.opset >= 14:
        return bool(attrs.get("training_mode", 0))
    return sum(1 for name in node.output if name) > 1


@from_onnx("BatchNormalization")
def batch_norm(b, node, inputs):
    from bnkit.torch import BatchNorm1d, BatchNorm2d, BatchNorm3d

    a = b.attrs(node)
    if len(inputs) != 5 or any(v is None for v in inputs):
        raise b.unsupported(f"{len(inputs)} inputs; BatchNormalization takes X, scale, B, input_mean, input_var")
    if int(a.get("spatial", 1)) != 1:
        raise b.unsupported("spatial=0 (statistics per position, opset 7-8) is not supported")
    x = inputs[0]
    scale, bias, mean, var = (
        b.constant(v, w) for v, w in zip(inputs[1:], ("scale", "B", "input_mean", "input_var"), strict=True)
    )
    cls = {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}.get(x.rank)
    if cls is None:
        raise b.unsupported(f"an input of rank {x.rank}; batch norms take rank 2 to 5")
    channels = x.shape[1]
    for what, array in (("scale", scale), ("B", bias), ("input_mean", mean), ("input_var", var)):
        if array.shape != (channels,):
            raise b.unsupported(f"{what} has shape {tuple(array.shape)}, expected ({channels},) for the channel axis 1")
    training = training_mode(b, node, a)
    # ONNX stores float attributes as float32: the shortest decimal of that float32 (0.9, not 0.8999999761581421),
    # which is the same float32 where the kernels compute with it
    eps = _float32_decimal(a.get("epsilon", 1e-5))
    momentum = _float32_decimal(a.get("momentum", 0.9))
    module = cls(channels, eps=eps, momentum=momentum, convention=onnx_convention(), track_running_stats=not training)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(scale.astype("float32")))
        module.bias.copy_(torch.from_numpy(bias.astype("float32")))
        if not training:
            module.running_mean.copy_(torch.from_numpy(mean.astype("float32")))
            module.running_var.copy_(torch.from_numpy(var.astype("float32")))
    return b.module(b.name_for(node), module, x)


def _float32_decimal(value: float) -> float:
    return float(str(np.float32(value)))


@from_onnx("LayerNormalization")
def layer_norm(b, node, inputs):
    a = b.attrs(node)
    x = inputs[0]
    axis = int(a.get("axis", -1)) % x.rank
    shape = x.shape[axis:]
    scale = b.constant(inputs[1], "Scale")
    bias = None if len(inputs) < 3 or inputs[2] is None else b.constant(inputs[2], "B")
    if int(a.get("stash_type", 1)) != 1:
        raise b.unsupported("stash_type other than float32 is not supported")
    module = nn.LayerNorm(shape, eps=_float32_decimal(a.get("epsilon", 1e-5)), bias=bias is not None)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(scale.astype("float32")).broadcast_to(shape))
        if bias is not None:
            module.bias.copy_(torch.from_numpy(bias.astype("float32")).broadcast_to(shape))
    return b.module(b.name_for(node), module, x)
