"""Exporters' decompositions recognised before the walk, so that they become one ``torch.nn`` layer.

* Both torch exporters write an exact ``nn.GELU`` as ``0.5 * x * (1 + erf(x / sqrt(2)))``: five nodes
(``Div``, ``Erf``, ``Add``, ``Mul``, ``Mul``, in either order of the last two) that PyTorch runs as they are
but Keras has no ``erf`` layer for. :func:`fuse` gives the node list with each such chain replaced by
one ``Gelu`` node (the operator opset 20 added; the converter takes it at any opset).
* Before opset 17 the TorchScript exporter writes ``nn.LayerNorm`` as ``d = x - mean(x)``,
  ``(d / sqrt(mean(d ** 2) + eps)) * scale + bias`` over the last axes (``ReduceMean``, ``Sub``, ``Pow``,
  ``ReduceMean``, ``Add``, ``Sqrt``, ``Div``, ``Mul``, ``Add``): one ``LayerNormalization`` node.

A chain is replaced only where its intermediate values are used nowhere else. The model is not modified.
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
    for mean in nodes:
        chain = _layer_norm_chain(mean, constants, sole, consumers, outputs, helper)
        if chain is not None and not any(id(n) in removed or id(n) in replaced for n in chain[0]):
            removed.update(id(n) for n in chain[0][:-1])
            replaced[id(chain[0][-1])] = chain[1]
    return [replaced.get(id(n), n) for n in nodes if id(n) not in removed]


def _reduce_axes(node, constants) -> list[int] | None:
    from onnx import helper

    if node.op_type != "ReduceMean":
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if not attrs.get("keepdims", 1):
        return None
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    if len(node.input) > 1 and node.input[1] in constants:
        return [int(a) for a in constants[node.input[1]].reshape(-1)]
    return None


def _layer_norm_chain(mean, constants, sole, consumers, outputs, helper):
    """``(nodes of the chain, LayerNormalization node)`` for a decomposed layer norm starting at ``mean``."""
    axes = _reduce_axes(mean, constants)
    if not axes or sorted(axes) != list(range(-len(axes), 0)):  # the last axes, as negative indices
        return None
    x = mean.input[0]
    sub = sole(mean.output[0], "Sub")
    if sub is None or list(sub.input) != [x, mean.output[0]]:
        return None
    users = consumers.get(sub.output[0], [])
    if len(users) != 2 or sub.output[0] in outputs:
        return None
    power = next((n for n in users if n.op_type == "Pow"), None)
    div = next((n for n in users if n.op_type == "Div"), None)
    if power is None or div is None or not _scalar(constants, power.input[1], 2.0):
        return None
    variance = sole(power.output[0], "ReduceMean")
    if variance is None or _reduce_axes(variance, constants) != axes:
        return None
    add = sole(variance.output[0], "Add")
    eps_name = _other(add, variance.output[0]) if add is not None else None
    if eps_name not in constants or constants[eps_name].size != 1:
        return None
    sqrt = sole(add.output[0], "Sqrt")
    if sqrt is None or list(div.input) != [sub.output[0], sqrt.output[0]]:
        return None
    mul = sole(div.output[0], "Mul")
    scale = _other(mul, div.output[0]) if mul is not None else None
    shift = sole(mul.output[0], "Add") if mul is not None else None
    bias = _other(shift, mul.output[0]) if shift is not None else None
    if scale not in constants or bias not in constants:
        return None
    eps = float(constants[eps_name].reshape(()))
    node = helper.make_node(
        "LayerNormalization", [x, scale, bias], [shift.output[0]], name=shift.name or mean.name,
        axis=-len(axes), epsilon=eps,
    )  # fmt: skip
    return [mean, sub, power, variance, add, sqrt, div, mul, shift], node
