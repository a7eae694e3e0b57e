r"""Batch normalization for PyTorch in either framework's convention.

:class:`BatchNorm1d`, :class:`BatchNorm2d` and :class:`BatchNorm3d` subclass their
``torch.nn`` namesakes: the same constructor arguments, parameters, buffers and
``state_dict`` keys, so checkpoints load both ways and every tool that recognises
``torch.nn.BatchNorm*`` (torch.fx, torchinfo, quantisation) recognises these. A keyword-only
``convention`` chooses the semantics:

.. math::

    y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

with the batch's mean and biased variance in training (or without running statistics) and
the running statistics in ``eval()``. Running statistics are updated in every training
forward pass:

* ``convention="torch"`` (default): ``run = (1 - m) * run + m * batch`` with the *unbiased*
  batch variance; ``momentum=None`` is a cumulative average; ``eps=1e-5``, ``momentum=0.1``.
* ``convention="keras"``: ``run = m * run + (1 - m) * batch`` with the *biased* batch variance;
  ``eps=1e-3``, ``momentum=0.99``.

``momentum`` is stored and read in the layer's convention. Both conventions run PyTorch's
fused native kernel; the Keras convention asks it for the batch statistics (through scratch
buffers and momentum 1) and applies its own per-channel running update.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnkit.checks import check_bn_input
from bnkit.conventions import Convention, get_convention

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "DEFAULT"]


class _Default:
    """Marks an argument left out, so that ``momentum=None`` stays meaningful."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()


class _ConventionBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Adds ``convention`` to ``torch.nn``'s batch norm; subclasses fix the input rank."""

    _ranks: tuple[int, ...] = ()

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
    ) -> None:
        conv = get_convention(convention)
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        eps = conv.eps if eps is None else eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a positive float, got {eps!r}")
        momentum = conv.momentum if isinstance(momentum, _Default) else momentum
        conv.check_momentum(momentum)
        super().__init__(
            num_features, float(eps), momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.convention = conv

    @property
    def _native_update(self) -> bool:
        """True when PyTorch's own running update is this convention's."""
        c = self.convention
        return c.momentum_weighs == "new" and c.unbiased_running_var and c.cumulative_average_when_none

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if isinstance(input, torch.fx.Proxy):  # symbolic tracing: no concrete shape to check
            return
        uses_batch_stats = self.training or self.running_mean is None
        check_bn_input(
            self._name(),
            input.shape,
            str(input.dtype),
            input.is_floating_point(),
            ranks=self._ranks,
            num_features=self.num_features,
            uses_batch_stats=uses_batch_stats,
        )

    def _name(self) -> str:
        return f"{type(self).__name__}({self.num_features}, convention={self.convention.name!r})"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self._native_update:
            return super().forward(input)  # torch.nn's forward calls _check_input_dim first
        self._check_input_dim(input)
        return self._forward_own_update(input)

    def _forward_own_update(self, input: torch.Tensor) -> torch.Tensor:
        use_batch_stats = self.training or self.running_mean is None
        updates = self.training and self.track_running_stats and self.running_mean is not None
        if not updates:
            return F.batch_norm(
                input,
                None if use_batch_stats else self.running_mean,
                None if use_batch_stats else self.running_var,
                self.weight,
                self.bias,
                use_batch_stats,
                0.0,
                self.eps,
            )
        self.num_batches_tracked.add_(1)
        # With momentum 1 the native kernel writes the batch mean and the unbiased batch
        # variance (accurate Welford statistics) into the scratch buffers.
        batch_mean = torch.zeros_like(self.running_mean)
        batch_var = torch.zeros_like(self.running_var)
        output = F.batch_norm(input, batch_mean, batch_var, self.weight, self.bias, True, 1.0, self.eps)
        n = input.numel() // self.num_features
        old, new = self.convention.weights(self.momentum, int(self.num_batches_tracked))
        with torch.no_grad():
            if not self.convention.unbiased_running_var:
                # out of place: the native kernel saved batch_var for its backward
                batch_var = batch_var * ((n - 1) / n)
            self.running_mean.copy_(self.running_mean * old + batch_mean * new)
            self.running_var.copy_(self.running_var * old + batch_var * new)
        return output

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, convention={self.convention.name!r}"


class BatchNorm1d(_ConventionBatchNorm, nn.BatchNorm1d):
    """Batch normalization over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input."""

    _ranks = (2, 3)


class BatchNorm2d(_ConventionBatchNorm, nn.BatchNorm2d):
    """Batch normalization over a 4D ``(N, C, H, W)`` input (any memory format)."""

    _ranks = (4,)


class BatchNorm3d(_ConventionBatchNorm, nn.BatchNorm3d):
    """Batch normalization over a 5D ``(N, C, D, H, W)`` input (any memory format)."""

    _ranks = (5,)
