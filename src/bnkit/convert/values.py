"""A tensor during conversion: where it is in the graph being built, and how its layout maps.

Keras tensors are channels-last (``N, *spatial, C``), PyTorch tensors channels-first
(``N, C, *spatial``). A converted tensor holds the same values as its source, in the layout
its value records (:mod:`bnkit.convert.layouts`): ``layout[i]`` is the PyTorch dimension that
Keras axis ``i`` holds. Normally that is the *mapped* layout (channels-last of channels-first);
a permute written in the model (Keras ``Permute``, ``x.permute(0, 2, 3, 1)``, a transpose) only
changes the recorded layout, and a layer that needs the mapped layout gets a permute in front
(the walkers add it). One more exception is tracked instead of being paid for with a transpose:
after a Flatten that only feeds Dense/Linear layers, the flattened features are in the source
framework's order and the next Dense/Linear kernel's rows are reordered (``pending_flat``).

Values that are not tensors pass between nodes too: shapes read in a ``forward``
(``x.size()``, whose batch is :data:`BATCH`), Python numbers, the pieces of a ``chunk``/``split``
(:class:`Pieces`) and constant tensors (:class:`Constant`: parameters and buffers read with
``get_attr``, Keras weights and arrays).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import fx

from bnkit.convert.layouts import Layout, inverse, mapped_layout

__all__ = ["TorchValue", "KerasValue", "Constant", "Pieces", "BATCH", "keras_array", "torch_array"]


@dataclass
class TorchValue:
    """A Keras tensor converted to PyTorch: its ``torch.fx`` node, the Keras tensor's rank and
    the layout (``None``: the mapped one). ``pending_flat``: the torch tensor is a PyTorch-order
    flattening of ``(C, *spatial)`` while Keras flattened ``(*spatial, C)``: the next Dense's
    kernel rows are reordered instead of the data.
    """

    node: fx.Node
    rank: int
    layout: Layout | None = None
    pending_flat: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.layout is None:
            self.layout = mapped_layout(self.rank)

    @property
    def mapped(self) -> bool:
        return self.layout == mapped_layout(self.rank)

    def like(self, node: fx.Node) -> TorchValue:
        """The output of an element-wise layer applied to this value: same rank and layout."""
        return replace(self, node=node)

    def torch_dim(self, keras_axis: int) -> int:
        """The PyTorch dimension that holds Keras axis ``keras_axis`` of this value."""
        return self.layout[keras_axis % self.rank]

    def torch_shape(self, keras_shape) -> tuple:
        """The PyTorch shape of this value, given the Keras tensor's shape (with the batch)."""
        where = inverse(self.layout)
        return tuple(keras_shape[where[d]] for d in range(self.rank))


@dataclass
class KerasValue:
    """A PyTorch tensor converted to Keras: a Keras symbolic tensor, the PyTorch shape (without
    the batch dimension) and the layout (``None``: the mapped one). ``pending_flat`` as in
    :class:`TorchValue`."""

    tensor: object
    shape: tuple[int, ...]
    pending_flat: tuple[int, ...] | None = None
    layout: Layout | None = None

    def __post_init__(self) -> None:
        self.shape = tuple(self.shape)
        if self.layout is None:
            self.layout = mapped_layout(self.rank)

    @property
    def rank(self) -> int:
        return len(self.shape) + 1

    @property
    def mapped(self) -> bool:
        return self.layout == mapped_layout(self.rank)

    @property
    def keras_shape(self) -> tuple:
        """The Keras tensor's shape without the batch."""
        full = (None, *self.shape)
        return tuple(full[d] for d in self.layout[1:])

    def like(self, tensor) -> KerasValue:
        """The output of an element-wise layer applied to this value: same shape and layout."""
        return replace(self, tensor=tensor)

    def keras_axis(self, torch_dim: int) -> int:
        """The Keras axis that holds PyTorch dimension ``torch_dim`` of this value."""
        return self.layout.index(torch_dim % self.rank)


class _BatchSize:
    """The batch dimension of a shape read in a ``forward`` (``x.size(0)``): not known statically."""

    def __repr__(self) -> str:
        return "<batch size>"


BATCH = _BatchSize()


@dataclass
class Constant:
    """A constant tensor in the source framework's own layout: a PyTorch parameter or buffer
    (``get_attr``), a Keras weight or array. ``trainable``: a parameter (or trainable weight)."""

    array: np.ndarray
    trainable: bool = False
    name: str = "constant"


@dataclass(repr=False)
class Pieces:
    """The pieces of a ``chunk``/``split`` of ``value`` along PyTorch dim ``dim``: ``bounds`` are
    ``(start, stop)``; each piece is made when indexed (and only then)."""

    value: KerasValue
    dim: int
    bounds: list[tuple[int, int]]
    node: fx.Node
    made: dict[int, KerasValue] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"the {len(self.bounds)} pieces of a split (use them by index)"


def keras_array(variable) -> np.ndarray:
    """A Keras variable's value as a NumPy array."""
    from bnkit.keras import keras

    return np.array(keras.ops.convert_to_numpy(variable.value))


def torch_array(tensor: torch.Tensor) -> np.ndarray:
    """A PyTorch parameter or buffer as a float32 NumPy array."""
    return tensor.detach().cpu().to(torch.float32).numpy()
