"""Keras 3 functional/Sequential model → ``torch.fx.GraphModule`` (NCHW)."""

from __future__ import annotations

import keyword
import operator
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from bnkit.conventions import KERAS, TORCH, Convention, translate_momentum
from bnkit.convert._common import (
    SemanticsChoice,
    UnsupportedLayerError,
    keras_axis_to_torch,
    keras_to_torch_flat_order,
    same_padding,
    warn_at_caller,
)
from bnkit.keras import BatchNormalization as BnkitKerasBN
from bnkit.keras import keras

L = keras.layers


@dataclass
class _Value:
    """A converted tensor: its fx node, the Keras tensor's rank and how it lies in PyTorch.

    ``layout="mapped"``: the torch tensor is the channels-first version of the Keras one;
    ``"same"``: identical (after a Keras ``Permute``). ``pending_flat``: the torch tensor is a
    PyTorch-order flattening of ``(C, *spatial)`` while Keras flattened ``(*spatial, C)``: the
    next Dense's kernel rows are reordered instead of the data.
    """

    node: fx.Node
    rank: int
    layout: str = "mapped"
    pending_flat: tuple[int, ...] | None = None


def _np(variable) -> np.ndarray:
    return np.array(keras.ops.convert_to_numpy(variable.value))


def _param(array) -> nn.Parameter:
    return nn.Parameter(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)))


_ACTIVATIONS = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,  # keras.activations.gelu defaults to approximate=False, as nn.GELU
    "elu": nn.ELU,  # alpha=1.0 in both
    "leaky_relu": lambda: nn.LeakyReLU(0.2),  # keras.activations.leaky_relu: negative_slope=0.2
    "silu": nn.SiLU,
    "relu6": nn.ReLU6,
    "selu": nn.SELU,  # the same alpha and scale constants
    "softplus": nn.Softplus,  # beta=1
    "softsign": nn.Softsign,
    "hard_sigmoid": nn.Hardsigmoid,  # relu6(x + 3) / 6 in both
    "hard_silu": nn.Hardswish,  # x * hard_sigmoid(x); Keras' hard_swish is the same function
    "mish": nn.Mish,
    "hard_tanh": nn.Hardtanh,  # clip to [-1, 1]
    "log_sigmoid": nn.LogSigmoid,
    "celu": nn.CELU,  # alpha=1.0 in both
}

# activations whose outputs are >= 0: zero padding cannot change a max pooling of them
_NON_NEGATIVE_ACTIVATIONS = {"relu", "relu6", "sigmoid", "softmax", "hard_sigmoid", "softplus"}

_PASS_THROUGH = (L.Dropout, L.Activation, L.ReLU, L.LeakyReLU, L.ELU, L.Softmax, L.Identity)


def _functional(model):
    if isinstance(model, keras.Sequential):
        functional = getattr(model, "_functional", None)
        if functional is None:
            raise ValueError(
                f"Sequential model {model.name!r} has no input shape yet: build it with an Input layer "
                "or call it once on data before converting"
            )
        return functional
    if not isinstance(model, keras.Model) or not hasattr(model, "_nodes_by_depth"):
        raise UnsupportedLayerError(
            getattr(model, "name", "?"),
            type(model).__name__,
            "only functional and Sequential Keras models can be converted (a subclassed model's call() "
            "is Python code with no graph to read)",
        )
    return model


