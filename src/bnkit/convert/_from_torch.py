"""PyTorch module → Keras 3 functional model (NHWC), by tracing with ``torch.fx``."""

from __future__ import annotations

import copy
import math
import operator
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from bnkit.conventions import KERAS, TORCH, Convention, translate_momentum
from bnkit.convert._common import (
    SemanticsChoice,
    UnsupportedLayerError,
    same_padding,
    torch_axis_to_keras,
    torch_to_keras_flat_order,
    warn_at_caller,
)
from bnkit.keras import BatchNormalization as BnkitKerasBN
from bnkit.keras import keras

L = keras.layers

# Element-wise on features: a pending Flatten order passes through them unchanged.
_PASS_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.Sigmoid,
    nn.Tanh,
    nn.GELU,
    nn.ELU,
    nn.LeakyReLU,
    nn.SiLU,
    nn.SELU,
    nn.Softplus,
    nn.Softsign,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Mish,
    nn.Hardtanh,
    nn.LogSigmoid,
    nn.CELU,
    nn.Identity,
    nn.Dropout,
)
# Traced as call_module leaves: the element-wise layers above and every layer with its own translation.
_LEAVES = (
    *_PASS_MODULES,
    nn.Conv1d,
    nn.Conv2d,
    nn.Linear,
    nn.modules.batchnorm._BatchNorm,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Flatten,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
)

_PASS_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.sigmoid,
    torch.sigmoid,
    torch.tanh,
    F.tanh,
    F.gelu,
    F.silu,
    F.dropout,
    F.elu,
    F.selu,
    F.softplus,
    F.softsign,
    F.hardsigmoid,
    F.hardswish,
    F.mish,
    F.hardtanh,
    F.logsigmoid,
    F.celu,
}
_PASS_METHODS = {"relu", "sigmoid", "tanh"}
# Outputs >= 0: zero padding cannot change a max pooling of them.
_NON_NEGATIVE_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softmax, nn.Hardsigmoid, nn.Softplus)
_NON_NEGATIVE_FUNCTIONS = {F.relu, torch.relu, F.relu6, torch.sigmoid, F.sigmoid, F.softmax, torch.softmax, F.softplus}
_MAX_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG_POOL_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
_POOL_FUNCTIONS = {
    F.max_pool1d: (nn.MaxPool1d, _MAX_POOL_ARGS),
    F.max_pool2d: (nn.MaxPool2d, _MAX_POOL_ARGS),
    F.avg_pool1d: (nn.AvgPool1d, _AVG_POOL_ARGS),
    F.avg_pool2d: (nn.AvgPool2d, (*_AVG_POOL_ARGS, "divisor_override")),
}
_PAD_FUNCTIONS = (F.pad, torch.ops.aten.pad.default, torch.ops.aten.constant_pad_nd.default)


