"""Summary of a ``keras.Model``: a walk over ``model.layers``; nested models are flattened,
their layers named ``outer/inner``."""

from __future__ import annotations

import math

import numpy as np

from bnkit.summarize.rows import LayerRow, MemoryEstimate, ModelSummary, normalize_input_shape, numel

# Weights that PyTorch keeps as buffers: the running statistics of batch normalization and,
# with renorm=True, its renorm statistics (duck-typed, so that subclasses such as
# bnkit.keras.BatchNormalization count too), and the scale and shift of a folded batch norm
# (bnkit's ChannelAffine, whose PyTorch twin holds buffers).
_STATISTICS = ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")
_OTHER_BUFFERS = {"ChannelAffine": ("scale", "shift")}


def summarize_keras(model, input_shape=None) -> ModelSummary:
    from bnkit.keras import keras

    input_shapes = normalize_input_shape(input_shape)
    _ensure_built(model, input_shapes, keras)
    model_inputs = _model_input_shapes(model)
    if input_shapes is not None and model_inputs is not None:
        _check_matches(model, input_shapes, model_inputs)

    rows: list[LayerRow] = []
    activation_bytes: int | None = 0
    for prefix, depth, layer in _walk(model, keras):
        shapes, itemsize = _output_shapes(layer)
        trainable = sum(_size(v) for v in layer.trainable_weights)
        non_trainable = sum(_size(v) for v in layer.non_trainable_weights)
        buffers = sum(_size(v) for v in _buffers(layer))
        counters = sum(_size(v) for v in _counters(layer))
        rows.append(
            LayerRow(
                name=prefix + layer.name,
                type=type(layer).__name__,
                output_shapes=shapes,
                trainable_params=trainable,
                non_trainable_params=non_trainable,
                buffers=buffers,
                counters=counters,
                depth=depth,
            )
        )
        if isinstance(layer, keras.layers.InputLayer) or trainable + non_trainable - buffers - counters == 0:
            continue  # torchinfo counts the outputs of layers with parameters only
        if shapes is None or any(d is None for s in shapes for d in s[1:]) or activation_bytes is None:
            activation_bytes = None  # unknown somewhere: no estimate rather than a wrong one
        else:
            activation_bytes += sum(numel(s) * itemsize for s in shapes) * _calls(layer)

    weights = _unique(model.weights)
    total = sum(_size(v) for v in weights)
    trainable = sum(_size(v) for v in _unique(model.trainable_weights))
    statistics = _unique(v for _, _, layer in _walk(model, keras) for v in _statistics(layer))
    buffers = _unique(v for _, _, layer in _walk(model, keras) for v in _buffers(layer))
    torch_buffers = sum(_size(v) for v in buffers)
    counters = _unique(v for _, _, layer in _walk(model, keras) for v in _counters(layer))
    torch_counters = sum(_size(v) for v in counters)

    shapes_for_memory = input_shapes or (tuple(s[1:] for s in model_inputs) if model_inputs is not None else None)
    memory = None
    notes = []
    if shapes_for_memory is not None and all(d is not None for s in shapes_for_memory for d in s):
        if activation_bytes is not None:
            input_itemsize = _itemsize(getattr(model, "input_dtype", None) or "float32")
            held_apart = {id(v) for v in buffers} | {id(v) for v in counters}
            memory = MemoryEstimate(
                input=sum(math.prod(s) * input_itemsize for s in shapes_for_memory),
                activations=2 * activation_bytes,
                params=sum(_size(v) * _itemsize(v.dtype) for v in weights if id(v) not in held_apart),
                buffers=sum(_size(v) * _itemsize(v.dtype) for v in buffers),
            )
    if memory is None:
        reason = (
            "pass input_shape"
            if shapes_for_memory is None
            else "Keras records no output shapes for the layers of a subclassed model or variable-size inputs"
        )
        notes.append(f"No memory estimate: some output shapes are unknown ({reason}).")
    return ModelSummary(
        name=model.name,
        framework="keras",
        keras_backend=keras.backend.backend(),
        source=getattr(model, "_bnkit_source", None),  # "tf-keras 2": bnkit.keras.from_tf_keras
        input_shapes=None if model_inputs is None else tuple(model_inputs),
        rows=rows,
        total=total,
        trainable=trainable,
        non_trainable=total - trainable,
        torch_params=total - torch_buffers - torch_counters,
        torch_trainable=trainable,
        torch_buffers=torch_buffers,
        torch_counters=torch_counters,
        memory=memory,
        dtype=str(getattr(model, "dtype", None) or "float32"),
        notes=notes,
        torch_running_stats=sum(_size(v) for v in statistics),
        renorm_layers=sum(bool(getattr(layer, "renorm", False)) for _, _, layer in _walk(model, keras)),
    )


