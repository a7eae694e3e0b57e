r"""Frozen batch normalization: a batch norm whose statistics and affine never change.

:class:`FrozenBatchNorm1d`, :class:`FrozenBatchNorm2d` and :class:`FrozenBatchNorm3d` subclass
``torch.nn.BatchNorm1d/2d/3d`` and keep their ``state_dict`` layout (``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked``), so a checkpoint of the unfrozen
model loads into the frozen one and back. ``weight`` and ``bias`` are *buffers*: no optimizer
sees them and ``model.requires_grad_(True)`` cannot bring them back to life. Nothing is
updated by a forward pass, in ``train()`` or ``eval()``; the gradient with respect to the
input still flows.

What a frozen layer computes in ``train()`` is the one choice left, ``batch_stats_in_train``:

* ``False`` (Keras ``trainable=False``, torchvision's ``FrozenBatchNorm2d``): always the running
  statistics, ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``;
* ``True`` (PyTorch ``requires_grad=False`` with the statistics frozen as well): in ``train()``
  the batch's mean and biased variance, as an unfrozen layer would, but the running statistics
  stay as they are; in ``eval()`` the running statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnkit.checks import check_bn_input
from bnkit.conventions import TORCH
from bnkit.torch.batchnorm import _ConventionBatchNorm

__all__ = [
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "is_batch_norm",
    "is_torchvision_frozen",
]

# torchvision's frozen batch norm (detection backbones, norm_layer=FrozenBatchNorm2d): its weight, bias,
# running_mean and running_var are buffers, it has no momentum, and it always computes
# x * weight / sqrt(running_var + eps) + (bias - running_mean * weight / sqrt(running_var + eps)), i.e.
# FrozenBatchNorm2d(batch_stats_in_train=False). Named, not imported: bnkit does not import torchvision.
TORCHVISION_FROZEN = "torchvision.ops.misc.FrozenBatchNorm2d"


def is_torchvision_frozen(module) -> bool:
    """Whether ``module`` is torchvision's ``FrozenBatchNorm2d`` (or a subclass), without importing it."""
    return any(f"{cls.__module__}.{cls.__qualname__}" == TORCHVISION_FROZEN for cls in type(module).__mro__)


def is_batch_norm(module) -> bool:
    """A batch norm with fixed statistics to read: ``torch.nn``'s and bnkit's, torchvision's frozen one."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or is_torchvision_frozen(module)


class FrozenBatchNorm(_ConventionBatchNorm):
    """A batch norm that never updates; any input rank from 2 to 5 (channel axis 1)."""

    _ranks = (2, 3, 4, 5)

    def __init__(
        self,
        num_features: int,
        eps: float | None = None,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        convention="torch",
        batch_stats_in_train: bool = False,
    ) -> None:
        super().__init__(
            num_features, eps, affine=affine, track_running_stats=True, device=device, dtype=dtype,
            convention=convention,
        )
        if not isinstance(batch_stats_in_train, bool):
            raise TypeError(f"batch_stats_in_train must be a bool, got {batch_stats_in_train!r}")
        self.batch_stats_in_train = batch_stats_in_train
        if affine:
            # parameters -> buffers with the same state_dict keys, in torch.nn's order
            tensors = {"weight": self.weight.detach(), "bias": self.bias.detach()}
            del self.weight, self.bias
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                tensors[name] = self._buffers.pop(name)
            for name, tensor in tensors.items():
                self.register_buffer(name, tensor)

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm, *, batch_stats_in_train: bool = False):
        """A frozen copy of ``bn``: same eps, momentum, convention, statistics and affine."""
        if not bn.track_running_stats or bn.running_mean is None:
            raise ValueError(
                f"{type(bn).__name__}({bn.num_features}) has track_running_stats=False: it has no "
                "running statistics to freeze"
            )
        if cls is FrozenBatchNorm:
            cls = _frozen_class_for(bn)
        frozen = cls(
            bn.num_features,
            bn.eps,
            affine=bn.weight is not None,
            device=bn.running_mean.device,
            dtype=bn.running_mean.dtype,
            convention=getattr(bn, "convention", TORCH),
            batch_stats_in_train=batch_stats_in_train,
        )
        frozen.momentum = bn.momentum  # kept in the layer's own meaning, unused while frozen
        with torch.no_grad():
            for name in ("weight", "bias"):
                value = getattr(bn, name)
                if value is not None:
                    getattr(frozen, name).copy_(value.detach())
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            frozen.num_batches_tracked.copy_(bn.num_batches_tracked)
        frozen.train(bn.training)
        return frozen

    @property
    def uses_batch_stats(self) -> bool:
        return self.training and self.batch_stats_in_train

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        use_batch = self.uses_batch_stats
        check_bn_input(
            self._name(), input.shape, str(input.dtype), input.is_floating_point(),
            ranks=self._ranks, num_features=self.num_features, uses_batch_stats=use_batch,
        )
        return F.batch_norm(
            input,
            None if use_batch else self.running_mean,
            None if use_batch else self.running_var,
            self.weight,
            self.bias,
            use_batch,  # with no running buffers given, nothing is updated
            0.0,
            self.eps,
        )

    def _name(self) -> str:
        return f"{type(self).__name__}({self.num_features}, convention={self.convention.name!r})"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, batch_stats_in_train={self.batch_stats_in_train}"


class FrozenBatchNorm1d(FrozenBatchNorm, nn.BatchNorm1d):
    """Frozen batch normalization over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input."""

    _ranks = (2, 3)


class FrozenBatchNorm2d(FrozenBatchNorm, nn.BatchNorm2d):
    """Frozen batch normalization over a 4D ``(N, C, H, W)`` input."""

    _ranks = (4,)


class FrozenBatchNorm3d(FrozenBatchNorm, nn.BatchNorm3d):
    """Frozen batch normalization over a 5D ``(N, C, D, H, W)`` input."""

    _ranks = (5,)


def _frozen_class_for(bn: nn.Module) -> type[FrozenBatchNorm]:
    for base, frozen in (
        (nn.BatchNorm1d, FrozenBatchNorm1d),
        (nn.BatchNorm2d, FrozenBatchNorm2d),
        (nn.BatchNorm3d, FrozenBatchNorm3d),
    ):
        if isinstance(bn, base):
            return frozen
    return FrozenBatchNorm
