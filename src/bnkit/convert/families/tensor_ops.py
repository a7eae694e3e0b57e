"""Layout operations, both ways: reshapes (``Flatten``, ``Reshape`` ⇄ ``nn.Flatten``, ``torch.flatten``,
``view``, ``reshape``, ``squeeze``, ``unsqueeze``, ``unflatten``), permutes (``Permute`` ⇄ ``permute``,
``transpose``), splits (bnkit's Keras ``Slice`` ⇄ ``chunk``, ``split``, ``narrow``, ``x[:, a:b]``), shape
reads (``x.size()``, ``x.shape``, ``x.size(0)``) and the identities (``contiguous``).

A permute only changes the layout the value records (:mod:`bnkit.convert.layouts`); no operation
is added. A reshape is planned on the layout: where the groups of axes it splits or merges are
in the same order in both frameworks it is one Keras ``Reshape`` (or PyTorch ``reshape``),
otherwise a permute comes first. So torchvision's channel shuffle (``view`` to ``(N, g, C/g, H, W)``,
``transpose(1, 2)``, ``view`` back) becomes ``Reshape((H, W, g, C/g))``, ``Permute((1, 2, 4, 3))``,
``Reshape((H, W, C))`` in Keras: the same channel order, channels-last.

Keras flattens ``(*spatial, C)``, PyTorch ``(C, *spatial)``. When a flattened tensor reaches only
Dense/Linear layers (through element-wise ones), the order is left pending in the value and the
Dense/Linear kernel rows are reordered (:mod:`bnkit.convert.families.dense`); otherwise the data
are permuted before flattening, so every consumer sees the same order.
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from bnkit.convert.keras_layers import Slice
from bnkit.convert.layouts import ReshapeError, inverse, mapped_layout, plan_reshape
from bnkit.convert.registry import from_keras, from_torch
from bnkit.convert.values import BATCH, Constant, KerasValue, Pieces, TorchValue
from bnkit.keras import keras

if TYPE_CHECKING:
    from bnkit.convert.keras_walker import KerasToTorch
    from bnkit.convert.torch_walker import TorchToKeras

L = keras.layers


# ---- identities ---------------------------------------------------------------------------


@from_keras(L.InputLayer, L.Identity, elementwise=True)
def identity_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    return inputs[0]


@from_torch(nn.Identity, torch.clone, methods=("contiguous", "clone"), elementwise=True)
def identity_to_keras(b: TorchToKeras, node, target) -> KerasValue:
    return b.input(node)


# ---- reshapes: Keras -> PyTorch -------------------------------------------------------------


def _known_shape(b: KerasToTorch, layer, tensor) -> tuple:
    shape = tuple(tensor.shape)
    if any(d is None for d in shape[1:]):
        raise b.unsupported(layer, f"shape {shape[1:]} is not fully known")
    return (None, *shape[1:])


def reshape_torch(b: KerasToTorch, layer, node, x: TorchValue, flatten_module: bool = False) -> TorchValue:
    """The PyTorch ``reshape`` (or ``nn.Flatten``) doing what the Keras ``layer`` does to ``x``."""
    keras_in, keras_out = _known_shape(b, layer, node.input_tensors[0]), _known_shape(b, layer, node.outputs[0])
    try:  # torch == keras.permute(order): plan in Keras' (the source's) terms
        plan = plan_reshape(keras_in, keras_out, inverse(x.layout), inverse(mapped_layout(len(keras_out))))
    except ReshapeError as e:
        raise b.unsupported(layer, str(e)) from None
    source = x.node
    current = [keras_in[d] for d in inverse(x.layout)[1:]]
    if plan.permute is not None:
        source = b.graph.call_method("permute", (source, *plan.permute))
        current = [current[d - 1] for d in plan.permute[1:]]
    layout = inverse(plan.order)
    if flatten_module and len(keras_out) == 2:
        out = b.add_module(layer.name, nn.Flatten(), source)
    elif list(plan.shape) != current:
        out = b.graph.call_method("reshape", (source, -1, *plan.shape))
    else:
        out = source
    return TorchValue(out, len(keras_out), layout)


@from_keras(L.Flatten, permuted_input=True)
def flatten_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    (x,) = inputs
    if x.rank == 2:
        return x
    if x.mapped and b.feeds_only_dense(node.outputs[0]):
        shape = _known_shape(b, layer, node.input_tensors[0])[1:]
        torch_shape = (shape[-1], *shape[:-1])
        return TorchValue(b.add_module(layer.name, nn.Flatten(), x.node), 2, pending_flat=torch_shape)
    # Keras flattens channels-last: the data are put in Keras' order first (unless they are)
    return reshape_torch(b, layer, node, x, flatten_module=True)


@from_keras(L.Reshape, permuted_input=True)
def reshape_layer_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    return reshape_torch(b, layer, node, inputs[0])


# ---- reshapes: PyTorch -> Keras -------------------------------------------------------------


def reshape_keras(b: TorchToKeras, node, x: KerasValue, out_shape: tuple[int, ...], name=None) -> KerasValue:
    """The Keras layers doing what a PyTorch reshape of ``x`` to ``out_shape`` (no batch) does."""
    name = name or b.name(node)
    try:
        plan = plan_reshape((None, *x.shape), (None, *out_shape), x.layout, mapped_layout(len(out_shape) + 1))
    except ReshapeError as e:
        raise b.unsupported(node, str(e)) from None
    tensor, current = x.tensor, list(x.keras_shape)
    if plan.permute is not None:
        tensor = L.Permute(plan.permute[1:], name=b.unique_name(f"{name}_permute"))(tensor)
        current = [current[d - 1] for d in plan.permute[1:]]
    if list(plan.shape) != current:
        layer = L.Flatten(name=name) if len(plan.shape) == 1 else L.Reshape(plan.shape, name=name)
        tensor = layer(tensor)
    return KerasValue(tensor, out_shape, layout=plan.order)


def flatten_keras(b: TorchToKeras, node, x: KerasValue) -> KerasValue:
    """Keras' Flatten of ``x`` giving PyTorch's ``(N, C*H*W)`` (data permuted, or the order left pending)."""
    if x.rank <= 2:
        return x
    features = (math.prod(x.shape),)
    if x.mapped and b.feeds_only_linear(node):
        return KerasValue(L.Flatten(name=b.name(node))(x.tensor), features, pending_flat=x.shape)
    return reshape_keras(b, node, x, features)


def _reshape_or_flatten(b: TorchToKeras, node, x: KerasValue) -> KerasValue:
    out = b.out_shape(node)
    if math.prod(out) != math.prod(x.shape):
        raise b.unsupported(node, f"a reshape from {x.shape} to {out} (no batch) moves values across the batch")
    if len(out) == 1 and x.rank > 2:
        return flatten_keras(b, node, x)
    return reshape_keras(b, node, x, out)


@from_torch(nn.Flatten, nn.Unflatten, permuted_input=True)
def flatten_module_to_keras(b: TorchToKeras, node, m) -> KerasValue:
    first = m.start_dim if isinstance(m, nn.Flatten) else m.dim
    if first % (len(b.input(node).shape) + 1) == 0:
        raise b.unsupported(node, f"{type(m).__name__} from dim {first} would merge the batch dimension")
    return _reshape_or_flatten(b, node, b.input(node))


@from_torch(torch.flatten, methods=("flatten",), permuted_input=True)
def flatten_call_to_keras(b: TorchToKeras, node, target) -> KerasValue:
    x = b.input(node)
    if b.arg(node, 1, "start_dim", 0) % x.rank == 0:
        raise b.unsupported(node, "flattening from dim 0 merges the batch dimension; flatten from dim 1")
    return _reshape_or_flatten(b, node, x)


def _sizes(b: TorchToKeras, node) -> list:
    """The sizes of ``x.view(*sizes)`` / ``x.reshape(sizes)``, read through shape reads."""
    sizes = list(node.args[1:]) or [node.kwargs.get("shape", node.kwargs.get("size"))]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = list(sizes[0])
    return [b.operand(s, node) for s in sizes]


@from_torch(torch.reshape, methods=("view", "reshape"), permuted_input=True)
def view_to_keras(b: TorchToKeras, node, target) -> KerasValue:
    x = b.input(node)
    sizes = _sizes(b, node)
    batch = sizes[0] if sizes else None
    keeps_batch = batch is BATCH or (batch == -1 and all(isinstance(s, int) and s >= 0 for s in sizes[1:]))
    if not keeps_batch or any(s is BATCH for s in sizes[1:]):
        shown = ", ".join("x.size(0)" if s is BATCH else repr(s) for s in sizes)
        raise b.unsupported(
            node, f"a reshape to ({shown}); the batch must stay first, as x.size(0) or -1 (with the other sizes given)"
        )
    return _reshape_or_flatten(b, node, x)


@from_torch(torch.squeeze, torch.unsqueeze, methods=("squeeze", "unsqueeze", "unflatten"), permuted_input=True)
def squeeze_to_keras(b: TorchToKeras, node, target) -> KerasValue:
    x = b.input(node)
    dims = b.arg(node, 1, "dim")
    name = getattr(target, "__name__", target)
    if dims is not None:
        first = dims if isinstance(dims, int) else min(dims, default=1)
        rank = x.rank + 1 if name == "unsqueeze" else x.rank
        if first % rank == 0:
            raise b.unsupported(node, f"{name}(dim={dims}) acts on the batch dimension")
    return _reshape_or_flatten(b, node, x)


# ---- permutes -----------------------------------------------------------------------------


@from_keras(L.Permute, permuted_input=True)
def permute_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    """No operation: the Keras axes are renamed, the PyTorch tensor stays as it is."""
    (x,) = inputs
    p = (0, *layer.dims)
    return TorchValue(x.node, x.rank, tuple(x.layout[i] for i in p))


def permuted_keras(b: TorchToKeras, node, x: KerasValue, dims) -> KerasValue:
    """``x`` after ``x.permute(dims)`` in PyTorch: the same Keras tensor, the layout renamed."""
    dims = tuple(d % x.rank for d in dims)
    if sorted(dims) != list(range(x.rank)) or dims[0] != 0:
        raise b.unsupported(node, f"permute{dims}; the batch dimension must stay first")
    where = inverse(dims)  # the new torch dim of each old one
    return KerasValue(x.tensor, tuple(x.shape[d - 1] for d in dims[1:]), layout=tuple(where[d] for d in x.layout))


@from_torch(torch.permute, torch.ops.aten.permute.default, methods=("permute",), permuted_input=True)
def permute_to_keras(b: TorchToKeras, node, target) -> KerasValue:
    x = b.input(node)
    if target == "permute" and not (len(node.args) == 2 and isinstance(node.args[1], (tuple, list))):
        dims = tuple(node.args[1:])  # x.permute(0, 2, 3, 1)
    else:
        dims = tuple(b.arg(node, 1, "dims"))
    return permuted_keras(b, node, x, dims)


@from_torch(torch.transpose, torch.swapaxes, methods=("transpose", "swapaxes"), permuted_input=True)
def transpose_to_keras(b: TorchToKeras, node, target) -> KerasValue:
    x = b.input(node)
    first, second = (b.arg(node, 1, "dim0"), b.arg(node, 2, "dim1"))
    if first is None or second is None:  # swapaxes names them axis0 / axis1
        first, second = b.arg(node, 1, "axis0"), b.arg(node, 2, "axis1")
    dims = list(range(x.rank))
    dims[first % x.rank], dims[second % x.rank] = dims[second % x.rank], dims[first % x.rank]
    return permuted_keras(b, node, x, dims)


# ---- shape reads --------------------------------------------------------------------------


def _shape(x: KerasValue) -> tuple:
    return (BATCH, *x.shape)


@from_torch(methods=("size",), permuted_input=True)
def size_to_keras(b: TorchToKeras, node, method):
    """``x.size()`` (the batch as :data:`BATCH`: not known when converting) or ``x.size(d)``."""
    shape = _shape(b.input(node))
    dim = b.arg(node, 1, "dim")
    return shape if dim is None else shape[dim]


@from_torch(methods=("dim",), permuted_input=True)
def dim_to_keras(b: TorchToKeras, node, method) -> int:
    return b.input(node).rank


@from_torch(getattr, permuted_input=True)
def getattr_to_keras(b: TorchToKeras, node, fn):
    x, attribute = b.operand(node.args[0], node), node.args[1]
    if isinstance(x, KerasValue) and attribute == "shape":
        return _shape(x)
    if isinstance(x, KerasValue) and attribute == "ndim":
        return x.rank
    raise b.unsupported(node, f"reading .{attribute} (only .shape and .ndim of a tensor convert)")


@from_torch(operator.floordiv, operator.mod, permuted_input=True)
def shape_arithmetic_to_keras(b: TorchToKeras, node, fn):
    """``c // groups`` and the like on sizes read from shapes: computed while converting."""
    return python_arithmetic(b, node, fn, [b.operand(a, node) for a in node.args])


