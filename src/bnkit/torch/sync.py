r"""Synchronised batch normalization over a ``torch.distributed`` process group, on CPU or GPU.

:class:`SyncBatchNorm` normalises each process's slice of a batch with the statistics of the
whole batch, the slices of every process in the group together:

.. math::

    n = \sum_r n_r,\quad \mu = \frac{1}{n}\sum_r n_r \mu_r,\quad
    \sigma^2 = \frac{1}{n}\sum_r \left(M_{2,r} + n_r (\mu_r - \mu)^2\right)

where rank ``r`` holds ``n_r`` values per channel with mean ``mu_r`` and sum of squared
deviations ``M2_r`` (Chan et al.'s exact parallel merge, in float64). Ranks may hold different
batch sizes, including none at all (``N = 0``). One ``all_gather`` of ``(n_r, mu_r, M2_r)``
carries the forward; the backward

.. math::

    \frac{\partial L}{\partial x} = \frac{\gamma}{\sqrt{\sigma^2+\epsilon}}\left(
    \frac{\partial L}{\partial y} - \frac{1}{n}\sum \frac{\partial L}{\partial y}
    - \hat{x}\,\frac{1}{n}\sum \frac{\partial L}{\partial y}\hat{x}\right)

needs one ``all_reduce`` of the two per-channel sums. ``weight`` and ``bias`` get this process's
own contribution (``sum(dy * xhat)`` and ``sum(dy)`` over its slice), as ``torch.nn.SyncBatchNorm``
gives them: ``DistributedDataParallel`` (or an ``all_reduce``) sums them across processes.
All communication goes through ``torch.distributed`` collectives, so gloo (CPU) and NCCL (GPU)
both work; ``torch.nn.SyncBatchNorm`` refuses CPU tensors. Every process must run the layer's
forward and backward, as with any collective.

Without an initialised process group (or with one process) the layer is a plain batch norm.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from bnkit.conventions import TORCH
from bnkit.torch._renorm import RENORM_BUFFERS, RENORM_DEFAULT
from bnkit.torch.batchnorm import DEFAULT, _ConventionBatchNorm

__all__ = ["SyncBatchNorm", "convert_sync", "group_moments", "merge_moments"]


def merge_moments(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor):
    """Merge per-part ``(n_r,)``, ``(R, C)`` means and ``(R, C)`` M2 into ``(n, mean, M2)`` exactly."""
    total = counts.sum()
    weights = counts.reshape(-1, 1)
    if total == 0:
        return total, torch.zeros_like(means[0]), torch.zeros_like(m2s[0])
    mean = (weights * means).sum(0) / total
    m2 = m2s.sum(0) + (weights * (means - mean).square()).sum(0)
    return total, mean, m2


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def world_size(group=None) -> int:
    """Processes in ``group`` (the default group for None); 1 without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _local_row(values: torch.Tensor, dims) -> torch.Tensor:
    """``(n, mean..., M2...)`` of this process's values in float64 (two-pass within the batch)."""
    channels = math.prod(s for i, s in enumerate(values.shape) if i not in dims)
    row = torch.zeros(1 + 2 * channels, dtype=torch.float64, device=values.device)
    n_local = math.prod(values.shape[d] for d in dims)
    if n_local > 0:
        var, mean = torch.var_mean(values.to(torch.float64), dim=dims, correction=0)
        row[0] = n_local
        row[1 : 1 + channels] = mean.reshape(-1)
        row[1 + channels :] = var.reshape(-1) * n_local
    return row


class _GroupMoments(torch.autograd.Function):
    """Mean and biased variance of the values of every process in the group, with their gradient."""

    @staticmethod
    def forward(ctx, input, dims, group):
        values = input.detach().to(_compute_dtype(input))
        row = _local_row(values, dims)
        rows = [torch.empty_like(row) for _ in range(world_size(group))]
        dist.all_gather(rows, row, group=group)
        table = torch.stack(rows)
        c = (row.numel() - 1) // 2
        count, mean, m2 = merge_moments(table[:, 0], table[:, 1 : 1 + c], table[:, 1 + c :])
        var = m2 / count if count > 0 else m2
        kept = [s for i, s in enumerate(input.shape) if i not in dims]
        mean_out, var_out = mean.to(values.dtype).reshape(kept), var.to(values.dtype).reshape(kept)
        ctx.save_for_backward(values, mean_out)
        ctx.dims, ctx.group, ctx.count, ctx.input_dtype = dims, group, count, input.dtype
        return mean_out, var_out, count

    @staticmethod
    def backward(ctx, grad_mean, grad_var, _grad_count):
        values, mean = ctx.saved_tensors
        # every process's loss depends on the group's statistics: sum their gradients first
        grads = torch.cat([grad_mean.reshape(-1), grad_var.reshape(-1)]).to(torch.float64)
        dist.all_reduce(grads, op=dist.ReduceOp.SUM, group=ctx.group)
        c = mean.numel()
        shape = [1 if i in ctx.dims else s for i, s in enumerate(values.shape)]
        count = float(ctx.count)
        g_mean = (grads[:c] / count).to(values.dtype).reshape(shape)
        g_var = (grads[c:] * (2.0 / count)).to(values.dtype).reshape(shape)
        grad_input = g_mean + g_var * (values - mean.reshape(shape))
        return grad_input.to(ctx.input_dtype), None, None


