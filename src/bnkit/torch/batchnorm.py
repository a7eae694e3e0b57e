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

Batch renormalization (keyword-only ``renorm=True``, ``renorm_clipping``, ``renorm_momentum``; Keras 3's
``BatchNormalization(renorm=True)`` in the Keras convention, the same algorithm with momenta read PyTorch's
way in the torch one) corrects the training output by ``r`` and ``d`` and keeps three more buffers,
``running_stddev``, ``renorm_mean``, ``renorm_stddev``; ``eval()`` is plain batch norm. Formulas in
:mod:`bnkit.torch._renorm` and :mod:`bnkit.reference`.

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
statistics as they are, as in ``torch.nn``, in both conventions (Keras' own layer turns its moving
statistics to NaN there, a mean over no values: deliberately not copied).

Arguments and errors. In the torch convention a layer takes every argument ``torch.nn`` takes and
fails where, when and with the exception type ``torch.nn`` fails: ``eps=0`` builds and runs in
``eval()`` and is refused by a training forward (``ValueError``); ``momentum`` is not
range-checked (``bnkit lint`` flags ``eps <= 0`` and ``momentum`` outside [0, 1]);
``num_batches_tracked`` is counted before a batch with one value per channel is refused. bnkit's
messages name the layer, and its exception classes derive from ``torch.nn``'s type and the
clearer one: a wrong channel count raises :class:`~bnkit.checks.ChannelMismatchError`
(``RuntimeError`` and ``ValueError``), a float64 input to a float32 layer
:class:`~bnkit.checks.DtypeMismatchError` (``RuntimeError`` and ``TypeError``), an integer input
:class:`~bnkit.checks.NonFloatingInputError` (``NotImplementedError`` and ``TypeError``).
In the Keras convention ``eps`` and ``momentum`` are read with ``float()`` as Keras reads them,
and what Keras computes is computed: a training batch with one value per channel gives ``beta``
(its variance is 0), ``eps <= 0`` divides by ``sqrt(var + eps)`` as written. Either way dtypes and
devices follow PyTorch's rules (the layer is a PyTorch layer).

``torch.compile``, ``torch.export`` and ``torch.jit.trace`` take these layers;
``torch.jit.script`` does not (the ``convention`` attribute is not a TorchScript type).
``torch.fx.symbolic_trace`` keeps only ``torch.nn``'s own layers as leaves and traces into
these, which in training loses the in-place running update (and, in the Keras convention,
stops at a branch on the input's layout): trace with :func:`bnkit.torch.tracing.symbolic_trace`,
which keeps every batch norm a ``call_module`` node.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from bnkit import kernels
from bnkit.checks import (
    ChannelMismatchError,
    DtypeMismatchError,
    NonFloatingInputError,
    NumFeaturesError,
    check_bn_rank,
)
from bnkit.conventions import TORCH, Convention, get_convention
from bnkit.torch._renorm import RENORM_DEFAULT, RenormMixin

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "DEFAULT",
]


