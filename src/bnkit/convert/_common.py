"""What both directions of conversion share: the error, layout arithmetic, activation names.

Layouts: Keras tensors are channels-last (``N, *spatial, C``), PyTorch tensors channels-first
(``N, C, *spatial``). A rank-2 ``(N, F)`` tensor is the same in both.
"""

from __future__ import annotations

import keyword
import math
import sys
import warnings
from collections.abc import Mapping

import numpy as np

__all__ = [
    "UnsupportedLayerError",
    "SEMANTICS",
    "check_semantics",
    "SemanticsChoice",
    "keras_axis_to_torch",
    "torch_axis_to_keras",
    "same_padding",
    "warn_at_caller",
    "keras_to_torch_flat_order",
    "torch_to_keras_flat_order",
]

SEMANTICS = ("source", "target")


class UnsupportedLayerError(ValueError):
    """A layer (or operation) the converter cannot translate exactly.

    ``layer_name`` and ``layer_type`` name the layer as the user wrote it: a Keras layer's name
    (``outer/inner`` inside a nested model) and class, a PyTorch module's path (``"features.2"``,
    ``""`` for the model itself) and class. For a function, operator or tensor method called in a
    module's ``forward``, ``operation`` says which (``"torch.flatten()"``) and ``location`` where
    (``"resnet.py:280"``), and ``layer_*`` name the module whose ``forward`` calls it.
    """

    def __init__(
        self, name: str, kind: str, reason: str, *, operation: str | None = None, location: str | None = None
    ) -> None:
        if operation is None:
            what = f"layer {name!r} ({kind})"
        else:
            owner = f"{name!r} ({kind})" if name else f"the model ({kind})"
            what = f"{operation} in the forward of {owner}" + (f", at {location}" if location else "")
        super().__init__(f"cannot convert {what}: {reason}")
        self.layer_name = name
        self.layer_type = kind
        self.reason = reason
        self.operation = operation
        self.location = location


def check_semantics(semantics):
    """``"source"``, ``"target"``, or a mapping from batch-norm layer name (the source model's:
    Keras layer name, PyTorch module path such as ``"block.bn1"``) to one of them, chosen per
    layer; layers left out keep ``"source"``."""
    if isinstance(semantics, str):
        if semantics not in SEMANTICS:
            raise ValueError(f"semantics must be 'source' or 'target', got {semantics!r}")
        return semantics
    if isinstance(semantics, Mapping):
        bad = {name: value for name, value in semantics.items() if value not in SEMANTICS}
        if bad:
            raise ValueError(f"semantics per layer must be 'source' or 'target', got {bad!r}")
        return dict(semantics)
    raise TypeError(
        f"semantics must be 'source', 'target' or a dict of layer name -> 'source'/'target', got {semantics!r}"
    )


class SemanticsChoice:
    """The semantics of each batch norm, and a check that every named layer was found."""

    def __init__(self, semantics) -> None:
        self.semantics = check_semantics(semantics)
        self.seen: list[str] = []

    def for_layer(self, name: str) -> str:
        self.seen.append(name)
        if isinstance(self.semantics, str):
            return self.semantics
        return self.semantics.get(name, "source")

    def check_all_found(self) -> None:
        if isinstance(self.semantics, dict):
            unknown = sorted(set(self.semantics) - set(self.seen))
            if unknown:
                raise ValueError(
                    f"semantics names no batch norm layer {', '.join(map(repr, unknown))}; "
                    f"the model's batch norms are: {', '.join(map(repr, self.seen)) or 'none'}"
                )


def keras_axis_to_torch(axis: int, rank: int) -> int:
    """The PyTorch dimension of Keras axis ``axis`` of a rank-``rank`` tensor."""
    axis = axis % rank
    if rank <= 2 or axis == 0:
        return axis
    return 1 if axis == rank - 1 else axis + 1


def torch_axis_to_keras(dim: int, rank: int) -> int:
    """The Keras axis of PyTorch dimension ``dim`` of a rank-``rank`` tensor."""
    dim = dim % rank
    if rank <= 2 or dim == 0:
        return dim
    return rank - 1 if dim == 1 else dim - 1


def same_padding(size: int | None, kernel: int, stride: int, dilation: int) -> tuple[int, int] | None:
    """``(before, after)`` zero padding of Keras/TensorFlow ``padding="same"`` on one axis.

    The total is what makes ``ceil(size / stride)`` outputs; the odd element goes *after*.
    With stride 1 it does not depend on ``size``; otherwise ``None`` when ``size`` is unknown.
    """
    effective = (kernel - 1) * dilation + 1
    if stride == 1:
        total = effective - 1
    elif size is None:
        return None
    else:
        total = max((math.ceil(size / stride) - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def keras_to_torch_flat_order(kernel: np.ndarray, torch_shape: tuple[int, ...]) -> np.ndarray:
    """Rows of a Dense kernel that follows a Keras Flatten of ``(*spatial, C)``, reordered for
    a PyTorch Flatten of ``(C, *spatial)`` (``torch_shape``): the classic silent porting bug."""
    c, *spatial = torch_shape
    out = kernel.shape[-1]
    k = kernel.reshape(*spatial, c, out)
    return np.moveaxis(k, -2, 0).reshape(-1, out)


def torch_to_keras_flat_order(kernel: np.ndarray, torch_shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of :func:`keras_to_torch_flat_order`: ``(C, *spatial)`` rows to ``(*spatial, C)``.

    Done on the transpose, PyTorch's ``(out, C·spatial)`` layout, which a Linear weight's ``.T``
    already is in memory: one transpose of ``C × spatial`` blocks, no transpose of the whole matrix."""
    c = torch_shape[0]
    out = kernel.shape[-1]
    weight = kernel.T.reshape(out, c, -1)
    return np.ascontiguousarray(weight.transpose(0, 2, 1)).reshape(out, -1).T


_NOT_THE_CALLER = ("bnkit.convert", "bnkit.frameworks")  # the converters, and the wrapper taking tf-keras models


def warn_at_caller(message: str) -> None:
    """A ``UserWarning`` that points at the first frame outside bnkit.convert (and the wrapper that lets
    it take tf-keras models): the user's call."""
    frame, level = sys._getframe(1), 2  # stacklevel 2 is the frame that called this function
    while frame is not None and frame.f_globals.get("__name__", "").startswith(_NOT_THE_CALLER):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def unique_identifier(base: str, taken: set[str]) -> str:
    """``base`` (already made of word characters) as a Python identifier not in ``taken``: a leading digit or a
    keyword gets ``_`` in front, a name taken ``_1``, ``_2``... behind; the result is added to ``taken``
    (a module attribute name of a converted graph)."""
    base = base or "layer"
    if base[0].isdigit() or keyword.iskeyword(base):
        base = f"_{base}"
    candidate, i = base, 1
    while candidate in taken:
        candidate, i = f"{base}_{i}", i + 1
    taken.add(candidate)
    return candidate
