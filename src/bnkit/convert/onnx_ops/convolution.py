"""ONNX ``Conv`` and ``ConvTranspose`` → ``torch.nn.Conv{1,2,3}d`` / ``ConvTranspose{1,2,3}d``.

``y[n, o] = sum_{c, k} W[o, c, k] * x_padded[n, g(o) * C/g + c, s * i + d * k] + B[o]`` in both; ONNX's
asymmetric ``pads`` (and ``auto_pad=SAME_*`` where it needs them) become a ``ZeroPad{n}d`` in front.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bnkit.convert.onnx_ops._shapes import explicit_pads, torch_pad_order
from bnkit.convert.onnx_ops.registry import from_onnx

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_ZERO_PAD = {1: nn.ZeroPad1d, 2: nn.ZeroPad2d, 3: nn.ZeroPad3d}


def _weights(b, inputs):
    x = inputs[0]
    weight = b.constant(inputs[1] if len(inputs) > 1 else None, "the weight (input W)")
    bias = inputs[2] if len(inputs) > 2 else None
    bias = None if bias is None else b.constant(bias, "the bias (input B)")
    nd = weight.ndim - 2
    if nd not in _CONV:
        raise b.unsupported(f"a {weight.ndim}-D weight; only 1-D, 2-D and 3-D convolutions are supported")
    if x.rank != nd + 2:
        raise b.unsupported(f"input of rank {x.rank} for a {weight.ndim}-D weight")
    return x, weight, bias, nd


def _set(module: nn.Module, weight, bias) -> nn.Module:
    """The module (built on the meta device: no random initialisation to pay for) holding these weights."""
    module.weight = nn.Parameter(torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)))
    if bias is not None:
        module.bias = nn.Parameter(torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32)))
    return module


@from_onnx("Conv")
def conv(b, node, inputs):
    x, weight, bias, nd = _weights(b, inputs)
    a = b.attrs(node)
    kernel = tuple(weight.shape[2:])
    if "kernel_shape" in a and tuple(a["kernel_shape"]) != kernel:
        raise b.unsupported(f"kernel_shape {a['kernel_shape']} does not match the weight's {kernel}")
    strides = tuple(a.get("strides", [1] * nd))
    dilations = tuple(a.get("dilations", [1] * nd))
    group = int(a.get("group", 1))
    begins, ends = explicit_pads(b, node, a, x.shape[2:], kernel, strides, dilations)
    if min(begins + ends) < 0:
        raise b.unsupported(f"negative pads {begins + ends}")
    name = b.name_for(node)
    if begins != ends:  # asymmetric: pad first, as PyTorch's padding= is the same at both ends
        x = b.module(f"{name}_pad", _ZERO_PAD[nd](torch_pad_order(begins, ends)), x)
        begins = [0] * nd
    in_channels = weight.shape[1] * group
    if x.shape[1] != in_channels:
        raise b.unsupported(f"{x.shape[1]} input channels, the weight expects {in_channels} (group={group})")
    module = _CONV[nd](
        in_channels,
        weight.shape[0],
        kernel,
        strides,
        tuple(begins),
        dilations,
        group,
        bias=bias is not None,
        device="meta",
    )
    return b.module(name, _set(module, weight, bias), x)


@from_onnx("ConvTranspose")
def conv_transpose(b, node, inputs):
    x, weight, bias, nd = _weights(b, inputs)
    a = b.attrs(node)
    kernel = tuple(weight.shape[2:])
    strides = tuple(a.get("strides", [1] * nd))
    dilations = tuple(a.get("dilations", [1] * nd))
    group = int(a.get("group", 1))
    if "output_shape" in a:
        raise b.unsupported("output_shape is not supported (give pads and output_padding)")
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "", "VALID"):
        raise b.unsupported(f"auto_pad={a['auto_pad']!r} is not supported for ConvTranspose")
    pads = list(a.get("pads", [0] * 2 * nd)) if a.get("auto_pad", "NOTSET") != "VALID" else [0] * 2 * nd
    if pads[:nd] != pads[nd:]:
        raise b.unsupported(f"asymmetric pads {pads} are not supported for ConvTranspose")
    output_padding = tuple(a.get("output_padding", [0] * nd))
    module = _TRANSPOSED[nd](
        weight.shape[0],
        weight.shape[1] * group,
        kernel,
        strides,
        tuple(pads[:nd]),
        output_padding,
        group,
        bias=bias is not None,
        dilation=dilations,
        device="meta",
    )
    return b.module(b.name_for(node), _set(module, weight, bias), x)