class _Default:
    """Marks an argument left out, so that ``momentum=None`` stays meaningful."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()

_FLOATING = "float16, bfloat16, float32 or float64"


def _settings(conv: Convention, layer: str, num_features, eps, momentum):
    """``(num_features, eps, momentum)`` with the convention's defaults filled in.

    Conventions with PyTorch's cumulative average (``momentum=None``) take ``eps`` and ``momentum``
    as ``torch.nn`` does, unchecked (a bad value fails in the forward pass, as there); the others
    read them with ``float()``, as Keras does.
    """
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
        kind = type(num_features).__name__
        raise TypeError(f"{layer}: num_features must be an int (the channel count), got {kind} {num_features!r}")
    if num_features < 0:
        raise NumFeaturesError(f"{layer}: num_features must be 0 or more (the channel count), got {num_features!r}")
    eps = conv.eps if eps is None else eps
    momentum = conv.momentum if isinstance(momentum, _Default) else momentum
    if conv.cumulative_average_when_none:
        return int(num_features), eps, momentum
    if momentum is None:
        conv.check_momentum(None)  # the message says why and what to give instead
    for name, value in (("eps", eps), ("momentum", momentum)):
        try:
            float(value)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{layer}: {name} must be a float, got {type(value).__name__} {value!r}") from None
    return int(num_features), float(eps), float(momentum)


def _per_channel_count(shape) -> int:
    """Values per channel of an ``(N, C, ...)`` shape, as ``torch.nn`` counts them."""
    return shape[0] * math.prod(shape[2:])


class _ConventionBatchNorm(RenormMixin, nn.modules.batchnorm._BatchNorm):
    """Adds ``convention`` and batch renormalization to ``torch.nn``'s batch norm; subclasses fix the input rank."""

    _ranks: tuple[int, ...] | None = ()  # None: any rank from 2 (SyncBatchNorm)

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
        renorm: bool = False,
        renorm_clipping: dict | None = None,
        renorm_momentum=RENORM_DEFAULT,
    ) -> None:
        layer = type(self).__name__
        try:
            conv = get_convention(convention)
            num_features, eps, momentum = _settings(conv, layer, num_features, eps, momentum)
        except ValueError as error:
            if str(error).startswith(layer):
                raise
            raise type(error)(f"{layer}: {error}") from None
        # keywords from device on: torch.nn.SyncBatchNorm has process_group in sixth place
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, bias=bias
        )
        self.convention = conv
        self._init_renorm(renorm, renorm_clipping, renorm_momentum, {"device": device, "dtype": dtype})

    @property
    def _native_update(self) -> bool:
        """True when PyTorch's own running update is this convention's."""
        c = self.convention
        native = c.momentum_weighs == "new" and c.unbiased_running_var and c.cumulative_average_when_none
        return native and not self.renorm

    def _check_input_dim(self, input: torch.Tensor) -> None:
        # the rank only, as torch.nn: everything else is found later, in torch.nn's order
        if isinstance(input, torch.fx.Proxy):  # symbolic tracing: no concrete shape to check
            return
        check_bn_rank(self._name(), input.shape, self._ranks)

    def _name(self) -> str:
        return f"{type(self).__name__}({self.num_features}, convention={self.convention.name!r})"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # CUDA, where measured to win (bnkit.kernels), for inputs torch.nn takes
        if kernels.use_triton(input, kernels.mode_of(self)) and self._fast_path_takes(input):
            return kernels.batch_norm(self, input)
        try:
            if self._native_update:
                # torch.nn's forward (not SyncBatchNorm's: bnkit's synchronises itself), its checks in its order
                return nn.modules.batchnorm._BatchNorm.forward(self, input)
            return self._forward_own_update(input)
        except (ValueError, RuntimeError) as error:  # NotImplementedError is a RuntimeError
            clearer = self._clearer_error(error, input)
            if clearer is None:
                raise
            raise clearer from None

    def _fast_path_takes(self, input: torch.Tensor) -> bool:
        """True for an input without any of the problems PyTorch reports: the Triton kernels check none,
        so any other input takes PyTorch's path, which raises what torch.nn raises, when it raises it."""
        shape = input.shape
        if self._ranks is None:
            if len(shape) < 2:
                return False
        elif len(shape) not in self._ranks:
            return False
        if shape[1] != self.num_features:
            return False
        eps, momentum = self.eps, self.momentum
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
            return False
        if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, numbers.Real)):
            return False
        if (self.training or self.running_mean is None) and _per_channel_count(shape) == 1:
            return False
        if self.renorm and self.training:  # the kernels know no renorm correction
            return False
        reference = self.weight if self.weight is not None else self.running_mean
        return reference is None or reference.dtype in (input.dtype, torch.float32)

    def _forward_own_update(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
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
            if self.renorm:
                return self._forward_renorm(input)
        if not self.eps > 0 or (use_batch_stats and input.numel() > 0 and _per_channel_count(input.shape) == 1):
            # what Keras computes and PyTorch's kernel refuses: eps <= 0, or a variance of 0 from one value
            return self._forward_as_written(input, use_batch_stats, updates and input.numel() > 0)
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
        if not self.convention.unbiased_running_var:
            n = input.numel() // self.num_features
            # biased variance = unbiased * (n - 1) / n, on the tensor: folded into the update's
            # weight as (1 - m) * (n - 1) / n, it made torch.compile fail once Dynamo treats the
            # momentum as a symbolic float (a guard that rounds the product differently)
            batch_var = batch_var * ((n - 1) / n)
        self._update_running(batch_mean, batch_var)
        return output

    def _update_running(self, batch_mean: torch.Tensor, batch_var: torch.Tensor) -> None:
        """``run = old * run + new * batch``, in place, in this layer's convention."""
        # The count matters only to the cumulative average; reading it syncs a GPU stream.
        count = int(self.num_batches_tracked) if self.momentum is None else 1
        old, new = self.convention.weights(self.momentum, count)
        # Nothing here requires grad, so autograd records none of it.
        self.running_mean.mul_(old).add_(batch_mean, alpha=new)
        self.running_var.mul_(old).add_(batch_var, alpha=new)

    def _forward_as_written(self, input: torch.Tensor, use_batch_stats: bool, updates: bool) -> torch.Tensor:
        """``(x - mean) * (rsqrt(var + eps) * gamma) + beta`` term by term, as Keras computes it.

        With one value per channel ``x - mean`` is exactly 0 and the variance 0: the output is
        ``beta`` (NaN when ``eps`` is 0 too), and the gradient reaching ``x`` is 0, as in Keras.
        """
        self._check_dtypes_and_channels(input, use_batch_stats)
        compute = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
        x = input.to(compute)
        dims = [0, *range(2, input.dim())]
        shape = (1, -1, *(1,) * (input.dim() - 2))
        if use_batch_stats:
            mean = x.mean(dims, keepdim=True)
            var = (x - mean).square().mean(dims, keepdim=True)  # biased; two passes
            if updates:
                n = _per_channel_count(input.shape)
                batch_var = var.detach().reshape(-1)
                if self.convention.unbiased_running_var:
                    batch_var = batch_var * (n / (n - 1)) if n > 1 else torch.full_like(batch_var, math.nan)
                dtype = self.running_mean.dtype
                self._update_running(mean.detach().reshape(-1).to(dtype), batch_var.to(dtype))
        else:
            mean = self.running_mean.to(compute).reshape(shape)
            var = self.running_var.to(compute).reshape(shape)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(compute).reshape(shape)
        output = (x - mean) * scale
        if self.bias is not None:
            output = output + self.bias.to(compute).reshape(shape)
        return output.to(input.dtype)

    def _check_dtypes_and_channels(self, input: torch.Tensor, use_batch_stats: bool) -> None:
        """What PyTorch's kernel refuses, for the paths that do not run it."""
        if not input.is_floating_point():
            raise NotImplementedError(f'"batch_norm" not implemented for {input.dtype}')
        per_channel = [t for t in (self.weight, self.bias) if t is not None]
        if not use_batch_stats:
            per_channel += [self.running_mean, self.running_var]
        for t in per_channel:
            if t.numel() != input.shape[1]:
                raise RuntimeError(f"running_mean should contain {input.shape[1]} elements not {t.numel()}")
            allowed = (input.dtype, torch.float32) if input.dtype in (torch.float16, torch.bfloat16) else (input.dtype,)
            if t.dtype not in allowed:
                raise RuntimeError("mixed dtype: the input's and the layer's dtypes differ")

    def _clearer_error(self, error: Exception, input) -> Exception | None:
        """bnkit's words for an error PyTorch raised, of a class deriving from PyTorch's; or None."""
        if not isinstance(input, torch.Tensor):
            return None
        text, name, shape = str(error), self._name(), tuple(input.shape)
        if type(error) is ValueError:
            if text.startswith("Expected more than 1 value per channel when training"):
                return ValueError(
                    f"{name}: expected more than 1 value per channel when training (batch statistics), "
                    f"got input shape {shape}; use a larger batch or call .eval()"
                )
            if text.startswith("batch_norm eps must be positive"):
                return ValueError(
                    f"{name}: eps must be positive during training (batch statistics), got eps={self.eps!r}"
                )
            if text.startswith("batch_norm eps must be non-negative"):
                return ValueError(f"{name}: eps must be non-negative, got eps={self.eps!r}")
            return None
        if type(error) is NotImplementedError and '"batch_norm" not implemented for' in text:
            return NonFloatingInputError(
                f"{name}: expected a floating-point input ({_FLOATING}), got dtype {input.dtype}; "
                "cast it first, e.g. x.float()"
            )
        if type(error) is not RuntimeError or len(shape) < 2:
            return None
        if "should contain" in text and shape[1] != self.num_features:
            return ChannelMismatchError(
                f"{name}: expected {self.num_features} channels on axis 1, got {shape[1]} (input shape {shape})"
            )
        if "mixed dtype" in text or "expected scalar type" in text:
            held = self.weight if self.weight is not None else self.running_mean
            held_dtype = held.dtype if held is not None else None
            return DtypeMismatchError(
                f"{name}: input of dtype {input.dtype} for a layer whose parameters and buffers are "
                f"{held_dtype}; cast one to the other (x.to({held_dtype}) or layer.to({input.dtype})). "
                "Only a float16 or bfloat16 input may meet float32 parameters."
            )
        return None

    def extra_repr(self) -> str:
        # torch.nn's own text in the torch convention: a drop-in prints as torch.nn does
        if self.convention == TORCH:
            return super().extra_repr() + self._renorm_repr()
        return f"{super().extra_repr()}, convention={self.convention.name!r}{self._renorm_repr()}"


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


class _LazyConventionBatchNorm:
    """``torch.nn``'s lazy batch norm (``num_features`` from the first input) with a ``convention``.

    Mixed in before a ``torch.nn.LazyBatchNorm*d`` and the bnkit layer it becomes on its first
    forward pass (``cls_to_become``).
    """

    def __init__(
        self,
        eps: float | None = None,
        momentum: float | None | _Default = DEFAULT,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        convention: str | Convention = "torch",
        renorm: bool = False,
        renorm_clipping: dict | None = None,
        renorm_momentum=RENORM_DEFAULT,
    ) -> None:
        layer = type(self).__name__
        try:
            conv = get_convention(convention)
            _, eps, momentum = _settings(conv, layer, 0, eps, momentum)
        except ValueError as error:
            if str(error).startswith(layer):
                raise
            raise type(error)(f"{layer}: {error}") from None
        super().__init__(eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.convention = conv
        factory_kwargs = {"device": device, "dtype": dtype}
        self._init_renorm(renorm, renorm_clipping, renorm_momentum, factory_kwargs, lazy=True)

    def initialize_parameters(self, input) -> None:
        if self.has_uninitialized_params():
            self._materialize_renorm(input.shape[1])
        super().initialize_parameters(input)


class LazyBatchNorm1d(_LazyConventionBatchNorm, nn.LazyBatchNorm1d, BatchNorm1d):
    """:class:`BatchNorm1d` whose ``num_features`` is ``input.size(1)`` of its first input."""

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_LazyConventionBatchNorm, nn.LazyBatchNorm2d, BatchNorm2d):
    """:class:`BatchNorm2d` whose ``num_features`` is ``input.size(1)`` of its first input."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_LazyConventionBatchNorm, nn.LazyBatchNorm3d, BatchNorm3d):
    """:class:`BatchNorm3d` whose ``num_features`` is ``input.size(1)`` of its first input."""

    cls_to_become = BatchNorm3d