def python_arithmetic(b: TorchToKeras, node, fn, operands: list):
    """``fn`` on Python numbers read from shapes; refuses tensors and the (unknown) batch size."""
    if any(o is BATCH for o in operands):
        raise b.unsupported(node, "arithmetic on the batch size, which is not known when converting")
    if not all(isinstance(o, (int, float)) for o in operands):
        kinds = ", ".join(type(o).__name__ for o in operands)
        raise b.unsupported(node, f"this operation on ({kinds}) is not supported by bnkit.convert")
    return fn(*operands)


# ---- splits and indexing --------------------------------------------------------------------


@from_keras(Slice, permuted_input=True)
def slice_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    (x,) = inputs
    dim = x.torch_dim(layer.axis)
    out = b.graph.call_function(torch.narrow, (x.node, dim, layer.start, layer.stop - layer.start))
    return x.like(out)


def _bounds(sizes) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def _split_dim(b: TorchToKeras, node, x: KerasValue, dim) -> int:
    dim = dim % x.rank
    if dim == 0:
        raise b.unsupported(node, "splitting the batch dimension")
    return dim


@from_torch(torch.chunk, methods=("chunk",), permuted_input=True)
def chunk_to_keras(b: TorchToKeras, node, target) -> Pieces:
    x = b.input(node)
    chunks, dim = b.arg(node, 1, "chunks"), _split_dim(b, node, x, b.arg(node, 2, "dim", 0))
    size = x.shape[dim - 1]
    step = math.ceil(size / chunks)
    return Pieces(x, dim, _bounds([min(step, size - s) for s in range(0, size, step)]), node)


