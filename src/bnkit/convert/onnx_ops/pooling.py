"""ONNX pooling → ``torch.nn`` pooling: ``MaxPool``/``AveragePool`` (symmetric pads, ``ceil_mode``,
``count_include_pad`` as ONNX's default 0), ``GlobalAveragePool``/``GlobalMaxPool`` as adaptive
pooling to 1, ``ReduceMean``/``ReduceMax`` in ``elementwise``."""

from __future__ import annotations

from torch import nn

from bnkit.convert.onnx_ops._shapes import explicit_pads
from bnkit.convert.onnx_ops.registry import from_onnx

_MAX = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVG = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_GLOBAL = {
    "GlobalAveragePool": {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d},
    "GlobalMaxPool": {1: nn.AdaptiveMaxPool1d, 2: nn.AdaptiveMaxPool2d, 3: nn.AdaptiveMaxPool3d},
}


def _window(b, node, x):
    a = b.attrs(node)
    nd = x.rank - 2
    if nd not in _MAX:
        raise b.unsupported(f"an input of rank {x.rank}; pooling over 1 to 3 spatial axes is supported")
    kernel = tuple(a["kernel_shape"])
    strides = tuple(a.get("strides", [1] * nd))
    dilations = tuple(a.get("dilations", [1] * nd))
    begins, ends = explicit_pads(b, node, a, x.shape[2:], kernel, strides, dilations)
    ceil = bool(a.get("ceil_mode", 0))
    if begins != ends:
        if (
            node.op_type == "MaxPool"
            and not ceil
            and _ceil_equivalent(x.shape[2:], kernel, strides, dilations, begins, ends)
        ):
            # opset 9 had no ceil_mode: the exporter wrote ceil_mode=True as extra end pads, which a max
            # ignores; PyTorch's ceil_mode gives the same windows
            return a, nd, kernel, strides, dilations, tuple(begins), True
        raise b.unsupported(f"asymmetric pads {begins + ends} are not supported for pooling")
    if any(2 * p > k for p, k in zip(begins, kernel, strict=True)):
        raise b.unsupported(f"pads {begins} larger than half the kernel {kernel}")
    return a, nd, kernel, strides, dilations, tuple(begins), ceil


def _ceil_equivalent(spatial, kernel, strides, dilations, begins, ends) -> bool:
    """Whether end pads beyond the begin pads give exactly PyTorch's ``ceil_mode=True`` windows:
    ``floor((L + b + e - span) / s) + 1`` outputs, equal to ceil mode's with padding ``b``
    (``ceil((L + 2b - span) / s) + 1``, less one where the last window would start in the end padding)."""
    for size, k, s, d, b, e in zip(spatial, kernel, strides, dilations, begins, ends, strict=True):
        span = (k - 1) * d + 1
        if e < b:
            return False
        padded = (size + b + e - span) // s + 1
        ceil = -(-(size + 2 * b - span) // s) + 1
        if (ceil - 1) * s >= size + b:
            ceil -= 1
        if padded != ceil or (padded - 1) * s >= size + b:
            return False
    return True


@from_onnx("MaxPool")
def max_pool(b, node, inputs):
    x = inputs[0]
    a, nd, kernel, strides, dilations, pads, ceil = _window(b, node, x)
    if int(a.get("storage_order", 0)) != 0 and node.output[1:2] != [""] and len(node.output) > 1:
        raise b.unsupported("storage_order=1 indices are not supported")
    module = _MAX[nd](kernel, strides, pads, dilations, ceil_mode=ceil)
    return b.module(b.name_for(node, None), module, x)


@from_onnx("AveragePool")
def average_pool(b, node, inputs):
    x = inputs[0]
    a, nd, kernel, strides, dilations, pads, ceil = _window(b, node, x)
    if any(d != 1 for d in dilations):
        raise b.unsupported(f"dilations {dilations} are not supported for average pooling")
    count_include_pad = bool(a.get("count_include_pad", 0))
    module = _AVG[nd](kernel, strides, pads, ceil_mode=ceil, count_include_pad=count_include_pad)
    return b.module(b.name_for(node, None), module, x)


@from_onnx("GlobalAveragePool", "GlobalMaxPool")
def global_pool(b, node, inputs):
    x = inputs[0]
    cls = _GLOBAL[node.op_type].get(x.rank - 2)
    if cls is None:
        raise b.unsupported(f"an input of rank {x.rank}")
    return b.module(b.name_for(node, None), cls(1), x)
