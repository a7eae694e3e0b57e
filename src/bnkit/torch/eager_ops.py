"""The ATen operators of an exported program, as the eager PyTorch calls they stand for.

A ``torch.export`` graph calls ATen operators (``aten.hardswish_.default``,
``aten.view.default``...), where the model's code called ``F.hardswish``, ``x.view(...)``.
:func:`eager_graph` rewrites a graph in place to those eager calls, so that what reads a
rebuilt model (bnkit's converter, ``summary``, ``compare``) sees the functions it knows. Each
replacement computes the same values with the same kernel: the rebuilt model's outputs do not
change. An in-place operator (``add_``, ``relu_``) becomes its out-of-place twin only where
nothing reads the memory it writes afterwards (the tensor, a view of it or its base, or, through
the caller, the tensor passed in), so that no reader can see the difference; an operator this
table does not hold, or one called with arguments its eager twin would read differently, is
left as it is (the converter then refuses it by its ATen name).
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import fx, nn
from torch.nn import functional as F

__all__ = ["eager_graph"]


def _pool_stride(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    # aten's empty stride means "the kernel size": eager's None
    if len(args) > 2 and not args[2]:
        args = (*args[:2], None, *args[3:])
    return args, kwargs


def _no_kwargs(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    return (args, kwargs) if not kwargs else None  # e.g. add's alpha: no operator takes it


def _drop_memory_format(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    rest = {k: v for k, v in kwargs.items() if k != "memory_format"}
    return (args, {}) if not rest and kwargs.get("memory_format") in (None, torch.contiguous_format) else None


_INT64_MAX = 2**63 - 1


def _index(dim, item) -> tuple | None:
    """The ``x[...]`` index that picks ``item`` along ``dim``."""
    if not isinstance(dim, int):
        return None
    return (*(slice(None),) * dim, item) if dim >= 0 else (Ellipsis, item, *(slice(None),) * (-dim - 1))


def _slice(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    # aten.slice.Tensor(x, dim=0, start=None, end=None, step=1) is x[..., start:end:step] along dim
    x, dim, start, end, step = (*args, *(0, None, None, 1)[len(args) - 1 :])[:5]
    if kwargs or not all(v is None or isinstance(v, int) for v in (start, end, step)):
        return None
    start = None if start == 0 else start
    end = None if end is not None and end >= _INT64_MAX else end
    index = _index(dim, slice(start, end, None if step == 1 else step))
    return ((x, index), {}) if index is not None else None


def _select(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    # aten.select.int(x, dim, index) is x[..., index] along dim
    x, dim, item = args
    index = _index(dim, item) if isinstance(item, int) and not kwargs else None
    return ((x, index), {}) if index is not None else None


def _first(count: int):
    """Keeps the first ``count`` positional arguments (aten's layer_norm also takes cudnn_enable)."""
    return lambda args, kwargs: (args[:count], kwargs) if not kwargs else None


# what an eager call becomes: ("call_function", fn) or ("call_method", name), and an optional
# adapter of the arguments that returns None when the eager call would read them differently
Replacement = tuple[str, object, Callable | None]


def _tables() -> tuple[dict[object, Replacement], dict[object, Replacement]]:
    """(operator -> replacement, in-place operator -> its out-of-place twin's replacement)"""
    aten = torch.ops.aten
    fn = "call_function"
    table: dict[object, Replacement] = {
        aten.add.Tensor: (fn, operator.add, _no_kwargs),
        aten.sub.Tensor: (fn, operator.sub, _no_kwargs),
        aten.mul.Tensor: (fn, operator.mul, _no_kwargs),
        aten.div.Tensor: (fn, operator.truediv, _no_kwargs),
        aten.neg.default: (fn, operator.neg, None),
        aten.cat.default: (fn, torch.cat, None),
        aten.chunk.default: (fn, torch.chunk, None),
        aten.split.Tensor: (fn, torch.split, None),
        aten.split_with_sizes.default: (fn, torch.split, None),
        aten.flatten.using_ints: (fn, torch.flatten, None),
        aten.reshape.default: (fn, torch.reshape, None),
        aten.view.default: ("call_method", "view", None),
        aten.slice.Tensor: (fn, operator.getitem, _slice),
        aten.select.int: (fn, operator.getitem, _select),
        aten.sym_size.int: ("call_method", "size", None),
        aten.transpose.int: (fn, torch.transpose, None),
        aten.squeeze.dim: (fn, torch.squeeze, None),
        aten.unsqueeze.default: (fn, torch.unsqueeze, None),
        aten.contiguous.default: ("call_method", "contiguous", _drop_memory_format),
        aten.clone.default: (fn, torch.clone, _drop_memory_format),
        aten.mean.dim: (fn, torch.mean, None),
        aten.relu.default: (fn, torch.relu, None),
        aten.sigmoid.default: (fn, torch.sigmoid, None),
        aten.tanh.default: (fn, torch.tanh, None),
        aten.silu.default: (fn, F.silu, None),
        aten.hardsigmoid.default: (fn, F.hardsigmoid, None),
        aten.hardswish.default: (fn, F.hardswish, None),
        aten.hardtanh.default: (fn, F.hardtanh, None),
        aten.gelu.default: (fn, F.gelu, None),
        aten.leaky_relu.default: (fn, F.leaky_relu, None),
        aten.softmax.int: (fn, torch.softmax, None),
        aten.layer_norm.default: (fn, F.layer_norm, _first(5)),
        aten.dropout.default: (fn, F.dropout, None),
        aten.adaptive_avg_pool2d.default: (fn, F.adaptive_avg_pool2d, None),
        aten.adaptive_avg_pool1d.default: (fn, F.adaptive_avg_pool1d, None),
        aten.max_pool2d.default: (fn, F.max_pool2d, _pool_stride),
        aten.max_pool1d.default: (fn, F.max_pool1d, _pool_stride),
        aten.avg_pool2d.default: (fn, F.avg_pool2d, _pool_stride),
        aten.avg_pool1d.default: (fn, F.avg_pool1d, _pool_stride),
    }
    in_place = {
        aten.add_.Tensor: aten.add.Tensor,
        aten.sub_.Tensor: aten.sub.Tensor,
        aten.mul_.Tensor: aten.mul.Tensor,
        aten.div_.Tensor: aten.div.Tensor,
        aten.relu_.default: aten.relu.default,
        aten.sigmoid_.default: aten.sigmoid.default,
        aten.tanh_.default: aten.tanh.default,
        aten.silu_.default: aten.silu.default,
        aten.hardsigmoid_.default: aten.hardsigmoid.default,
        aten.hardswish_.default: aten.hardswish.default,
        aten.hardtanh_.default: aten.hardtanh.default,
        aten.leaky_relu_.default: aten.leaky_relu.default,
        aten.dropout_.default: aten.dropout.default,
    }
    return table, {op: table[twin] for op, twin in in_place.items()}


class _Aliases:
    """Which nodes of a graph may share memory: a view (``view``, ``slice``, ``transpose``, a piece of
    ``chunk``...) with its base, by the operators' own alias annotations; a module's output with its
    inputs unless the module is known to return new tensors (a convolution, a sub-program whose
    outputs are none of its inputs' memory). An in-place operator's result is not joined to what it
    wrote: its readers read the written values, which the out-of-place twin gives them."""

    def __init__(self, graph: fx.Graph, in_place: dict, owner: nn.Module | None) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}
        self.position = {n: i for i, n in enumerate(graph.nodes)}
        for node in graph.nodes:
            if node.op == "call_function" and node.target in in_place:
                continue
            if node.op == "call_module":
                module = owner.get_submodule(node.target) if owner is not None else None
                if module is not None and not _may_return_an_input(module, in_place):
                    continue
                sources = node.all_input_nodes
            elif node.target is operator.getitem or _returns_alias(node.target):
                sources = node.args[:1]
            else:
                continue
            for arg in sources:
                if isinstance(arg, fx.Node):
                    self.parent[self.find(node)] = self.find(arg)
        self.groups: dict[fx.Node, list[fx.Node]] = {}
        for node in graph.nodes:
            self.groups.setdefault(self.find(node), []).append(node)

    def find(self, node: fx.Node) -> fx.Node:
        while node in self.parent:
            node = self.parent[node]
        return node

    def read_after(self, node: fx.Node, value: fx.Node, unsafe_inputs: set[fx.Node]) -> bool:
        """Whether ``value``'s memory is read after ``node`` (by another node), or is state or an input
        that the caller reads again (``unsafe_inputs``)."""
        for member in self.groups[self.find(value)]:
            if member.op == "get_attr" or member in unsafe_inputs:
                return True
            if any(user is not node and self.position[user] > self.position[node] for user in member.users):
                return True
        return False


