"""ONNX ``ModelProto`` → ``torch.fx.GraphModule`` of real ``torch.nn`` layers: the graph walk.

This module holds only the bookkeeping: it visits the ONNX graph in topological order, keeps one
:class:`Value` per tensor name (initializers and ``Constant`` outputs are constants), looks each
node's converter up in :mod:`bnkit.convert.onnx_ops.registry` and gives it an :class:`OnnxToTorch`
builder. The translations live in :mod:`bnkit.convert.onnx_ops`.

Every value carries an *example*: the tensor it holds when the model runs on a batch of the declared
input shape (a symbolic dimension taken as 2). Converters read shapes from it, and an operation whose
inputs are all constants (``Shape`` → ``Gather`` → ``Concat`` → a ``Reshape``'s shape, as the
TorchScript exporter writes) is computed once here and becomes a constant, not a graph node.
Shapes read so hold for the declared input shape; dimension 0 is the batch where the graph keeps it.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

import bnkit.convert.onnx_ops  # noqa: F401 - registers the converters
from bnkit.convert._common import UnsupportedLayerError, unique_identifier
from bnkit.convert.onnx_ops.fusions import fuse
from bnkit.convert.onnx_ops.registry import onnx_converter

__all__ = ["OnnxToTorch", "Value", "onnx_to_torch"]

_DEFAULT_DOMAINS = ("", "ai.onnx")
OLDEST_OPSET = 9
_SYMBOLIC_DIM = 2  # an unnamed/symbolic dimension (the batch, usually) in the example run


@dataclass
class Value:
    """One ONNX tensor: ``node`` is its fx node, or ``None`` for a constant; ``example`` its value
    on the example batch (for a constant: its value)."""

    node: fx.Node | None
    example: torch.Tensor
    buffer: fx.Node | None = None  # a constant's buffer, once a graph operation has read it
    reshaped_from: Value | None = None  # the tensor a Reshape made this one of (to undo a reshape back)

    @property
    def is_constant(self) -> bool:
        return self.node is None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.example.shape)

    @property
    def rank(self) -> int:
        return self.example.dim()

    def numpy(self) -> np.ndarray:
        return self.example.detach().cpu().numpy()


class OnnxToTorch:
    """Builds the PyTorch graph; converters (``@from_onnx``) receive it as ``b``.

    For converters: :meth:`module` (an ``nn.Module`` named after the node, called on values),
    :meth:`function` and :meth:`method` (an operation: folded to a constant when every input is one),
    :meth:`constant` / :meth:`ints` (an input that must be a constant), :meth:`attrs`,
    :attr:`opset`, :meth:`unsupported`.
    """

    def __init__(self, model) -> None:
        self.model = model
        self.graph_proto = model.graph
        self.opset = _default_opset(model)
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.env: dict[str, Value] = {}
        self.names: set[str] = set()
        self.node = None  # the ONNX node being converted

    # ---- for converters ------------------------------------------------------------------
    def attrs(self, node) -> dict:
        """The node's attributes as Python values (strings decoded)."""
        from onnx import helper

        out = {}
        for attr in node.attribute:
            value = helper.get_attribute_value(attr)
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            out[attr.name] = value
        return out

    def unsupported(self, reason: str, node=None) -> UnsupportedLayerError:
        """The error for an ONNX node, named by its name and op_type."""
        node = node if node is not None else self.node
        return UnsupportedLayerError(node.name or node.output[0], node.op_type, reason)

    def constant(self, value: Value | None, what: str) -> np.ndarray:
        """The value of an input that must be known before the model runs (a weight, a shape)."""
        if value is None:
            raise self.unsupported(f"{what} is missing")
        if not value.is_constant:
            raise self.unsupported(f"{what} is computed in the graph; only a constant (an initializer) is supported")
        return value.numpy()

    def ints(self, value: Value | None, what: str) -> list[int]:
        return [int(v) for v in self.constant(value, what).reshape(-1)]

    def module(self, name: str, module: nn.Module, *args: Value) -> Value:
        """Add ``module`` (in ``eval()``) under a unique name derived from ``name``; call it on ``args``."""
        target = self._unique(name)
        module.eval()
        self.root.add_module(target, module)
        with torch.no_grad():
            example = module(*(a.example for a in args))
        return Value(self.graph.call_module(target, tuple(self._arg(a) for a in args)), example)

    def function(self, fn: Callable, *args, **kwargs) -> Value:
        """``fn(*args, **kwargs)``: a constant when no argument is a graph tensor, else a graph node."""
        return self._call("call_function", fn, fn, args, kwargs)

    def method(self, name: str, value: Value, *args, **kwargs) -> Value:
        """``value.name(*args, **kwargs)``, as :meth:`function`."""
        return self._call("call_method", name, lambda t, *a, **k: getattr(t, name)(*a, **k), (value, *args), kwargs)

    def tensor_arg(self, value: Value, name: str = "const") -> fx.Node | float:
        """A constant as an operand of a graph operation: a Python number when it holds one value
        (broadcasting is then unchanged for an operand of rank up to the other's), else a buffer."""
        return self._arg(value, name)

    # ---- internals -----------------------------------------------------------------------
    def _call(self, kind: str, target, eager: Callable, args, kwargs) -> Value:
        flat = [*args, *kwargs.values()]
        if not any(isinstance(a, Value) and not a.is_constant for a in _flatten(flat)):
            with torch.no_grad():
                return Value(None, eager(*_examples(args), **_examples(kwargs)))
        with torch.no_grad():
            example = eager(*_examples(args), **_examples(kwargs))
        node = getattr(self.graph, kind)(target, _map(args, self._arg), _map(kwargs, self._arg))
        return Value(node, example)

    def _arg(self, value: Value, name: str = "const"):
        if value.node is not None:
            return value.node
        tensor = value.example
        if tensor.numel() == 1 and tensor.dim() <= 1 and tensor.dtype.is_floating_point:
            return float(tensor.reshape(()))
        if tensor.numel() == 1 and tensor.dim() <= 1 and not tensor.dtype.is_complex and tensor.dtype != torch.bool:
            return int(tensor.reshape(()))
        if value.buffer is None:  # one buffer, shared by every later use
            target = self._unique(f"{self._node_name()}_{name}")
            self.root.register_buffer(target, tensor.clone())
            value.buffer = self.graph.get_attr(target)
        return value.buffer

    def _node_name(self) -> str:
        node = self.node
        if node is None:
            return "const"
        return node.name or node.op_type.lower()

    def _unique(self, name: str) -> str:
        return unique_identifier(re.sub(r"\W", "_", name).strip("_"), self.names)  # "/layer1/Conv": no "_" ends

    def name_for(self, node, weight_index: int | None = 1) -> str:
        """A readable module name: the weight initializer's (``layer1.0.conv1.weight`` → ``layer1_0_conv1``)
        when the exporter kept it, else the node's name."""
        if weight_index is not None and len(node.input) > weight_index:
            weight = node.input[weight_index]
            if weight.endswith(".weight") and not weight.startswith("onnx::"):
                return weight[: -len(".weight")]
        name = node.name.strip("/").replace("/", ".") or node.op_type.lower()
        return name

    def build(self) -> fx.GraphModule:
        from onnx import numpy_helper

        g = self.graph_proto
        for init in g.initializer:
            self.env[init.name] = Value(None, _tensor(numpy_helper.to_array(init)))
        for sparse in g.sparse_initializer:
            raise UnsupportedLayerError(
                sparse.values.name, "sparse_initializer", "sparse initializers are not supported"
            )
        for inp in g.input:
            if inp.name in self.env:  # an initializer listed as an input too (opset < 9 habit): a constant
                continue
            shape, dtype = _input_spec(inp)
            placeholder = self.graph.placeholder(self._unique(inp.name))
            # its own generator: converting leaves torch's global random state alone
            generator = torch.Generator().manual_seed(0)
            example = (
                torch.randn(shape, generator=generator).to(dtype)
                if dtype.is_floating_point
                else torch.zeros(shape, dtype=dtype)
            )
            self.env[inp.name] = Value(placeholder, example)
        for node in _topological(fuse(g)):
            self._convert(node)
        outputs = []
        for out in g.output:
            value = self.env[out.name]
            if value.is_constant:
                raise UnsupportedLayerError(
                    out.name, "graph output", "the output is a constant, not computed from the inputs"
                )
            outputs.append(value.node)
        self.graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
        name = re.sub(r"\W", "_", g.name or "onnx_model") or "onnx_model"
        gm = fx.GraphModule(self.root, self.graph, class_name=name if name[0].isalpha() else f"m_{name}")
        gm.graph.eliminate_dead_code()  # reshapes undone later (see Value.reshaped_from) would pin the batch
        gm.delete_all_unused_submodules()
        gm.recompile()
        return gm.eval()

    def _convert(self, node) -> None:
        self.node = node
        if node.domain not in _DEFAULT_DOMAINS:
            raise self.unsupported(f"operator domain {node.domain!r} is not ONNX's default domain")
        converter = onnx_converter(node.op_type)
        if converter is None:
            raise self.unsupported("this ONNX operator is not supported by bnkit.convert")
        inputs = []
        for name in node.input:
            if not name:
                inputs.append(None)
                continue
            if name not in self.env:
                raise self.unsupported(f"its input {name!r} is produced by no node, initializer or graph input")
            inputs.append(self.env[name])
        result = converter(self, node, inputs)
        results = result if isinstance(result, list) else [result]
        for name, value in zip(node.output, results, strict=False):
            if name:
                self.env[name] = value
        missing = [name for name in node.output[len(results) :] if name and _used(self.graph_proto, name)]
        if missing:
            raise self.unsupported(f"its output {missing[0]!r} is used, and bnkit.convert computes only the first")