@from_torch(torch.split, methods=("split",), permuted_input=True)
def split_to_keras(b: TorchToKeras, node, target) -> Pieces:
    x = b.input(node)
    sizes, dim = b.arg(node, 1, "split_size_or_sections"), b.arg(node, 2, "dim", 0)
    if sizes is None:
        sizes = b.arg(node, 1, "split_size")
    dim = _split_dim(b, node, x, dim)
    total = x.shape[dim - 1]
    if isinstance(sizes, int):
        sizes = [min(sizes, total - s) for s in range(0, total, sizes)]
    return Pieces(x, dim, _bounds(list(sizes)), node)


def slice_keras(b: TorchToKeras, node, x: KerasValue, dim: int, start: int, stop: int, name: str) -> KerasValue:
    """``x`` narrowed to ``start:stop`` on PyTorch dim ``dim`` (bnkit's Keras ``Slice``)."""
    shape = list(x.shape)
    if start == 0 and stop == shape[dim - 1]:
        return x
    shape[dim - 1] = stop - start
    tensor = Slice(x.keras_axis(dim), start, stop, name=name)(x.tensor)
    return KerasValue(tensor, tuple(shape), layout=x.layout)


def piece(b: TorchToKeras, pieces: Pieces, index: int, node) -> KerasValue:
    """Piece ``index`` of a chunk/split, made on first use (a ``Slice`` named ``<split>_<index>``)."""
    index = range(len(pieces.bounds))[index]
    if index not in pieces.made:
        start, stop = pieces.bounds[index]
        name = b.unique_name(f"{b.name(pieces.node)}_{index}")
        pieces.made[index] = slice_keras(b, node, pieces.value, pieces.dim, start, stop, name)
    return pieces.made[index]


