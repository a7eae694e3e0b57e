"""Per-layer ONNX emitters for :mod:`bnkit.formats.onnx_write`: one registered function per layer type.

An emitter is registered with ``@to_onnx(nn.BatchNorm2d, "torchvision.ops.misc.FrozenBatchNorm2d", ...)``
(classes, or dotted ``"module.QualName"`` strings for classes of packages bnkit does not import), in the
family file of :mod:`bnkit.formats.onnx_emit` that holds its kind of layer, as converters are in
:mod:`bnkit.convert.registry`. It is called as ``emit(module, name, training)`` with the module (a
``call_module`` leaf of the ``torch.fx`` graph), its qualified name and whether a training-mode file is
asked for, and returns the :class:`OnnxNode` that stands for one call of the module, or raises
:class:`NotWritable` naming the module and what ONNX cannot hold exactly.

A class's emitter serves its subclasses only with ``subclasses=True`` (the emitter then checks what it
needs itself). Layers without an emitter are written by ``torch.onnx.export`` as it writes them (see
:mod:`bnkit.formats.onnx_write` for why that is exact).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["NotWritable", "OnnxNode", "to_onnx", "emitter_for", "registered"]


class NotWritable(ValueError):
    """A layer ONNX cannot hold as exactly that layer: the message names the layer and why."""


@dataclass
class OnnxNode:
    """One standard-domain ONNX node standing for a module call: ``op_type``, its tensor inputs after
    the layer's input (``inputs``: name -> torch tensor, written as initializers in this order), its
    attributes, and ``state_outputs``: names of outputs beyond the first (a training-mode batch norm's
    updated running statistics), written as graph outputs ``<module name>.<output name>``.

    ``reference(x)`` computes in PyTorch what the node computes (the shape and values the exporter
    traces through)."""

    op_type: str
    inputs: dict
    attributes: dict
    reference: Callable
    state_outputs: tuple[str, ...] = ()
    min_opset: int = 1
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Emitter:
    emit: Callable
    subclasses: bool = False


_BY_CLASS: dict[type, _Emitter] = {}
_BY_NAME: dict[str, _Emitter] = {}


def to_onnx(*classes, subclasses: bool = False) -> Callable:
    """Register ``emit(module, name, training) -> OnnxNode`` for these module classes (or dotted names)."""
    if not classes:
        raise TypeError("to_onnx needs at least one module class")

    def decorate(fn: Callable) -> Callable:
        for cls in classes:
            if not isinstance(cls, (type, str)):
                raise TypeError(f"to_onnx takes module classes, got {cls!r}")
            table = _BY_NAME if isinstance(cls, str) else _BY_CLASS
            existing = table.get(cls)
            if existing is not None and existing.emit is not fn:
                raise ValueError(f"{cls!r} already has an ONNX emitter ({existing.emit.__qualname__})")
            table[cls] = _Emitter(fn, subclasses)
        return fn

    return decorate


def emitter_for(module) -> Callable | None:
    """The emitter of ``module``'s class: registered for the class itself, or for a base class with
    ``subclasses=True``; else None."""
    _load_families()
    cls = type(module)
    for base in cls.__mro__:
        found = _BY_CLASS.get(base) or _BY_NAME.get(f"{base.__module__}.{base.__qualname__}")
        if found is not None and (base is cls or found.subclasses):
            return found.emit
    return None


def registered() -> dict[str, str]:
    """``{class: emitter}`` for every registered class (for docs and tests)."""
    _load_families()
    rows = {f"{c.__module__}.{c.__qualname__}": e.emit.__qualname__ for c, e in _BY_CLASS.items()}
    rows.update({name: e.emit.__qualname__ for name, e in _BY_NAME.items()})
    return rows


def _load_families() -> None:
    from bnkit.formats.onnx_emit import batch_norm  # noqa: F401 - registers its emitters
