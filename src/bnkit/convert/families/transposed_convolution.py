"""Transposed convolutions, both ways: ``Conv1DTranspose``/``Conv2DTranspose``/``Conv3DTranspose`` ⇄
``nn.ConvTranspose1d/2d/3d`` (strides, dilation, ``output_padding``, bias, ``activation=``).

Kernels: Keras ``(*k, out, in)`` ⇄ PyTorch ``(in, out, *k)`` (the same transposition as a
convolution's, the roles of the two channel axes swapped; no spatial flip on either side).

A transposed convolution is a window on its *full* output, per axis: the input scattered every
``s`` values, each through the kernel (extent ``K = (k-1)·d + 1``), ``full = (n-1)·s + K`` values,
zeros beyond (the bias is added everywhere after the window is taken, zeros included):

* PyTorch ``padding=p, output_padding=op`` takes ``[p, full - p + op)``: ``(p, p - op)`` off the
  left and the right (a negative amount: zeros appended), ``0 <= op < max(s, d)``.
* Keras (read from ``keras/src/backend/common/backend_utils.py``; its torch backend runs PyTorch's
  ``conv_transpose`` with ``padding=0`` and crops or zero-pads the result) takes off
  ``(K - 1 - left, K - 1 - right)``:

  - ``valid``: ``left = K - 1``, ``right = K - 1 + q`` with ``q = output_padding``, default
    ``max(K, s) - K``: nothing off the left, ``q`` zeros appended;
  - ``same``: ``t = s + K - 2`` (``output_padding`` None: ``n·s`` outputs) or ``t = K + K % 2 - 2 + q``;
    ``left = min(ceil(t / 2), K - 1)``, ``right = t - left``.

Keras → PyTorch: ``padding = left crop``, ``output_padding = left crop - right crop`` when that is
in ``[0, max(s, d))``; when the right crop is larger (``same`` with an odd kernel and stride 2:
``(0, 1)``), ``output_padding=0`` and the extra right values are cropped (``F.pad`` with a
negative amount). PyTorch → Keras: ``same`` or ``valid`` where Keras takes the same window, else
``valid`` with ``output_padding = max(op - p, 0)`` and a ``Cropping1D/2D/3D`` of what remains.
Refused, naming the argument: ``groups > 1`` (Keras' transposed convolutions have none),
``stride > 1`` with ``dilation > 1`` (Keras refuses the pair), an ``output_size=`` passed in the
call, and an ``output_padding`` Keras cannot take (``>= strides``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import nn

from bnkit.convert.families.activation import has_non_negative_activation, with_activation
from bnkit.convert.families.convolution import _bias, _keras_kernel, _torch_kernel
from bnkit.convert.families.padding import _torch_order, zero_padding_keras
from bnkit.convert.registry import from_keras, from_torch
from bnkit.convert.values import (
    KerasValue,
    TorchValue,
    call_with_weights,
    keras_array,
    torch_array,
    torch_module_holding,
)
from bnkit.keras import keras

if TYPE_CHECKING:
    from bnkit.convert.keras_walker import KerasToTorch
    from bnkit.convert.torch_walker import TorchToKeras

L = keras.layers

_TORCH_TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_KERAS_TRANSPOSED = {1: L.Conv1DTranspose, 2: L.Conv2DTranspose, 3: L.Conv3DTranspose}


def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def keras_crops(kernel: int, stride: int, dilation: int, padding: str, output_padding: int | None) -> tuple[int, int]:
    """What Keras' transposed convolution takes off the left and right of the full output, on one
    axis (negative: zeros appended), as ``keras/src/backend/common/backend_utils.py`` computes it."""
    extent = (kernel - 1) * dilation + 1
    if padding == "valid":
        q = max(extent, stride) - extent if output_padding is None else output_padding
        left, right = extent - 1, extent - 1 + q
    else:
        total = stride + extent - 2 if output_padding is None else extent + extent % 2 - 2 + output_padding
        left = min(math.ceil(total / 2), extent - 1)
        right = total - left
    return extent - 1 - left, extent - 1 - right


# ---- Keras -> PyTorch ---------------------------------------------------------------------


@from_keras(*_KERAS_TRANSPOSED.values(), non_negative=has_non_negative_activation)
def conv_transpose_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    """``ConvNDTranspose`` → ``nn.ConvTransposeNd(padding=left crop, output_padding=left - right crop)``,
    plus a crop of the right edge where Keras takes more off the right than off the left."""
    (x,) = inputs
    n = x.rank - 2
    kernel = keras_array(layer.kernel)  # (*k, out, in)
    ks, strides, dilations = tuple(layer.kernel_size), tuple(layer.strides), tuple(layer.dilation_rate)
    ops = _tuple(layer.output_padding, n) if layer.output_padding is not None else (None,) * n
    crops = [keras_crops(*args, layer.padding, op) for *args, op in zip(ks, strides, dilations, ops, strict=True)]
    paddings, output_paddings, extra = [], [], []
    for (left, right), s, d in zip(crops, strides, dilations, strict=True):
        if 0 <= left - right < max(s, d):
            paddings.append(left), output_paddings.append(left - right), extra.append(0)
        elif left < right:  # PyTorch takes as much off both sides: crop the rest of the right after
            paddings.append(left), output_paddings.append(0), extra.append(right - left)
        else:
            raise b.unsupported(layer, f"Keras' window {crops} needs PyTorch output_padding >= stride")
    conv = torch_module_holding(
        lambda: _TORCH_TRANSPOSED[n](
            kernel.shape[-1],
            layer.filters,
            ks,
            stride=strides,
            padding=tuple(paddings),
            output_padding=tuple(output_paddings),
            dilation=dilations,
            bias=layer.use_bias,
        ),
        {"weight": _torch_kernel(kernel)} | _bias(layer),
    )
    out = b.add_module(layer.name, conv, x.node)
    if any(extra):  # after the bias, as Keras crops before adding it: cropped values are gone either way
        out = b.graph.call_function(F.pad, (out, tuple(-c for c in _torch_order([(0, e) for e in extra]))))
    return with_activation(b, layer, TorchValue(out, x.rank))


# ---- PyTorch -> Keras ---------------------------------------------------------------------


@from_torch(*_TORCH_TRANSPOSED.values())
def conv_transpose_to_keras(b: TorchToKeras, node, m) -> KerasValue:
    """``nn.ConvTransposeNd`` → ``ConvNDTranspose`` (``same``/``valid`` where Keras takes PyTorch's
    window, else ``valid`` with ``output_padding`` and a ``Cropping``)."""
    if len(node.args) > 1 or node.kwargs:
        raise b.unsupported(node, "output_size= passed in the call has no Keras equivalent")
    if m.groups != 1:
        raise b.unsupported(node, f"groups={m.groups}: Keras' transposed convolutions have no groups")
    if m.padding_mode != "zeros":
        raise b.unsupported(node, f"padding_mode={m.padding_mode!r}; only 'zeros' converts")
    x = b.input(node)
    name = b.name(node)
    n = x.rank - 2
    ks, strides, dilations = (_tuple(getattr(m, a), n) for a in ("kernel_size", "stride", "dilation"))
    pads, ops = _tuple(m.padding, n), _tuple(m.output_padding, n)
    if max(strides) > 1 and max(dilations) > 1:
        raise b.unsupported(node, f"stride={strides} with dilation={dilations}: Keras refuses the pair")
    wanted = [(p, p - op) for p, op in zip(pads, ops, strict=True)]
    axes = list(zip(ks, strides, dilations, strict=True))
    padding, output_padding, crops = "valid", None, [(0, 0)] * n
    if [keras_crops(*a, "same", None) for a in axes] == wanted:
        padding = "same"
    elif [keras_crops(*a, "valid", None) for a in axes] != wanted:
        output_padding = tuple(max(op - p, 0) for p, op in zip(pads, ops, strict=True))
        if any(q >= s for q, s in zip(output_padding, strides, strict=True)):
            raise b.unsupported(
                node, f"output_padding={ops} with padding={pads}: Keras takes output_padding < strides={strides}"
            )
        crops = [(p, max(p - op, 0)) for p, op in zip(pads, ops, strict=True)]
    layer = _KERAS_TRANSPOSED[n](
        m.out_channels,
        ks,
        strides=strides,
        padding=padding,
        output_padding=output_padding,
        dilation_rate=dilations,
        use_bias=m.bias is not None,
        name=name,
    )
    weights = [_keras_kernel(torch_array(m.weight))] + ([torch_array(m.bias)] if m.bias is not None else [])
    if not any(any(c) for c in crops):
        return b.apply(node, layer, x, weights)
    full = tuple(
        (size - 1) * s + (k - 1) * d + 1 + q
        for size, k, s, d, q in zip(x.shape[1:], ks, strides, dilations, output_padding, strict=True)
    )
    out = KerasValue(call_with_weights(layer, x.tensor, weights), (m.out_channels, *full))
    flat = tuple(-c for c in _torch_order(crops))
    return zero_padding_keras(b, node, out, b.unique_name(f"{name}_crop"), flat)
