"""PyTorch module → Keras 3 functional model (NHWC), by tracing with ``torch.fx``: the graph walk.

This module holds only the bookkeeping: it traces the module (keeping whole every module that
has a converter), records shapes, visits the nodes in order, looks each one's converter up in
:mod:`bnkit.convert.registry` by module class, function or method name, and gives it a
:class:`TorchToKeras` builder. The translations live in :mod:`bnkit.convert.families`.
"""

from __future__ import annotations

import copy
import functools
import inspect
import operator
import os
import re
import sys

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

import bnkit.convert.families  # noqa: F401 - registers the converters
from bnkit.convert._common import SemanticsChoice, UnsupportedLayerError, warn_at_caller
from bnkit.convert.layouts import mapped_layout
from bnkit.convert.registry import (
    Converter,
    torch_function_converter,
    torch_method_converter,
    torch_module_converter,
    torch_unsupported_reason,
)
from bnkit.convert.values import Constant, KerasValue, call_with_weights, torch_array
from bnkit.keras import keras

__all__ = ["TorchToKeras", "torch_to_keras"]

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_CONVERT_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _Tracer(fx.Tracer):
    """Keeps whole every module that has a converter (its subclasses that do not override
    ``forward`` included, e.g. bnkit.torch.BatchNorm2d), and records where each node was created."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return torch_module_converter(m) is not None or super().is_leaf_module(m, qualname)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith((_TORCH_DIR, _CONVERT_DIR)):
            frame = frame.f_back
        if frame is not None:
            node.meta["bnkit_source"] = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
        return node


_OPERATOR_SYMBOLS = {
    "add": "+", "sub": "-", "mul": "*", "truediv": "/", "floordiv": "//", "mod": "%", "pow": "**",
    "matmul": "@", "neg": "unary -", "iadd": "+=", "isub": "-=", "imul": "*=", "itruediv": "/=",
    "and_": "&", "or_": "|",
}  # fmt: skip


def describe_operation(node: fx.Node) -> str:
    """What a function, operator, method or attribute node is, as written in Python."""
    target = node.target
    if node.op == "call_method":
        return f"Tensor.{target}()"
    if node.op == "get_attr":
        return f"the attribute self.{target}"
    if target is getattr and len(node.args) > 1:
        return f"reading .{node.args[1]}"
    name = getattr(target, "__name__", str(target))
    if target is operator.getitem:
        return "indexing x[...]"
    if getattr(target, "__module__", None) in ("_operator", "operator"):
        symbol = _OPERATOR_SYMBOLS.get(name)
        return f"the {symbol} operator (operator.{name})" if symbol else f"operator.{name}"
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return f"torch.ops.{target}()"
    module = getattr(target, "__module__", None) or "torch"
    module = {"torch._C._nn": "torch.nn.functional", "torch._C._VariableFunctions": "torch"}.get(module, module)
    return f"{module}.{name}()"


class TorchToKeras:
    """Builds the Keras model; converters (``@from_torch``) receive it as ``b``.

    For converters: :meth:`input` / :meth:`value` / :meth:`operand` / :meth:`arg` read a node's
    arguments, :meth:`name` is the Keras layer name of a node, :meth:`unique_name` another one,
    :meth:`out_shape` the node's PyTorch output shape, :meth:`apply` calls a Keras layer and sets
    its weights, :meth:`to_layout` permutes a value, :attr:`semantics`, :meth:`unsupported`, and
    the graph questions :meth:`feeds_only_linear` and :meth:`non_negative`.
    """

    def __init__(self, module: nn.Module, input_shapes, semantics) -> None:
        self.semantics = SemanticsChoice(semantics)
        # the Keras model is named after the user's class (a GraphModule's copy is named GraphModule)
        self.model_name = re.sub(r"\W", "_", type(module).__name__)
        # Traced in eval() on a copy of the module that shares its parameters (the tracer reads them
        # as graph inputs and never writes them; converters copy what they read): the user's module
        # keeps its mode, and its buffers, which a forward may write in place while it is traced.
        self.module = copy.deepcopy(module, memo={id(p): p for p in _parameters(module)}).eval()
        self.layer_types = getattr(module, "_bnkit_layer_types", None) or {}  # a loaded .pt2's original classes
        if torch_module_converter(self.module) is not None:  # fx traces into the root: give it a parent
            self.module = nn.Sequential(self.module)
        self.input_shapes = input_shapes
        self.env: dict[fx.Node, object] = {}
        self.keras_names: set[str] = set()
        self.node_names: dict[fx.Node, str] = {}

    # ---- for converters ------------------------------------------------------------------
    def arg(self, node: fx.Node, index: int, key: str, default=None):
        """Argument ``index`` of the call (or keyword ``key``), as traced: fx nodes for tensors."""
        return node.args[index] if len(node.args) > index else node.kwargs.get(key, default)

    def value(self, arg, node: fx.Node) -> KerasValue:
        """The converted tensor of ``arg`` (an fx node), an argument of ``node``."""
        value = self.env.get(arg) if isinstance(arg, fx.Node) else arg
        if isinstance(value, Constant):
            raise self.unsupported(node, f"it takes the constant tensor {value.name!r} where only an input-dependent "
                                   "tensor converts")
        if not isinstance(value, KerasValue):
            raise self.unsupported(node, f"expected a tensor argument, got {value!r}")
        return value

    def operand(self, arg, node: fx.Node):
        """A tensor, constant or Python value argument of ``node``: a :class:`KerasValue`, a
        :class:`Constant` (a parameter, buffer or tensor constant), or the value itself."""
        if isinstance(arg, fx.Node):
            return self.env[arg]
        return arg

    def input(self, node: fx.Node, index: int = 0, key: str = "input") -> KerasValue:
        """The converted tensor passed as argument ``index`` (or keyword ``key``) of ``node``."""
        return self.value(self.arg(node, index, key), node)

    def name(self, node: fx.Node) -> str:
        """The Keras layer name of ``node`` (its fx name, made unique; the same on every call)."""
        if node not in self.node_names:
            self.node_names[node] = self.unique_name(node.name)
        return self.node_names[node]

    def unique_name(self, name: str) -> str:
        """A Keras layer name not used yet: ``name``, else ``name_1``, ``name_2``..."""
        candidate, i = name, 1
        while candidate in self.keras_names:
            candidate, i = f"{name}_{i}", i + 1
        self.keras_names.add(candidate)
        return candidate

    def out_shape(self, node: fx.Node) -> tuple[int, ...]:
        """The PyTorch shape of ``node``'s output, without the batch dimension."""
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise self.unsupported(node, "it does not return a single tensor")
        return tuple(meta.shape[1:])

    def apply(self, node, layer, value: KerasValue, weights=None, pending=None) -> KerasValue:
        """Call the new Keras ``layer`` on ``value``, its weights holding ``weights`` (NumPy arrays in
        ``layer.weights`` order, as ``set_weights`` takes them: PyTorch's, transposed)."""
        return KerasValue(call_with_weights(layer, value.tensor, weights), self.out_shape(node), pending)

    def to_layout(self, value: KerasValue, layout, name: str) -> KerasValue:
        """``value`` with its Keras axes in ``layout`` (a Keras ``Permute`` named after ``name``, if needed)."""
        layout = tuple(layout)
        if value.layout == layout:
            return value
        dims = tuple(value.layout.index(d) for d in layout[1:])
        tensor = keras.layers.Permute(dims, name=self.unique_name(f"{name}_permute"))(value.tensor)
        return KerasValue(tensor, value.shape, value.pending_flat, layout)

    def mapped(self, value: KerasValue, name: str) -> KerasValue:
        """``value`` in the mapped layout (channels-last of PyTorch's channels-first)."""
        return self.to_layout(value, mapped_layout(value.rank), name)

    def unsupported(self, node: fx.Node, reason: str) -> UnsupportedLayerError:
        """The error for ``node``, naming the module (path and class) the user can find in the code."""
        if node.op == "call_module":
            return UnsupportedLayerError(str(node.target), type(self.gm.get_submodule(node.target)).__name__, reason)
        stack = node.meta.get("nn_module_stack") or {}
        path, cls = next(reversed(stack.values())) if stack else ("", type(self.module))
        cls_name = getattr(cls, "__name__", str(cls))
        # a layer of a loaded .pt2 program that was not rebuilt runs as a sub-program: name its class
        cls_name = self.layer_types.get(path, cls_name) if isinstance(self.layer_types, dict) else cls_name
        return UnsupportedLayerError(
            path,
            cls_name,
            reason,
            operation=describe_operation(node),
            location=node.meta.get("bnkit_source"),
        )

    def feeds_only_linear(self, node: fx.Node) -> bool:
        """True when every user of ``node`` is a Linear, or an element-wise op that feeds only Linears."""
        if not node.users:
            return False
        for user in node.users:
            if user.op == "call_module" and isinstance(self.gm.get_submodule(user.target), nn.Linear):
                continue
            converter = self.converter(user)
            if converter is None or not converter.elementwise or not self.feeds_only_linear(user):
                return False
        return True

    def non_negative(self, arg) -> bool:
        """True when ``arg`` is the output of an op whose values are >= 0 (ReLU, sigmoid, ...)."""
        if not isinstance(arg, fx.Node):
            return False
        converter = self.converter(arg)
        return converter is not None and converter.output_non_negative(self._target(arg))

    def converter(self, node: fx.Node) -> Converter | None:
        """The registered converter of ``node``, or ``None``."""
        if node.op == "call_module":
            return torch_module_converter(self.gm.get_submodule(node.target))
        if node.op == "call_function":
            return torch_function_converter(node.target)
        if node.op == "call_method":
            return torch_method_converter(node.target)
        return None

    # ---- the walk ------------------------------------------------------------------------
    def _target(self, node: fx.Node):
        return self.gm.get_submodule(node.target) if node.op == "call_module" else node.target

    def _propagate_shapes(self) -> list[tuple[int, ...]]:
        """Record every node's shape; the shapes are PyTorch's layout, but a channels-last
        (Keras-style) shape that only fits the module that way is accepted with a warning."""
        try:
            _record_shapes(self.gm, self.input_shapes)
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
                _record_shapes(self.gm, moved)
            except Exception:
                raise failure from first_error
            warn_at_caller(
                f"input_shape {self.input_shapes} does not fit the module in PyTorch's layout (C, H, W); "
                f"read it as channels-last, i.e. {moved}"
            )
            return moved

    def build(self):
        graph = _Tracer().trace(self.module)
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
                keras_shape = shape if len(shape) <= 1 else (*shape[1:], shape[0])
                tensor = keras.Input(shape=keras_shape, name=self.unique_name(node.name))
                inputs.append(tensor)
                self.env[node] = KerasValue(tensor, shape)
            elif node.op == "output":
                result = node.args[0]
                if isinstance(result, dict):  # torchvision's segmentation models: {"out": ..., "aux": ...}
                    outputs = {str(k): self.mapped(self.value(r, node), r.name).tensor for k, r in result.items()}
                    continue
                for r in result if isinstance(result, (tuple, list)) else (result,):
                    outputs.append(self.mapped(self.value(r, node), r.name).tensor)
            else:
                self.env[node] = self._convert(node)
        self.semantics.check_all_found()
        return keras.Model(
            inputs[0] if len(inputs) == 1 else inputs,
            outputs[0] if isinstance(outputs, list) and len(outputs) == 1 else outputs,
            name=self.model_name,
        )

    def _convert(self, node: fx.Node):
        if node.op == "get_attr":
            return self._constant(node)
        converter = self.converter(node)
        if converter is not None and not (converter.permuted_input or converter.elementwise):
            for arg in node.all_input_nodes:  # this converter reads its inputs in the mapped layout
                value = self.env.get(arg)
                if isinstance(value, KerasValue) and not value.mapped:
                    self.env[arg] = self.mapped(value, arg.name)
        if converter is None:
            for arg in node.all_input_nodes:  # a parameter of a module bnkit does not know: name that module
                owner = str(arg.target).rpartition(".")[0] if arg.op == "get_attr" else ""
                if owner:
                    module = self.module.get_submodule(owner)
                    raise UnsupportedLayerError(owner, type(module).__name__, torch_unsupported_reason(module))
            if node.op == "call_module":
                raise self.unsupported(node, torch_unsupported_reason(self.gm.get_submodule(node.target)))
            kind = "function" if node.op == "call_function" else "tensor method"
            if getattr(node.target, "__module__", None) in ("_operator", "operator") or node.target is getattr:
                kind = "operation"
            raise self.unsupported(node, f"this {kind} is not supported by bnkit.convert")
        result = converter.convert(self, node, self._target(node))
        mutated = self._mutated_input(node)
        if mutated is not None:  # what follows reads the tensor as the in-place op left it
            for same in self._same_tensor(node, mutated):
                self.env[same] = result
        return result

    def _constant(self, node: fx.Node) -> Constant:
        """A parameter, buffer or tensor constant read with ``get_attr``; a consumer that takes
        no constant refuses it (naming the module whose forward reads it)."""
        owner, _, attribute = str(node.target).rpartition(".")
        module = self.gm.get_submodule(owner) if owner else self.gm
        tensor = getattr(module, attribute)
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            what = f"a {tensor.dtype} tensor" if isinstance(tensor, torch.Tensor) else "not a tensor"
            users = ", ".join(sorted({describe_operation(u) for u in node.users if u.op != "output"})) or "nothing"
            raise self.unsupported(
                node,
                f"the attribute {node.target!r} is {what}, read by {users}; only floating-point parameters "
                "and buffers convert (an integer buffer is usually an index, e.g. into a position bias table)",
            )
        trainable = isinstance(tensor, nn.Parameter) and tensor.requires_grad
        return Constant(torch_array(tensor), trainable, str(node.target))

    # ---- in-place operations ------------------------------------------------------------
    def _mutated_input(self, node: fx.Node) -> fx.Node | None:
        """The tensor an in-place call overwrites (``relu_``, ``inplace=True``, ``x.mul_()``), if any."""
        target = node.target
        if node.op == "call_module":
            in_place = getattr(self.gm.get_submodule(target), "inplace", False) is True
        elif node.op == "call_method":
            in_place = target.endswith("_") and not target.startswith("_")
        elif node.op == "call_function":
            name = getattr(target, "__name__", "")
            in_place = (name.endswith("_") and not name.startswith("_")) or _inplace_argument(node) is True
        else:
            in_place = False
        first = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
        return first if in_place and isinstance(first, fx.Node) else None

    def _same_tensor(self, node: fx.Node, mutated: fx.Node) -> set[fx.Node]:
        """The nodes that are the tensor ``node`` overwrites in place (``mutated``, and the outputs of
        other in-place ops on it), to be read as its result from now on. A view of it read
        afterwards (a chunk, a reshape) is refused: the converted graph would read it unchanged."""
        if getattr(self, "_order", None) is None:
            self._order = {n: i for i, n in enumerate(node.graph.nodes)}
        same, views, todo = {mutated}, set(), [(mutated, False)]
        while todo:
            current, is_view = todo.pop()
            linked = [(u, True) for u in current.users if _is_view(u)]
            linked += [(u, False) for u in current.users if u is not node and self._mutated_input(u) is current]
            if _is_view(current):
                linked.append((current.all_input_nodes[0], True))
            if self._mutated_input(current) is not None:
                linked.append((self._mutated_input(current), False))
            for other, through_view in linked:
                other_is_view = is_view or through_view
                if other is node or other in same or other in views:
                    continue
                (views if other_is_view else same).add(other)
                todo.append((other, other_is_view))
        for view in views:
            if any(self._order[user] > self._order[node] for user in view.users):
                raise self.unsupported(
                    node, f"it overwrites a view of {view.name!r}, which is read afterwards (write it out of place)"
                )
        return same


