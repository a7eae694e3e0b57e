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

from bnkit.diagnose.kinds import kind_of
from bnkit.diagnose.report import BatchNormState

__all__ = [
    "INPUT",
    "Entry",
    "Trace",
    "Recorder",
    "folds_into",
    "to_layout",
    "to_numpy",
    "magnitude",
    "rerun",
    "renorm_state",
]

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
    # the pair's outputs compared in their own layouts: both sides hold the data in one arrangement (a
    # Dense after a permute, as ConvNeXt's; a Linear over the length axis kept in PyTorch's layout)
    compared_as_is: bool = False
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

    def set_output(self, raw: np.ndarray, canonical: np.ndarray) -> None:
        """Replace the output (an activation folded in, simulated rounding added)."""
        self.raw, self.canonical = raw, canonical
        self.cache.pop("scale", None)
        self.cache.pop("nonfinite", None)

    @property
    def scale(self) -> float:
        """The largest finite ``|value|`` of the output."""
        if "scale" not in self.cache:
            self.cache["scale"], self.cache["nonfinite"] = _scan(self.raw)
        return self.cache["scale"]

    @property
    def nonfinite(self) -> bool:
        """NaN or Inf somewhere in the output."""
        if "nonfinite" not in self.cache:
            self.cache["scale"], self.cache["nonfinite"] = _scan(self.raw)
        return self.cache["nonfinite"]


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


def folds_into(entries: list[Entry], kind: str, inputs: list[tuple[int, ...]]) -> int | None:
    """The traced layer that a new layer of ``kind`` with operands from ``inputs`` folds into, or
    None: an activation or a crop applied to a convolution's or dense layer's output (as Keras fuses
    ``Conv2D(..., activation="relu")``; one side may crop a transposed convolution inside), arithmetic
    with a constant applied to such arithmetic
    (``(x - mean) / std`` is one layer in Keras, two operations in PyTorch). The caller checks that
    the operand is that layer's latest output and that nothing else consumed it."""
    if len(inputs) != 1 or len(inputs[0]) != 1 or inputs[0][0] == INPUT:
        return None
    p = inputs[0][0]
    before = entries[p].kind
    if (kind in ("act", "crop") and kind_of(before).folds_activation) or (kind_of(kind).chains and before == kind):
        return p
    return None


def renorm_state(layer, conv) -> dict:
    """Either framework's batch-renormalization settings (for :class:`BatchNormState`), the momentum
    as the weight of the new batch statistic."""
    if getattr(layer, "renorm", False) is not True:
        return {}
    momentum = layer.renorm_momentum
    return {
        "renorm": True,
        "renorm_clipping": {k: v for k, v in (layer.renorm_clipping or {}).items() if v is not None},
        "renorm_new_weight": None if momentum is None else conv.weights(float(momentum))[1],
    }


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


def to_layout(x: np.ndarray, source: str, target: str, *, copy: bool = True) -> np.ndarray:
    """Move the channel axis of a rank-3/4/5 array from ``source``'s layout to ``target``'s
    (a contiguous copy, or with ``copy=False`` a view). ONNX's layout is PyTorch's (NCHW)."""
    if source == target or x.ndim not in (3, 4, 5) or {source, target} <= {"torch", "onnx"}:
        return x
    moved = np.moveaxis(x, -1, 1) if source == "keras" else np.moveaxis(x, 1, -1)
    return np.ascontiguousarray(moved) if copy else moved


def as_tensor(x: np.ndarray):
    """A torch view of ``x`` (no copy), for arithmetic over large arrays: PyTorch's kernels are
    vectorised and threaded where NumPy's reductions are not."""
    import torch

    return torch.from_numpy(x if x.flags.writeable else x.copy())


def _scan(x: np.ndarray) -> tuple[float, bool]:
    """(largest finite ``|value|``, whether some value is NaN or Inf) in one pass where all are finite
    (the extremes are NaN or Inf exactly when some value is)."""
    if x.size == 0 or not np.issubdtype(x.dtype, np.number):
        return 0.0, False
    import torch

    t = as_tensor(x)
    if not t.is_floating_point():
        return float(t.abs().max()), False
    low, high = torch.aminmax(t)
    largest = max(-float(low), float(high))
    if math.isfinite(largest):
        return largest, False
    finite = t[t.isfinite()]
    return (float(finite.abs().max()) if finite.numel() else 0.0), True


def magnitude(x: np.ndarray) -> float:
    """The largest finite ``|value|`` of ``x`` (0 for an empty or all-non-finite array)."""
    return _scan(x)[0]


def all_finite(x: np.ndarray) -> bool:
    return not _scan(x)[1]


class Recorder:
    """What both tracers keep while a model runs: the entries recorded so far, which traced layers
    each live tensor came from (its provenance, by ``id``), and the names given out.

    A tracer subclasses it and says, in :meth:`results`, which tensors of an untraced operation's
    result are new (they inherit the provenance of its operands)."""

    def __init__(self, perturb=None) -> None:
        self.perturb = perturb
        self.entries: list[Entry] = []
        self.provenance: dict[int, tuple[int, ...]] = {}
        self.keep: list = []  # tensors stay alive, so their ids are not reused
        self.output_ids: dict[int, int] = {}  # entry -> id of the tensor it returned
        self.consumed: set[int] = set()  # entries whose output some recorded layer has read
        self.used_names: dict[str, int] = {}

    def results(self, operands, result) -> list:
        raise NotImplementedError

    def source(self, tensor, producers: tuple[int, ...]) -> None:
        self.provenance[id(tensor)] = producers
        self.keep.append(tensor)

    def of(self, tensor) -> tuple[int, ...]:
        return self.provenance.get(id(tensor), ())

    def pass_on(self, operands, result) -> None:
        """An untraced operation: its new tensors came from whatever its operands came from."""
        merged: list[int] = []
        for t in operands:
            for p in self.of(t):
                if p not in merged:
                    merged.append(p)
        if merged:
            for out in self.results(operands, result):
                self.source(out, tuple(sorted(merged)))

    def unique(self, name: str) -> str:
        count = self.used_names.get(name, 0)
        self.used_names[name] = count + 1
        return name if count == 0 else f"{name}_{count}"


def describe_operands(recorder, operands, keep: bool):
    """(max |x|, shape, all finite, arrays) of each operand a layer received. An operand that is a
    traced layer's output (the usual case) reuses that layer's figures and array: nothing is
    copied or scanned twice. ``keep``: also return the arrays (parametric kinds, for experiments)."""
    scales, shapes, finite, arrays = [], [], True, []
    for t in operands:
        producers = recorder.of(t)
        p = producers[0] if len(producers) == 1 else None
        if p is not None and p != INPUT and recorder.output_ids.get(p) == id(t):
            entry = recorder.entries[p]
            array, scale, ok = entry.raw, entry.scale, not entry.nonfinite
        else:
            array = to_numpy(t)
            scale, bad = _scan(array)
            ok = not bad
            if keep:
                array = array.copy()
        scales.append(scale)
        shapes.append(tuple(array.shape))
        finite = finite and ok
        arrays.append(array)
    return scales, shapes, finite, (arrays if keep else None)


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