class _Tracer(fx.Tracer):
    """Keeps every layer bnkit converts (its subclasses included, e.g. bnkit.torch.BatchNorm2d) whole."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


@dataclass
class _Value:
    tensor: object  # a Keras symbolic tensor
    shape: tuple[int, ...]  # PyTorch shape without the batch dimension
    pending_flat: tuple[int, ...] | None = None  # see bnkit.convert._from_keras._Value
    # True after a permute to channels-last: the torch tensor *is* the Keras tensor (only a
    # Flatten may follow; Keras code written by hand, or keras_to_torch output, does this)
    channels_last: bool = False

    @property
    def rank(self) -> int:
        return len(self.shape) + 1


def _t(x) -> np.ndarray:
    return x.detach().cpu().to(torch.float32).numpy()


def _keras_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape if len(shape) <= 1 else (*shape[1:], shape[0])


def _pair(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


class _TorchToKeras:
    def __init__(self, module: nn.Module, input_shapes, semantics: str) -> None:
        self.semantics = SemanticsChoice(semantics)
        self.module = copy.deepcopy(module).eval()  # tracing must not touch the running statistics
        if isinstance(self.module, _LEAVES):  # fx traces into the root: give it a parent
            self.module = nn.Sequential(self.module)
        self.input_shapes = input_shapes
        self.env: dict[fx.Node, _Value] = {}
        self.keras_names: set[str] = set()

    def _propagate_shapes(self) -> list[tuple[int, ...]]:
        """Record every node's shape; the shapes are PyTorch's layout, but a channels-last
        (Keras-style) shape that only fits the module that way is accepted with a warning."""
        try:
            with torch.no_grad():
                ShapeProp(self.gm).propagate(*(torch.zeros(2, *s) for s in self.input_shapes))
            return self.input_shapes
        except Exception as first_error:
            failure = ValueError(
                f"the module does not run on input_shape {self.input_shapes} (PyTorch's layout, no batch "
                f"dimension): {type(first_error).__name__}: {' '.join(str(first_error).split())}"
            )
            moved = [(s[-1], *s[:-1]) if len(s) >= 2 else s for s in self.input_shapes]
            if moved == self.input_shapes:
                raise failure from first_error
            try:
                with torch.no_grad():
                    ShapeProp(self.gm).propagate(*(torch.zeros(2, *s) for s in moved))
            except Exception:
                raise failure from first_error
            warn_at_caller(
                f"input_shape {self.input_shapes} does not fit the module in PyTorch's layout (C, H, W); "
                f"read it as channels-last, i.e. {moved}"
            )
            return moved

    def build(self):
        tracer = _Tracer()
        graph = tracer.trace(self.module)
        self.gm = fx.GraphModule(self.module, graph)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(self.input_shapes):
            raise ValueError(
                f"the module's forward takes {len(placeholders)} inputs, got {len(self.input_shapes)} input shapes"
            )
        self.input_shapes = self._propagate_shapes()
        inputs, outputs = [], []
        for node in graph.nodes:
            if node.op == "placeholder":
                shape = tuple(self.input_shapes[len(inputs)])
                tensor = keras.Input(shape=_keras_shape(shape), name=self._name(node.name))
                inputs.append(tensor)
                self.env[node] = _Value(tensor, shape)
            elif node.op == "output":
                result = node.args[0]
                results = result if isinstance(result, (tuple, list)) else (result,)
                for r in results:
                    value = self._value(r, node)
                    outputs.append(value.tensor)
            else:
                self.env[node] = self._convert(node)
        self.semantics.check_all_found()
        name = re.sub(r"\W", "_", type(self.module).__name__)
        return keras.Model(
            inputs[0] if len(inputs) == 1 else inputs, outputs[0] if len(outputs) == 1 else outputs, name=name
        )

    # ---- helpers ----------------------------------------------------------------------
    def _name(self, name: str) -> str:
        candidate, i = name, 1
        while candidate in self.keras_names:
            candidate, i = f"{name}_{i}", i + 1
        self.keras_names.add(candidate)
        return candidate

    def _value(self, arg, node) -> _Value:
        if not isinstance(arg, fx.Node) or not isinstance(self.env.get(arg), _Value):
            raise UnsupportedLayerError(node.name, node.op, f"expected a tensor argument, got {arg!r}")
        return self.env[arg]

    def _out_shape(self, node) -> tuple[int, ...]:
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise UnsupportedLayerError(node.name, str(node.target), "it does not return a single tensor")
        return tuple(meta.shape[1:])

    def _apply(self, node, layer, value: _Value, weights=None, pending=None) -> _Value:
        out = layer(value.tensor)
        if weights is not None:
            layer.set_weights(weights)
        return _Value(out, self._out_shape(node), pending)

    def _kind(self, node) -> tuple[str, str]:
        if node.op == "call_module":
            return str(node.target), type(self.gm.get_submodule(node.target)).__name__
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
        return node.name, f"{node.op} {target}"

    def _unsupported(self, node, reason: str) -> UnsupportedLayerError:
        name, kind = self._kind(node)
        return UnsupportedLayerError(name, kind, reason)

    # ---- dispatch ---------------------------------------------------------------------
    def _convert(self, node):
        for arg in node.all_input_nodes:
            value = self.env.get(arg)
            if isinstance(value, _Value) and value.channels_last and not self._is_flatten(node):
                raise self._unsupported(node, "only a flatten may follow a permute to channels-last")
        if node.op == "call_module":
            return self._module(node, self.gm.get_submodule(node.target))
        if node.op == "call_function":
            return self._function(node)
        if node.op == "call_method":
            return self._method(node)
        owner = str(node.target).rpartition(".")[0]
        if owner:  # a parameter read inside a module bnkit does not know: name that module
            kind = type(self.module.get_submodule(owner)).__name__
            raise UnsupportedLayerError(owner, kind, "this module type is not supported by bnkit.convert")
        raise self._unsupported(node, "module attributes used as tensors (get_attr) are not supported")

    def _module(self, node, m: nn.Module):
        x = self._value(node.args[0], node) if node.args else None
        name = self._name(node.name)
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            return self._conv(node, m, x, name)
        if isinstance(m, nn.Linear):
            return self._linear(node, m, x, name)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return self._batchnorm(node, m, x, name)
        if isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise self._unsupported(node, f"Flatten(start_dim={m.start_dim}, end_dim={m.end_dim})")
            return self._flatten(node, x, name)
        if isinstance(m, nn.Identity):
            return x
        if isinstance(m, nn.Dropout):
            return _Value(L.Dropout(m.p, name=name)(x.tensor), x.shape, x.pending_flat)
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)):
            return self._pool(node, m, x, name)
        if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)):
            if set(_pair(m.output_size, x.rank - 2)) != {1}:
                raise self._unsupported(node, f"output_size={m.output_size!r}; only 1 (global pooling) converts")
            is_max = isinstance(m, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d))
            return self._global_pool(node, x, name, is_max, keepdims=True)
        if isinstance(m, (nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d)):
            if m.value != 0:
                raise self._unsupported(node, f"padding value {m.value!r}; only zero padding converts")
            return self._zero_padding(node, x, name, tuple(m.padding))
        activation = self._activation_from_module(node, m, x.rank)
        if activation is not None:
            layer = activation(name)
            return _Value(layer(x.tensor), x.shape, x.pending_flat)
        raise self._unsupported(node, "this module type is not supported by bnkit.convert")

    def _activation_from_module(self, node, m, rank: int):
        simple = {
            nn.ReLU: "relu",
            nn.Sigmoid: "sigmoid",
            nn.Tanh: "tanh",
            nn.SiLU: "silu",
            nn.SELU: "selu",
            nn.Softsign: "softsign",
            nn.Hardsigmoid: "hard_sigmoid",
            nn.Hardswish: "hard_silu",
            nn.Mish: "mish",
            nn.LogSigmoid: "log_sigmoid",
        }
        for cls, act in simple.items():
            if type(m) is cls:
                return lambda name, act=act: L.Activation(act, name=name)
        if type(m) is nn.Softplus:
            if m.beta != 1 or m.threshold < 20:  # above 20, softplus(x) and x agree in float32
                raise self._unsupported(
                    node, f"Softplus(beta={m.beta}, threshold={m.threshold}); Keras' softplus has beta=1"
                )
            return lambda name: L.Activation("softplus", name=name)
        if type(m) is nn.Hardtanh:
            if (m.min_val, m.max_val) != (-1.0, 1.0):
                raise self._unsupported(node, f"Hardtanh({m.min_val}, {m.max_val}); Keras' hard_tanh clips to [-1, 1]")
            return lambda name: L.Activation("hard_tanh", name=name)
        if type(m) is nn.CELU:
            if m.alpha != 1.0:
                raise self._unsupported(node, f"CELU(alpha={m.alpha}); Keras' 'celu' activation has alpha=1")
            return lambda name: L.Activation("celu", name=name)
        if type(m) is nn.LogSoftmax:
            if m.dim is None:
                raise self._unsupported(node, "LogSoftmax(dim=None) has an implicit dimension; give dim")
            if torch_axis_to_keras(m.dim, rank) != rank - 1:
                raise self._unsupported(node, f"LogSoftmax(dim={m.dim}); Keras' log_softmax is over the channels")
            return lambda name: L.Activation("log_softmax", name=name)
        if type(m) is nn.ReLU6:
            return lambda name: L.ReLU(max_value=6.0, name=name)
        if type(m) is nn.GELU:
            if m.approximate != "none":
                raise self._unsupported(node, "GELU(approximate='tanh') has no serialisable Keras layer")
            return lambda name: L.Activation("gelu", name=name)
        if type(m) is nn.ELU:
            return lambda name: L.ELU(alpha=m.alpha, name=name)
        if type(m) is nn.LeakyReLU:
            return lambda name: L.LeakyReLU(negative_slope=m.negative_slope, name=name)
        if type(m) is nn.Softmax:
            if m.dim is None:
                raise self._unsupported(node, "Softmax(dim=None) has an implicit dimension; give dim")
            return lambda name: L.Softmax(axis=torch_axis_to_keras(m.dim, rank), name=name)
        return None

    def _function(self, node):
        fn, args, kwargs = node.target, node.args, node.kwargs

        def arg(i, key, default=None):
            return args[i] if len(args) > i else kwargs.get(key, default)

        name = self._name(node.name)
        if fn in (operator.add, torch.add):
            a, b = arg(0, "input"), arg(1, "other")
            if kwargs.get("alpha", 1) != 1 or not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                raise self._unsupported(node, "only the sum of two tensors converts (no scalars, no alpha)")
            va, vb = self._value(a, node), self._value(b, node)
            if va.shape != vb.shape:
                raise self._unsupported(node, f"broadcasting add of shapes {va.shape} and {vb.shape}")
            return _Value(L.Add(name=name)([va.tensor, vb.tensor]), va.shape)
        if fn is torch.cat:
            values = [self._value(t, node) for t in arg(0, "tensors")]
            dim = arg(1, "dim", 0)
            axis = torch_axis_to_keras(dim, values[0].rank)
            return _Value(L.Concatenate(axis=axis, name=name)([v.tensor for v in values]), self._out_shape(node))
        if fn is torch.flatten:
            if arg(1, "start_dim", 0) != 1 or arg(2, "end_dim", -1) != -1:
                raise self._unsupported(node, "only torch.flatten(x, 1) converts")
            return self._flatten(node, self._value(arg(0, "input"), node), name)
        if fn in (torch.permute, torch.ops.aten.permute.default):
            dims = arg(1, "dims")
            return self._permute(node, self._value(arg(0, "input"), node), tuple(dims))
        if fn in _PAD_FUNCTIONS:
            x = self._value(arg(0, "input"), node)
            mode = arg(2, "mode", "constant") if fn is not torch.ops.aten.constant_pad_nd.default else "constant"
            value = arg(3, "value", 0.0) if fn is not torch.ops.aten.constant_pad_nd.default else arg(2, "value", 0)
            if mode != "constant" or (value or 0) != 0:
                raise self._unsupported(node, f"padding mode {mode!r} with value {value!r}; only zeros convert")
            return self._zero_padding(node, x, name, tuple(arg(1, "pad")))
        if fn in (torch.mean, torch.amax, torch.ops.aten.mean.dim, torch.ops.aten.amax.default):
            x = self._value(arg(0, "input"), node)
            dims = arg(1, "dim")
            dims = tuple(sorted(d % x.rank for d in _pair(dims, 1))) if dims is not None else None
            if dims != tuple(range(2, x.rank)):
                raise self._unsupported(node, f"a reduction over dims {dims}; only the spatial dims convert")
            is_max = fn in (torch.amax, torch.ops.aten.amax.default)
            return self._global_pool(node, x, name, is_max, keepdims=bool(arg(2, "keepdim", False)))
        if fn in _POOL_FUNCTIONS:  # F.max_pool2d(x, 2) as the module it stands for
            names = _POOL_FUNCTIONS[fn][1]
            given = {key: arg(i + 1, key) for i, key in enumerate(names) if arg(i + 1, key) is not None}
            module = _POOL_FUNCTIONS[fn][0](**given)
            return self._pool(node, module, self._value(arg(0, "input"), node), name)
        if fn in (F.adaptive_avg_pool2d, F.adaptive_avg_pool1d):
            x = self._value(arg(0, "input"), node)
            if set(_pair(arg(1, "output_size"), x.rank - 2)) != {1}:
                raise self._unsupported(node, "only output_size=1 (global pooling) converts")
            return self._global_pool(node, x, name, False, keepdims=True)
        if fn in (F.dropout,):
            x = self._value(arg(0, "input"), node)
            return _Value(L.Dropout(arg(1, "p", 0.5), name=name)(x.tensor), x.shape, x.pending_flat)
        if fn in (F.softmax, torch.softmax):
            x = self._value(arg(0, "input"), node)
            return _Value(L.Softmax(axis=torch_axis_to_keras(arg(1, "dim"), x.rank), name=name)(x.tensor), x.shape)
        layer = self._activation_function(node, fn, arg, name)
        if layer is not None:
            x = self._value(arg(0, "input"), node)
            return _Value(layer(x.tensor), x.shape, x.pending_flat)
        raise self._unsupported(node, "this function is not supported by bnkit.convert")

    def _activation_function(self, node, fn, arg, name):
        if fn in (F.relu, torch.relu):
            return L.Activation("relu", name=name)
        if fn in (F.sigmoid, torch.sigmoid):
            return L.Activation("sigmoid", name=name)
        if fn in (F.tanh, torch.tanh):
            return L.Activation("tanh", name=name)
        if fn is F.silu:
            return L.Activation("silu", name=name)
        plain = {
            F.selu: "selu",
            F.softsign: "softsign",
            F.hardsigmoid: "hard_sigmoid",
            F.hardswish: "hard_silu",
            F.mish: "mish",
            F.logsigmoid: "log_sigmoid",
        }
        if fn in plain:
            return L.Activation(plain[fn], name=name)
        if fn is F.softplus and arg(1, "beta", 1) == 1:
            return L.Activation("softplus", name=name)
        if fn is F.hardtanh and (arg(1, "min_val", -1.0), arg(2, "max_val", 1.0)) == (-1.0, 1.0):
            return L.Activation("hard_tanh", name=name)
        if fn is F.celu and arg(1, "alpha", 1.0) == 1.0:
            return L.Activation("celu", name=name)
        if fn is F.gelu:
            if arg(1, "approximate", "none") != "none":
                raise self._unsupported(node, "only exact gelu (approximate='none') converts as a function")
            return L.Activation("gelu", name=name)
        if fn is F.elu:
            return L.ELU(alpha=arg(1, "alpha", 1.0), name=name)
        if fn is F.leaky_relu:
            return L.LeakyReLU(negative_slope=arg(1, "negative_slope", 0.01), name=name)
        return None

    def _method(self, node):
        method, args = node.target, node.args
        if method == "size":
            return "size"  # only feeds view/reshape, whose output shape is checked
        x = self._value(args[0], node)
        name = self._name(node.name)
        if method in _PASS_METHODS:
            return _Value(L.Activation(method, name=name)(x.tensor), x.shape, x.pending_flat)
        if method == "flatten":
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            if start != 1 or (len(args) > 2 and args[2] != -1):
                raise self._unsupported(node, "only x.flatten(1) converts")
            return self._flatten(node, x, name)
        if method in ("view", "reshape"):
            out = self._out_shape(node)
            if out != (math.prod(x.shape),):
                raise self._unsupported(node, f"a {method} to {out}; only flattening to (N, features) converts")
            return self._flatten(node, x, name)
        if method == "permute":
            dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
            return self._permute(node, x, tuple(dims))
        if method == "mean":
            dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
            dims = tuple(sorted(d % x.rank for d in _pair(dims, 1)))
            if dims != tuple(range(2, x.rank)):
                raise self._unsupported(node, f"a mean over dims {dims}; only the spatial dims convert")
            keepdim = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
            return self._global_pool(node, x, name, False, keepdims=bool(keepdim))
        raise self._unsupported(node, "this tensor method is not supported by bnkit.convert")

    # ---- layers -----------------------------------------------------------------------
    def _conv(self, node, m, x: _Value, name: str) -> _Value:
        n = x.rank - 2
        if m.padding_mode != "zeros":
            raise self._unsupported(node, f"padding_mode={m.padding_mode!r}; only 'zeros' converts")
        strides, dilations, ks = _pair(m.stride, n), _pair(m.dilation, n), _pair(m.kernel_size, n)
        if max(strides) > 1 and max(dilations) > 1:
            raise self._unsupported(node, f"stride={strides} with dilation={dilations}: Keras refuses the pair")
        if m.padding == "same":
            padding, explicit = "same", None
        elif m.padding == "valid" or set(_pair(m.padding, n)) == {0}:
            padding, explicit = "valid", None
        else:
            pads = _pair(m.padding, n)
            keras_same = [same_padding(x.shape[1 + i], ks[i], strides[i], dilations[i]) for i in range(n)]
            if all(s == 1 for s in strides) and all(p == (q, q) for p, q in zip(keras_same, pads, strict=True)):
                padding, explicit = "same", None
            else:
                padding, explicit = "valid", pads
        source = x
        if explicit is not None:
            flat = tuple(p for q in reversed(explicit) for p in (q, q))
            source = self._zero_padding(None, x, self._name(f"{name}_pad"), flat)
        cls = L.Conv1D if n == 1 else L.Conv2D
        layer = cls(
            m.out_channels,
            ks,
            strides=strides,
            padding=padding,
            dilation_rate=dilations,
            groups=m.groups,
            use_bias=m.bias is not None,
            name=name,
        )
        weights = [np.transpose(_t(m.weight), (*range(2, n + 2), 1, 0))]
        if m.bias is not None:
            weights.append(_t(m.bias))
        return self._apply(node, layer, source, weights)

    def _linear(self, node, m, x: _Value, name: str) -> _Value:
        if x.rank != 2:
            raise self._unsupported(node, f"Linear on a rank-{x.rank} input (only (batch, features) converts)")
        kernel = _t(m.weight).T
        if x.pending_flat is not None:
            kernel = torch_to_keras_flat_order(kernel, x.pending_flat)
        layer = L.Dense(m.out_features, use_bias=m.bias is not None, name=name)
        weights = [kernel] + ([_t(m.bias)] if m.bias is not None else [])
        return self._apply(node, layer, x, weights)

    def _batchnorm(self, node, m, x: _Value, name: str) -> _Value:
        if not m.track_running_stats or m.running_mean is None:
            raise self._unsupported(
                node,
                "track_running_stats=False (batch statistics also in eval()) has no Keras equivalent",
            )
        conv = getattr(m, "convention", TORCH)
        conv = conv if isinstance(conv, Convention) else TORCH
        scale = m.weight is not None and not (
            not m.weight.requires_grad and bool(torch.all(m.weight == 1)) and m.bias is not None
        )
        center = m.bias is not None
        kwargs = dict(axis=-1, epsilon=m.eps, center=center, scale=scale, name=name)
        if self.semantics.for_layer(str(node.target)) == "target" or conv == KERAS:
            try:
                momentum = translate_momentum(m.momentum, conv, KERAS)
            except ValueError as e:
                raise self._unsupported(node, f"{e}; use semantics='source'") from None
            layer = L.BatchNormalization(momentum=momentum, **kwargs)
        else:
            layer = BnkitKerasBN(momentum=m.momentum, convention=conv, **kwargs)
        weights = []
        if scale:
            weights.append(_t(m.weight))
        if center:
            weights.append(_t(m.bias))
        weights += [_t(m.running_mean), _t(m.running_var)]
        out = layer(x.tensor)
        if getattr(layer, "num_batches_tracked", None) is not None:
            weights.append(np.array(int(m.num_batches_tracked), dtype="int64"))
        layer.set_weights(weights)
        return _Value(out, self._out_shape(node))

    def _feeds_only_linear(self, node) -> bool:
        if not node.users:
            return False
        for user in node.users:
            if user.op == "call_module":
                m = self.gm.get_submodule(user.target)
                if isinstance(m, nn.Linear):
                    continue
                if isinstance(m, _PASS_MODULES) and self._feeds_only_linear(user):
                    continue
            elif user.op == "call_function" and user.target in _PASS_FUNCTIONS and self._feeds_only_linear(user):
                continue
            elif user.op == "call_method" and user.target in _PASS_METHODS and self._feeds_only_linear(user):
                continue
            return False
        return True

    def _is_flatten(self, node) -> bool:
        if node.op == "call_module":
            return isinstance(self.gm.get_submodule(node.target), nn.Flatten)
        if node.op == "call_function":
            return node.target is torch.flatten
        return node.op == "call_method" and node.target in ("flatten", "view", "reshape")

    def _permute(self, node, x: _Value, dims: tuple[int, ...]) -> _Value:
        to_channels_last = (0, *range(2, x.rank), 1)
        if x.channels_last or tuple(d % x.rank for d in dims) != to_channels_last:
            raise self._unsupported(node, f"permute{dims}; only a permute to channels-last before a flatten converts")
        shape = (*x.shape[1:], x.shape[0])
        return _Value(x.tensor, shape, channels_last=True)

    def _flatten(self, node, x: _Value, name: str) -> _Value:
        if x.rank <= 2:
            return x
        features = (math.prod(x.shape),)
        if x.channels_last:  # already in Keras' order
            return _Value(L.Flatten(name=name)(x.tensor), features)
        if self._feeds_only_linear(node):
            out = L.Flatten(name=name)(x.tensor)
            return _Value(out, features, pending_flat=x.shape)
        # PyTorch flattens channels-first: permute the Keras data to (C, *spatial) first.
        permuted = L.Permute((x.rank - 1, *range(1, x.rank - 1)), name=self._name(f"{name}_to_channels_first"))
        return _Value(L.Flatten(name=name)(permuted(x.tensor)), features)

    def _pool(self, node, m, x: _Value, name: str) -> _Value:
        n = x.rank - 2
        ks = _pair(m.kernel_size, n)
        strides = _pair(m.stride if m.stride is not None else m.kernel_size, n)
        pads = _pair(m.padding, n)
        is_max = isinstance(m, (nn.MaxPool1d, nn.MaxPool2d))
        if is_max and (set(_pair(m.dilation, n)) != {1} or m.return_indices):
            raise self._unsupported(node, "dilation and return_indices have no Keras equivalent")
        if not is_max and getattr(m, "divisor_override", None) is not None:
            raise self._unsupported(node, "divisor_override has no Keras equivalent")
        cls = {(True, 1): L.MaxPooling1D, (True, 2): L.MaxPooling2D, (False, 1): L.AveragePooling1D}.get(
            (is_max, n), L.AveragePooling2D
        )
        if m.ceil_mode:
            return self._apply(node, cls(ks, strides=strides, padding=self._ceil_mode_same(node, m, x), name=name), x)
        padding = "valid"
        source = x
        if any(pads):
            keras_same = [same_padding(x.shape[1 + i], ks[i], strides[i], 1) for i in range(n)]
            counts_zeros = not is_max and m.count_include_pad  # Keras' 'same' averages real values only
            if not counts_zeros and all(p == (q, q) for p, q in zip(keras_same, pads, strict=True)):
                padding = "same"
            elif counts_zeros or (is_max and self._non_negative(node.args[0])):
                # counted zeros (average), or zeros that never win a max over values >= 0 (after a ReLU)
                flat = tuple(p for q in reversed(pads) for p in (q, q))
                source = self._zero_padding(None, x, self._name(f"{name}_pad"), flat)
            else:
                raise self._unsupported(node, f"padding={pads} is not what Keras 'same' pads here ({keras_same})")
        return self._apply(node, cls(ks, strides=strides, padding=padding, name=name), source)

    def _ceil_mode_same(self, node, m, x: _Value) -> str:
        """``"same"`` when a ``ceil_mode=True`` pooling pools Keras' 'same' windows: on every axis
        the padding is Keras' (symmetric), or (max pooling) none where Keras pads one element
        after (the last window overhangs), and the output has Keras' size ``ceil(n / stride)``."""
        n = x.rank - 2
        ks, pads = _pair(m.kernel_size, n), _pair(m.padding, n)
        strides = _pair(m.stride if m.stride is not None else m.kernel_size, n)
        out = self._out_shape(node)[1:]
        for i in range(n):
            size = x.shape[1 + i]
            before, after = same_padding(size, ks[i], strides[i], 1)
            is_max = isinstance(m, (nn.MaxPool1d, nn.MaxPool2d))  # see _from_keras._pool: averages differ
            overhang = (is_max or ks[i] == 2) and pads[i] == 0 and (before, after) == (0, 1)
            fits = (before, after) == (pads[i], pads[i]) or overhang
            counts_zeros = pads[i] and not is_max and m.count_include_pad
            if not fits or counts_zeros or out[i] != math.ceil(size / strides[i]):
                raise self._unsupported(node, "ceil_mode=True pools windows that Keras' 'same' padding does not")
        return "same"

    def _non_negative(self, arg) -> bool:
        """True when ``arg`` is the output of an activation whose values are >= 0 (ReLU, sigmoid, ...)."""
        if not isinstance(arg, fx.Node):
            return False
        if arg.op == "call_module":
            return isinstance(self.gm.get_submodule(arg.target), _NON_NEGATIVE_MODULES)
        if arg.op == "call_function":
            return arg.target in _NON_NEGATIVE_FUNCTIONS
        return arg.op == "call_method" and arg.target in ("relu", "relu_", "sigmoid", "sigmoid_", "softmax")

    def _global_pool(self, node, x: _Value, name: str, is_max: bool, keepdims: bool) -> _Value:
        n = x.rank - 2
        if n not in (1, 2):
            raise self._unsupported(node, f"global pooling of a rank-{x.rank} input")
        cls = {
            (False, 1): L.GlobalAveragePooling1D,
            (False, 2): L.GlobalAveragePooling2D,
            (True, 1): L.GlobalMaxPooling1D,
            (True, 2): L.GlobalMaxPooling2D,
        }[(is_max, n)]
        out = cls(keepdims=keepdims, name=name)(x.tensor)
        shape = (x.shape[0], *([1] * n)) if keepdims else (x.shape[0],)
        return _Value(out, shape)

    def _zero_padding(self, node, x: _Value, name: str, flat: tuple[int, ...]) -> _Value:
        n = x.rank - 2
        if n == 1:
            layer = L.ZeroPadding1D((flat[0], flat[1]), name=name)
            shape = (x.shape[0], x.shape[1] + flat[0] + flat[1])
        elif n == 2 and len(flat) == 4:
            left, right, top, bottom = flat
            layer = L.ZeroPadding2D(((top, bottom), (left, right)), name=name)
            shape = (x.shape[0], x.shape[1] + top + bottom, x.shape[2] + left + right)
        else:
            raise self._unsupported(node, f"zero padding {flat} of a rank-{x.rank} input")
        return _Value(layer(x.tensor), shape)