def group_moments(input: torch.Tensor, dims, group=None):
    """``(mean, var, count)`` over ``dims`` of ``input`` on every process of ``group`` together.

    ``var`` is biased; ``count`` the number of values per channel in the group (a float64 tensor).
    Differentiable: the backward sums the gradients of the statistics over the group (one
    ``all_reduce``), as every process's loss depends on them. Every process must call it. With no
    process group (or one process), it is computed locally without communication.
    """
    dims = sorted(d % input.dim() for d in dims)
    if world_size(group) == 1:
        values = input.to(_compute_dtype(input))
        var, mean = torch.var_mean(values, dim=dims, correction=0)
        count = torch.tensor(float(math.prod(input.shape[d] for d in dims)), dtype=torch.float64)
        return mean, var, count
    return _GroupMoments.apply(input, dims, group)


class _SyncNormalize(torch.autograd.Function):
    """``y = (x - mean) * invstd * weight + bias`` with ``mean``/``invstd`` of the whole group."""

    @staticmethod
    def forward(ctx, input, weight, bias, mean, invstd, count, group):
        cd = _compute_dtype(input)
        xhat = (input.to(cd) - mean.to(cd).reshape(1, -1, *(1,) * (input.ndim - 2))) * invstd.to(cd).reshape(
            1, -1, *(1,) * (input.ndim - 2)
        )
        shape = (1, -1, *(1,) * (input.ndim - 2))
        out = xhat
        if weight is not None:
            out = out * weight.to(cd).reshape(shape)
        if bias is not None:
            out = out + bias.to(cd).reshape(shape)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.count, ctx.group, ctx.input_dtype, ctx.has_bias = count, group, input.dtype, bias is not None
        return out.to(input.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        xhat, weight, invstd = ctx.saved_tensors
        cd = xhat.dtype
        shape = (1, -1, *(1,) * (xhat.ndim - 2))
        dims = [0, *range(2, xhat.ndim)]
        dy = grad_output.to(cd)
        sum_dy = dy.sum(dims, dtype=torch.float64)
        sum_dy_xhat = (dy * xhat).sum(dims, dtype=torch.float64)
        grad_input = grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_dy_xhat.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(weight.dtype if weight is not None else cd)
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
            c = xhat.shape[1]
            mean_dy = (sums[:c] / ctx.count).to(cd).reshape(shape)
            mean_dy_xhat = (sums[c:] / ctx.count).to(cd).reshape(shape)
            scale = invstd.to(cd)
            if weight is not None:
                scale = scale * weight.to(cd)
            grad_input = (scale.reshape(shape) * (dy - mean_dy - xhat * mean_dy_xhat)).to(ctx.input_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None


class SyncBatchNorm(_ConventionBatchNorm, nn.SyncBatchNorm):
    """Batch norm with statistics over all processes of ``process_group``; any input rank from 2.

    A ``torch.nn.SyncBatchNorm`` (it subclasses it) with the same arguments, ``bias`` and
    ``process_group`` included, plus bnkit's keyword-only ``convention`` (``"torch"``: unbiased
    running variance, momentum weighs the new value; ``"keras"``: biased, momentum weighs the
    old value). The running statistics are updated from the group's statistics, identically on
    every process. Only ``train()`` communicates: in ``eval()`` (even with
    ``track_running_stats=False``) each process normalises on its own, as
    ``torch.nn.SyncBatchNorm`` does. Unlike it, CPU tensors (gloo) synchronise too. With
    ``renorm=True`` (batch renormalization, see :class:`bnkit.torch.BatchNorm2d`) the correction
    ``r``, ``d`` is computed from the group's statistics, identically on every process.
    """

    _ranks = None

    def __init__(
        self,
        num_features: int,
        eps: float | None = None,
        momentum=DEFAULT,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        convention="torch",
        renorm: bool = False,
        renorm_clipping: dict | None = None,
        renorm_momentum=RENORM_DEFAULT,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias, convention=convention,
            renorm=renorm, renorm_clipping=renorm_clipping, renorm_momentum=renorm_momentum,
        )
        self.process_group = process_group

    def _world_size(self) -> int:
        return world_size(self.process_group)

    def _check_non_zero_input_channels(self, input: torch.Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError(f"{self._name()}: SyncBatchNorm number of input channels should be non-zero, "
                             f"got input shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # torch.nn.SyncBatchNorm's checks first, then, as there, only training synchronises: an
        # eval() forward on one rank alone (validation on rank 0) must not wait for the others,
        # so without running statistics eval() normalises with this rank's batch
        if not isinstance(input, torch.fx.Proxy):
            self._check_input_dim(input)
            self._check_non_zero_input_channels(input)
        if not self.training or self._world_size() == 1:
            return super().forward(input)
        if self.track_running_stats and self.running_mean is not None:
            self.num_batches_tracked.add_(1)  # counted before any refusal, as torch.nn counts it
        try:
            self._check_dtype_and_channels(input)
        except (RuntimeError, ValueError) as error:
            raise self._clearer_error(error, input) or error from None
        count, mean, m2 = self._group_moments(input)
        if count <= 1 and self.convention.unbiased_running_var:
            raise ValueError(
                f"{self._name()}: expected more than 1 value per channel when training across the "
                f"process group, got {int(count)} in total (this process: input shape {tuple(input.shape)})"
            )
        # one value in the whole group (Keras convention): variance 0, the output is beta, as in Keras
        var = m2 / count if count > 0 else m2
        invstd = torch.rsqrt(var + self.eps)
        weight, bias = self.weight, self.bias
        if self.renorm:  # the group's statistics, corrected by the group's r and d on every process
            weight, bias = self._renorm_affine(mean, var)
            if count > 0:
                self._update_renorm(mean, var, float(count))
        elif self.track_running_stats and self.running_mean is not None and count > 0:
            self._update_group_running(mean, m2, count)
        return _SyncNormalize.apply(input, weight, bias, mean, invstd, count, self.process_group)

    def _check_dtype_and_channels(self, input: torch.Tensor) -> None:
        """What PyTorch's kernel would refuse, before the collective (every rank must call it)."""
        if not input.is_floating_point():
            raise NotImplementedError(f'"batch_norm" not implemented for {input.dtype}')
        for t in (self.weight, self.bias, self.running_mean):
            if t is not None and t.numel() != input.shape[1]:
                raise RuntimeError(f"running_mean should contain {input.shape[1]} elements not {t.numel()}")

    def _group_moments(self, input: torch.Tensor):
        c = self.num_features
        n_local = input.numel() // c if c else 0
        row = torch.zeros(1 + 2 * c, dtype=torch.float64, device=input.device)
        if n_local > 0:
            with torch.no_grad():
                dims = [0, *range(2, input.ndim)]
                values = input.detach().to(_compute_dtype(input))
                var_l, mean_l = torch.var_mean(values, dim=dims, correction=0)
            row[0] = n_local
            row[1 : 1 + c] = mean_l.double()
            row[1 + c :] = var_l.double() * n_local
        rows = [torch.empty_like(row) for _ in range(self._world_size())]
        dist.all_gather(rows, row, group=self.process_group)
        table = torch.stack(rows)
        return merge_moments(table[:, 0], table[:, 1 : 1 + c], table[:, 1 + c :])

    def _update_group_running(self, mean: torch.Tensor, m2: torch.Tensor, count: torch.Tensor) -> None:
        with torch.no_grad():
            n = float(count)
            var = m2 / (n - 1) if self.convention.unbiased_running_var else m2 / n
            old, new = self.convention.weights(self.momentum, int(self.num_batches_tracked))
            dtype = self.running_mean.dtype
            self.running_mean.copy_(self.running_mean * old + mean.to(dtype) * new)
            self.running_var.copy_(self.running_var * old + var.to(dtype) * new)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """:func:`convert_sync`: every batch norm in ``module`` becomes a bnkit :class:`SyncBatchNorm`.

        As ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, keeping each layer's ``convention``
        (``torch`` for ``torch.nn`` layers); returns ``module``, or the new layer when ``module``
        is a batch norm itself.
        """
        return convert_sync(module, process_group)


def convert_sync(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every batch norm in ``module`` by a :class:`SyncBatchNorm`, in place; returns the module.

    ``torch.nn`` batch norms (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``) and bnkit's layers are
    converted keeping ``eps``, ``momentum``, ``convention`` (``torch`` for ``torch.nn`` layers), renorm,
    the ``training`` flag and the state: the new layer holds the *same* ``weight`` and ``bias``
    parameters (an optimizer built before still updates them) and running buffers; a
    ``torch.nn.SyncBatchNorm`` keeps its ``process_group`` when none is given. Frozen batch
    norms (:mod:`bnkit.torch.frozen`) never use batch statistics across processes and are left.
    """
    from bnkit.torch.frozen import FrozenBatchNorm

    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, (SyncBatchNorm, FrozenBatchNorm)
    ):
        sync = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            # a torch.nn.SyncBatchNorm keeps the group it was built for, unless one is given
            process_group if process_group is not None else getattr(module, "process_group", None),
            bias=module.bias is not None,
            convention=getattr(module, "convention", TORCH),
            renorm=getattr(module, "renorm", False),
            renorm_clipping=getattr(module, "renorm_clipping", None),
            renorm_momentum=getattr(module, "renorm_momentum", RENORM_DEFAULT),
        )
        if module.weight is not None:
            sync.weight = module.weight
        if module.bias is not None:
            sync.bias = module.bias
        renorm_buffers = RENORM_BUFFERS if sync.renorm else ()
        for name in ("running_mean", "running_var", "num_batches_tracked", *renorm_buffers):
            setattr(sync, name, getattr(module, name))
        sync.train(module.training)
        if hasattr(module, "qconfig"):
            sync.qconfig = module.qconfig
        return sync
    for name, child in module.named_children():
        module.add_module(name, convert_sync(child, process_group))
    return module