_VIEW_METHODS = {
    "view", "reshape", "permute", "transpose", "contiguous", "flatten", "chunk", "split", "narrow",
    "squeeze", "unsqueeze", "expand", "t", "view_as", "reshape_as", "unflatten", "swapaxes", "movedim",
}  # fmt: skip


def _is_view(node: fx.Node) -> bool:
    """Whether ``node`` may return a view of its first input (so an in-place op on it writes there)."""
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        return node.target is operator.getitem or getattr(node.target, "__name__", None) in _VIEW_METHODS
    return False


def _inplace_argument(node: fx.Node):
    """The ``inplace`` argument of a function call (keyword or positional), if it has one."""
    if "inplace" in node.kwargs:
        return node.kwargs["inplace"]
    position = _inplace_position(node.target)
    return node.args[position] if position is not None and position < len(node.args) else None


@functools.cache
def _inplace_position(fn) -> int | None:
    """Where ``fn`` takes ``inplace`` positionally (``F.relu(x, True)``), if it does."""
    try:
        parameters = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # builtins without a signature
        return None
    return parameters.index("inplace") if "inplace" in parameters else None


def _parameters(module: nn.Module) -> list[torch.Tensor]:
    return [p for _, p in module.named_parameters(remove_duplicate=False)]


class _ShapeRecorder(fx.Interpreter):
    """Records each node's output as ``node.meta["tensor_meta"]``, as ``torch.fx``'s ShapeProp does
    (a tuple of them for a tuple of tensors), without printing a traceback when a node fails."""

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        found = False

        def extract(obj):
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, extract)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


class _Recording(nn.Module):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *args):
        return _ShapeRecorder(self.gm).run(*args)


def _record_shapes(gm: fx.GraphModule, shapes) -> None:
    """Run ``gm`` on a batch of 2 of ``shapes`` and record every node's output shape, with stand-ins
    for its parameters and buffers (the module's own are never written to): on the meta device
    first (shapes only, no arithmetic), on the CPU with zeros where an operation has no meta
    implementation."""
    recording = _Recording(gm)
    tensors = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    with torch.no_grad():
        try:
            stand_ins = {f"gm.{name}": torch.empty_like(t, device="meta") for name, t in tensors}
            torch.func.functional_call(recording, stand_ins, tuple(torch.zeros(2, *s, device="meta") for s in shapes))
        except Exception:
            stand_ins = {f"gm.{name}": torch.zeros_like(t) for name, t in tensors}
            torch.func.functional_call(recording, stand_ins, tuple(torch.zeros(2, *s) for s in shapes))


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
    return TorchToKeras(module, shapes, semantics).build()
