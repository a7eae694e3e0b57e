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

__all__ = [
    "TorchValue",
    "KerasValue",
    "Constant",
    "Pieces",
    "BATCH",
    "keras_array",
    "torch_array",
    "call_with_weights",
    "torch_module_holding",
]


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


def torch_module_holding(factory, arrays: dict[str, np.ndarray]):
    """The module ``factory()`` builds, its state (every parameter and buffer ``state_dict`` lists,
    by name) holding ``arrays``: built on the meta device, so that nothing is initialised at random
    only to be overwritten, then given the arrays in place of its tensors, without a copy where an
    array is C-contiguous and of the tensor's dtype. The arrays must be the caller's own
    (``keras_array`` returns a copy)."""
    with torch.device("meta"):
        module = factory()
    dtypes = {name: t.dtype for name, t in module.state_dict(keep_vars=True).items()}
    state = {name: _tensor(a, copy=False).to(dtypes.get(name)) for name, a in arrays.items()}
    module.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{type(module).__name__} was given no values for {left}")
    return module


def _tensor(array: np.ndarray, copy: bool) -> torch.Tensor:
    """``array`` as a C-contiguous tensor: its memory where it is C-contiguous and ``copy`` is false,
    else a copy (PyTorch's, which transposes a large matrix several times faster than NumPy's)."""
    if not isinstance(array, np.ndarray) or not array.flags.writeable or any(s < 0 for s in array.strides):
        return torch.from_numpy(np.array(array, order="C"))  # what torch.from_numpy does not take
    tensor = torch.from_numpy(array)
    if not tensor.is_contiguous():
        return tensor.contiguous()
    return tensor.clone() if copy else tensor


def torch_array(tensor: torch.Tensor) -> np.ndarray:
    """A PyTorch parameter or buffer as a float32 NumPy array."""
    return tensor.detach().cpu().to(torch.float32).numpy()


class _WeightsFrom:
    """While a Keras layer builds, the weights it creates hold the given arrays, in creation order,
    instead of being initialised at random and then overwritten: each a fresh copy (never the
    PyTorch module's memory). ``exact`` stays true while every weight created took the next array."""

    def __init__(self, layer, weights) -> None:
        self.layer, self.pending, self.created, self.exact = layer, list(weights), [], True

    def __enter__(self) -> _WeightsFrom:
        add_weight = self.layer.add_weight

        def add_weight_from_array(*args, **kwargs):
            if args:  # Keras 2's positional (shape, initializer, dtype)
                kwargs.update(zip(("shape", "initializer", "dtype"), args, strict=False))
            shape = tuple(kwargs.get("shape") or ())
            self.exact = self.exact and bool(self.pending) and np.shape(self.pending[0]) == shape
            if self.exact:  # a tensor, which Keras takes as it is (it copies a NumPy array)
                value = _tensor(np.asarray(self.pending.pop(0)), copy=True)
                kwargs["initializer"] = lambda shape, dtype=None: value
            variable = add_weight(**kwargs)
            self.created.append(variable)
            return variable

        object.__setattr__(self.layer, "add_weight", add_weight_from_array)  # past Keras' attribute tracking
        return self

    def __exit__(self, *exc) -> None:
        object.__delattr__(self.layer, "add_weight")

    def complete(self) -> bool:
        """Whether the layer's weights, in ``layer.weights`` order, are exactly the given arrays."""
        ids = [id(v) for v in self.layer.weights]
        return self.exact and not self.pending and ids == [id(v) for v in self.created]


def call_with_weights(layer, inputs, weights=None):
    """Call a new Keras ``layer`` on symbolic ``inputs``; its weights hold ``weights`` (NumPy arrays
    in ``layer.weights`` order, as ``set_weights`` takes them). Creating them with those values is
    what makes converting a large network fast: no random initialisation, one copy per weight.
    Where the layer creates its weights in another order or shape, ``set_weights`` sets them."""
    if weights is None or layer.built:
        out = layer(inputs)
        if weights is not None:
            layer.set_weights(weights)
        return out
    with _WeightsFrom(layer, weights) as preset:
        out = layer(inputs)
    if not preset.complete():
        layer.set_weights(weights)
    return out
