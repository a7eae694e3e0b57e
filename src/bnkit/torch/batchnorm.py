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
buffers and momentum 1) and applies its own per-channel running update. On CUDA tensors both
run bnkit's fused Triton kernels instead where the device's measured table says they win
(:mod:`bnkit.kernels`; ``BNKIT_TRITON=1`` forces them, ``BNKIT_TRITON=0`` turns them off).

NaN and Inf propagate exactly as in ``torch.nn`` (and, for the Keras convention, to the same
places as in Keras): in training a NaN or Inf anywhere in a channel makes that channel's batch
mean and variance NaN or Inf, so the channel's whole output is NaN and its running statistics
become NaN/Inf (and stay so; reset them with ``reset_running_stats()``). Other channels are
untouched. In ``eval()`` with finite running statistics a NaN/Inf only affects its own output
element. Nothing is checked or replaced: a NaN check would cost a pass over the input.
An empty batch (N = 0) is counted in ``num_batches_tracked`` and leaves the running
statistics as they are, as in ``torch.nn``.

``torch.compile``, ``torch.export`` and ``torch.jit.trace`` take these layers;
``torch.jit.script`` does not (the ``convention`` attribute is not a TorchScript type).
``torch.fx.symbolic_trace`` keeps only ``torch.nn``'s own layers as leaves and traces into
these, which in training loses the in-place running update (and, in the Keras convention,
stops at a branch on the input's layout): trace with :func:`bnkit.torch.tracing.symbolic_trace`,
which keeps every batch norm a ``call_module`` node.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from bnkit import kernels
from bnkit.checks import check_bn_input
from bnkit.conventions import Convention, get_convention

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "DEFAULT"]


class _Default:
    """Marks an argument left out, so that ``momentum=None`` stays meaningful."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()


def _checked_settings(conv: Convention, num_features, eps, momentum) -> tuple[float, float | None]:
    """``(eps, momentum)`` with the convention's defaults filled in, or a message quoting the bad value."""
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
        kind = type(num_features).__name__
        raise TypeError(f"num_features must be a positive int, got {kind} {num_features!r}")
    if num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    eps = conv.eps if eps is None else eps
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a positive float, got {type(eps).__name__} {eps!r}")
    if not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    momentum = conv.momentum if isinstance(momentum, _Default) else momentum
    conv.check_momentum(momentum)
    return float(eps), momentum


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
        layer = type(self).__name__
        try:
            conv = get_convention(convention)
            eps, momentum = _checked_settings(conv, num_features, eps, momentum)
        except (TypeError, ValueError) as error:
            # name the layer, as the input checks do: "BatchNorm2d: momentum must be in [0, 1], got 1.5"
            raise type(error)(f"{layer}: {error}") from None
        super().__init__(
            int(num_features), eps, momentum, affine, track_running_stats, device, dtype, bias=bias
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
        if kernels.use_triton(input, kernels.mode_of(self)):  # CUDA, where measured to win (bnkit.kernels)
            return kernels.batch_norm(self, input)
        if self._native_update:
            return super().forward(input)  # torch.nn's forward calls _check_input_dim first
        self._check_input_dim(input)
        return self._forward_own_update(input)

    def _forward_own_update(self, input: torch.Tensor) -> torch.Tensor:
        use_batch_stats = self.training or self.running_mean is None
        if use_batch_stats and input.device.type == "cpu" and input.dim() > 2 and not input.is_contiguous():
            # PyTorch's CPU kernel sums a channels_last batch in one float32 pass: its batch mean
            # drifts by ~1e-7·n relative (1.4e-5 at 2^17 values per channel) where Keras' does not.
            # Its NCHW kernel sums accurately; take it and hand the output back in the input's format.
            output = self._forward_own_update(input.contiguous())
            return output.contiguous(memory_format=_memory_format(input))
        updates = self.training and self.track_running_stats and self.running_mean is not None
        if updates:
            self.num_batches_tracked.add_(1)
        if not updates or input.numel() == 0:  # torch.nn counts an empty batch but keeps the statistics
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
        # With momentum 1 the native kernel writes the batch mean and the unbiased batch
        # variance (accurate Welford statistics) into the scratch buffers. Autograd keeps them
        # for the backward pass: they are only read below, never changed in place (that would
        # make backward() fail on their version counter).
        running_mean, running_var = self.running_mean, self.running_var  # one Module lookup each
        batch_mean = torch.zeros_like(running_mean)
        batch_var = torch.zeros_like(running_var)
        output = F.batch_norm(input, batch_mean, batch_var, self.weight, self.bias, True, 1.0, self.eps)
        # The count matters only to the cumulative average; reading it syncs a GPU stream.
        count = int(self.num_batches_tracked) if self.momentum is None else 1
        old, new = self.convention.weights(self.momentum, count)
        if not self.convention.unbiased_running_var:
            n = input.numel() // self.num_features
            # biased variance = unbiased * (n - 1) / n, on the tensor: folded into the update's
            # weight as (1 - m) * (n - 1) / n, it made torch.compile fail once Dynamo treats the
            # momentum as a symbolic float (a guard that rounds the product differently)
            batch_var = batch_var * ((n - 1) / n)
        # run = old * run + new * batch, in place. Nothing here requires grad, so autograd
        # records none of it.
        running_mean.mul_(old).add_(batch_mean, alpha=new)
        running_var.mul_(old).add_(batch_var, alpha=new)
        return output

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, convention={self.convention.name!r}"


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


class BatchNorm1d(_ConventionBatchNorm, nn.BatchNorm1d):
    """Batch normalization over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input."""

    _ranks = (2, 3)


class BatchNorm2d(_ConventionBatchNorm, nn.BatchNorm2d):
    """Batch normalization over a 4D ``(N, C, H, W)`` input (any memory format)."""

    _ranks = (4,)


class BatchNorm3d(_ConventionBatchNorm, nn.BatchNorm3d):
    """Batch normalization over a 5D ``(N, C, D, H, W)`` input (any memory format)."""

    _ranks = (5,)
