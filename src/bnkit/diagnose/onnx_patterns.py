"""Activations an ONNX exporter wrote as several nodes, found so the ONNX tracer records each as one.

PyTorch's ``nn.SiLU``, ``nn.Hardswish`` (below opset 14, which has no ``HardSwish``) and ``nn.GELU`` are one
module each, and compare folds each into the convolution or linear layer it follows. torch's exporters
write them as small graphs of element-wise nodes over one tensor ``x``:

- SiLU ``x · σ(x)``: ``Sigmoid``, ``Mul(x, ·)``;
- Hardswish ``x · relu6(x + 3) / 6``: ``HardSigmoid``, ``Mul(x, ·)`` or ``Add``, ``Clip``, ``Div``, ``Mul``;
- GELU ``x · (1 + erf(x / √2)) / 2``: ``Div``, ``Erf``, ``Add``, ``Mul(x, ·)``, ``Mul(·, 0.5)`` (or the tanh form).

:func:`activation_regions` finds such a graph generally, whatever its nodes: a set of element-wise nodes
whose only non-constant operand is ``x`` or each other's outputs, every constant a scalar, ``x`` read at
least twice inside it (a function of ``x`` that is not affine: ``x · f(x)``), and one output read outside it.
:func:`activation_name` names it by its values: the first of :data:`KNOWN` whose formula gives its output
from ``x`` within float32 rounding, else ``"Elementwise"``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["Region", "activation_regions", "activation_name", "KNOWN"]

# element-wise operators an exporter writes activations with (operands broadcast, one output)
_ELEMENTWISE = {
    "Sigmoid", "HardSigmoid", "Mul", "Div", "Add", "Sub", "Erf", "Tanh", "Clip", "Relu", "Pow", "Sqrt",
    "Neg", "Exp", "Log", "Softplus", "Min", "Max", "Abs", "Reciprocal",
}  # fmt: skip


class Region:
    """Element-wise nodes (indices into ``graph.node``) computing ``output`` from the tensor ``source``."""

    def __init__(self, source: str, nodes: list[int], output: str, reads: int) -> None:
        self.source, self.nodes, self.output = source, nodes, output
        self.reads = reads  # how many operands inside the region are ``source``


def _scalar_constants(graph, values: dict) -> set[str]:
    """Tensor names that hold one number: initializers and Constant nodes' outputs."""
    names = {t.name for t in graph.initializer if int(np.prod(t.dims, dtype=np.int64)) == 1}
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] in values and np.size(values[node.output[0]]) == 1:
            names.add(node.output[0])
    return names


def activation_regions(graph, values: dict, floating: set[str]) -> dict[int, Region]:
    """The regions of ``graph`` (keyed by their last node's index), each a multi-node activation of one
    tensor. ``values``: the tensors onnxruntime computed (for constants' sizes); ``floating``: the names of
    the tensors that carry data (have provenance), the candidates for ``source``."""
    scalars = _scalar_constants(graph, values)
    readers: dict[str, list[int]] = {}
    for k, node in enumerate(graph.node):
        for name in node.input:
            readers.setdefault(name, []).append(k)
    graph_outputs = {o.name for o in graph.output}
    regions: dict[int, Region] = {}
    taken: set[int] = set()
    for node in graph.node:
        for source in node.output:
            if source not in floating or len(readers.get(source, ())) < 2:
                continue  # x · f(x) reads x at least twice
            region = _grow(graph, source, readers, scalars, taken, graph_outputs)
            if region is not None:
                regions[region.nodes[-1]] = region
                taken.update(region.nodes)
    return regions


def _grow(graph, source: str, readers, scalars: set[str], taken: set[int], graph_outputs: set[str]) -> Region | None:
    """The largest closed region over ``source``: nodes joined in graph order while their operands are
    ``source``, the region's outputs or scalar constants; closed when exactly one of its tensors other
    than ``source`` is read outside it."""
    inside: list[int] = []
    produced: set[str] = set()
    best = None
    candidates = sorted(set(readers.get(source, ())))
    pending = set(candidates)
    while pending:
        k = min(pending)
        pending.discard(k)
        node = graph.node[k]
        if k in taken or node.op_type not in _ELEMENTWISE or len(node.output) != 1:
            continue
        ins = [n for n in node.input if n]
        if not ins or not all(n == source or n in produced or n in scalars for n in ins):
            continue
        if not any(n == source or n in produced for n in ins):
            continue
        inside.append(k)
        produced.add(node.output[0])
        pending.update(readers.get(node.output[0], ()))
        members = set(inside)
        escaping = [n for n in produced if any(r not in members for r in readers.get(n, ())) or n in graph_outputs]
        reads = sum(1 for m in inside for n in graph.node[m].input if n == source)
        if len(inside) >= 2 and reads >= 2 and len(escaping) == 1 and escaping[0] == node.output[0]:
            best = Region(source, list(inside), node.output[0], reads)
    return best


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


#: name -> formula of x (float64), the activations torch's exporters decompose
KNOWN = {
    "SiLU": lambda x: x / (1.0 + np.exp(-x)),
    "Hardswish": lambda x: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0,
    "GELU": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "GELU(tanh)": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))),
    "Mish": lambda x: x * np.tanh(np.logaddexp(0.0, x)),
}


def activation_name(x: np.ndarray, y: np.ndarray) -> str:
    """The activation of :data:`KNOWN` that maps ``x`` to ``y`` within float32 rounding (|error| at most
    ``1e-5 · (1 + |y|)`` everywhere), or ``"Elementwise"``."""
    if x.shape != y.shape or x.size == 0:
        return "Elementwise"
    sample = slice(0, 4096)  # enough values to tell the formulas apart, cheap on a large map
    x64 = x.reshape(-1)[sample].astype(np.float64)
    y64 = y.reshape(-1)[sample].astype(np.float64)
    for name, f in KNOWN.items():
        with np.errstate(all="ignore"):
            if np.all(np.abs(f(x64) - y64) <= 1e-5 * (1.0 + np.abs(y64))):
                return name
    return "Elementwise"
