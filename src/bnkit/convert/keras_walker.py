"""Keras 3 functional/Sequential model → ``torch.fx.GraphModule`` (NCHW): the graph walk.

This module holds only the bookkeeping: it visits the Keras graph in order, looks each layer's
converter up in :mod:`bnkit.convert.registry` and gives it a :class:`KerasToTorch` builder to add
PyTorch modules and operations with. The translations live in :mod:`bnkit.convert.families`.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import torch
from torch import fx, nn

import bnkit.convert.families  # noqa: F401 - registers the converters
from bnkit.convert._common import SemanticsChoice, UnsupportedLayerError, unique_identifier
from bnkit.convert.layouts import identity, inverse, mapped_layout
from bnkit.convert.registry import from_keras, keras_converter, keras_unsupported_reason
from bnkit.convert.values import TorchValue
from bnkit.keras import keras
from bnkit.keras.data_format import is_channels_first

__all__ = ["KerasToTorch", "keras_to_torch"]


def functional(model):
    """The functional graph of a functional or Sequential model; refuses subclassed models."""
    if isinstance(model, keras.Sequential):
        graph = getattr(model, "_functional", None)
        if graph is None:
            raise ValueError(
                f"Sequential model {model.name!r} has no input shape yet: build it with an Input layer "
                "or call it once on data before converting"
            )
        return graph
    if not isinstance(model, keras.Model) or not hasattr(model, "_nodes_by_depth"):
        raise UnsupportedLayerError(
            getattr(model, "name", "?"),
            type(model).__name__,
            "only functional and Sequential Keras models can be converted (a subclassed model's call() "
            "is Python code with no graph to read)",
        )
    return model


def _nodes(model):
    for depth in sorted(model._nodes_by_depth, reverse=True):
        yield from model._nodes_by_depth[depth]


class KerasToTorch:
    """Builds the PyTorch graph; converters (``@from_keras``) receive it as ``b``.

    For converters: :meth:`add_module` (a submodule named after a layer, called on fx nodes),
    :meth:`add_tensor` (a parameter or buffer, read with ``get_attr``), :attr:`graph`
    (``b.graph.call_function(torch.cat, ...)`` for operations without a module), :meth:`to_layout`,
    :attr:`semantics`, :meth:`unsupported`, and the graph questions
    :meth:`feeds_only_dense` and :meth:`input_non_negative`.
    """

    def __init__(self, model, semantics) -> None:
        self.name = model.name
        self.model = functional(model)
        self.semantics = SemanticsChoice(semantics)
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.env: dict[int, TorchValue] = {}
        self.names: set[str] = set()
        self.consumers: dict[int, list] = {}
        self.output_ids = {id(t) for t in self.model.outputs}
        self.scope: list[str] = []  # names of the nested models being converted in line

    # ---- for converters ------------------------------------------------------------------
    def add_module(self, name: str, module: nn.Module, *args: fx.Node) -> fx.Node:
        """Add ``module`` under a unique attribute name derived from ``name`` and call it on ``args``."""
        target = self._unique(name)
        self.root.add_module(target, module)
        return self.graph.call_module(target, tuple(args))

    def add_tensor(self, name: str, array, trainable: bool = False) -> fx.Node:
        """A parameter (``trainable``) or buffer of the root module named after ``name``, read with ``get_attr``."""
        target = self._unique(name)
        tensor = torch.from_numpy(np.array(array, dtype="float32"))
        if trainable:
            self.root.register_parameter(target, nn.Parameter(tensor))
        else:
            self.root.register_buffer(target, tensor)
        return self.graph.get_attr(target)

    def to_layout(self, value: TorchValue, layout) -> TorchValue:
        """``value`` with its PyTorch dimensions arranged for ``layout`` (a ``permute``, if needed)."""
        layout = tuple(layout)
        if value.layout == layout:
            return value
        # keras == torch.permute(value.layout) == new.permute(layout): new = torch.permute(dims)
        where = inverse(layout)
        dims = tuple(value.layout[where[d]] for d in range(value.rank))
        node = self.graph.call_method("permute", (value.node, *dims))
        return TorchValue(node, value.rank, layout, value.pending_flat)

    def mapped(self, value: TorchValue) -> TorchValue:
        """``value`` in the mapped layout (PyTorch's channels-first of Keras' channels-last)."""
        return self.to_layout(value, mapped_layout(value.rank))

    def unsupported(self, layer, reason: str) -> UnsupportedLayerError:
        """The error for ``layer``, named as the user can find it (``outer/inner`` inside nested models)."""
        return UnsupportedLayerError("/".join([*self.scope, layer.name]), type(layer).__name__, reason)

    def feeds_only_dense(self, tensor) -> bool:
        """True when every path from the Keras ``tensor`` reaches a Dense through element-wise layers only."""
        if id(tensor) in self.output_ids:
            return False
        consumers = self.consumers.get(id(tensor), [])
        for node in consumers:
            layer = node.operation
            if isinstance(layer, keras.layers.Dense):
                continue
            converter = keras_converter(layer)
            if converter is None or not converter.elementwise or not self.feeds_only_dense(node.outputs[0]):
                return False
        return bool(consumers)

    def input_non_negative(self, node, index: int = 0) -> bool:
        """True when input ``index`` of the Keras ``node`` is the output of a layer whose values are >= 0."""
        producer = node.input_tensors[index]._keras_history.operation
        converter = keras_converter(producer)
        return converter is not None and converter.output_non_negative(producer)

    # ---- channels_first models -------------------------------------------------------------
    @functools.cached_property
    def channels_first(self) -> bool:
        """Whether the model is channels_first (:func:`is_channels_first`): its converted inputs and
        outputs then keep Keras' own layout, which is PyTorch's, ``(N, C, *spatial)``."""
        return is_channels_first(self.model)

    def io_layout(self, rank: int):
        """The layout of the converted model's inputs and outputs: PyTorch's (N, C, *spatial)."""
        return identity(rank) if self.channels_first else mapped_layout(rank)

    def output(self, value: TorchValue) -> TorchValue:
        return self.to_layout(value, self.io_layout(value.rank))

    def _channels_last_twin(self, layer, node, inputs):
        """A ``channels_first`` layer computes its ``channels_last`` twin on the same tensors with the
        channel axis moved last: ``f_cf(x) = moveaxis(f_cl(moveaxis(x, 1, -1)), -1, 1)``. The twin (same
        config but the format, same weights: kernels have one layout in both) is called on stand-in
        inputs of the moved shapes, and each input is relabelled as its channels-last view (the same
        PyTorch tensor: nothing moves); :func:`_channels_first_of` relabels the outputs back."""
        config = {**layer.get_config(), "data_format": "channels_last"}
        twin = type(layer).from_config(config)
        stand_ins = [keras.Input(shape=(*t.shape[2:], t.shape[1]), batch_size=t.shape[0]) for t in node.input_tensors]
        twin(stand_ins[0] if len(stand_ins) == 1 else stand_ins)
        twin.set_weights(layer.get_weights())
        twin.trainable = layer.trainable
        relabelled = [
            TorchValue(x.node, x.rank, (x.layout[0], *x.layout[2:], x.layout[1]), x.pending_flat) for x in inputs
        ]
        return twin, twin._inbound_nodes[-1], relabelled

    # ---- the walk ------------------------------------------------------------------------
    def _unique(self, name: str) -> str:
        return unique_identifier(re.sub(r"\W", "_", name), self.names)

    def build(self) -> fx.GraphModule:
        for node in _nodes(self.model):
            for t in node.input_tensors:
                self.consumers.setdefault(id(t), []).append(node)
        for tensor in self.model.inputs:
            placeholder = self.graph.placeholder(self._unique(tensor._keras_history.operation.name))
            rank = len(tensor.shape)
            self.env[id(tensor)] = TorchValue(placeholder, rank, self.io_layout(rank))
        for node in _nodes(self.model):
            if not node.is_input:
                self.convert(node)
        structure = getattr(self.model, "_outputs_struct", None)
        if isinstance(structure, dict):  # named outputs ({"out": ..., "aux": ...}) stay a dict
            self.graph.output({str(k): self.output(self.env[id(t)]).node for k, t in structure.items()})
        else:
            outputs = [self.output(self.env[id(tensor)]).node for tensor in self.model.outputs]
            self.graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
        self.semantics.check_all_found()
        gm = fx.GraphModule(self.root, self.graph, class_name=re.sub(r"\W", "_", self.name))
        # A Keras model called without training= runs in inference: so does the converted one
        # until model.train(), rather than normalising with batch statistics from the first call.
        return gm.eval()

    def convert(self, node) -> None:
        """Convert one Keras graph node (a layer call) with its registered converter."""
        layer = node.operation
        inputs = [self.env[id(t)] for t in node.input_tensors]
        converter = keras_converter(layer)
        if converter is None:
            raise self.unsupported(layer, keras_unsupported_reason(layer))
        channels_first = getattr(layer, "data_format", None) == "channels_first"
        outputs = node.outputs
        if channels_first:  # converted as its channels_last twin, the tensors' layouts relabelled
            layer, node, inputs = self._channels_last_twin(layer, node, inputs)
        if not (converter.elementwise or converter.permuted_input):  # it reads its inputs in the mapped layout
            for i, (tensor, value) in enumerate(zip(node.input_tensors, inputs, strict=True)):
                if not value.mapped:
                    inputs[i] = self.env[id(tensor)] = self.mapped(value)
        result = converter.convert(self, layer, node, inputs)
        results = result if isinstance(result, list) else [result]  # a list: one value per output (return_state)
        if channels_first:
            results = [_channels_first_of(value) for value in results]
        if len(results) != len(outputs):
            raise self.unsupported(layer, "layers with several outputs are not supported")
        for tensor, value in zip(outputs, results, strict=True):
            self.env[id(tensor)] = value


def _channels_first_of(value: TorchValue) -> TorchValue:
    """A channels_last twin's output relabelled as the channels_first layer's (channel axis 1)."""
    if value.rank <= 2:
        return value
    layout = value.layout
    return TorchValue(value.node, value.rank, (layout[0], layout[-1], *layout[1:-1]), value.pending_flat)


@from_keras(keras.Model, subclasses=True)
def nested_model_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    """A functional or Sequential model used as a layer: its layers are converted in line."""
    inner = functional(layer)
    if sum(1 for n in _nodes(b.model) if n.operation is layer) != 1:
        raise b.unsupported(layer, "a nested model called more than once (shared weights)")
    if len(inner.inputs) != len(inputs):
        raise b.unsupported(layer, "its inputs do not match its call")
    for tensor, value in zip(inner.inputs, inputs, strict=True):
        b.env[id(tensor)] = value
    for inner_node in _nodes(inner):
        for t in inner_node.input_tensors:
            b.consumers.setdefault(id(t), []).append(inner_node)
    b.scope.append(layer.name)
    for inner_node in _nodes(inner):
        if not inner_node.is_input:
            b.convert(inner_node)
    b.scope.pop()
    return b.env[id(inner.outputs[0])]


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
    return KerasToTorch(keras_model, semantics).build()
