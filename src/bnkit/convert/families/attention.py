"""Attention, both ways: ``keras.layers.MultiHeadAttention`` ⇄ ``nn.MultiheadAttention``; the learned
token of a ViT (bnkit's Keras ``BatchConstant`` ⇄ ``parameter.expand(x.size(0), -1, -1)``); ``einsum``
(``keras.ops.einsum`` ⇄ ``torch.einsum``); and, refused by name, torchvision's attention blocks that
have no exact Keras counterpart (Swin's shifted windows, MaxViT's relative position bias).

Multi-head attention, per head ``h`` (``d`` the model width, ``k = d / heads`` the head width):
``q_h = x_q W_q[:, h] + b_q[h]`` (likewise ``k_h``, ``v_h`` from the key and value inputs),
``o_h = softmax(q_h k_hᵀ / sqrt(k)) v_h`` (dropout on the softmax in training, as in both), and
``y = Σ_h o_h W_o[h] + b_o``. PyTorch packs the projections as rows: ``in_proj_weight`` is
``(3d, d)`` (``q_proj_weight``, ``k_proj_weight`` ``(d, kdim)``, ``v_proj_weight`` ``(d, vdim)`` when
``kdim``/``vdim`` differ from ``d``), head ``h`` holding rows ``h·k … (h+1)·k``; ``out_proj`` is a
Linear. Keras holds per-head kernels: ``query/kernel`` ``(d, heads, k)`` ``= W_qᵀ.reshape(d, heads, k)``,
``query/bias`` ``(heads, k)``, and ``attention_output/kernel`` ``(heads, k, d) = W_oᵀ.reshape(heads, k, d)``.
Keras calls ``(query, value, key)``, PyTorch ``(query, key, value)``.

Exact only where both compute that: batch-first inputs of rank 3 (PyTorch's ``batch_first=False``
attends along the axis bnkit carries as the batch), Keras' ``key_dim == value_dim == d / heads``
and output width ``d``, default ``attention_axes``, no masks, no ``add_bias_kv`` / ``add_zero_attn``,
no ``use_gate`` / ``sliding_window``, and the attention weights unused (``need_weights=True`` is
converted when only the output is read). The rest is refused by name.
"""

from __future__ import annotations

import operator
import re
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import fx, nn

from bnkit.convert.keras_layers import BatchConstant
from bnkit.convert.layouts import identity, inverse, mapped_layout
from bnkit.convert.registry import from_keras, from_torch
from bnkit.convert.values import (
    BATCH,
    Constant,
    KerasValue,
    TorchValue,
    keras_array,
    torch_array,
    torch_module_holding,
)
from bnkit.keras import keras

if TYPE_CHECKING:
    from bnkit.convert.keras_walker import KerasToTorch
    from bnkit.convert.torch_walker import TorchToKeras

L = keras.layers
keras_numpy_ops = keras.src.ops.numpy

# ---- multi-head attention: PyTorch -> Keras ----------------------------------------------------

_TORCH_MASKS = ((3, "key_padding_mask"), (5, "attn_mask"))


def _weights_used(node: fx.Node) -> bool:
    """Whether anything reads the attention weights (item 1) of a ``MultiheadAttention`` call."""
    return any(
        not (user.target is operator.getitem and (user.args[1] == 0 or not user.users))  # `out, _ = attn(...)`
        for user in node.users
    )


