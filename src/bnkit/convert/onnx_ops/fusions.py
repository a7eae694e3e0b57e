"""Exporters' decompositions recognised before the walk, so that they become one ``torch.nn`` layer.

Both torch exporters write an exact ``nn.GELU`` as ``0.5 * x * (1 + erf(x / sqrt(2)))``: five nodes
(``Div``, ``Erf``, ``Add``, ``Mul``, ``Mul``, in either order of the last two) that PyTorch runs as they are
but Keras has no ``erf`` layer for. :func:`fuse` gives the node list with each such chain replaced by
one ``Gelu`` node (the operator opset 20 added; the converter takes it at any opset), where the chain's
intermediate values are used nowhere else. Nothing else changes: the model is not modified.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["fuse"]


def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def _scalar(constants, name: str, value: float) -> bool:
    array = constants.get(name)
    return array is not None and array.size == 1 and math.isclose(float(array.reshape(())), value, rel_tol=1e-6)


def _other(node, name: str) -> str | None:
    """The other input of a two-input node that takes ``name``."""
    if len(node.input) != 2 or name not in node.input:
        return None
    return node.input[1] if node.input[0] == name else node.input[0]


def fuse(graph) -> list:
    """The graph's nodes with every exact-GELU chain replaced by a ``Gelu`` node."""
    from onnx import helper

    nodes = list(graph.node)
    constants = _constants(graph)
    producer = {out: n for n in nodes for out in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    outputs = {o.name for o in graph.output}

    def sole(name: str, op_type: str):
        users = consumers.get(name, [])
        if len(users) != 1 or name in outputs or users[0].op_type != op_type:
            return None
        return users[0]

    removed: set[int] = set()
    replaced: dict[int, object] = {}
    for erf in nodes:
        if erf.op_type != "Erf":
            continue
        div = producer.get(erf.input[0])
        if div is None or div.op_type != "Div" or not _scalar(constants, div.input[1], math.sqrt(2)):
            continue
        x = div.input[0]
        if sole(div.output[0], "Erf") is not erf:
            continue
        add = sole(erf.output[0], "Add")
        if add is None or not _scalar(constants, _other(add, erf.output[0]) or "", 1.0):
            continue
        first = sole(add.output[0], "Mul")
        if first is None:
            continue
        partner = _other(first, add.output[0])
        second = sole(first.output[0], "Mul")
        if second is None:
            continue
        last_partner = _other(second, first.output[0])
        if not (
            (partner == x and _scalar(constants, last_partner or "", 0.5))
            or (_scalar(constants, partner or "", 0.5) and last_partner == x)
        ):
            continue
        gelu = helper.make_node("Gelu", [x], [second.output[0]], name=second.name or erf.name)
        removed.update(id(n) for n in (div, erf, add, first))
        replaced[id(second)] = gelu
    return [replaced.get(id(n), n) for n in nodes if id(n) not in removed]
