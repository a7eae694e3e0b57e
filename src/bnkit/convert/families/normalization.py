"""Batch normalization, both ways, training semantics included.

``keras.layers.BatchNormalization`` / ``bnkit.keras.BatchNormalization`` ⇄ ``nn.BatchNorm1d/2d/3d``,
``nn.SyncBatchNorm`` and bnkit's PyTorch batch norms (plain, sync, frozen, fused with a ReLU).
With ``semantics="source"`` the target is bnkit's layer with the source framework's convention
(so training updates the statistics as the source did); with ``"target"`` the target
framework's native layer, momentum translated (``1 - m``). ``eps`` is always copied.
``center``/``scale`` ⇄ ``affine``/``bias``; Keras' ``center`` without ``scale`` becomes a frozen
PyTorch weight of ones, which converts back to ``scale=False``.

Batch renormalization (``renorm=True``) has no ``torch.nn`` layer: it becomes bnkit's batch norm with
``renorm=True`` and the renorm state (``moving_stddev``, ``renorm_mean``, ``renorm_stddev`` ⇄ the
buffers ``running_stddev``, ``renorm_mean``, ``renorm_stddev``), in the torch convention (both
momenta translated) where ``semantics="target"``. ``synchronized=True`` ⇄ ``bnkit.torch.SyncBatchNorm``
(``torch.nn.SyncBatchNorm`` converts to ``synchronized=True`` too); on a Keras backend other than
TensorFlow the synchronised Keras layer is bnkit's, which synchronises over ``torch.distributed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bnkit.conventions import KERAS, TORCH, Convention, translate_momentum
from bnkit.convert.registry import from_keras, from_torch
from bnkit.convert.values import Constant, KerasValue, TorchValue, call_with_weights, keras_array, torch_array
from bnkit.keras import BatchNormalization as BnkitKerasBN
from bnkit.keras import keras
from bnkit.renorm import STATE_NAMES
from bnkit.torch.batchnorm import _ConventionBatchNorm
from bnkit.torch.frozen import FrozenBatchNorm
from bnkit.torch.fused import BatchNormAct2d, BatchNormAddAct2d
from bnkit.torch.sync import SyncBatchNorm as BnkitSyncBatchNorm

if TYPE_CHECKING:
    from bnkit.convert.keras_walker import KerasToTorch
    from bnkit.convert.torch_walker import TorchToKeras

L = keras.layers


def _channels_at_dim_1(b: KerasToTorch, x: TorchValue, axis: int) -> TorchValue:
    """``x`` arranged so that PyTorch dimension 1 holds Keras axis ``axis`` (the normalised one), the other
    axes in any order: a batch norm reduces over all of them. As it is when it already does (channels-last
    data, or channels-first data of a channels_first model), else permuted."""
    if x.torch_dim(axis) == 1:
        return x
    others = [d for d in range(1, x.rank) if d != axis % x.rank]
    layout = [0] * x.rank
    layout[axis % x.rank] = 1
    for dim, keras_axis in enumerate(others, start=2):
        layout[keras_axis] = dim
    return b.to_layout(x, layout)


@from_keras(L.BatchNormalization, BnkitKerasBN, permuted_input=True)
def batchnorm_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    """Any valid ``axis``: the normalised axis becomes PyTorch's dimension 1 (``BatchNorm1d`` for (N, C)
    and (N, C, L), ``2d``, ``3d``), where it is not already."""
    (x,) = inputs
    if x.rank < 2:
        raise b.unsupported(layer, f"a rank-{x.rank} input has no channel axis")
    x = _channels_at_dim_1(b, x, layer.axis)
    conv: Convention = layer.convention if isinstance(layer, BnkitKerasBN) else KERAS
    renorm, synchronized = bool(layer.renorm), bool(layer.synchronized)
    channels = layer.moving_mean.shape[0]
    rank_to_dim = {2: 1, 3: 1, 4: 2, 5: 3}
    if x.rank not in rank_to_dim:
        raise b.unsupported(layer, f"rank-{x.rank} input")
    dim = rank_to_dim[x.rank]
    affine = layer.scale or layer.center
    bias = layer.center or not layer.scale
    kwargs = dict(eps=layer.epsilon, affine=affine, bias=bias)
    target = b.semantics.for_layer(layer.name) == "target" or conv == TORCH
    momentum, renorm_momentum = layer.momentum, layer.renorm_momentum
    if target:
        try:
            momentum = translate_momentum(momentum, conv, TORCH)
            if renorm:
                renorm_momentum = translate_momentum(renorm_momentum, conv, TORCH)
        except ValueError as e:
            raise b.unsupported(layer, str(e)) from None
    if renorm:
        kwargs.update(renorm=True, renorm_clipping=dict(layer.renorm_clipping or {}), renorm_momentum=renorm_momentum)
    if target and not (renorm or synchronized):
        bn = getattr(nn, f"BatchNorm{dim}d")(channels, momentum=momentum, **kwargs)
    else:  # torch.nn has no renorm; bnkit's SyncBatchNorm also synchronises CPU tensors
        from bnkit import torch as bnkit_torch

        cls = bnkit_torch.SyncBatchNorm if synchronized else getattr(bnkit_torch, f"BatchNorm{dim}d")
        bn = cls(channels, momentum=momentum, convention=TORCH if target else conv, **kwargs)
    with torch.no_grad():
        if layer.scale:
            bn.weight.copy_(torch.from_numpy(keras_array(layer.gamma)))
        elif affine:  # center without scale: PyTorch has no beta-only affine; a frozen weight of ones
            bn.weight.requires_grad_(False)
        if layer.center:
            bn.bias.copy_(torch.from_numpy(keras_array(layer.beta)))
        bn.running_mean.copy_(torch.from_numpy(keras_array(layer.moving_mean)))
        bn.running_var.copy_(torch.from_numpy(keras_array(layer.moving_variance)))
        if renorm:
            for buffer, weight in STATE_NAMES.items():
                getattr(bn, buffer).copy_(torch.from_numpy(keras_array(getattr(layer, weight))))
        counter = getattr(layer, "num_batches_tracked", None)
        if counter is not None:
            bn.num_batches_tracked.fill_(int(keras_array(counter)))
    if not layer.trainable:
        # Keras runs a frozen BN in inference mode, in fit() too: bnkit's FrozenBatchNorm computes that in
        # train() as in eval() (a torch.nn batch norm would switch back to batch statistics in train())
        bn = FrozenBatchNorm.from_batchnorm(bn)
    return TorchValue(b.add_module(layer.name, bn, x.node), x.rank, x.layout)


def keras_batchnorm(b: TorchToKeras, node, m, x: KerasValue, name: str, key: str | None = None) -> KerasValue:
    """The Keras batch norm of the PyTorch batch norm ``m`` (called at ``node``) applied to ``x``;
    ``key``: its name in a ``semantics`` dict (the module's path)."""
    if not m.track_running_stats or m.running_mean is None:
        raise b.unsupported(node, "track_running_stats=False (batch statistics also in eval()) has no Keras equivalent")
    conv = getattr(m, "convention", TORCH)
    conv = conv if isinstance(conv, Convention) else TORCH
    scale = m.weight is not None and not (
        not m.weight.requires_grad and bool(torch.all(m.weight == 1)) and m.bias is not None
    )
    center = m.bias is not None
    kwargs = dict(axis=-1, epsilon=m.eps, center=center, scale=scale, name=name)
    renorm = bool(getattr(m, "renorm", False))
    synchronized = isinstance(m, nn.SyncBatchNorm)
    target = b.semantics.for_layer(key or str(node.target)) == "target" or conv == KERAS
    momentum = m.momentum
    if target:
        try:
            momentum = translate_momentum(momentum, conv, KERAS)
            if renorm:
                kwargs["renorm_momentum"] = translate_momentum(m.renorm_momentum, conv, KERAS)
        except ValueError as e:
            raise b.unsupported(node, f"{e}; use semantics='source'") from None
    elif renorm:
        kwargs["renorm_momentum"] = m.renorm_momentum
    if renorm:
        kwargs.update(renorm=True, renorm_clipping=dict(m.renorm_clipping))
    if synchronized:
        kwargs["synchronized"] = True
    if target and not synchronized:
        layer = L.BatchNormalization(momentum=momentum, **kwargs)
    else:  # Keras' own synchronised layer exists on TensorFlow only; bnkit's passes it through there
        layer = BnkitKerasBN(momentum=momentum, convention=KERAS if target else conv, **kwargs)
    weights = []
    if scale:
        weights.append(torch_array(m.weight))
    if center:
        weights.append(torch_array(m.bias))
    weights += [torch_array(m.running_mean), torch_array(m.running_var)]
    if renorm:
        weights += [torch_array(getattr(m, buffer)) for buffer in STATE_NAMES]
    if isinstance(layer, BnkitKerasBN) and layer.convention.cumulative_average_when_none:
        weights.append(np.array(int(m.num_batches_tracked), dtype="int64"))  # the counter, the last weight
    out = call_with_weights(layer, x.tensor, weights)
    if isinstance(m, FrozenBatchNorm):
        if m.batch_stats_in_train:
            raise b.unsupported(
                node, "batch_stats_in_train=True (batch statistics without updates) has no Keras equivalent"
            )
        layer.trainable = False  # Keras runs a frozen batch norm in inference mode, as FrozenBatchNorm
    return KerasValue(out, b.out_shape(node))


# nn.SyncBatchNorm and bnkit's sync and frozen batch norms have their own forward; in eval() (and,
# for the frozen one, always) it computes what the plain layer computes.
@from_torch(
    nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm, _ConventionBatchNorm, BnkitSyncBatchNorm, FrozenBatchNorm
)
def batchnorm_to_keras(b: TorchToKeras, node, m) -> KerasValue:
    return keras_batchnorm(b, node, m, b.input(node), b.name(node))


@from_torch(F.batch_norm)
def functional_batchnorm_to_keras(b: TorchToKeras, node, fn) -> KerasValue:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)`` written in a
    ``forward``, with a module's buffers and parameters: the batch norm those tensors make, as
    ``nn.BatchNorm*d`` with them converts (traced in ``eval()``, where ``training=self.training`` is
    False; the Keras layer then trains as the call does in ``train()``). Statistics that are not a
    module's tensors, or ``training=True`` always (batch statistics in ``eval()`` too), are refused."""
    x = b.input(node)
    tensors = {}
    for index, key in enumerate(("running_mean", "running_var", "weight", "bias"), start=1):
        value = b.operand(b.arg(node, index, key), node)
        if value is not None and not isinstance(value, Constant):
            raise b.unsupported(node, f"its {key} is computed in forward, not a parameter or buffer of the model")
        tensors[key] = value
    if tensors["running_mean"] is None or tensors["running_var"] is None:
        raise b.unsupported(node, "running_mean/running_var=None (batch statistics also in eval()) has no Keras "
                            "equivalent")
    if b.arg(node, 5, "training", False) is not False:
        raise b.unsupported(node, "training=True in eval() (batch statistics at inference) has no Keras equivalent")
    momentum, eps = b.arg(node, 6, "momentum", 0.1), b.arg(node, 7, "eps", 1e-5)
    channels = tensors["running_mean"].array.shape[0]
    affine = tensors["weight"] is not None or tensors["bias"] is not None
    m = getattr(nn, f"BatchNorm{max(x.rank - 2, 1)}d")(channels, eps=float(eps), momentum=momentum, affine=affine)
    with torch.no_grad():
        m.running_mean.copy_(torch.from_numpy(tensors["running_mean"].array))
        m.running_var.copy_(torch.from_numpy(tensors["running_var"].array))
        if tensors["weight"] is not None:
            m.weight.copy_(torch.from_numpy(tensors["weight"].array))
            m.weight.requires_grad_(tensors["weight"].trainable)
        elif affine:  # bias without weight: a frozen weight of ones, which Keras reads as scale=False
            m.weight.requires_grad_(False)
        if tensors["bias"] is not None:
            m.bias.copy_(torch.from_numpy(tensors["bias"].array))
        elif affine:
            m.bias = None
    owner = tensors["running_mean"].name.rpartition(".")[0]
    return keras_batchnorm(b, node, m, x, b.name(node), key=owner or node.name)