@from_torch(torch.narrow, methods=("narrow",), permuted_input=True)
def narrow_to_keras(b: TorchToKeras, node, target) -> KerasValue:
    x = b.input(node)
    dim = _split_dim(b, node, x, b.arg(node, 1, "dim"))
    start, length = b.arg(node, 2, "start"), b.arg(node, 3, "length")
    start = start % x.shape[dim - 1]
    return slice_keras(b, node, x, dim, start, start + length, b.name(node))


@from_torch(operator.getitem, permuted_input=True)
def getitem_to_keras(b: TorchToKeras, node, fn):
    """An element of a shape or of a chunk/split; on a tensor, slices with step 1 (``x[:, a:b]``)."""
    container, index = b.operand(node.args[0], node), node.args[1]
    if isinstance(index, fx.Node):
        index = b.operand(index, node)
    if isinstance(container, Pieces):
        if not isinstance(index, int):
            raise b.unsupported(node, f"indexing the pieces of a split with {index!r}")
        return piece(b, container, index, node)
    if isinstance(container, (tuple, list)):
        return container[index]
    if isinstance(container, Constant):
        raise b.unsupported(node, f"indexing the constant tensor {container.name!r}")
    if not isinstance(container, KerasValue):
        raise b.unsupported(node, f"indexing {type(container).__name__}")
    return _slice_tensor(b, node, container, index)


