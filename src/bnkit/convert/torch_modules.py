"""PyTorch modules for Keras layers that ``torch.nn`` has no single module for.

Converted models hold them (``keras_to_torch``), and ``torch_to_keras`` turns them back into the
Keras layer they came from. They are plain compositions of ``torch.nn`` modules: their state
dicts are those of the parts, and ``torch.export`` traces through them. Importing this module
imports only PyTorch.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

__all__ = ["SeparableConv1d", "SeparableConv2d"]


class _SeparableConv(nn.Sequential):
    _conv: type[nn.Module]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        depth_multiplier: int = 1,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        if not isinstance(depth_multiplier, int) or depth_multiplier < 1:
            raise ValueError(f"depth_multiplier must be a positive int, got {depth_multiplier!r}")
        factory = {"device": device, "dtype": dtype}
        middle = in_channels * depth_multiplier
        groups = in_channels
        depthwise = self._conv(in_channels, middle, kernel_size, stride, padding, dilation, groups, False, **factory)
        pointwise = self._conv(middle, out_channels, 1, bias=bias, **factory)
        super().__init__(OrderedDict(depthwise=depthwise, pointwise=pointwise))


class SeparableConv1d(_SeparableConv):
    """Keras' ``SeparableConv1D``: a depthwise ``Conv1d`` (``groups=in_channels``, ``in_channels *
    depth_multiplier`` outputs, no bias) then a pointwise ``Conv1d`` (kernel 1, with the bias):
    ``pointwise(depthwise(x))``. ``stride``, ``padding`` and ``dilation`` are the depthwise conv's."""

    _conv = nn.Conv1d


class SeparableConv2d(_SeparableConv):
    """Keras' ``SeparableConv2D``: a depthwise ``Conv2d`` (``groups=in_channels``, ``in_channels *
    depth_multiplier`` outputs, no bias) then a pointwise ``Conv2d`` (1×1, with the bias):
    ``pointwise(depthwise(x))``. ``stride``, ``padding`` and ``dilation`` are the depthwise conv's."""

    _conv = nn.Conv2d
