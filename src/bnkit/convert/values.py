"""A tensor during conversion: where it is in the graph being built, and how its layout maps.

Keras tensors are channels-last (``N, *spatial, C``), PyTorch tensors channels-first
(``N, C, *spatial``). A converted tensor normally holds the same values in the other framework's
layout ("mapped"). Two exceptions are tracked instead of being paid for with a transpose:

* after a Flatten that only feeds Dense/Linear layers, the flattened features are in the source
  framework's order and the next Dense/Linear kernel's rows are reordered (``pending_flat``);
* after a permute written in the model itself (Keras ``Permute``, ``x.permute(0, 2, 3, 1)``), the
  tensor is identical in both frameworks (``TorchValue.layout == "same"``,
  ``KerasValue.channels_last``): only layers flagged ``elementwise`` or ``permuted_input`` may
  follow (see :mod:`bnkit.convert.registry`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import fx

from bnkit.convert._common import keras_axis_to_torch, torch_axis_to_keras

__all__ = ["TorchValue", "KerasValue", "keras_array", "torch_array"]


@dataclass
class TorchValue:
    """A Keras tensor converted to PyTorch: its ``torch.fx`` node and the Keras tensor's rank.

    ``layout="mapped"``: the torch tensor is the channels-first version of the Keras one;
    ``"same"``: identical (after a Keras ``Permute``). ``pending_flat``: the torch tensor is a
    PyTorch-order flattening of ``(C, *spatial)`` while Keras flattened ``(*spatial, C)``: the next
    Dense's kernel rows are reordered instead of the data.
    """

    node: fx.Node
    rank: int
    layout: str = "mapped"
    pending_flat: tuple[int, ...] | None = None

    def like(self, node: fx.Node) -> TorchValue:
        """The output of an element-wise layer applied to this value: same rank and layout."""
        return replace(self, node=node)

    def torch_dim(self, keras_axis: int) -> int:
        """The PyTorch dimension that holds Keras axis ``keras_axis`` of this value."""
        if self.layout == "same":
            return keras_axis % self.rank
        return keras_axis_to_torch(keras_axis, self.rank)


@dataclass
class KerasValue:
    """A PyTorch tensor converted to Keras: a Keras symbolic tensor and the PyTorch shape
    (without the batch dimension). ``pending_flat`` as in :class:`TorchValue`; ``channels_last``:
    a permute to channels-last made the PyTorch tensor identical to the Keras one."""

    tensor: object
    shape: tuple[int, ...]
    pending_flat: tuple[int, ...] | None = None
    channels_last: bool = False

    @property
    def rank(self) -> int:
        return len(self.shape) + 1

    def like(self, tensor) -> KerasValue:
        """The output of an element-wise layer applied to this value: same shape and layout."""
        return replace(self, tensor=tensor)

    def keras_axis(self, torch_dim: int) -> int:
        """The Keras axis that holds PyTorch dimension ``torch_dim`` of this value."""
        if self.channels_last:
            return torch_dim % self.rank
        return torch_axis_to_keras(torch_dim, self.rank)


def keras_array(variable) -> np.ndarray:
    """A Keras variable's value as a NumPy array."""
    from bnkit.keras import keras

    return np.array(keras.ops.convert_to_numpy(variable.value))


def torch_array(tensor: torch.Tensor) -> np.ndarray:
    """A PyTorch parameter or buffer as a float32 NumPy array."""
    return tensor.detach().cpu().to(torch.float32).numpy()