@from_torch("torchvision.ops.misc.FrozenBatchNorm2d")
def torchvision_frozen_batchnorm_to_keras(b: TorchToKeras, node, m) -> KerasValue:
    """torchvision's ``FrozenBatchNorm2d`` (detection backbones, ``norm_layer=FrozenBatchNorm2d``): a batch
    norm whose statistics and affine are fixed buffers, ``x·w/√(var+eps) + (b − mean·w/√(var+eps))``. A
    Keras ``BatchNormalization`` with those four as its weights and ``trainable=False``, which Keras runs
    in inference mode always, as the frozen layer: the same function, in another order of rounding; a
    batch norm that summary, lint, fold and compare see as one (traced through, it was four elementwise
    constants)."""
    layer = L.BatchNormalization(axis=-1, epsilon=float(m.eps), name=b.name(node))
    weights = [torch_array(getattr(m, buffer)) for buffer in ("weight", "bias", "running_mean", "running_var")]
    out = call_with_weights(layer, b.input(node).tensor, weights)
    layer.trainable = False
    return KerasValue(out, b.out_shape(node))


@from_torch(BatchNormAct2d, BatchNormAddAct2d)
def fused_batchnorm_to_keras(b: TorchToKeras, node, m) -> KerasValue:
    """bnkit's fused ``act(bn(x))`` and ``act(bn(x) + residual)``: the batch norm, an Add, a ReLU."""
    name = b.name(node)
    out = keras_batchnorm(b, node, m, b.input(node), name)
    if isinstance(m, BatchNormAddAct2d):
        residual = b.input(node, 1, "residual")
        out = out.like(L.Add(name=b.unique_name(f"{name}_add"))([out.tensor, residual.tensor]))
    if m.act == "relu":
        out = out.like(L.ReLU(name=b.unique_name(f"{name}_relu"))(out.tensor))
    return out
