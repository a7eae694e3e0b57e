r"""Batch renormalization for bnkit's PyTorch batch norms (``renorm=True``).

In training the batch-normalised value is corrected by ``r`` and ``d``, the batch's standard
deviation and mean relative to the *renorm* statistics, clipped, and held constant in the
gradient (:mod:`bnkit.reference` has the formulas):

.. math::

    y = \gamma\,(r\,\hat{x} + d) + \beta,\quad
    r = \mathrm{clip}\!\left(\frac{\sigma_B}{\max(\sigma_{renorm}, \sqrt{\epsilon})}\right),\quad
    d = \mathrm{clip}\!\left(\frac{\mu_B - \mu_{renorm}}{\max(\sigma_{renorm}, \sqrt{\epsilon})}\right)

with :math:`\sigma_B = \sqrt{\mathrm{Var}_B + \epsilon}`. It runs as batch norm with the weight
``r * weight`` and the bias ``d * weight + bias``, so PyTorch's fused kernel computes the
output and the gradient. Five buffers hold the state, named after Keras' weights so that a
checkpoint or a conversion maps one to one: ``running_mean``, ``running_var`` (Keras'
``moving_mean``, ``moving_variance``), ``running_stddev`` (``moving_stddev``), ``renorm_mean``,
``renorm_stddev``. ``eval()`` is plain batch norm with ``running_mean`` and ``running_var``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bnkit.renorm import STATE_NAMES, check_clipping, default_renorm_momentum, read_momentum

RENORM_BUFFERS = tuple(STATE_NAMES)


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


RENORM_DEFAULT = _Default()


class RenormMixin:
    """The renorm state and arithmetic of :class:`bnkit.torch.batchnorm._ConventionBatchNorm`."""

    renorm: bool = False
    _renorm_clipping: dict = {}  # noqa: RUF012 - replaced per instance, never mutated

    @property
    def renorm_clipping(self) -> dict:
        """``{"rmax": ..., "rmin": ..., "dmax": ...}`` (each optional); read on every training step, so a
        clipping schedule is an assignment between steps, checked as the constructor checks it."""
        return self._renorm_clipping

    @renorm_clipping.setter
    def renorm_clipping(self, clipping) -> None:
        self._renorm_clipping = check_clipping(clipping, type(self).__name__)

    def _init_renorm(self, renorm, renorm_clipping, renorm_momentum, factory_kwargs, lazy: bool = False) -> None:
        layer = type(self).__name__
        if not isinstance(renorm, bool):
            raise TypeError(f"{layer}: renorm must be a bool, got {type(renorm).__name__} {renorm!r}")
        conv = self.convention
        if isinstance(renorm_momentum, _Default):
            renorm_momentum = default_renorm_momentum(conv)
        self.renorm = renorm
        self.renorm_clipping = renorm_clipping
        self.renorm_momentum = read_momentum(renorm_momentum, conv, layer)
        if not renorm:
            return
        if not self.track_running_stats:
            raise ValueError(
                f"{layer}: renorm=True needs track_running_stats=True (its corrections are relative to "
                "moving statistics)"
            )
        for name in RENORM_BUFFERS:
            if lazy:
                self.register_buffer(name, torch.nn.parameter.UninitializedBuffer(**factory_kwargs))
            else:
                self.register_buffer(name, torch.empty(self.num_features, **factory_kwargs))
        if not lazy:
            self._reset_renorm_stats()

    def _reset_renorm_stats(self) -> None:
        # Keras' initial values: the moving standard deviations are sqrt of the variance's 1
        self.running_stddev.fill_(1.0)
        self.renorm_mean.zero_()
        self.renorm_stddev.fill_(1.0)

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if self.renorm and not isinstance(self.renorm_mean, torch.nn.parameter.UninitializedBuffer):
            self._reset_renorm_stats()

    def _materialize_renorm(self, channels: int) -> None:
        """Lazy layers: give the renorm buffers their shape (before ``reset_parameters`` fills them)."""
        if self.renorm:
            for name in RENORM_BUFFERS:
                buffer = getattr(self, name)
                if isinstance(buffer, torch.nn.parameter.UninitializedBuffer):
                    buffer.materialize((channels,))

    def _renorm_affine(self, mean: torch.Tensor, var: torch.Tensor):
        """``(r * weight, d * weight + bias)``: the weight and bias that apply the correction."""
        with torch.no_grad():
            dtype = self.renorm_mean.dtype
            mean, var = mean.to(dtype), var.to(dtype)
            stddev = torch.sqrt(var + self.eps)
            # max(renorm_stddev, sqrt(eps)), sqrt taken in the statistics' dtype, as Keras takes it
            floor = torch.sqrt(torch.tensor(float(self.eps), dtype=dtype, device=mean.device))
            renorm_stddev = torch.maximum(self.renorm_stddev, floor)
            r = stddev / renorm_stddev
            d = (mean - self.renorm_mean) / renorm_stddev
            bounds = self.renorm_clipping
            if bounds.get("rmin") is not None:
                r = torch.clamp_min(r, bounds["rmin"])
            if bounds.get("rmax") is not None:
                r = torch.clamp_max(r, bounds["rmax"])
            if bounds.get("dmax") is not None:
                d = torch.clamp(d, -bounds["dmax"], bounds["dmax"])
        if self.weight is None:
            weight, bias = r, d
        else:
            weight, bias = r * self.weight, d * self.weight
        if self.bias is not None:
            bias = bias + self.bias
        return weight, bias

    def _update_renorm(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        """Renorm and running statistics after a batch of ``n`` values per channel (``var`` biased)."""
        conv = self.convention
        with torch.no_grad():
            dtype = self.renorm_mean.dtype
            mean, var = mean.to(dtype), var.to(dtype)
            cumulative = self.momentum is None or self.renorm_momentum is None
            count = int(self.num_batches_tracked) if cumulative else 1  # reading it syncs a GPU stream
            old, new = conv.weights(self.momentum, count)
            renorm_old, renorm_new = conv.weights(self.renorm_momentum, count)
            stddev = torch.sqrt(var + self.eps)
            if conv.unbiased_running_var:
                running = var * (n / (n - 1)) if n > 1 else torch.full_like(var, math.nan)
                running_stddev = torch.sqrt(running + self.eps)
            else:
                running_stddev = stddev
            self.renorm_mean.copy_(self.renorm_mean * renorm_old + mean * renorm_new)
            self.renorm_stddev.copy_(self.renorm_stddev * renorm_old + stddev * renorm_new)
            self.running_mean.copy_(self.running_mean * old + mean * new)
            self.running_stddev.copy_(self.running_stddev * old + running_stddev * new)
            # the variance follows the standard deviation; relu against rounding below 0, as Keras
            self.running_var.copy_(F.relu(self.running_stddev * self.running_stddev - self.eps))

    def _forward_renorm(self, input: torch.Tensor) -> torch.Tensor:
        """A renorm training forward pass (``num_batches_tracked`` already counted)."""
        self._check_dtypes_and_channels(input, True)
        if input.numel() == 0:  # counted, statistics kept, as an empty batch without renorm
            return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        n = input.numel() // input.shape[1]
        compute = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
        dims = [0, *range(2, input.dim())]
        # what Keras computes and PyTorch's kernel refuses (eps <= 0, one value per channel); the
        # torch convention gets PyTorch's refusal from the kernel instead
        if not self.convention.cumulative_average_when_none and (not self.eps > 0 or n == 1):
            x = input.to(compute)
            mean = x.mean(dims, keepdim=True)
            var = (x - mean).square().mean(dims, keepdim=True)  # biased; two passes
            batch_mean, batch_var = mean.detach().reshape(-1), var.detach().reshape(-1)
            weight, bias = self._renorm_affine(batch_mean, batch_var)
            shape = (1, -1, *(1,) * (input.dim() - 2))
            scale = torch.rsqrt(var + self.eps) * weight.to(compute).reshape(shape)
            output = ((x - mean) * scale + bias.to(compute).reshape(shape)).to(input.dtype)
        else:
            with torch.no_grad():  # the correction needs the batch's statistics before normalising
                batch_var, batch_mean = torch.var_mean(input.detach().to(compute), dims, correction=0)
            weight, bias = self._renorm_affine(batch_mean, batch_var)
            output = F.batch_norm(input, None, None, weight, bias, True, 0.0, self.eps)
        self._update_renorm(batch_mean, batch_var, n)
        return output

    def _renorm_repr(self) -> str:
        if not self.renorm:
            return ""
        return f", renorm=True, renorm_clipping={self.renorm_clipping!r}, renorm_momentum={self.renorm_momentum!r}"