def _used(graph, name: str) -> bool:
    return any(name in n.input for n in graph.node) or any(o.name == name for o in graph.output)


def _default_opset(model) -> int:
    for entry in model.opset_import:
        if entry.domain in _DEFAULT_DOMAINS:
            return int(entry.version)
    return OLDEST_OPSET


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor of its own (numpy_helper's arrays may be read-only views of the protobuf)."""
    return torch.from_numpy(np.array(array, copy=True))


_DTYPES = {
    1: torch.float32,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
}


def _input_spec(inp) -> tuple[tuple[int, ...], torch.dtype]:
    ttype = inp.type.tensor_type
    dtype = _DTYPES.get(ttype.elem_type)
    if dtype is None:
        raise UnsupportedLayerError(inp.name, "graph input", f"element type {ttype.elem_type} is not supported")
    if not ttype.HasField("shape"):
        raise UnsupportedLayerError(inp.name, "graph input", "the input has no declared shape")
    shape = tuple(
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else _SYMBOLIC_DIM for d in ttype.shape.dim
    )
    return shape, dtype


def _topological(nodes) -> list:
    """The nodes in an order where each comes after the producers of its inputs (Kahn's algorithm;
    ONNX requires it already, but some tools write nodes out of order)."""
    produced_by = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    waiting = [sum(1 for name in set(n.input) if name in produced_by) for n in nodes]
    consumers: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in set(n.input):
            if name in produced_by:
                consumers.setdefault(produced_by[name], []).append(i)
    ready = deque(i for i, w in enumerate(waiting) if w == 0)
    order = []
    while ready:
        i = ready.popleft()
        order.append(nodes[i])
        for j in consumers.get(i, []):
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.append(j)
    if len(order) != len(nodes):
        stuck = next(n for i, n in enumerate(nodes) if waiting[i] > 0)
        raise UnsupportedLayerError(stuck.name or stuck.output[0], stuck.op_type, "the graph has a cycle")
    return order


def _flatten(items):
    for item in items:
        if isinstance(item, (list, tuple)):
            yield from _flatten(item)
        else:
            yield item


def _map(obj, fn):
    if isinstance(obj, Value):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _examples(obj):
    return _map(obj, lambda v: v.example)


def onnx_to_torch(model) -> fx.GraphModule:
    """Convert an ONNX ``ModelProto`` to a ``torch.fx.GraphModule`` of ``torch.nn`` layers (see the package)."""
    return OnnxToTorch(model).build()
