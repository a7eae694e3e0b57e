"""A per-channel affine map, what an inference-mode batch norm is once its statistics are fixed."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ChannelAffine"]


class ChannelAffine(nn.Module):
    r"""``y = x * scale + shift`` per channel on axis 1, for inputs of any rank >= 2.

    ``bnkit.fold_bn`` puts one where a batch norm has no preceding layer to fold into:
    ``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale``.
    ``scale`` and ``shift`` are buffers: the module is meant for inference.
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
        return (input.transpose(1, -1) * self.scale + self.shift).transpose(1, -1)

    def extra_repr(self) -> str:
        return f"{self.num_features}"
