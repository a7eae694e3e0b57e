"""The Keras half of :func:`bnkit.diagnose.lint.lint`: its findings on a ``keras.Model`` (the codes and what
they mean: :mod:`bnkit.diagnose.lint`)."""

from __future__ import annotations

import math

from bnkit.conventions import get_convention
from bnkit.diagnose.lint import (
    Finding,
    _batch_of_one,
    _bias_finding,
    _eps_mismatch,
    _in_unit_interval,
    _momentum_finding,
    _renorm_findings,
    _settings_findings,
)

__all__ = ["lint_keras"]


def lint_keras(model, for_inference, batch_size, input_shape) -> list[Finding]:
    from bnkit.keras import keras

    layers = list(_keras_walk(model, keras))
    bns = [(name, layer) for name, layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    findings: list[Finding] = []

    for name, layer in layers:
        producer = _keras_single_producer_of_bn(layer, keras)
        if producer is None:
            continue
        producer_name = next((n for n, lay in layers if lay is producer), producer.name)
        bias = getattr(producer, "bias", None)
        findings.append(
            _bias_finding(
                producer_name,
                type(producer).__name__,
                name,
                _describe_keras(layer),
                0 if bias is None else math.prod(bias.shape),
                "use_bias=False",
            )
        )

    if batch_size == 1 and not for_inference:  # Keras uses batch statistics only in training (fit)
        for name, bn in bns:
            if bn.trainable:
                findings.append(_batch_of_one(name, _describe_keras(bn), _keras_values_per_channel(bn), keras=True))

    for name, bn in bns:
        if not bn.trainable:
            findings.append(
                Finding(
                    "keras-frozen-inference",
                    name,
                    f"{_describe_keras(bn)} has trainable=False: gamma and beta are frozen and the layer "
                    "runs in inference mode even inside fit(), normalising with its moving statistics "
                    "and never updating them (PyTorch's requires_grad=False freezes gamma and beta only).",
                    "info",
                )
            )

    for name, bn in bns:
        if bn.momentum is None or not _in_unit_interval(bn.momentum):  # out of range: its own finding
            continue
        # bnkit.keras.BatchNormalization(convention="torch") declares PyTorch's meaning (bnkit.convert
        # keeps it): its number is not a literal copy
        convention = getattr(bn, "convention", None)
        if bn.momentum is None or (convention is not None and get_convention(convention).momentum_weighs == "new"):
            continue
        weighs_new = False
        new_weight = 1 - bn.momentum
        if new_weight >= 0.5:
            findings.append(_momentum_finding(name, _describe_keras(bn), bn.momentum, new_weight, weighs_new))

    findings += _settings_findings(
        [(name, _describe_keras(bn), bn.epsilon, bn.momentum) for name, bn in bns], keras=True
    )
    findings += _eps_mismatch([(name, bn.epsilon) for name, bn in bns])
    findings += _renorm_findings([(name, _describe_keras(bn), bn) for name, bn in bns])
    return findings


def _keras_walk(model, keras, prefix=""):
    for layer in model.layers:
        if isinstance(layer, keras.Model) and hasattr(layer, "layers"):
            yield from _keras_walk(layer, keras, f"{prefix}{layer.name}/")
        else:
            yield prefix + layer.name, layer


def _describe_keras(bn) -> str:
    return f"{type(bn).__name__}(axis={bn.axis})"


def _keras_single_producer_of_bn(layer, keras):
    """The conv/dense layer with a bias and no activation feeding BN ``layer`` alone, or None."""
    if not isinstance(layer, keras.layers.BatchNormalization) or not layer.trainable:
        return None  # a frozen Keras BN runs in inference mode: it does not cancel the bias
    for node in layer._inbound_nodes:
        parents = node.parent_nodes
        if len(parents) != 1:
            continue
        producer = parents[0].operation
        if not getattr(producer, "use_bias", False) or len(producer._outbound_nodes) != 1:
            continue
        activation = getattr(producer, "activation", None)
        if activation is not None and getattr(activation, "__name__", "") != "linear":
            continue  # BN(relu(Wx + b)) does not cancel b
        if _keras_channel_axis(producer) == _normalized_axis(layer):
            return producer
    return None


def _keras_channel_axis(layer) -> int | None:
    try:
        rank = len(layer.output.shape)
    except (AttributeError, ValueError):
        return None
    return 1 if getattr(layer, "data_format", "channels_last") == "channels_first" else rank - 1


def _normalized_axis(bn) -> int | None:
    try:
        rank = len(bn.input.shape)
    except (AttributeError, ValueError):
        return None
    axis = bn.axis[0] if isinstance(bn.axis, (list, tuple)) else bn.axis
    return axis % rank


def _keras_values_per_channel(bn) -> int | None:
    try:
        shape = bn.input.shape
    except (AttributeError, ValueError):
        return None
    axis = _normalized_axis(bn)
    spatial = [d for i, d in enumerate(shape) if i not in (0, axis)]
    if any(d is None for d in spatial):
        return None
    return math.prod(spatial)  # times batch_size, which is 1
