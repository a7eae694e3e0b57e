"""Resizing, both ways: ``F.interpolate`` / ``nn.Upsample`` (``UpsamplingNearest2d``,
``UpsamplingBilinear2d``, ``F.upsample*``) ⇄ Keras ``UpSampling1D``/``UpSampling2D``, ``Resizing`` and
``ops.image.resize`` in a functional model; ``mode='area'`` is an adaptive average pooling.

What Keras computes, read from its sources and measured (Keras 3.15, PyTorch 2.13, on all three backends):

* ``UpSampling2D(k, 'nearest')`` and ``UpSampling1D(k)`` repeat each value ``k`` times
  (``ops.repeat``): PyTorch's ``'nearest-exact'`` with an integer factor, on every backend;
* ``Resizing``, ``ops.image.resize`` and ``UpSampling2D`` with another interpolation resize to the
  output size with half-pixel centres: source coordinate ``(i + 0.5)·in/out - 0.5`` per axis.
  On Keras' torch backend that is ``F.interpolate(size=out, mode=M, align_corners=False,
  antialias=a)`` with ``M`` = ``'nearest-exact'`` for ``'nearest'``, ``'bilinear'``, ``'bicubic'``;
  TensorFlow's and JAX's ``'nearest'`` and ``'bilinear'`` (antialias on or off) compute the same
  function (within 1e-6 relative, measured on odd/even sizes, up- and down-sampling). Their
  ``'bicubic'`` does too with ``antialias=True`` (PyTorch's antialiased cubic has A=-0.5), but
  not without: PyTorch's cubic has A=-0.75, TensorFlow's and JAX's Keys' A=-0.5 (0.09-0.16 apart),
  so a ``'bicubic'`` resize without antialias is refused both ways (the Keras layer would compute
  another function on another backend). ``lanczos3``/``lanczos5`` have no PyTorch equivalent.

A PyTorch call converts when it is one of those functions for its shapes, which is decided by
running both on a random probe of the input's spatial shape (every resize is linear in its input,
so equal outputs on a random probe mean equal functions): ``'nearest'`` (source index
``floor(i·scale)``) is Keras' ``floor((i + 0.5)·scale)`` for integer upsampling, not in general;
``align_corners=True`` (source coordinate ``i·(in-1)/(out-1)``) only where it lands on the same
points (out == in, a 1-pixel input); ``scale_factor=s`` without ``recompute_scale_factor`` maps
coordinates with ``1/s`` rather than ``in/out``, the same where ``out == in·s``. Integer
upsampling becomes ``UpSampling2D`` (``UpSampling1D`` for 1-D nearest), any other size
``Resizing``; 1-D ``'linear'``/``'nearest'`` resizes are 2-D ones of a ``(L, 1)`` image between
two ``Reshape``s. Each refusal names the mode and why it differs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from bnkit.convert.families.pooling import adaptive_pool_keras
from bnkit.convert.registry import from_keras, from_torch
from bnkit.convert.values import KerasValue, TorchValue
from bnkit.keras import keras

if TYPE_CHECKING:
    from bnkit.convert.keras_walker import KerasToTorch
    from bnkit.convert.torch_walker import TorchToKeras

L = keras.layers
keras_image_ops = keras.src.ops.image  # the operation of keras.ops.image.resize on Keras tensors

# Keras interpolation -> the PyTorch mode Keras' resize computes (its torch backend's own table)
KERAS_TO_TORCH_MODE = {"nearest": "nearest-exact", "bilinear": "bilinear", "bicubic": "bicubic"}
# PyTorch mode -> the Keras interpolation that may compute it
TORCH_TO_KERAS_MODE = {
    "nearest": "nearest",
    "nearest-exact": "nearest",
    "linear": "bilinear",
    "bilinear": "bilinear",
    "bicubic": "bicubic",
}
BICUBIC_REASON = (
    "PyTorch's cubic kernel has A=-0.75, which Keras' 'bicubic' computes only on its torch backend "
    "(TensorFlow and JAX use Keys' A=-0.5), so the Keras layer's function would depend on the backend; "
    "with antialias=True both use A=-0.5 on every backend"
)
_MODES_1D = ("nearest", "nearest-exact", "linear")
_MODES_2D = ("nearest", "nearest-exact", "bilinear", "bicubic")
_PROBE_TOL = 1e-6  # relative: rounding of the same coefficients (1/s against in/out); other coefficients are >1e-3


def keras_resize_call(out: tuple[int, ...], interpolation: str, antialias: bool = False) -> dict:
    """The ``F.interpolate`` keyword arguments computing Keras' resize to ``out`` with ``interpolation``."""
    mode = KERAS_TO_TORCH_MODE[interpolation]
    return {
        "size": tuple(out),
        "mode": mode,
        "align_corners": None if mode.startswith("nearest") else False,
        "antialias": bool(antialias) and mode in ("bilinear", "bicubic"),
    }


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(-1) if x.dim() == 3 else x


