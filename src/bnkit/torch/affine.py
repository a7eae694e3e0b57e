"""A per-channel affine map, what an inference-mode batch norm is once its statistics are fixed."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ChannelAffine"]


class ChannelAffine(nn.Module):
    r"""``y = x * scale + shift`` per channel on axis 1, for inputs of any rank >= 2.

    ``bnkit.fold_bn`` puts one where a batch norm has no preceding layer to fold into:
    ``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale``.
    ``scale`` and ``shift`` are buffers: the module is meant for inference. Half-precision
    inputs are computed in float32; the output has the input's dtype.
    """

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        scale, shift = torch.as_tensor(scale), torch.as_tensor(shift)
        if scale.ndim != 1 or scale.shape != shift.shape:
            raise ValueError(
                f"scale and shift must be 1-D of the same length, got shapes {tuple(scale.shape)} "
                f"and {tuple(shift.shape)}"
            )
        self.num_features = scale.numel()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # Moving the channel axis last broadcasts against (C,) for any rank; it is a view,
        # and the elementwise result keeps the input's memory layout.
        x = input.transpose(1, -1)
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # as batch norm computes half inputs: in float32, rounded once
        # the output has the input's dtype, as a batch norm's has, also when scale and shift are
        # wider (a batch norm kept in float32 inside a half model)
        return (x * self.scale + self.shift).to(input.dtype).transpose(1, -1)

    def extra_repr(self) -> str:
        return f"{self.num_features}"