def _ensure_built(model, input_shapes, keras) -> None:
    if model.built:
        return
    if input_shapes is None:
        raise ValueError(
            f"the Keras model {model.name!r} is not built yet: pass input_shape "
            "(without the batch dimension, as in keras.Input(shape=...))"
        )
    if isinstance(model, keras.Sequential):
        if len(input_shapes) != 1:
            raise ValueError(f"a Sequential model takes one input, got input_shape {input_shapes!r}")
        model.build((None, *input_shapes[0]))
    else:  # a subclassed model builds on its first call
        zeros = [keras.ops.zeros((1, *s)) for s in input_shapes]
        model(zeros[0] if len(zeros) == 1 else zeros)


def _model_input_shapes(model):
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    if not inputs:
        return None
    return [tuple(None if d is None else int(d) for d in t.shape) for t in inputs]


def _check_matches(model, input_shapes, model_inputs) -> None:
    given = [(None, *s) for s in input_shapes]
    compatible = len(given) == len(model_inputs) and all(
        len(g) == len(m) and all(b is None or a == b for a, b in zip(g, m, strict=True))
        for g, m in zip(given, model_inputs, strict=True)
    )
    if not compatible:
        expected = ", ".join(str(tuple(m[1:])) for m in model_inputs)
        got = ", ".join(str(s) for s in input_shapes)
        raise ValueError(
            f"the Keras model {model.name!r} takes input of shape {expected} (without the batch "
            f"dimension), got input_shape {got}"
        )


def _walk(model, keras, prefix: str = "", depth: int = 0):
    """Every layer; a nested model is replaced by its own layers, named ``outer/inner``."""
    for layer in model.layers:
        if isinstance(layer, keras.Model) and hasattr(layer, "layers"):
            yield from _walk(layer, keras, f"{prefix}{layer.name}/", depth + 1)
        else:
            yield prefix, depth, layer


def _output_shapes(layer):
    """The layer's output shapes with the batch dimension, or ``None`` (shared or subclassed layers)."""
    try:
        output = layer.output
    except (AttributeError, ValueError, RuntimeError):
        return None, 4
    tensors = list(output.values()) if isinstance(output, dict) else output
    if not isinstance(tensors, (list, tuple)):
        tensors = [tensors]
    shapes = tuple(tuple(None if d is None else int(d) for d in t.shape) for t in tensors)
    itemsize = _itemsize(tensors[0].dtype) if tensors else 4
    return shapes, itemsize


def _statistics(layer):
    return [v for v in (getattr(layer, name, None) for name in _STATISTICS) if v is not None]


def _buffers(layer):
    """The weights PyTorch would keep as floating buffers: running statistics, folded scale/shift."""
    others = _OTHER_BUFFERS.get(type(layer).__name__, ())
    return _statistics(layer) + [v for v in (getattr(layer, name, None) for name in others) if v is not None]


def _calls(layer) -> int:
    """How many times the layer is called in the model's graph (a shared layer's outputs add up)."""
    return max(len(getattr(layer, "_inbound_nodes", ()) or ()), 1)


def _counters(layer):
    """Integer weights (a PyTorch-convention BN's num_batches_tracked): Keras counts them, PyTorch does not."""
    return [v for v in layer.non_trainable_weights if not _is_floating(v.dtype)]


def _is_floating(dtype) -> bool:
    kind = np.dtype(str(dtype).removeprefix("torch.")).kind if str(dtype) != "bfloat16" else "f"
    return kind in "fc"


def _unique(variables):
    seen, unique = set(), []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            unique.append(v)
    return unique


def _size(variable) -> int:
    return math.prod(int(d) for d in variable.shape)


def _itemsize(dtype) -> int:
    name = str(dtype).removeprefix("torch.")
    return 2 if name == "bfloat16" else np.dtype(name).itemsize  # NumPy has no bfloat16