@from_torch(nn.MultiheadAttention, permuted_input=True)
def multihead_attention_to_keras(b: TorchToKeras, node, m: nn.MultiheadAttention):
    """``nn.MultiheadAttention(q, k, v)`` → ``keras.layers.MultiHeadAttention()(q, v, key=k)``; returns
    ``(output, None)`` as the module does with ``need_weights=False``."""
    if not m.batch_first:
        raise b.unsupported(
            node,
            "batch_first=False: its inputs are (L, N, E), so it attends along the first axis, which "
            "bnkit.convert carries as the batch (use batch_first=True)",
        )
    if m.bias_k is not None:
        raise b.unsupported(node, "add_bias_kv=True (learned key/value biases appended to the sequence)")
    if m.add_zero_attn:
        raise b.unsupported(node, "add_zero_attn=True (a zero key/value appended to the sequence)")
    for index, key in _TORCH_MASKS:
        if b.arg(node, index, key) is not None:
            raise b.unsupported(node, f"{key}= is not supported (only unmasked attention converts)")
    if b.arg(node, 7, "is_causal", False):
        raise b.unsupported(node, "is_causal=True is not supported (only unmasked attention converts)")
    if b.arg(node, 4, "need_weights", True) and _weights_used(node):
        raise b.unsupported(node, "its attention weights (need_weights=True) are used; only the output converts")
    args = [b.arg(node, i, key) for i, key in enumerate(("query", "key", "value"))]
    name = b.name(node)
    q, k, v = (b.value(a, node) for a in args)
    if any(t.rank != 3 for t in (q, k, v)):
        raise b.unsupported(node, "unbatched (L, E) inputs; only (N, L, E) converts")
    q, k, v = (b.to_layout(t, identity(3), f"{name}_{i}") for i, t in enumerate((q, k, v)))
    d, heads = m.embed_dim, m.num_heads
    head = d // heads
    if m._qkv_same_embed_dim:
        w_q, w_k, w_v = np.split(torch_array(m.in_proj_weight), 3)
    else:
        w_q, w_k, w_v = (torch_array(w) for w in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight))
    use_bias = m.in_proj_bias is not None
    biases = np.split(torch_array(m.in_proj_bias), 3) if use_bias else [None] * 3
    weights = []
    for w, bias in zip((w_q, w_k, w_v), biases, strict=True):
        weights.append(np.ascontiguousarray(w.T).reshape(w.shape[1], heads, head))
        weights += [bias.reshape(heads, head)] if use_bias else []
    weights.append(np.ascontiguousarray(torch_array(m.out_proj.weight).T).reshape(heads, head, d))
    weights += [torch_array(m.out_proj.bias)] if use_bias else []
    layer = L.MultiHeadAttention(heads, head, head, dropout=float(m.dropout), use_bias=use_bias, name=name)
    tensor = layer(q.tensor, v.tensor) if args[1] is args[2] else layer(q.tensor, v.tensor, key=k.tensor)
    layer.set_weights(weights)
    return KerasValue(tensor, q.shape[:-1] + (d,), layout=identity(3)), None


# ---- multi-head attention: Keras -> PyTorch ----------------------------------------------------

_KERAS_CALL = ("query", "value", "key")
_KERAS_OPTIONS = ("query_mask", "value_mask", "key_mask", "attention_mask")


def _keras_attention_inputs(b: KerasToTorch, layer, node) -> list:
    """The Keras tensors given as query, value and key (key: the value when left out)."""
    given = dict(zip(_KERAS_CALL, node.arguments.args, strict=False)) | dict(node.arguments.kwargs)
    for option in _KERAS_OPTIONS:
        if given.get(option) is not None:
            raise b.unsupported(layer, f"{option}= is not supported (only unmasked attention converts)")
    if given.get("use_causal_mask"):
        raise b.unsupported(layer, "use_causal_mask=True is not supported (only unmasked attention converts)")
    if given.get("return_attention_scores"):
        raise b.unsupported(layer, "return_attention_scores=True; only the output converts")
    if given.get("key") is None:
        given["key"] = given["value"]
    return [given["query"], given["value"], given["key"]]


@from_keras(L.MultiHeadAttention, permuted_input=True)
def multi_head_attention_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    """``MultiHeadAttention()(q, v, key=k)`` → ``nn.MultiheadAttention(batch_first=True)(q, k, v)[0]``."""
    base = L.MultiHeadAttention
    if any(getattr(type(layer), f) is not getattr(base, f) for f in ("_compute_attention", "_masked_softmax")):
        raise b.unsupported(layer, "a subclass of MultiHeadAttention with its own attention computation")
    query, value, key = (b.env[id(t)] for t in _keras_attention_inputs(b, layer, node))
    if any(t.rank != 3 for t in (query, value, key)):
        raise b.unsupported(layer, "inputs of rank other than 3; only (N, L, E) converts")
    heads, d = layer.num_heads, int(layer.query_dense.kernel.shape[0])
    if layer._use_gate:
        raise b.unsupported(layer, "use_gate=True (a gated attention output)")
    if layer._sliding_window is not None:
        raise b.unsupported(layer, f"sliding_window={layer._sliding_window}")
    if tuple(layer._attention_axes) != (1,):
        raise b.unsupported(layer, f"attention_axes={layer._attention_axes}; only the default (the sequence) converts")
    head = d // heads
    out = int(layer.output_dense.kernel.shape[-1])
    if d % heads or layer.key_dim != head or layer.value_dim != head or out != d:
        raise b.unsupported(
            layer,
            f"key_dim={layer.key_dim}, value_dim={layer.value_dim}, output width {out} with {heads} heads "
            f"on width {d}; PyTorch's MultiheadAttention needs key_dim == value_dim == {d} / {heads} and width {d}",
        )
    kdim, vdim = int(layer.key_dense.kernel.shape[0]), int(layer.value_dense.kernel.shape[0])
    dense = (layer.query_dense, layer.key_dense, layer.value_dense)
    w = [keras_array(x.kernel).reshape(x.kernel.shape[0], d).T for x in dense]
    arrays = {}
    if kdim == vdim == d:
        arrays["in_proj_weight"] = np.concatenate(w)
    else:
        arrays |= {"q_proj_weight": w[0], "k_proj_weight": w[1], "v_proj_weight": w[2]}
    arrays["out_proj.weight"] = np.ascontiguousarray(keras_array(layer.output_dense.kernel).reshape(d, d).T)
    if layer.use_bias:
        arrays["in_proj_bias"] = np.concatenate([keras_array(x.bias).reshape(d) for x in dense])
        arrays["out_proj.bias"] = keras_array(layer.output_dense.bias)

    def factory():
        return nn.MultiheadAttention(
            d, heads, dropout=float(layer.dropout), bias=layer.use_bias, kdim=kdim, vdim=vdim, batch_first=True
        )

    module = torch_module_holding(factory, arrays)
    query, key, value = (b.to_layout(t, identity(3)) for t in (query, key, value))
    call = b.add_module(layer.name, module, query.node, key.node, value.node)
    call.kwargs = {"need_weights": False}
    return TorchValue(b.graph.call_function(operator.getitem, (call, 0)), 3, identity(3))


