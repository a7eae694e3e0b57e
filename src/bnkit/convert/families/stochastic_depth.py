"""Stochastic depth, both ways: keras.applications ConvNeXt's ``StochasticDepth``, bnkit's Keras
``StochasticDepth`` and a Keras ``Dropout`` whose ``noise_shape`` is ``(None, 1, ..., 1)`` (one draw
per sample: EfficientNet's) ⇄ ``torchvision.ops.StochasticDepth`` and bnkit's PyTorch ``StochasticDepth``.

Identity in inference. In training each sample (``"row"``; keras.applications drops per sample
too) or the whole batch (``"batch"``) is zeroed with probability ``p`` and what is kept is divided
by ``1 - p``: the same distribution in both frameworks, drawn by each framework's own random
generator, so not the same masks. Element-wise: a layout passes through.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bnkit.convert.keras_layers import StochasticDepth as KerasStochasticDepth
from bnkit.convert.registry import from_keras, from_torch
from bnkit.convert.torch_modules import StochasticDepth as TorchStochasticDepth
from bnkit.convert.values import KerasValue, TorchValue

if TYPE_CHECKING:
    from bnkit.convert.keras_walker import KerasToTorch
    from bnkit.convert.torch_walker import TorchToKeras


@from_keras(KerasStochasticDepth, "keras.src.applications.convnext.StochasticDepth", elementwise=True)
def stochastic_depth_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    (x,) = inputs
    if isinstance(layer, KerasStochasticDepth):
        module = TorchStochasticDepth(layer.rate, layer.mode)
    else:  # keras.applications: x / keep * floor(keep + U) per sample
        module = TorchStochasticDepth(float(layer.drop_path_rate), "row")
    return x.like(b.add_module(layer.name, module, x.node))


def per_sample_dropout_to_torch(b: KerasToTorch, layer, x: TorchValue) -> TorchValue:
    """A Keras ``Dropout`` with ``noise_shape=(None, 1, ..., 1)``: stochastic depth by sample."""
    return x.like(b.add_module(layer.name, TorchStochasticDepth(float(layer.rate), "row"), x.node))


@from_torch(TorchStochasticDepth, "torchvision.ops.stochastic_depth.StochasticDepth", elementwise=True)
def stochastic_depth_to_keras(b: TorchToKeras, node, m) -> KerasValue:
    x = b.input(node)
    return x.like(KerasStochasticDepth(float(m.p), m.mode, name=b.name(node))(x.tensor))
