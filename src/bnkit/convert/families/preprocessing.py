"""Keras preprocessing layers → PyTorch, as the arithmetic they do (so ``include_preprocessing=True``
keras.applications convert): ``Rescaling`` and ``Normalization``.

* ``Rescaling(scale, offset)`` computes ``x * scale + offset``: ``x * scale`` then ``+ offset``
  in PyTorch (a number stays a number; a per-channel list becomes a buffer in PyTorch's layout).
* ``Normalization`` computes ``(x - mean) / max(sqrt(variance), epsilon)`` (``invert=True``:
  ``mean + x * max(sqrt(variance), epsilon)``), with ``epsilon = keras.backend.epsilon()`` (1e-7
  unless changed) read when it is called: the converted model keeps the value it had when
  converted. ``mean`` and the divisor (computed once here, with Keras' own ops) become buffers.

Each operation is the one Keras does, in the same order, so the results agree to the bit. The
other way these are PyTorch arithmetic and convert as such (:mod:`.elementwise`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from bnkit.convert.families.elementwise import torch_operation
from bnkit.convert.registry import from_keras
from bnkit.convert.values import Constant, TorchValue
from bnkit.keras import keras

if TYPE_CHECKING:
    from bnkit.convert.keras_walker import KerasToTorch

L = keras.layers


def _operand(value, name: str):
    """A number as a number, anything else (a list, an array) as a constant."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    array = np.asarray(keras.ops.convert_to_numpy(value), dtype="float32")
    return float(array) if array.ndim == 0 else Constant(array, False, name)


@from_keras(L.Rescaling, permuted_input=True)
def rescaling_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    (x,) = inputs
    scale, offset = _operand(layer.scale, "scale"), _operand(layer.offset, "offset")
    if isinstance(scale, Constant) and keras.config.image_data_format() == "channels_first":
        raise b.unsupported(layer, "a per-channel scale with image_data_format='channels_first'")
    if scale != 1.0:
        x = torch_operation(b, layer, "multiply", [x, scale])
    if offset != 0.0:
        x = torch_operation(b, layer, "add", [x, offset])
    return x


@from_keras(L.Normalization, permuted_input=True)
def normalization_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    (x,) = inputs
    if getattr(layer, "mean", None) is None:
        raise b.unsupported(layer, "it has no mean and variance yet (adapt it or give them)")
    mean = np.asarray(keras.ops.convert_to_numpy(layer.mean), dtype="float32")
    # the divisor as Keras computes it, with its backend's sqrt (PyTorch's CPU sqrt is not always
    # correctly rounded: NumPy's would differ from Keras-on-torch in the last bit)
    ops = keras.ops
    std = ops.maximum(ops.sqrt(ops.cast(layer.variance, "float32")), keras.backend.epsilon())
    std = np.asarray(ops.convert_to_numpy(std), dtype="float32")
    mean, std = Constant(mean, False, "mean"), Constant(std, False, "std")
    if layer.invert:
        return torch_operation(b, layer, "add", [mean, torch_operation(b, layer, "multiply", [x, std])])
    return torch_operation(b, layer, "divide", [torch_operation(b, layer, "subtract", [x, mean]), std])
