"""The data of a model summary: one :class:`LayerRow` per layer, totals in both accountings.

Keras and PyTorch count the same network differently. Keras counts every weight a layer
holds, so a ``BatchNormalization`` layer over C channels has 4·C params, of which the 2·C
moving statistics are *non-trainable*. PyTorch counts ``parameters()`` only: the running
statistics are *buffers*, and tools built on it (``sum(p.numel() for p in m.parameters())``,
torchinfo, torchsummary) report 2·C. So, for the same network,

    keras_total = torch_params + torch_buffers
    keras_trainable = torch_trainable
    keras_non_trainable = torch_frozen_params + torch_buffers

where ``torch_buffers`` counts floating-point buffers (running statistics). Integer step
counters such as ``num_batches_tracked`` have no Keras counterpart and are reported apart,
as ``torch_counters``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass, field

__all__ = ["LayerRow", "MemoryEstimate", "ModelSummary"]

#: Bytes in a megabyte, as torchinfo counts them (decimal).
MEGABYTE = 1_000_000

Shape = tuple[int | None, ...]


@dataclass(frozen=True)
class LayerRow:
    """One layer of a summary.

    ``trainable_params`` and ``non_trainable_params`` follow Keras' accounting (running
    statistics are non-trainable params); ``buffers`` is the part of ``non_trainable_params``
    that PyTorch keeps as buffers, so ``torch_params = trainable + non_trainable - buffers``.
    ``output_shape`` includes the batch dimension (``None`` in Keras, 1 in the PyTorch
    forward pass used to measure it) and is ``None`` where it is unknown; a layer with
    several outputs has a tuple of shapes in ``output_shapes``.
    """

    name: str
    type: str
    output_shapes: tuple[Shape, ...] | None
    trainable_params: int
    non_trainable_params: int
    buffers: int
    counters: int = 0
    depth: int = 0

    @property
    def output_shape(self) -> Shape | None:
        """The shape of the (first) output, or ``None`` where it is unknown."""
        return self.output_shapes[0] if self.output_shapes else None

    @property
    def params(self) -> int:
        """Param count in Keras' accounting (what ``Param #`` of ``model.summary()`` shows)."""
        return self.trainable_params + self.non_trainable_params

    @property
    def torch_params(self) -> int:
        """Param count in PyTorch's accounting (running statistics left out)."""
        return self.params - self.buffers


@dataclass(frozen=True)
class MemoryEstimate:
    """Memory of one forward and backward pass at batch size 1, in bytes, as torchinfo defines it.

    ``input``: the input tensors. ``activations`` ("Forward/backward pass size"): the output of
    every call of a layer that has parameters, counted twice (kept for the backward pass, and its
    gradient); layers without parameters (activations, pooling, reshapes) are left out, as
    torchinfo leaves them out. ``params``: the parameters (Keras: the weights that are not running
    statistics or step counters). ``total`` is their sum, torchinfo's "Estimated Total Size".
    ``buffers`` (running statistics and other floating buffers, which torchinfo does not count
    anywhere) is reported apart and is not in ``total``.
    """

    input: int
    activations: int
    params: int
    buffers: int = 0

    @property
    def total(self) -> int:
        return self.input + self.activations + self.params

    def megabytes(self) -> dict[str, float]:
        return {
            "input": self.input / MEGABYTE,
            "forward_backward": self.activations / MEGABYTE,
            "params": self.params / MEGABYTE,
            "buffers": self.buffers / MEGABYTE,
            "total": self.total / MEGABYTE,
        }


