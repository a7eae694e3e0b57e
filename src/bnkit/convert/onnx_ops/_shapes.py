"""Padding arithmetic shared by the ONNX convolution and pooling converters."""

from __future__ import annotations

import math

__all__ = ["explicit_pads", "torch_pad_order"]


def explicit_pads(b, node, attrs: dict, spatial: tuple[int, ...], kernel, strides, dilations) -> tuple[list, list]:
    """``(begins, ends)`` per spatial axis from ``pads`` or ``auto_pad``.

    ``SAME_UPPER``/``SAME_LOWER`` pad to ``ceil(size / stride)`` outputs: the total is
    ``max((ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)``, its odd element at the end
    (UPPER) or the beginning (LOWER); ``VALID`` pads nothing."""
    nd = len(spatial)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        pads = list(attrs.get("pads", [0] * 2 * nd))
        return pads[:nd], pads[nd:]
    if auto_pad == "VALID":
        return [0] * nd, [0] * nd
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise b.unsupported(f"auto_pad={auto_pad!r} is not an ONNX value")
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins, ends


def torch_pad_order(begins, ends) -> tuple[int, ...]:
    """ONNX ``(x1_begin, x2_begin, ..., x1_end, ...)`` as ``torch.nn.functional.pad`` orders pads:
    last axis first, ``(begin, end)`` pairs."""
    out: list[int] = []
    for begin, end in zip(reversed(begins), reversed(ends), strict=True):
        out += [int(begin), int(end)]
    return tuple(out)
