"""Keras side of :func:`bnkit.fold_bn`: clone the model, folding batch norms into kernels."""

from __future__ import annotations

import numpy as np

from bnkit.keras import keras
from bnkit.lifecycle.fold import FoldDecision
from bnkit.lifecycle.keras_layers import ChannelAffine

# keras.Model(inputs, outputs) builds one; it has no public name (and keras must come through bnkit.keras)
Functional = keras.src.models.functional.Functional
_CONV_TRANSPOSE = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)
_FOLDABLE = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D, keras.layers.Dense) + _CONV_TRANSPOSE


def _scale_shift(bn) -> tuple[np.ndarray, np.ndarray]:
    """Inference ``x * scale + shift`` of a BatchNormalization, in float64."""
    mean = np.asarray(keras.ops.convert_to_numpy(bn.moving_mean), dtype=np.float64)
    var = np.asarray(keras.ops.convert_to_numpy(bn.moving_variance), dtype=np.float64)
    scale = 1.0 / np.sqrt(var + bn.epsilon)
    if bn.gamma is not None:
        scale = scale * np.asarray(keras.ops.convert_to_numpy(bn.gamma), dtype=np.float64)
    shift = -mean * scale
    if bn.beta is not None:
        shift = shift + np.asarray(keras.ops.convert_to_numpy(bn.beta), dtype=np.float64)
    return scale, shift


def _channel_axis(layer, rank: int) -> int:
    if isinstance(layer, keras.layers.Dense):
        return rank - 1
    return rank - 1 if layer.data_format == "channels_last" else 1


def _nodes_in(model):
    """``(operation, node)`` for every call inside ``model``'s own graph."""
    keys = getattr(model, "_nodes", None)
    for op in getattr(model, "operations", []):
        for i, node in enumerate(op._inbound_nodes):
            if keys is None or f"{id(op)}_ib-{i}" in keys:
                yield op, node


def _foldable_pairs(model) -> tuple[dict[int, object], dict[int, str]]:
    """``id(batch norm) -> producer layer`` for every batch norm that can be folded, and
    ``id(batch norm) -> why not`` for the others."""
    pairs: dict[int, object] = {}
    reasons: dict[int, str] = {}
    graphs = [model] + [m for m in model._flatten_layers(include_self=False, recursive=True)
                        if isinstance(m, keras.Model)]
    # a built Sequential keeps its graph in a Functional of its own; it lists no operations
    graphs = list({id(g): g for g in (getattr(graph, "_functional", None) or graph for graph in graphs)}.values())
    # calls per layer inside this model; a loaded or rebuilt Sequential leaves its layers stale
    # inbound nodes of earlier graphs, so len(layer._inbound_nodes) overcounts
    calls: dict[int, int] = {}
    for graph in graphs:
        for op, _ in _nodes_in(graph):
            calls[id(op)] = calls.get(id(op), 0) + 1
    for graph in graphs:
        nodes = list(_nodes_in(graph))
        readers: dict[int, list[str]] = {}
        for op, node in nodes:
            for tensor in node.input_tensors:
                readers.setdefault(id(tensor), []).append(_layer(op))
        for tensor in keras.tree.flatten(getattr(graph, "outputs", None) or []):
            readers.setdefault(id(tensor), []).append("the model's output")
        for op, node in nodes:
            if not isinstance(op, keras.layers.BatchNormalization):
                continue
            if calls[id(op)] != 1:
                reasons[id(op)] = f"it is called {calls[id(op)]} times (shared): each call would need its own fold"
                continue
            if len(node.input_tensors) != 1:
                reasons[id(op)] = "it is called with more than one input"
                continue
            tensor = node.input_tensors[0]
            problem = _pair_problem(op, tensor, tensor._keras_history.operation, calls, readers)
            if problem is None:
                pairs[id(op)] = tensor._keras_history.operation
            else:
                reasons[id(op)] = problem
    return pairs, reasons


def _layer(layer) -> str:
    return f"{type(layer).__name__} {layer.name!r}"