def same_resize(in_spatial: tuple[int, ...], call: dict, keras_call: dict) -> bool:
    """Whether ``F.interpolate(x, **call)`` on inputs of spatial shape ``in_spatial`` computes
    ``F.interpolate(x, **keras_call)`` (Keras' resize; on a 1-D input, of the ``(L, 1)`` image)."""
    probe = torch.randn((1, 1, *in_spatial), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            got = _as_2d(F.interpolate(probe, **call))
            expected = F.interpolate(_as_2d(probe), **keras_call)
    except (RuntimeError, ValueError, NotImplementedError):
        return False
    if got.shape != expected.shape:
        return False
    return bool((got - expected).abs().max() <= _PROBE_TOL * expected.abs().max())


def _resolve(b: TorchToKeras, node, value):
    """A size or scale argument as Python numbers (a shape read in ``forward`` is a node)."""
    value = b.operand(value, node) if isinstance(value, torch.fx.Node) else value
    if isinstance(value, (tuple, list)):
        return tuple(b.operand(v, node) if isinstance(v, torch.fx.Node) else v for v in value)
    return value


def _difference(call: dict, in_spatial, out_spatial) -> str:
    """Why a PyTorch resize that no Keras layer computes differs from Keras' resize, in words."""
    mode, shapes = call["mode"], f"{tuple(in_spatial)} -> {tuple(out_spatial)}"
    if call.get("align_corners"):
        return (
            f"mode={mode!r} with align_corners=True samples source coordinate i*(in-1)/(out-1); Keras resizes "
            f"with half-pixel centres (align_corners=False), which differ for {shapes}"
        )
    if mode == "nearest":
        return (
            f"mode='nearest' picks source index floor(i*in/out), Keras' 'nearest' floor((i+0.5)*in/out) "
            f"(PyTorch's 'nearest-exact'); they differ for {shapes}: use 'nearest-exact' or an integer upsampling"
        )
    if call.get("scale_factor") is not None and not call.get("recompute_scale_factor"):
        return (
            f"scale_factor={call['scale_factor']} maps coordinates with 1/scale_factor, Keras with in/out, which "
            f"differ for {shapes}: pass size= or recompute_scale_factor=True"
        )
    return f"mode={mode!r} (antialias={call.get('antialias', False)}) is not what a Keras resize computes for {shapes}"


def resize_keras(b: TorchToKeras, node, x: KerasValue, call: dict) -> KerasValue:
    """The Keras layer computing ``F.interpolate(x, **call)``, or a refusal saying why none does."""
    mode = call["mode"]
    n = x.rank - 2
    in_spatial, out_spatial = tuple(x.shape[1:]), tuple(b.out_shape(node)[1:])
    if mode == "area":  # F.interpolate's 'area' is adaptive_avg_pool
        return adaptive_pool_keras(b, node, x, out_spatial, is_max=False)
    if mode not in (_MODES_1D if n == 1 else _MODES_2D if n == 2 else ()):
        raise b.unsupported(node, f"mode={mode!r} on a rank-{x.rank} input has no Keras equivalent")
    interpolation = TORCH_TO_KERAS_MODE[mode]
    antialias = bool(call.get("antialias"))
    if interpolation == "bicubic" and not antialias:
        raise b.unsupported(node, f"mode='bicubic' with antialias=False: {BICUBIC_REASON}")
    name = b.name(node)
    out_2d = out_spatial if n == 2 else (out_spatial[0], 1)
    factors = tuple(o // i for o, i in zip(out_spatial, in_spatial, strict=True))
    integer = all(o == f * i and f >= 1 for o, i, f in zip(out_spatial, in_spatial, factors, strict=True))
    if integer and interpolation in ("nearest", "bilinear") and (n == 2 or interpolation == "nearest"):
        # UpSampling: 'nearest' repeats values, which is the exact-nearest resize for integer factors
        keras_call = keras_resize_call(out_2d, interpolation)
        if same_resize(in_spatial, call, keras_call):
            if n == 1:
                return b.apply(node, L.UpSampling1D(factors[0], name=name), x)
            return b.apply(node, L.UpSampling2D(factors, interpolation=interpolation, name=name), x)
    for aa in dict.fromkeys((antialias, False)):
        keras_call = keras_resize_call(out_2d, interpolation, aa)
        if same_resize(in_spatial, call, keras_call):
            layer = L.Resizing(*out_2d, interpolation=interpolation, antialias=aa, name=name)
            if n == 2:
                return b.apply(node, layer, x)
            (channels, length), out_length = x.shape, out_spatial[0]  # 1-D: a (L, 1) image
            image = L.Reshape((length, 1, channels), name=b.unique_name(f"{name}_image"))(x.tensor)
            resized = layer(image)
            out = L.Reshape((out_length, channels), name=b.unique_name(f"{name}_squeeze"))(resized)
            return KerasValue(out, (channels, out_length))
    raise b.unsupported(node, _difference(call, in_spatial, out_spatial))


_INTERPOLATE_ARGS = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
_DEFAULTS = {"mode": "nearest", "antialias": False}
_UPSAMPLE_FUNCTIONS = {  # deprecated aliases: F.upsample(x, size, scale_factor, mode, align_corners)
    F.upsample: ("size", "scale_factor", "mode", "align_corners"),
    F.upsample_nearest: ("size", "scale_factor"),
    F.upsample_bilinear: ("size", "scale_factor"),
}


@from_torch(F.interpolate, *_UPSAMPLE_FUNCTIONS)
def interpolate_function_to_keras(b: TorchToKeras, node, fn) -> KerasValue:
    """``F.interpolate(x, size=..., scale_factor=..., mode=..., align_corners=..., antialias=...)``."""
    names = _INTERPOLATE_ARGS if fn is F.interpolate else _UPSAMPLE_FUNCTIONS[fn]
    call = {key: _resolve(b, node, b.arg(node, i + 1, key, _DEFAULTS.get(key))) for i, key in enumerate(names)}
    if fn is F.upsample_nearest:
        call["mode"] = "nearest"
    elif fn is F.upsample_bilinear:
        call.update(mode="bilinear", align_corners=True)
    call.setdefault("mode", "nearest")
    return resize_keras(b, node, b.input(node), call)


@from_torch(nn.Upsample)  # UpsamplingNearest2d and UpsamplingBilinear2d (align_corners=True) inherit forward
def upsample_module_to_keras(b: TorchToKeras, node, m) -> KerasValue:
    call = {key: getattr(m, key, None) for key in _INTERPOLATE_ARGS[:-1]}
    return resize_keras(b, node, b.input(node), call)


# ---- Keras -> PyTorch ---------------------------------------------------------------------


def _interpolation(b: KerasToTorch, layer, interpolation: str, antialias: bool) -> str:
    """Keras' ``interpolation``, checked to compute the same function on every backend and in PyTorch."""
    interpolation = str(interpolation).lower()
    if interpolation not in KERAS_TO_TORCH_MODE:
        raise b.unsupported(layer, f"interpolation={interpolation!r} has no PyTorch equivalent")
    if interpolation == "bicubic" and not antialias:
        raise b.unsupported(layer, f"interpolation='bicubic' with antialias=False: {BICUBIC_REASON}")
    return interpolation


def _interpolate_torch(b: KerasToTorch, x: TorchValue, out, interpolation: str, antialias: bool) -> TorchValue:
    kwargs = keras_resize_call(out, interpolation, antialias)
    return TorchValue(b.graph.call_function(F.interpolate, (x.node,), kwargs), x.rank)


@from_keras(L.UpSampling2D)
def upsampling2d_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    """``UpSampling2D(k, interpolation)``: ``nn.Upsample`` to ``k`` times the size ('nearest' repeats:
    ``'nearest-exact'``, which for integer factors is the repeat; other interpolations: Keras' resize)."""
    (x,) = inputs
    interpolation = _interpolation(b, layer, layer.interpolation, antialias=False)
    factors = tuple(int(f) for f in layer.size)
    spatial = tuple(node.input_tensors[0].shape[1:3])
    if interpolation == "nearest" or None in spatial:  # an unknown size: by factor (1/k, the same scale)
        kwargs = {"scale_factor": factors, "mode": KERAS_TO_TORCH_MODE[interpolation]}
    else:  # the size, as Keras' torch backend passes it: the same coefficients to the bit
        kwargs = {"size": tuple(s * f for s, f in zip(spatial, factors, strict=True)), "mode": "bilinear"}
    if interpolation != "nearest":
        kwargs["align_corners"] = False
    return TorchValue(b.add_module(layer.name, nn.Upsample(**kwargs), x.node), x.rank)


@from_keras(L.UpSampling1D)
def upsampling1d_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    """``UpSampling1D(k)`` repeats each step ``k`` times: ``nn.Upsample(scale_factor=k, mode='nearest-exact')``."""
    (x,) = inputs
    module = nn.Upsample(scale_factor=int(layer.size), mode="nearest-exact")
    return TorchValue(b.add_module(layer.name, module, x.node), x.rank)


def _resize_options(b: KerasToTorch, layer, op) -> None:
    """Refuse the options of Keras' resize that crop or pad (``op``: the layer or operation)."""
    for option in ("crop_to_aspect_ratio", "pad_to_aspect_ratio"):
        if getattr(op, option, False):
            raise b.unsupported(layer, f"{option}=True (a crop or pad before the resize) is not converted")
    if getattr(op, "data_format", "channels_last") != "channels_last":
        raise b.unsupported(layer, f"data_format={op.data_format!r}; only 'channels_last' is supported")


@from_keras(L.Resizing)
def resizing_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    """``Resizing(h, w, interpolation, antialias)``: ``F.interpolate(size=(h, w), ...)``, as Keras' torch
    backend calls it."""
    _resize_options(b, layer, layer)
    (x,) = inputs
    if x.rank != 4:
        raise b.unsupported(layer, f"a rank-{x.rank} input (only batches of images convert)")
    interpolation = _interpolation(b, layer, layer.interpolation, layer.antialias)
    return _interpolate_torch(b, x, (layer.height, layer.width), interpolation, layer.antialias)


@from_keras(keras_image_ops.Resize)
def resize_op_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    """``keras.ops.image.resize(x, size, interpolation, antialias)`` on a Keras tensor in a functional model."""
    _resize_options(b, layer, layer)
    (x,) = inputs
    if x.rank != 4:
        raise b.unsupported(layer, f"a rank-{x.rank} input (only batches of images convert)")
    interpolation = _interpolation(b, layer, layer.interpolation, layer.antialias)
    return _interpolate_torch(b, x, tuple(layer.size), interpolation, layer.antialias)
