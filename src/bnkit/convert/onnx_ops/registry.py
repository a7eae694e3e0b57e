"""Which converter translates which ONNX operator: one registered function per ``op_type``.

Modelled on :mod:`bnkit.convert.registry`. A converter is registered in its family file
(``bnkit/convert/onnx_ops/*.py``) with ``@from_onnx("Conv")`` and called as
``convert(b, node, inputs)``: ``b`` the :class:`~bnkit.convert.onnx_walker.OnnxToTorch` builder,
``node`` the ``onnx.NodeProto``, ``inputs`` one :class:`~bnkit.convert.onnx_walker.Value` per
input (``None`` for an omitted optional input). It returns a ``Value`` or a list of them, one per
output. Only the default domain (``""`` / ``"ai.onnx"``) is registered: other domains are refused.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["from_onnx", "onnx_converter", "registered_ops"]

_OPS: dict[str, Callable] = {}


def from_onnx(*op_types: str) -> Callable:
    """Register ``convert(b, node, inputs)`` for these ONNX ``op_type`` names (default domain)."""
    if not op_types or not all(isinstance(op, str) for op in op_types):
        raise TypeError("from_onnx needs one or more op_type names")

    def decorate(fn: Callable) -> Callable:
        for op in op_types:
            existing = _OPS.get(op)
            if existing is not None and existing is not fn:
                raise ValueError(f"ONNX op {op!r} already has a converter ({existing.__module__}.{existing.__name__})")
            _OPS[op] = fn
        return fn

    return decorate


def onnx_converter(op_type: str) -> Callable | None:
    return _OPS.get(op_type)


def registered_ops() -> list[str]:
    """The ONNX operators with a converter, sorted (for docs and error messages)."""
    return sorted(_OPS)