def _pair_problem(bn, tensor, producer, calls, readers) -> str | None:
    """Why ``bn`` cannot fold into ``producer``, the layer that computes its input ``tensor``, or ``None``."""
    if isinstance(producer, keras.layers.InputLayer):
        return "its input is the model's input: no layer comes before it"
    if not isinstance(producer, _FOLDABLE):
        return f"its input is the output of {_layer(producer)}, not of a Conv/ConvTranspose/Dense"
    if calls.get(id(producer)) != 1:
        return f"{_layer(producer)} is called {calls.get(id(producer))} times (shared weights)"
    if len(readers.get(id(tensor), [])) != 1:
        others = [r for r in readers.get(id(tensor), []) if r != _layer(bn)]
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        return (
            f"the output of {_layer(producer)} is also used by {shown}, which would see the folded values "
            "(a residual or skip connection?)"
        )
    activation = producer.get_config().get("activation")
    if activation != "linear":
        return (
            f"{_layer(producer)} applies activation={activation!r} before the batch norm: folding needs its "
            "linear output (activation=None, and the activation after the batch norm)"
        )
    if len(producer.get_weights()) not in (1, 2):
        return f"{_layer(producer)} holds more than a kernel and a bias (LoRA or quantised weights)"
    rank = len(tensor.shape)
    if bn.axis % rank != _channel_axis(producer, rank):
        return (
            f"the batch norm normalises axis {bn.axis % rank}, {_layer(producer)} puts its channels on "
            f"axis {_channel_axis(producer, rank)}"
        )
    return None


def _copy_layer(layer, weights=None, **config_changes):
    config = {**layer.get_config(), **config_changes}
    new = layer.__class__.from_config(config)
    if not isinstance(layer, keras.layers.Layer):  # an operation on Keras tensors (x + y): no build, no weights
        return new
    build_config = layer.get_build_config()
    if build_config:
        new.build_from_config(build_config)
    new.set_weights(layer.get_weights() if weights is None else weights)
    return new


def fold_keras(model):
    if not isinstance(model, keras.Model):
        if isinstance(model, keras.layers.BatchNormalization):
            raise TypeError("fold_bn takes a Keras model; wrap the layer in keras.Sequential first")
        raise TypeError(f"fold_bn takes a Keras model, got layer {type(model).__name__}")
    if not model.built:
        raise ValueError(f"Keras model {model.name!r} is not built; call it on data or give it an Input first")
    if not isinstance(model, (keras.Sequential, Functional)):
        raise ValueError(
            f"fold_bn folds Keras functional and Sequential models; {model.name!r} is a subclassed "
            f"{type(model).__name__} whose call() is Python code that clone_model cannot rebuild"
        )
    pairs, reasons = _foldable_pairs(model)
    folded_producers = {id(producer): bn for bn_id, producer in pairs.items()
                        for bn in batchnorms(model) if id(bn) == bn_id}

    def clone(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            if id(layer) in pairs:
                return keras.layers.Identity(name=layer.name)
            scale, shift = _scale_shift(layer)
            affine = ChannelAffine(axis=layer.axis, name=layer.name, dtype=layer.dtype_policy)
            affine.build_from_config(layer.get_build_config())
            affine.set_weights([scale.astype(affine.scale.dtype), shift.astype(affine.shift.dtype)])
            return affine
        if id(layer) in folded_producers:
            scale, shift = _scale_shift(folded_producers[id(layer)])
            weights = layer.get_weights()
            if isinstance(layer, _CONV_TRANSPOSE):  # kernel (*size, out, in)
                kernel = weights[0].astype(np.float64) * scale[:, None]
            else:  # Conv (*size, in / groups, out), Dense (in, out): output channels last
                kernel = weights[0].astype(np.float64) * scale
            bias = weights[1].astype(np.float64) if len(weights) == 2 else np.zeros_like(scale)
            bias = bias * scale + shift
            return _copy_layer(layer, [kernel.astype(weights[0].dtype), bias.astype(weights[0].dtype)],
                               use_bias=True)
        return _copy_layer(layer)

    def call(layer, *args, **kwargs):
        if isinstance(layer, (keras.layers.Identity, ChannelAffine)):
            kwargs.pop("mask", None)  # a batch norm's call arguments that the replacements lack
            kwargs.pop("training", None)
        return layer(*args, **kwargs)

    if isinstance(model, keras.Sequential):  # layers are listed, not called, when cloning a Sequential
        folded = keras.models.clone_model(model, clone_function=clone, recursive=True)
    else:
        folded = keras.models.clone_model(model, clone_function=clone, call_function=call, recursive=True)
    decisions = []
    for bn in batchnorms(model):
        if id(bn) in pairs:
            decisions.append(FoldDecision(bn.name, type(bn).__name__, "folded", into=(pairs[id(bn)].name,)))
        else:
            reason = reasons.get(id(bn), "it is never called, so no layer before it is known")
            decisions.append(FoldDecision(bn.name, type(bn).__name__, "affine", reason=reason))
    return folded, decisions


def batchnorms(model):
    """Every Keras batch norm of ``model``, nested models included."""
    return [m for m in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(m, keras.layers.BatchNormalization)]