# ---- a learned token for every sample: Keras BatchConstant <-> parameter.expand(n, -1, -1) ---------


def _expand_sizes(b: TorchToKeras, node) -> list:
    sizes = list(node.args[1:]) or [node.kwargs.get("size")]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = list(sizes[0])
    return [b.operand(s, node) for s in sizes]


def _consumer_layout(b: TorchToKeras, node, rank: int):
    """The layout of the tensors ``node`` is concatenated with (``torch.cat([token, x])``), else the mapped one."""
    for user in node.users:
        for arg in user.all_input_nodes:
            value = b.env.get(arg)
            if arg is not node and isinstance(value, KerasValue) and value.rank == rank:
                return value.layout
    return mapped_layout(rank)


@from_torch(methods=("expand",), permuted_input=True)
def expand_to_keras(b: TorchToKeras, node, method) -> KerasValue:
    """``token.expand(x.size(0), -1, -1)`` of a ``(1, ...)`` parameter or buffer: bnkit's ``BatchConstant``;
    ``x.expand(...)`` that keeps ``x``'s shape: ``x``. Other broadcasts are refused."""
    x, sizes = b.operand(node.args[0], node), _expand_sizes(b, node)
    if isinstance(x, KerasValue):
        shape = (BATCH, *x.shape)
        if len(sizes) == len(shape) and all(s in (-1, d) for s, d in zip(sizes, shape, strict=True)):
            return x
        raise b.unsupported(node, f"expand{tuple(sizes)} of a tensor of shape {shape} (only the batch of a constant)")
    if not isinstance(x, Constant):
        raise b.unsupported(node, f"expanding {type(x).__name__}")
    shape = x.array.shape
    rest_ok = all(s in (-1, d) for s, d in zip(sizes[1:], shape[1:], strict=False))
    if len(sizes) != len(shape) or shape[0] != 1 or sizes[0] is not BATCH or not rest_ok:
        shown = ", ".join("x.size(0)" if s is BATCH else repr(s) for s in sizes)
        raise b.unsupported(
            node,
            f"expand({shown}) of the constant {x.name!r} of shape {shape}; only a (1, ...) constant expanded "
            "to the batch (expand(x.size(0), -1, ...)) converts",
        )
    layout = _consumer_layout(b, node, len(shape))
    weight = np.ascontiguousarray(x.array.transpose(layout)[0])
    reference = next(v for n, v in b.env.items() if n.op == "placeholder")  # any input: it gives the batch size
    layer = BatchConstant(weight.shape, trainable=x.trainable, name=b.name(node))
    tensor = layer(reference.tensor)
    layer.set_weights([weight])
    return KerasValue(tensor, shape[1:], layout=layout)


@from_keras(BatchConstant, permuted_input=True)
def batch_constant_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    """``parameter.expand(x.size(0), -1, ...)``: the weight with a batch axis of 1, in PyTorch's layout."""
    weight = keras_array(layer.constant)
    rank = weight.ndim + 1
    array = np.ascontiguousarray(weight[None].transpose(inverse(mapped_layout(rank))))
    parameter = b.add_tensor(layer.name, array, trainable=layer.trainable)
    batch = b.graph.call_method("size", (inputs[0].node, 0))
    out = b.graph.call_method("expand", (parameter, batch, *([-1] * weight.ndim)))
    return TorchValue(out, rank)


# ---- einsum -------------------------------------------------------------------------------------

