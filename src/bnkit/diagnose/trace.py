"""What a tracer records, in framework-neutral terms: a graph of traced layers.

Each framework's tracer (:mod:`~bnkit.diagnose.trace_torch`, :mod:`~bnkit.diagnose.trace_keras`)
runs the model once and returns a :class:`Trace`: one :class:`Entry` per layer of a known kind
(:mod:`bnkit.diagnose.kinds`), in execution order, each with its output in its own framework's layout
and in PyTorch's (``canonical``), and the traced layers its inputs came from — so that the two
graphs can be aligned by structure (:mod:`bnkit.diagnose.align`), not by order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from bnkit.diagnose.report import BatchNormState

__all__ = ["INPUT", "Entry", "Trace", "to_layout", "to_numpy", "magnitude", "rerun"]

#: The producer index that stands for the model's input.
INPUT = -1


@dataclass
class Entry:
    """One traced layer (or a layer and the activation folded into it)."""

    index: int
    name: str
    type: str
    kind: str
    raw: np.ndarray  # output in the framework's own layout
    canonical: np.ndarray  # output in PyTorch's layout (and C·H·W flatten order)
    # per operand, the traced layers its value came from (INPUT: the model input), through layers of no kind
    inputs: list[tuple[int, ...]] = field(default_factory=list)
    input_scales: list[float] = field(default_factory=list)  # max |x| of each operand as the layer received it
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    inputs_finite: bool = True  # no operand held NaN or Inf
    input_raw: list[np.ndarray] | None = None  # the operands themselves, for parametric kinds (experiments)
    callables: list = field(default_factory=list, repr=False)  # re-run the entry on new operands
    weights: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # canonical parameters
    bn: BatchNormState | None = None
    pre_flatten_shape: tuple[int, ...] | None = None  # the input's raw shape, for a flatten
    flat_order: str = "own"  # "hwc" when a flatten pair agrees in Keras' H·W·C order on both sides
    cache: dict = field(default_factory=dict, repr=False)  # figures derived from the weights, computed once

    @property
    def producers(self) -> list[int]:
        """The traced layers feeding this one, operand by operand, each once."""
        seen: list[int] = []
        for operand in self.inputs:
            for p in operand:
                if p not in seen:
                    seen.append(p)
        return seen

    @property
    def scale(self) -> float:
        """The largest finite ``|value|`` of the output."""
        return magnitude(self.canonical)

    @property
    def nonfinite(self) -> bool:
        return bool(self.canonical.size) and not bool(np.isfinite(self.canonical).all())


@dataclass
class Trace:
    """A model's traced layers in execution order, its final output (canonical) and the input."""

    framework: str
    entries: list[Entry]
    output: np.ndarray
    output_producers: tuple[int, ...]  # the traced layers the final output came from
    input_scale: float
    dtype_eps: float  # machine epsilon of the dtype the model computed in
    input_nonfinite: int = 0  # NaN/Inf values in the input
    model: object = None  # the model as run (PyTorch: the working copy)


def to_numpy(x) -> np.ndarray:
    """A NumPy array from a tensor of either framework (or anything array-like)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "value") and hasattr(x.value, "detach"):  # a Keras variable on the torch backend
        x = x.value
    if hasattr(x, "detach"):
        t = x.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
            t = t.float()
        return t.numpy()
    try:
        from bnkit.keras import keras

        return np.asarray(keras.ops.convert_to_numpy(x))
    except Exception:  # noqa: BLE001 - anything array-like
        return np.asarray(x)


def to_layout(x: np.ndarray, source: str, target: str) -> np.ndarray:
    """Move the channel axis of a rank-3/4/5 array from ``source``'s layout to ``target``'s."""
    if source == target or x.ndim not in (3, 4, 5):
        return x
    if source == "keras":
        return np.ascontiguousarray(np.moveaxis(x, -1, 1))
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


def magnitude(x: np.ndarray) -> float:
    """The largest finite ``|value|`` of ``x`` (0 for an empty or all-non-finite array)."""
    if x.size == 0:
        return 0.0
    largest = float(np.max(np.abs(x)))
    if math.isfinite(largest):
        return largest
    a = np.abs(x[np.isfinite(x)])
    return float(a.max()) if a.size else 0.0


def rerun(entry: Entry, framework: str, *operands: np.ndarray) -> np.ndarray:
    """Run an entry's layers (e.g. a Linear and its ReLU) on operands in its framework's layout."""
    if framework == "torch":
        import torch

        with torch.no_grad():
            args = [torch.from_numpy(np.ascontiguousarray(x)) for x in operands]
            first, *rest = entry.callables
            t = first(*args)
            for m in rest:
                t = m(t)
        return to_numpy(t)
    first, *rest = entry.callables
    y = first(operands[0] if len(operands) == 1 else list(operands))
    for layer in rest:
        y = layer(y)
    return to_numpy(y)
