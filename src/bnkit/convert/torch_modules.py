"""PyTorch modules that :mod:`bnkit.convert` puts into converted models where ``torch.nn`` has none.

``torch_to_keras`` turns each back into the Keras layer it came from. The separable convolutions
are plain compositions of ``torch.nn`` modules (their state dicts are those of the parts, and
``torch.export`` traces through them). Importing this module imports only PyTorch.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["SeparableConv1d", "SeparableConv2d", "StochasticDepth"]


class StochasticDepth(nn.Module):
    """Identity in ``eval()``; in training, each sample (``mode="row"``) or the whole batch
    (``mode="batch"``) is zeroed with probability ``p`` and what is kept is divided by ``1 - p``.

    What ``torchvision.ops.StochasticDepth`` computes (without needing torchvision), and what
    keras.applications' ConvNeXt ``StochasticDepth`` and a Keras ``Dropout`` whose
    ``noise_shape`` keeps only the batch compute: the same probabilities, not the same masks.
    """

    def __init__(self, p: float, mode: str = "row") -> None:
        super().__init__()
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"drop probability has to be between 0 and 1, but got {p!r}")
        if mode not in ("row", "batch"):
            raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode!r}")
        self.p, self.mode = float(p), mode

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return input
        size = [input.shape[0] if self.mode == "row" else 1] + [1] * (input.ndim - 1)
        keep = 1.0 - self.p
        noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(keep)
        if keep > 0.0:
            noise.div_(keep)
        return input * noise

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode!r}"


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