@dataclass(frozen=True)
class ModelSummary:
    """A model's layers and parameter counts in Keras' and PyTorch's accountings.

    ``total``, ``trainable``, ``non_trainable``: Keras' accounting (``model.count_params()``
    and ``model.summary()``). ``torch_params``, ``torch_trainable``, ``torch_frozen``,
    ``torch_buffers``, ``torch_counters``: PyTorch's (``parameters()`` and ``buffers()``).
    ``torch_running_stats`` is the part of ``torch_buffers`` that is batch-norm running
    statistics; the rest are other floating buffers (a folded batch norm's ``ChannelAffine``
    scale and shift, for instance).
    The totals are read from the model itself (shared weights counted once), not summed
    from the rows.
    """

    name: str
    framework: str  # "torch", "keras" or "onnx"
    input_shapes: tuple[Shape, ...] | None
    rows: list[LayerRow]
    total: int
    trainable: int
    non_trainable: int
    torch_params: int
    torch_trainable: int
    torch_buffers: int
    torch_counters: int
    memory: MemoryEstimate | None
    dtype: str = "float32"
    notes: list[str] = field(default_factory=list)
    renorm_layers: int = 0  # batch norms with batch renormalization (3·C more statistics each)
    torch_running_stats: int | None = None  # None: all of torch_buffers
    keras_backend: str | None = None  # the Keras backend that ran a Keras model ("torch", "tensorflow", "jax")
    source: str | None = None  # what the model was read from when not a model of its framework ("tf-keras 2")
    onnx_stored: int | None = None  # an ONNX model: the values of its floating-point initializers, each stored once

    @property
    def running_stats(self) -> int:
        """Batch-norm running statistics among the buffers."""
        return self.torch_buffers if self.torch_running_stats is None else self.torch_running_stats

    @property
    def other_buffers(self) -> int:
        """Floating buffers that are not running statistics (a ChannelAffine's scale and shift, ...)."""
        return self.torch_buffers - self.running_stats

    @property
    def torch_frozen(self) -> int:
        """Parameters with ``requires_grad=False`` (Keras: non-trainable weights that are not statistics)."""
        return self.torch_params - self.torch_trainable

    @property
    def input_shape(self) -> Shape | None:
        return self.input_shapes[0] if self.input_shapes else None

    @property
    def explanation(self) -> str:
        """Why PyTorch tools print a different count than Keras for this model, in one sentence."""
        from bnkit.summarize.table import why_counts_differ

        return why_counts_differ(self)

    def __str__(self) -> str:
        """The summary as plain text, so that ``print(bnkit.summary(model))`` shows the table (as torchinfo)."""
        import io

        from rich.console import Console

        from bnkit.summarize.table import render

        out = io.StringIO()
        render(self, Console(file=out, width=100, color_system=None, highlight=False))
        return out.getvalue().rstrip()

    def to_dict(self) -> dict:
        """Plain data for ``json.dumps``: rows, both accountings and memory in bytes and MB."""
        rows = []
        for row in self.rows:
            d = asdict(row)
            d["output_shapes"] = _json_shapes(row.output_shapes)
            d["output_shape"] = _json_shape(row.output_shape)
            d["params"] = row.params
            d["torch_params"] = row.torch_params
            rows.append(d)
        memory = None
        if self.memory is not None:
            memory = {
                "bytes": {**asdict(self.memory), "total": self.memory.total},
                "megabytes": self.memory.megabytes(),
            }
        return {
            "name": self.name,
            "framework": self.framework,
            "keras_backend": self.keras_backend,
            "source": self.source,
            "input_shapes": _json_shapes(self.input_shapes),
            "dtype": self.dtype,
            "keras": {
                "total": self.total,
                "trainable": self.trainable,
                "non_trainable": self.non_trainable,
            },
            "torch": {
                "params": self.torch_params,
                "trainable": self.torch_trainable,
                "frozen": self.torch_frozen,
                "buffers": self.torch_buffers,
                "running_stats": self.running_stats,
                "other_buffers": self.other_buffers,
                "counters": self.torch_counters,
            },
            "renorm_layers": self.renorm_layers,
            "onnx_stored": self.onnx_stored,
            "memory": memory,
            "explanation": self.explanation,
            "rows": rows,
            "notes": list(self.notes),
        }


def _json_shape(shape):
    return None if shape is None else list(shape)


def _json_shapes(shapes):
    return None if shapes is None else [_json_shape(s) for s in shapes]


def numel(shape: Shape, batch: int = 1) -> int:
    """Elements of ``shape`` with an unknown (``None``) batch dimension taken as ``batch``."""
    return math.prod(batch if d is None else int(d) for d in shape)


def normalize_input_shape(input_shape) -> tuple[tuple[int, ...], ...] | None:
    """``(64, 64, 1)`` or ``[(3,), (4, 5)]`` (one per input) -> a tuple of int tuples."""
    if input_shape is None:
        return None
    if isinstance(input_shape, str):
        raise TypeError(f"input_shape must be a tuple of ints such as (64, 64, 1), got {input_shape!r}")
    items = list(input_shape)
    if items and all(isinstance(s, (list, tuple)) for s in items):
        return tuple(_check_dims(s) for s in items)
    return (_check_dims(items),)


def _check_dims(shape) -> tuple[int, ...]:
    message = f"input_shape must hold positive ints (without the batch dimension), got {tuple(shape)!r}"
    dims = []
    for d in shape:
        try:
            d = operator.index(d)  # ints and NumPy integers, not floats or bools
        except TypeError:
            raise ValueError(message) from None
        if isinstance(d, bool) or d < 1:
            raise ValueError(message)
        dims.append(d)
    return tuple(dims)