_EQUATION = re.compile(r"^([a-zA-Z]+(?:,[a-zA-Z]+)*)->([a-zA-Z]+)$")


def _batch_first_equation(equation: str, ranks: list[int]) -> str | None:
    """Why ``equation`` does not keep the batch first in every operand and the output, or ``None``."""
    found = _EQUATION.match(equation.replace(" ", ""))
    if found is None:
        return "only explicit equations with letters ('bij,bjk->bik', no '...') convert"
    operands, output = found.group(1).split(","), found.group(2)
    if len(operands) != len(ranks) or any(len(o) != r for o, r in zip(operands, ranks, strict=False)):
        return "its subscripts do not match the operands' ranks"
    batch = output[0]
    if any(o[0] != batch or batch in o[1:] for o in operands) or batch in output[1:]:
        return f"the batch (the first axis, {batch!r} in the output) must be the first subscript of every operand"
    return None


@from_torch(torch.einsum, permuted_input=True)
def einsum_to_keras(b: TorchToKeras, node, fn) -> KerasValue:
    """``torch.einsum(eq, *tensors)`` → ``keras.ops.einsum(eq, *tensors)`` on the tensors in PyTorch's axis
    order (the same contraction, the torch backend's own ``einsum``); the batch must be the first
    subscript of every operand and of the output."""
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (tuple, list)):
        operands = list(operands[0])
    values = [b.operand(o, node) for o in operands]
    if not isinstance(equation, str) or not all(isinstance(v, KerasValue) for v in values):
        kinds = ", ".join(type(v).__name__ for v in values)
        raise b.unsupported(node, f"einsum({equation!r}) of ({kinds}); only input-dependent tensors convert")
    why = _batch_first_equation(equation, [v.rank for v in values])
    if why is not None:
        raise b.unsupported(node, f"einsum({equation!r}): {why}")
    name = b.name(node)
    tensors = [b.to_layout(v, identity(v.rank), f"{name}_{i}").tensor for i, v in enumerate(values)]
    out = keras_numpy_ops.Einsum(equation, name=name)(*tensors)
    shape = b.out_shape(node)
    return KerasValue(out, shape, layout=identity(len(shape) + 1))


@from_keras(keras_numpy_ops.Einsum, permuted_input=True)
def einsum_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    """``keras.ops.einsum(eq, *tensors)`` → ``torch.einsum(eq, *tensors)`` in Keras' axis order."""
    why = _batch_first_equation(layer.subscripts, [v.rank for v in inputs])
    if why is not None:
        raise b.unsupported(layer, f"einsum({layer.subscripts!r}): {why}")
    nodes = [b.to_layout(v, identity(v.rank)).node for v in inputs]
    rank = len(node.outputs[0].shape)
    return TorchValue(b.graph.call_function(torch.einsum, (layer.subscripts, *nodes)), rank, identity(rank))


# ---- torchvision's attention blocks with no exact Keras counterpart: refused by name ---------------

_TORCHVISION_BLOCKS = {
    "torchvision.models.maxvit.RelativePositionalMultiHeadAttention": (
        "relative position bias (a bias table indexed with the integer buffer relative_position_index, added to "
        "the attention logits of each window or grid partition) has no exact Keras layer"
    ),
}


@from_torch(
    *_TORCHVISION_BLOCKS,
    "torchvision.models.swin_transformer.ShiftedWindowAttention",
    "torchvision.models.swin_transformer.ShiftedWindowAttentionV2",
)
def torchvision_attention_block(b: TorchToKeras, node, m):
    """Kept whole by the tracer so that the refusal names the block and what stops it (not the integer
    buffer or the einsum it meets first)."""
    names = [f"{c.__module__}.{c.__qualname__}" for c in type(m).__mro__]
    reason = next((_TORCHVISION_BLOCKS[n] for n in names if n in _TORCHVISION_BLOCKS), None) or _swin_reason(m)
    raise b.unsupported(node, reason)


def _swin_reason(m) -> str:
    shifted = any(m.shift_size)  # Swin's even blocks do not shift their windows
    v2 = type(m).__name__.endswith("V2")
    parts = ["windows cyclically shifted with torch.roll and an attention mask between them"] if shifted else []
    parts += ["cosine attention with a learned logit scale and a position-bias MLP"] if v2 else []
    parts += ["a relative position bias table indexed with the integer buffer relative_position_index"]
    what = "shifted-window attention" if shifted else "window attention"
    return (
        f"{what} (torchvision.models.swin_transformer.shifted_window_attention, window_size={list(m.window_size)}, "
        f"shift_size={list(m.shift_size)}: {', '.join(parts)}) has no exact Keras layer"
    )