def torch_to_keras(module: nn.Module, input_shape, *, semantics="source"):
    """Convert a PyTorch module to an equivalent Keras 3 functional model.

    ``input_shape`` is the input's shape **in PyTorch's layout without the batch dimension**
    (``(C, H, W)`` for images, ``(C, L)`` for sequences, ``(F,)`` for features), or a list of them
    for a module with several inputs. The Keras model takes and returns Keras' channels-last
    layout (``(N, H, W, C)``). ``semantics="source"`` keeps PyTorch's training semantics in every
    batch norm (:class:`bnkit.keras.BatchNormalization` with ``convention="torch"``); ``"target"``
    gives ``keras.layers.BatchNormalization`` with the momentum translated (``1 - m``).
    The module is traced with ``torch.fx`` on a copy in ``eval()`` mode: the original is untouched.
    Raises :class:`UnsupportedLayerError` naming the first layer it cannot translate exactly.
    """
    if isinstance(input_shape, (tuple, list)) and input_shape and all(isinstance(d, int) for d in input_shape):
        shapes = [tuple(input_shape)]
    elif isinstance(input_shape, (tuple, list)) and input_shape:
        shapes = [tuple(s) for s in input_shape]
    else:
        raise ValueError(f"input_shape must be a shape such as (3, 32, 32) or a list of them, got {input_shape!r}")
    for s in shapes:
        if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in s):
            raise ValueError(f"input_shape entries must be positive ints (no batch dimension), got {s!r}")
    return _TorchToKeras(module, shapes, semantics).build()