def _slice_tensor(b: TorchToKeras, node, x: KerasValue, index) -> KerasValue:
    """``x[:, a:b, i]``: a ``Slice`` per narrowed dim, and a reshape dropping the integer-indexed ones."""
    index = index if isinstance(index, tuple) else (index,)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (x.rank - len(index) + 1) + index[at + 1 :]
    simple = all(isinstance(i, slice) or (isinstance(i, int) and not isinstance(i, bool)) for i in index)
    if len(index) > x.rank or not simple:
        raise b.unsupported(node, f"indexing with {index!r}; only integers and slices with step 1 (x[:, a:b]) convert")
    if index and index[0] != slice(None):
        raise b.unsupported(node, "indexing the batch dimension")
    name = b.name(node)
    for dim, s in enumerate(index[1:], start=1):
        size = x.shape[dim - 1]
        if isinstance(s, int):
            if not -size <= s < size:
                raise b.unsupported(node, f"index {s} is out of range for size {size}")
            s = slice(s % size, s % size + 1)
        start, stop, step = s.indices(size)
        if step != 1 or stop <= start:
            raise b.unsupported(node, f"the slice {s!r}; only non-empty slices with step 1 convert")
        if (start, stop) != (0, size):
            x = slice_keras(b, node, x, dim, start, stop, name)
            name = b.unique_name(b.name(node))
    if any(isinstance(i, int) for i in index):
        x = reshape_keras(b, node, x, b.out_shape(node), name)
    return x
