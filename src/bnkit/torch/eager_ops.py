"""The ATen operators of an exported program, as the eager PyTorch calls they stand for.

A ``torch.export`` graph calls ATen operators (``aten.hardswish_.default``,
``aten.view.default``...), where the model's code called ``F.hardswish``, ``x.view(...)``.
:func:`eager_graph` rewrites a graph in place to those eager calls, so that what reads a
rebuilt model (bnkit's converter, ``summary``, ``compare``) sees the functions it knows. Each
replacement computes the same values with the same kernel: the rebuilt model's outputs do not
change. An in-place operator (``add_``, ``relu_``) becomes its out-of-place twin only where
nothing reads its input afterwards, so that no reader can see the difference; an operator this
table does not hold, or one called with arguments its eager twin would read differently, is
left as it is (the converter then refuses it by its ATen name).
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import fx
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


def _read_later(node: fx.Node, position: dict[fx.Node, int]) -> bool:
    """Whether the tensor an in-place ``node`` writes (its first argument) is read after it."""
    written = node.args[0] if node.args else None
    if not isinstance(written, fx.Node):
        return True
    return any(user is not node and position[user] > position[node] for user in written.users)


def eager_graph(graph: fx.Graph) -> None:
    """Rewrite ``graph``'s ATen calls to their eager twins, in place (see the module's docstring)."""
    table, in_place = _tables()
    position = {n: i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        replacement = table.get(node.target)
        if replacement is None and node.target in in_place and not _read_later(node, position):
            replacement = in_place[node.target]
        if replacement is None:
            continue
        op, target, adapt = replacement
        args_kwargs = adapt(tuple(node.args), dict(node.kwargs)) if adapt else (node.args, node.kwargs)
        if args_kwargs is None:
            continue
        node.op, node.target = op, target
        node.args, node.kwargs = args_kwargs
