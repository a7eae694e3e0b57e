r"""Batch normalization fused with its activation, and with a ResNet block's residual add.

.. math::

    \text{BatchNormAct2d:}\quad y = \mathrm{relu}(\mathrm{bn}(x))
    \qquad
    \text{BatchNormAddAct2d:}\quad y = \mathrm{relu}(\mathrm{bn}(x) + \text{residual})

Both subclass :class:`bnkit.torch.BatchNorm2d`: the same constructor (plus ``act``), the same
parameters, buffers and ``state_dict`` keys, so a checkpoint of ``BatchNorm2d`` loads into them
and back. On CUDA tensors, where the device's measured table says it wins (:mod:`bnkit.kernels`),
one Triton kernel normalises, adds and applies the ReLU, and the backward pass goes through the
ReLU mask without storing the pre-activation; elsewhere they compute the same expression with PyTorch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bnkit import kernels
from bnkit.conventions import Convention
from bnkit.torch.batchnorm import DEFAULT, BatchNorm2d, _Default

__all__ = ["BatchNormAct2d", "BatchNormAddAct2d"]

_ACTIVATIONS = ("relu", None)


class _FusedBatchNorm2d(BatchNorm2d):
    def __init__(
        self,
        num_features: int,
        eps: float | None = None,
        momentum: float | None | _Default = DEFAULT,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        convention: str | Convention = "torch",
        act: str | None = "relu",
    ) -> None:
        if act not in _ACTIVATIONS:
            raise ValueError(f"act must be 'relu' or None, got {act!r}")
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            convention=convention,
        )
        self.act = act

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        # in place: the batch norm's backward does not need its output
        return F.relu(y, inplace=True) if self.act == "relu" else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act!r}"


class BatchNormAct2d(_FusedBatchNorm2d):
    """``relu(bn(x))`` over a 4D ``(N, C, H, W)`` input; ``act=None`` leaves out the ReLU."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if kernels.use_triton(input, kernels.mode_of(self, fused=True)) and self._fast_path_takes(input):
            return kernels.batch_norm(self, input, activation=self.act)
        return self._activate(super().forward(input))


class BatchNormAddAct2d(_FusedBatchNorm2d):
    """``relu(bn(x) + residual)``, the end of a ResNet block; ``act=None`` leaves out the ReLU."""

    def forward(self, input: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if not isinstance(residual, torch.Tensor) or residual.shape != input.shape:
            got = tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__
            raise ValueError(
                f"{self._name()}: residual must have the input's shape {tuple(input.shape)}, got {got}"
            )
        same_kind = residual.dtype == input.dtype and residual.device == input.device
        fast = same_kind and kernels.use_triton(input, kernels.mode_of(self, fused=True))
        if fast and self._fast_path_takes(input):
            return kernels.batch_norm(self, input, residual=residual, activation=self.act)
        return self._activate(super().forward(input) + residual)
