"""Shared PyTorch helpers: find batch norms, their convention, replace modules."""

from __future__ import annotations

import torch
from torch import nn

from bnkit.conventions import TORCH, Convention
from bnkit.torch.frozen import is_batch_norm

_BatchNorm = nn.modules.batchnorm._BatchNorm


def batchnorms(model: nn.Module, *, torchvision_frozen: bool = False) -> list[tuple[str, _BatchNorm]]:
    """``(qualified name, module)`` of every batch norm, the root included (named ``""``); with
    ``torchvision_frozen``, torchvision's ``FrozenBatchNorm2d`` too (no momentum, nothing to update:
    there to fold, not to recalibrate or freeze)."""
    wanted = is_batch_norm if torchvision_frozen else (lambda m: isinstance(m, _BatchNorm))
    return [(name, m) for name, m in model.named_modules() if wanted(m)]


def num_channels(bn: nn.Module) -> int:
    """The channels a batch norm normalises (torchvision's frozen one has no ``num_features``)."""
    return int(bn.running_mean.shape[0]) if getattr(bn, "num_features", None) is None else bn.num_features


def convention_of(bn: nn.Module) -> Convention:
    """A bnkit layer's ``convention``; ``torch.nn`` batch norms follow PyTorch's."""
    return getattr(bn, "convention", TORCH)


def display_name(name: str, bn: nn.Module) -> str:
    return f"{type(bn).__name__} {name!r}" if name else f"{type(bn).__name__} (the model itself)"


def require_running_stats(name: str, bn: _BatchNorm, action: str) -> None:
    if not getattr(bn, "track_running_stats", True) or bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{display_name(name, bn)} has track_running_stats=False: it normalises with batch statistics "
            f"even in eval(), so it has no fixed statistics to {action}"
        )


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` wherever the module at ``name`` is registered inside ``root`` (one module may
    sit under several names, e.g. ``self.bn_alias = self.bn``: ``named_modules()`` gives only the
    first); returns the root (``new`` itself for ``name == ""``)."""
    if not name:
        return new
    old = root.get_submodule(name)
    aliases = [qualname for qualname, m in root.named_modules(remove_duplicate=False) if m is old]
    for alias in aliases:
        parent_name, _, child = alias.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, new)
    return root


def inference_scale_shift(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` of ``bn`` in eval(), in float64.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias = x * scale + shift`` with
    ``scale = weight / sqrt(var + eps)`` and ``shift = bias - mean * scale``.
    """
    mean = bn.running_mean.detach().double()
    var = bn.running_var.detach().double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift
