"""ONNX tensor plumbing → PyTorch: ``Reshape``, ``Flatten``, ``Transpose``, ``Concat``, ``Squeeze``,
``Unsqueeze``, ``Slice``, ``Split``, ``Gather``, ``Pad``, ``Shape``, ``Constant``, ``Cast``,
``Identity``, ``Dropout`` (inference: the identity).

Operations on constants only (shape arithmetic) are computed here, once (see the walker). A
``Reshape`` that keeps dimension 0 (the batch) is written with ``-1`` there (``flatten(x, 1)`` for
``(N, rest)``), so the module takes any batch size, not only the example's.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from bnkit.convert.onnx_ops._shapes import torch_pad_order
from bnkit.convert.onnx_ops.registry import from_onnx

_ONNX_DTYPES = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
}


@from_onnx("Identity")
def identity(b, node, inputs):
    return inputs[0]


@from_onnx("Dropout")
def dropout(b, node, inputs):
    # ONNX's Dropout is the identity unless training_mode (an input since opset 12) is true
    if len(inputs) > 2 and inputs[2] is not None and bool(b.constant(inputs[2], "training_mode").reshape(())):
        raise b.unsupported("training_mode=true (a random mask) is not supported")
    return inputs[0]


@from_onnx("Constant")
def constant(b, node, inputs):
    from onnx import numpy_helper

    ((name, value),) = ((attr.name, attr) for attr in node.attribute)
    if name == "value":
        array = numpy_helper.to_array(value.t)
    elif name in ("value_float", "value_int"):
        array = np.array(
            value.f if name == "value_float" else value.i, dtype="float32" if name == "value_float" else "int64"
        )
    elif name in ("value_floats", "value_ints"):
        array = np.array(
            list(value.floats) if name == "value_floats" else list(value.ints),
            dtype="float32" if name == "value_floats" else "int64",
        )
    else:
        raise b.unsupported(f"a Constant given as {name!r} is not supported")
    from bnkit.convert.onnx_walker import Value

    return Value(None, torch.from_numpy(np.array(array, copy=True)))


@from_onnx("Shape")
def shape(b, node, inputs):
    from bnkit.convert.onnx_walker import Value

    dims = list(inputs[0].shape)
    a = b.attrs(node)
    dims = dims[int(a.get("start", 0)) : a.get("end")] if b.opset >= 15 else dims
    return Value(None, torch.tensor(dims, dtype=torch.int64))


@from_onnx("Cast")
def cast(b, node, inputs):
    to = _ONNX_DTYPES.get(int(b.attrs(node)["to"]))
    if to is None:
        raise b.unsupported(f"a cast to ONNX type {b.attrs(node)['to']}")
    x = inputs[0]
    if x.is_constant:
        return b.function(lambda t: t.to(to), x)
    if x.example.dtype == to:
        return x
    raise b.unsupported(f"a cast of a computed tensor from {x.example.dtype} to {to} is not supported")


@from_onnx("ConstantOfShape")
def constant_of_shape(b, node, inputs):
    from onnx import numpy_helper

    from bnkit.convert.onnx_walker import Value

    dims = b.ints(inputs[0], "the shape")
    attr = next((a for a in node.attribute if a.name == "value"), None)
    fill = numpy_helper.to_array(attr.t) if attr is not None else np.zeros(1, dtype="float32")
    return Value(None, torch.from_numpy(np.full(dims, fill.reshape(-1)[0], dtype=fill.dtype)))


@from_onnx("Range")
def range_(b, node, inputs):
    start, limit, delta = (
        b.constant(v, w).reshape(()) for v, w in zip(inputs, ("start", "limit", "delta"), strict=True)
    )
    from bnkit.convert.onnx_walker import Value

    return Value(None, torch.from_numpy(np.arange(start, limit, delta, dtype=np.result_type(start, limit, delta))))


def _batch_kept_reshape(b, x, out_shape: tuple[int, ...]):
    """A graph reshape of ``x`` to ``out_shape`` (concrete, from the example), with -1 for a kept batch."""
    if x.is_constant:
        return b.method("reshape", x, *out_shape)
    if out_shape == x.shape:
        return x
    if out_shape[0] == x.shape[0] and len(out_shape) >= 1:
        if len(out_shape) == 2 and x.rank > 2:
            return b.function(torch.flatten, x, 1)
        return b.method("reshape", x, -1, *out_shape[1:])
    return b.method("reshape", x, *out_shape)


@from_onnx("Reshape")
def reshape(b, node, inputs):
    x = inputs[0]
    if b.opset < 5:
        target = list(b.attrs(node)["shape"])
    else:
        target = b.ints(inputs[1], "the target shape (input shape)")
    allowzero = bool(b.attrs(node).get("allowzero", 0)) if b.opset >= 14 else False
    if not allowzero:  # 0 copies the input's dimension there
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    out_shape = tuple(x.example.reshape(target).shape)
    if x.reshaped_from is not None and x.reshaped_from.shape == out_shape:
        return x.reshaped_from  # reshaped back: the tensor before, as it was (the batch stays free)
    out = _batch_kept_reshape(b, x, out_shape)
    if out is not x:
        out.reshaped_from = x
    return out


@from_onnx("Flatten")
def flatten(b, node, inputs):
    x = inputs[0]
    axis = int(b.attrs(node).get("axis", 1)) % (x.rank + 1) if x.rank else 0
    out_shape = (math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
    if axis == 1 and not x.is_constant:
        return x if x.rank == 2 else b.function(torch.flatten, x, 1)
    return _batch_kept_reshape(b, x, out_shape) if axis >= 1 else b.method("reshape", x, *out_shape)


@from_onnx("Transpose")
def transpose(b, node, inputs):
    x = inputs[0]
    perm = b.attrs(node).get("perm", list(range(x.rank))[::-1])
    return b.function(torch.permute, x, tuple(int(p) for p in perm))


@from_onnx("Concat")
def concat(b, node, inputs):
    axis = int(b.attrs(node)["axis"])
    values = [v for v in inputs if v is not None and v.example.numel() > 0 or v is not None and v.rank != 1]
    return b.function(torch.cat, values, axis % values[0].rank)


def _axes_arg(b, node, inputs):
    if b.opset < 13:
        axes = b.attrs(node).get("axes")
        return None if axes is None else [int(a) for a in axes]
    return b.ints(inputs[1], "axes") if len(inputs) > 1 and inputs[1] is not None else None


@from_onnx("Unsqueeze")
def unsqueeze(b, node, inputs):
    x = inputs[0]
    axes = _axes_arg(b, node, inputs)
    rank = x.rank + len(axes)
    out = x
    for axis in sorted(a % rank for a in axes):
        out = b.function(torch.unsqueeze, out, axis)
    return out


@from_onnx("Squeeze")
def squeeze(b, node, inputs):
    x = inputs[0]
    axes = _axes_arg(b, node, inputs)
    if axes is None:
        axes = [i for i, d in enumerate(x.shape) if d == 1]
        if 0 in axes and not x.is_constant:
            raise b.unsupported("Squeeze without axes would drop the batch dimension of size 1 of the example")
    axes = sorted((a % x.rank for a in axes), reverse=True)
    out = x
    for axis in axes:
        if out.shape[axis] != 1:
            raise b.unsupported(f"axis {axis} has size {out.shape[axis]}, not 1")
        out = b.function(torch.squeeze, out, axis)
    return out


@from_onnx("Gather")
def gather(b, node, inputs):
    data, indices = inputs
    axis = int(b.attrs(node).get("axis", 0)) % data.rank
    if not indices.is_constant:
        raise b.unsupported("indices computed in the graph are not supported")
    index = indices.example.long()
    index = torch.where(index < 0, index + data.shape[axis], index)
    if data.is_constant:
        return b.function(
            lambda d: torch.index_select(d, axis, index.reshape(-1)).reshape(
                (*d.shape[:axis], *index.shape, *d.shape[axis + 1 :])
            ),
            data,
        )
    if index.dim() == 0:  # one position: the axis is dropped, as x.select(axis, i)
        sliced = b.function(torch.narrow, data, axis, int(index), 1)
        return b.function(torch.squeeze, sliced, axis)
    flat = index.reshape(-1)
    if data.rank == 1 and torch.equal(flat, torch.arange(data.shape[0])):
        # every position in order (the dynamo exporter's as_strided of a flattened tensor): a reshape,
        # or the tensor before the flatten when that had this shape
        if data.reshaped_from is not None and data.reshaped_from.shape == tuple(index.shape):
            return data.reshaped_from
        return b.method("reshape", data, *index.shape)
    raise b.unsupported("Gather of several positions of a computed tensor is not supported")


def _slice_args(b, node, inputs):
    if b.opset < 10:
        a = b.attrs(node)
        starts, ends = list(a["starts"]), list(a["ends"])
        axes = list(a.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = b.ints(inputs[1], "starts"), b.ints(inputs[2], "ends")
        axes = b.ints(inputs[3], "axes") if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
        steps = b.ints(inputs[4], "steps") if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    return starts, ends, axes, steps


@from_onnx("Slice")
def slice_(b, node, inputs):
    x = inputs[0]
    starts, ends, axes, steps = _slice_args(b, node, inputs)
    out = x
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis %= x.rank
        size = x.shape[axis]
        if step != 1:
            if not x.is_constant:
                raise b.unsupported(f"step {step} on a computed tensor is not supported")
            index = [slice(None)] * x.rank
            index[axis] = slice(*slice(start, end, step).indices(size))
            out = b.function(lambda t, i=tuple(index): t[i], out)
            continue
        lo, hi, _ = slice(start, end).indices(size)
        if lo == 0 and hi == size:
            continue
        out = b.function(torch.narrow, out, axis, lo, max(hi - lo, 0))
    return out


@from_onnx("Split")
def split(b, node, inputs):
    x = inputs[0]
    a = b.attrs(node)
    axis = int(a.get("axis", 0)) % x.rank
    if b.opset < 13:
        sizes = a.get("split")
    else:
        sizes = b.ints(inputs[1], "split") if len(inputs) > 1 and inputs[1] is not None else None
    count = len(node.output)
    if sizes is None:
        size = x.shape[axis]
        part = math.ceil(size / count)  # opset 18's num_outputs: equal parts, the last smaller
        sizes = [min(part, size - i * part) for i in range(count)]
    sizes = [int(s) for s in sizes]
    out = []
    start = 0
    for s in sizes:  # one narrow per output: each output is its own node, nothing to unpack
        out.append(b.function(torch.narrow, x, axis, start, s))
        start += s
    return out


@from_onnx("Pad")
def pad(b, node, inputs):
    x = inputs[0]
    a = b.attrs(node)
    mode = a.get("mode", "constant")
    if b.opset < 11:
        pads, value = list(a["pads"]), float(a.get("value", 0.0))
        axes = list(range(x.rank))
    else:
        pads = b.ints(inputs[1], "pads")
        value = 0.0
        if len(inputs) > 2 and inputs[2] is not None and inputs[2].example.numel():
            value = float(b.constant(inputs[2], "constant_value").reshape(()))
        axes = b.ints(inputs[3], "axes") if len(inputs) > 3 and inputs[3] is not None else list(range(x.rank))
    n = len(axes)
    begins, ends = [0] * x.rank, [0] * x.rank
    for i, axis in enumerate(axes):
        begins[axis % x.rank], ends[axis % x.rank] = pads[i], pads[n + i]
    first = next((i for i in range(x.rank) if begins[i] or ends[i]), x.rank)
    if first < 2 and not x.is_constant:
        raise b.unsupported("padding of the batch or channel axis is not supported")
    if mode != "constant":
        raise b.unsupported(f"mode={mode!r}; only constant padding is supported")
    spec = torch_pad_order(begins[2:], ends[2:])
    return b.function(F.pad, x, spec, value=value) if value else b.function(F.pad, x, spec)


@from_onnx("Expand")
def expand(b, node, inputs):
    x = inputs[0]
    dims = b.ints(inputs[1], "shape")
    out_shape = tuple(torch.broadcast_shapes(x.shape, tuple(dims)))
    if out_shape == x.shape:
        return x
    return b.method("expand", x, *out_shape)