class _KerasToTorch:
    def __init__(self, model, semantics: str) -> None:
        self.name = model.name
        self.model = _functional(model)
        self.semantics = SemanticsChoice(semantics)
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.env: dict[int, _Value] = {}
        self.names: set[str] = set()
        self.consumers: dict[int, list] = {}
        self.output_ids = {id(t) for t in self.model.outputs}

    # ---- graph bookkeeping ------------------------------------------------------------
    def _nodes(self, model=None):
        model = self.model if model is None else model
        for depth in sorted(model._nodes_by_depth, reverse=True):
            yield from model._nodes_by_depth[depth]

    def _name(self, name: str) -> str:
        base = re.sub(r"\W", "_", name) or "layer"
        if base[0].isdigit() or keyword.iskeyword(base):
            base = f"_{base}"
        candidate, i = base, 1
        while candidate in self.names:
            candidate, i = f"{base}_{i}", i + 1
        self.names.add(candidate)
        return candidate

    def _module(self, name: str, module: nn.Module, *args) -> fx.Node:
        target = self._name(name)
        self.root.add_module(target, module)
        return self.graph.call_module(target, tuple(args))

    def build(self) -> fx.GraphModule:
        for node in self._nodes():
            for t in node.input_tensors:
                self.consumers.setdefault(id(t), []).append(node)
        for tensor in self.model.inputs:
            placeholder = self.graph.placeholder(self._name(tensor._keras_history.operation.name))
            self.env[id(tensor)] = _Value(placeholder, len(tensor.shape))
        for node in self._nodes():
            if node.is_input:
                continue
            self._convert(node)
        outputs = []
        for tensor in self.model.outputs:
            value = self.env[id(tensor)]
            outputs.append(value.node)
        self.graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
        self.semantics.check_all_found()
        gm = fx.GraphModule(self.root, self.graph, class_name=re.sub(r"\W", "_", self.name))
        # A Keras model called without training= runs in inference: so does the converted one
        # until model.train(), rather than normalising with batch statistics from the first call.
        return gm.eval()

    # ---- layers -----------------------------------------------------------------------
    def _convert(self, node) -> None:
        layer = node.operation
        kind = type(layer).__name__
        inputs = [self.env[id(t)] for t in node.input_tensors]
        if len(node.outputs) != 1:
            raise UnsupportedLayerError(layer.name, kind, "layers with several outputs are not supported")
        for value in inputs:
            if value.layout == "same" and value.rank > 2 and not isinstance(layer, (L.Flatten, *_PASS_THROUGH)):
                raise UnsupportedLayerError(
                    layer.name, kind, "its input was permuted by a Permute layer; only Flatten may follow one"
                )
        handler = self._handler(layer)
        if handler is None:
            raise UnsupportedLayerError(layer.name, kind, "this layer type is not supported by bnkit.convert")
        out = handler(layer, node, inputs)
        self.env[id(node.outputs[0])] = out

    def _handler(self, layer):
        if isinstance(layer, keras.Model):
            return self._nested
        table = [
            (L.InputLayer, lambda layer, node, inputs: inputs[0]),
            (L.Identity, lambda layer, node, inputs: inputs[0]),
            ((L.Conv1D, L.Conv2D), self._conv),
            (L.Dense, self._dense),
            (L.BatchNormalization, self._batchnorm),
            (L.Activation, self._activation_layer),
            ((L.ReLU, L.LeakyReLU, L.ELU, L.Softmax), self._activation_layer),
            (L.Flatten, self._flatten),
            (L.Dropout, self._dropout),
            ((L.MaxPooling1D, L.MaxPooling2D, L.AveragePooling1D, L.AveragePooling2D), self._pool),
            ((L.GlobalAveragePooling1D, L.GlobalAveragePooling2D), self._global_pool),
            ((L.GlobalMaxPooling1D, L.GlobalMaxPooling2D), self._global_pool),
            ((L.ZeroPadding1D, L.ZeroPadding2D), self._zero_padding),
            (L.Add, self._add),
            (L.Concatenate, self._concatenate),
            (L.Permute, self._permute),
        ]
        excluded = (L.Conv1DTranspose, L.Conv2DTranspose, L.DepthwiseConv2D, L.SeparableConv2D)
        if isinstance(layer, excluded):
            return None
        for types, handler in table:
            if isinstance(layer, types):
                return handler
        return None

    def _nested(self, layer, node, inputs) -> _Value:
        """A functional or Sequential model used as a layer: its layers are converted in line."""
        inner = _functional(layer)
        if sum(1 for n in self._nodes() if n.operation is layer) != 1:
            raise UnsupportedLayerError(
                layer.name, type(layer).__name__, "a nested model called more than once (shared weights)"
            )
        if len(inner.inputs) != len(inputs):
            raise UnsupportedLayerError(layer.name, type(layer).__name__, "its inputs do not match its call")
        for tensor, value in zip(inner.inputs, inputs, strict=True):
            self.env[id(tensor)] = value
        for inner_node in self._nodes(inner):
            for t in inner_node.input_tensors:
                self.consumers.setdefault(id(t), []).append(inner_node)
        for inner_node in self._nodes(inner):
            if not inner_node.is_input:
                self._convert(inner_node)
        return self.env[id(inner.outputs[0])]

    def _channels_last(self, layer) -> None:
        fmt = getattr(layer, "data_format", "channels_last")
        if fmt != "channels_last":
            raise UnsupportedLayerError(
                layer.name, type(layer).__name__, f"data_format={fmt!r}; only 'channels_last' is supported"
            )

    def _with_activation(self, layer, value: _Value) -> _Value:
        module = self._activation_module(layer, getattr(layer, "activation", None), value.rank)
        if module is None:
            return value
        return _Value(self._module(f"{layer.name}_activation", module, value.node), value.rank)

    def _activation_module(self, layer, fn, rank: int) -> nn.Module | None:
        if fn is None:
            return None
        name = keras.activations.serialize(fn)
        if name == "linear":
            return None
        if name == "softmax":
            return nn.Softmax(dim=keras_axis_to_torch(-1, rank))
        if name == "log_softmax":
            return nn.LogSoftmax(dim=keras_axis_to_torch(-1, rank))
        if isinstance(name, str) and name in _ACTIVATIONS:
            return _ACTIVATIONS[name]()
        raise UnsupportedLayerError(layer.name, type(layer).__name__, f"activation {name!r} is not supported")

    def _conv(self, layer, node, inputs) -> _Value:
        self._channels_last(layer)
        kind = type(layer).__name__
        (x,) = inputs
        spatial_rank = x.rank - 2
        in_shape = node.input_tensors[0].shape
        kernel = _np(layer.kernel)
        ks, strides, dilations = layer.kernel_size, layer.strides, layer.dilation_rate
        if layer.padding == "valid":
            pads = [(0, 0)] * spatial_rank
        elif layer.padding == "causal":
            pads = [((ks[0] - 1) * dilations[0], 0)]
        else:
            pads = [same_padding(in_shape[1 + i], ks[i], strides[i], dilations[i]) for i in range(spatial_rank)]
            if any(p is None for p in pads):
                raise UnsupportedLayerError(
                    layer.name, kind, "padding='same' with strides > 1 needs the input's spatial size"
                )
        conv_cls = nn.Conv1d if spatial_rank == 1 else nn.Conv2d
        in_channels = kernel.shape[-2] * layer.groups
        symmetric = all(b == a for b, a in pads)
        odd_stride_one = all(s == 1 for s in strides) and layer.padding == "same" and not symmetric
        padding = "same" if odd_stride_one else tuple(b for b, _ in pads) if symmetric else 0
        conv = conv_cls(
            in_channels,
            layer.filters,
            tuple(ks),
            stride=tuple(strides),
            padding=padding,
            dilation=tuple(dilations),
            groups=layer.groups,
            bias=layer.use_bias,
        )
        with torch.no_grad():
            conv.weight.copy_(
                torch.from_numpy(np.transpose(kernel, (spatial_rank + 1, spatial_rank, *range(spatial_rank))))
            )
            if layer.use_bias:
                conv.bias.copy_(torch.from_numpy(_np(layer.bias)))
        source = x.node
        if padding == 0 and any(b or a for b, a in pads):
            # Keras pads the odd element after (right/bottom); PyTorch's padding is symmetric.
            flat = tuple(p for b, a in reversed(pads) for p in (b, a))
            pad_cls = nn.ZeroPad1d if spatial_rank == 1 else nn.ZeroPad2d
            source = self._module(f"{layer.name}_pad", pad_cls(flat), source)
        out = _Value(self._module(layer.name, conv, source), x.rank)
        return self._with_activation(layer, out)

    def _dense(self, layer, node, inputs) -> _Value:
        (x,) = inputs
        if x.rank != 2:
            raise UnsupportedLayerError(
                layer.name, "Dense", f"Dense on a rank-{x.rank} input (only (batch, features) is supported)"
            )
        kernel = _np(layer.kernel)
        if x.pending_flat is not None:
            kernel = keras_to_torch_flat_order(kernel, x.pending_flat)
        linear = nn.Linear(kernel.shape[0], kernel.shape[1], bias=layer.use_bias)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T)))
            if layer.use_bias:
                linear.bias.copy_(torch.from_numpy(_np(layer.bias)))
        out = _Value(self._module(layer.name, linear, x.node), 2)
        return self._with_activation(layer, out)

    def _batchnorm(self, layer, node, inputs) -> _Value:
        (x,) = inputs
        kind = type(layer).__name__
        if layer.axis % x.rank != x.rank - 1 or x.rank < 2:
            raise UnsupportedLayerError(
                layer.name, kind, f"axis={layer.axis} is not the channel axis of a rank-{x.rank} input"
            )
        if getattr(layer, "renorm", False) or getattr(layer, "synchronized", False):
            raise UnsupportedLayerError(layer.name, kind, "renorm and synchronized have no PyTorch equivalent")
        conv: Convention = layer.convention if isinstance(layer, BnkitKerasBN) else KERAS
        channels = layer.moving_mean.shape[0]
        rank_to_dim = {2: 1, 3: 1, 4: 2, 5: 3}
        if x.rank not in rank_to_dim:
            raise UnsupportedLayerError(layer.name, kind, f"rank-{x.rank} input")
        dim = rank_to_dim[x.rank]
        affine = layer.scale or layer.center
        bias = layer.center or not layer.scale
        kwargs = dict(eps=layer.epsilon, affine=affine, bias=bias)
        if self.semantics.for_layer(layer.name) == "target" or conv == TORCH:
            try:
                momentum = translate_momentum(layer.momentum, conv, TORCH)
            except ValueError as e:
                raise UnsupportedLayerError(layer.name, kind, str(e)) from None
            bn = getattr(nn, f"BatchNorm{dim}d")(channels, momentum=momentum, **kwargs)
        else:
            from bnkit import torch as bnkit_torch

            bn = getattr(bnkit_torch, f"BatchNorm{dim}d")(channels, momentum=layer.momentum, convention=conv, **kwargs)
        with torch.no_grad():
            if layer.scale:
                bn.weight.copy_(torch.from_numpy(_np(layer.gamma)))
            elif affine:  # center without scale: PyTorch has no beta-only affine; a frozen weight of ones
                bn.weight.requires_grad_(False)
            if layer.center:
                bn.bias.copy_(torch.from_numpy(_np(layer.beta)))
            bn.running_mean.copy_(torch.from_numpy(_np(layer.moving_mean)))
            bn.running_var.copy_(torch.from_numpy(_np(layer.moving_variance)))
            counter = getattr(layer, "num_batches_tracked", None)
            if counter is not None:
                bn.num_batches_tracked.fill_(int(_np(counter)))
        if not layer.trainable:
            # Keras runs a frozen BN in inference mode; PyTorch decides by module mode.
            bn.requires_grad_(False)
            warn_at_caller(
                f"{layer.name}: a frozen Keras BatchNormalization (trainable=False) runs in inference mode; "
                "the converted BatchNorm is put in eval() with requires_grad=False, but model.train() "
                "switches it back to batch statistics: call .eval() on it after model.train()"
            )
        return _Value(self._module(layer.name, bn, x.node), x.rank)

    def _activation_layer(self, layer, node, inputs) -> _Value:
        (x,) = inputs
        kind = type(layer).__name__
        if isinstance(layer, L.Activation):
            module = self._activation_module(layer, layer.activation, x.rank)
        elif isinstance(layer, L.ReLU):
            max_value = None if layer.max_value is None else float(layer.max_value)
            if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0 or max_value not in (None, 6.0):
                raise UnsupportedLayerError(
                    layer.name,
                    kind,
                    "only ReLU() and ReLU(max_value=6) (no negative_slope/threshold) convert",
                )
            module = nn.ReLU() if max_value is None else nn.ReLU6()
        elif isinstance(layer, L.LeakyReLU):
            module = nn.LeakyReLU(float(layer.negative_slope))
        elif isinstance(layer, L.ELU):
            module = nn.ELU(float(layer.alpha))
        else:  # Softmax
            module = nn.Softmax(dim=keras_axis_to_torch(layer.axis, x.rank))
        if module is None:
            return x
        node_out = self._module(layer.name, module, x.node)
        return _Value(node_out, x.rank, x.layout, x.pending_flat)

    def _dropout(self, layer, node, inputs) -> _Value:
        (x,) = inputs
        if layer.noise_shape is not None:
            raise UnsupportedLayerError(layer.name, "Dropout", "noise_shape is not supported")
        return _Value(self._module(layer.name, nn.Dropout(float(layer.rate)), x.node), x.rank, x.layout, x.pending_flat)

    def _feeds_only_dense(self, tensor) -> bool:
        """True when every path from ``tensor`` reaches a Dense through element-wise layers only."""
        if id(tensor) in self.output_ids:
            return False
        consumers = self.consumers.get(id(tensor), [])
        for node in consumers:
            layer = node.operation
            if isinstance(layer, L.Dense):
                continue
            if isinstance(layer, _PASS_THROUGH) and not isinstance(layer, L.Softmax):
                if not self._feeds_only_dense(node.outputs[0]):
                    return False
                continue
            return False
        return bool(consumers)

    def _flatten(self, layer, node, inputs) -> _Value:
        (x,) = inputs
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            self._channels_last(layer)
        if x.rank == 2:
            return x
        shape = tuple(node.input_tensors[0].shape[1:])
        if any(d is None for d in shape):
            raise UnsupportedLayerError(layer.name, "Flatten", f"input shape {shape} is not fully known")
        if x.layout == "same":
            return _Value(self._module(layer.name, nn.Flatten(), x.node), 2)
        torch_shape = (shape[-1], *shape[:-1])
        if self._feeds_only_dense(node.outputs[0]):
            return _Value(self._module(layer.name, nn.Flatten(), x.node), 2, pending_flat=torch_shape)
        # Keras flattens channels-last: permute the data back before flattening.
        perm = (0, *range(2, x.rank), 1)
        permuted = self.graph.call_method("permute", (x.node, *perm))
        return _Value(self._module(layer.name, nn.Flatten(), permuted), 2)

    def _permute(self, layer, node, inputs) -> _Value:
        (x,) = inputs
        if x.layout != "mapped" or x.rank <= 2:
            raise UnsupportedLayerError(layer.name, "Permute", "only one Permute of a channels-last tensor")
        r = x.rank
        keras_to_torch = (0, r - 1, *range(1, r - 1))  # torch dim j holds Keras axis keras_to_torch[j]
        where = {k: j for j, k in enumerate(keras_to_torch)}
        perm = [where[d] for d in (0, *layer.dims)]
        return _Value(self.graph.call_method("permute", (x.node, *perm)), r, layout="same")

    def _pool(self, layer, node, inputs) -> _Value:
        self._channels_last(layer)
        (x,) = inputs
        kind = type(layer).__name__
        spatial_rank = x.rank - 2
        in_shape = node.input_tensors[0].shape
        ks, strides = tuple(layer.pool_size), tuple(layer.strides)
        padding = [0] * spatial_rank
        is_max = isinstance(layer, (L.MaxPooling1D, L.MaxPooling2D))
        source = x.node
        ceil_mode = False
        if layer.padding == "same":
            pads = [same_padding(in_shape[1 + i], ks[i], strides[i], 1) for i in range(spatial_rank)]
            known = None not in pads  # None: a strided axis of unknown size
            overhang = [
                known and (b, a) == (0, 1) and s > 1 and (is_max or k == 2)
                for (b, a), s, k in zip(pads if known else [(0, 0)] * spatial_rank, strides, ks, strict=True)
            ]
            if known and all(b == a or o for (b, a), o in zip(pads, overhang, strict=True)):
                # max pooling padded one element after, with a stride: PyTorch's ceil_mode pools the
                # same windows (from 0, every stride) and lets the last one overhang, ignoring what lies
                # outside. Averages: Keras' torch backend pads by replicating the edge value, its
                # TensorFlow backend averages the real values only; both give the edge value itself
                # for a 2-wide window, the only case where one PyTorch layer matches both.
                ceil_mode = any(b != a for b, a in pads)
                pads = [(b, b) for b, _ in pads]
            elif is_max and known and any(b != a for b, a in pads) and self._non_negative(node):
                # zeros never win a max over values >= 0 (after a ReLU): pad explicitly, pool 'valid'
                flat = tuple(p for b, a in reversed(pads) for p in (b, a))
                pad_cls = nn.ZeroPad1d if spatial_rank == 1 else nn.ZeroPad2d
                source = self._module(f"{layer.name}_pad", pad_cls(flat), source)
                pads = [(0, 0)] * spatial_rank
            for i, pad in enumerate(pads):
                if pad is None:
                    raise UnsupportedLayerError(
                        layer.name, kind, f"padding='same' with strides on axis {i + 1}, whose size is not known"
                    )
                if pad[0] != pad[1] or pad[0] > ks[i] // 2:
                    raise UnsupportedLayerError(
                        layer.name,
                        kind,
                        f"padding='same' pads axis {i + 1} by {pad} (before, after); PyTorch pooling pads "
                        "symmetrically: use padding='valid' or an input size that pads evenly"
                        + (" (or max-pool the output of a ReLU)" if is_max else ""),
                    )
                padding[i] = pad[0]
        cls = {
            (True, 1): nn.MaxPool1d,
            (True, 2): nn.MaxPool2d,
            (False, 1): nn.AvgPool1d,
            (False, 2): nn.AvgPool2d,
        }[(is_max, spatial_rank)]
        kwargs = {} if is_max else {"count_include_pad": False}  # Keras averages over real values only
        pool = cls(ks, stride=strides, padding=tuple(padding), ceil_mode=ceil_mode, **kwargs)
        return _Value(self._module(layer.name, pool, source), x.rank)

    def _non_negative(self, node) -> bool:
        """True when the layer's input is the output of an activation whose values are >= 0."""
        producer = node.input_tensors[0]._keras_history.operation
        if isinstance(producer, L.ReLU):
            return float(producer.negative_slope) == 0.0 and float(producer.threshold) >= 0.0
        if isinstance(producer, (L.InputLayer, L.Softmax)):
            return isinstance(producer, L.Softmax)
        activation = getattr(producer, "activation", None)
        name = keras.activations.serialize(activation) if activation is not None else None
        return name in _NON_NEGATIVE_ACTIVATIONS

    def _global_pool(self, layer, node, inputs) -> _Value:
        self._channels_last(layer)
        (x,) = inputs
        dims = tuple(range(2, x.rank))
        fn = torch.amax if isinstance(layer, (L.GlobalMaxPooling1D, L.GlobalMaxPooling2D)) else torch.mean
        keepdims = bool(layer.keepdims)
        out = self.graph.call_function(fn, (x.node,), {"dim": dims, "keepdim": keepdims})
        return _Value(out, x.rank if keepdims else 2)

    def _zero_padding(self, layer, node, inputs) -> _Value:
        self._channels_last(layer)
        (x,) = inputs
        if isinstance(layer, L.ZeroPadding1D):
            left, right = layer.padding
            module = nn.ZeroPad1d((int(left), int(right)))
        else:
            (top, bottom), (left, right) = layer.padding
            module = nn.ZeroPad2d((int(left), int(right), int(top), int(bottom)))
        return _Value(self._module(layer.name, module, x.node), x.rank)

    def _add(self, layer, node, inputs) -> _Value:
        out = inputs[0].node
        for value in inputs[1:]:
            out = self.graph.call_function(operator.add, (out, value.node))
        return _Value(out, inputs[0].rank)

    def _concatenate(self, layer, node, inputs) -> _Value:
        rank = inputs[0].rank
        dim = keras_axis_to_torch(layer.axis, rank)
        out = self.graph.call_function(torch.cat, ([v.node for v in inputs],), {"dim": dim})
        return _Value(out, rank)


def keras_to_torch(keras_model, *, semantics="source") -> fx.GraphModule:
    """Convert a Keras 3 functional or Sequential model to an equivalent PyTorch module.

    The result is a ``torch.fx.GraphModule`` taking and returning PyTorch's layout
    (``N, C, *spatial``) and holding one submodule per Keras layer, named after it. It is
    returned in ``eval()`` mode, as a Keras model infers unless called with ``training=True``.
    ``semantics="source"`` keeps Keras' training semantics in every BatchNormalization
    (:class:`bnkit.torch.BatchNorm2d` with ``convention="keras"``); ``"target"`` gives
    ``torch.nn.BatchNorm*d`` with the momentum translated (``1 - m``) and the same eps.
    Raises :class:`UnsupportedLayerError` naming the first layer it cannot translate exactly.
    """
    return _KerasToTorch(keras_model, semantics).build()