# rebuilt layers (bnkit.torch.rebuild) that always return a new tensor
_NEW_TENSOR_LAYERS = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._NormBase,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.ReLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.SiLU,
    nn.GELU,
    nn.ELU,
    nn.LeakyReLU,
    nn.Softmax,
)


def _may_return_an_input(module: nn.Module, in_place: dict) -> bool:
    """Whether a called module's output may be (a view of) one of its inputs."""
    from torch.export.unflatten import InterpreterModule

    if isinstance(module, _NEW_TENSOR_LAYERS) and not getattr(module, "inplace", False):
        return False
    if not isinstance(module, InterpreterModule):
        return True
    aliases = _Aliases(module.graph, in_place, module)
    outputs = [n for n in module.graph.nodes if n.op == "output"]
    returned = [a for o in outputs for a in o.all_input_nodes]
    inputs = {aliases.find(n) for n in module.graph.nodes if n.op in ("placeholder", "get_attr")}
    return any(aliases.find(a) in inputs for a in returned)


def _returns_alias(target) -> bool:
    schema = getattr(target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def eager_graph(
    graph: fx.Graph, unsafe_inputs: frozenset[int] | None = None, owner: nn.Module | None = None
) -> dict[fx.Node, frozenset[int]]:
    """Rewrite ``graph``'s ATen calls to their eager twins, in place (see the module's docstring).

    ``owner``: the module whose submodules the graph calls (None: every call may return its input).
    ``unsafe_inputs``: the positions of the graph's inputs that its caller reads again after the call
    (through an alias), so that they must still be written in place; all of them when None. Returns,
    for each module the graph calls, the positions of its arguments that are unsafe in that sense.
    """
    table, in_place = _tables()
    aliases = _Aliases(graph, in_place, owner)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    unsafe = {p for i, p in enumerate(placeholders) if unsafe_inputs is None or i in unsafe_inputs}
    calls = {
        node: frozenset(
            i for i, arg in enumerate(node.args) if isinstance(arg, fx.Node) and aliases.read_after(node, arg, unsafe)
        )
        for node in graph.nodes
        if node.op == "call_module"
    }
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        replacement = table.get(node.target)
        if replacement is None and node.target in in_place:
            written = node.args[0] if node.args else None
            if isinstance(written, fx.Node) and not aliases.read_after(node, written, unsafe):
                replacement = in_place[node.target]
        if replacement is None:
            continue
        op, target, adapt = replacement
        args_kwargs = adapt(tuple(node.args), dict(node.kwargs)) if adapt else (node.args, node.kwargs)
        if args_kwargs is None:
            continue
        node.op, node.target = op, target
        node.args, node.kwargs = args_kwargs
    return calls
