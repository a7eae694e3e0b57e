"""One translator per Keras 3 class for :mod:`bnkit.formats.keras2_write` (what each class is in a Keras 2
config, and its weights as Keras 2 names and orders them), registered in its :data:`TRANSLATORS` (layers)
and :data:`OPERATIONS` (the Keras operations a functional model records); the rules are in its module doc.
"""

from __future__ import annotations

import math

import numpy as np

from bnkit.formats.keras2_write import (
    DTYPES,
    OPERATIONS,
    TRANSLATORS,
    Call,
    Keras2Layer,
    Ref,
    flatten,
    keras2_dtype,
    translates,
)

# ---------------------------------------------------------------------------------- layer translators


@translates(
    "Conv1D", "Conv2D", "Conv3D", "SeparableConv1D", "SeparableConv2D", "Dense", "Activation", "ReLU", "ELU",
    "Softmax", "Add", "Subtract", "Multiply", "Maximum", "Minimum", "Average", "Concatenate", "ZeroPadding2D",
    "ZeroPadding3D", "Cropping1D", "Cropping2D", "Cropping3D", "MaxPooling1D", "MaxPooling2D", "MaxPooling3D",
    "AveragePooling1D", "AveragePooling2D", "AveragePooling3D", "GlobalAveragePooling1D",
    "GlobalAveragePooling2D", "GlobalAveragePooling3D", "GlobalMaxPooling1D", "GlobalMaxPooling2D",
    "GlobalMaxPooling3D", "Dropout", "SpatialDropout2D", "SpatialDropout3D", "Flatten", "Reshape", "Permute",
    "Identity", "LayerNormalization",
)  # fmt: skip
def _same(layer: Keras2Layer) -> None:
    """Classes whose Keras 3 arguments tf-keras 2 takes as they are (measured: tf-keras 2.21's get_config)."""


@translates("InputLayer")
def _input_layer(layer: Keras2Layer) -> None:
    config = layer.config
    if config.pop("optional", False):
        raise layer.refuse("optional=True (an input that may be None), which tf-keras 2 does not have")
    config["batch_input_shape"] = config.pop("batch_shape")
    config["dtype"] = keras2_dtype(layer, config.get("dtype"))


@translates("DepthwiseConv1D", "DepthwiseConv2D")
def _depthwise(layer: Keras2Layer) -> None:
    layer.weights = [("depthwise_kernel" if n == "kernel" else n, v) for n, v in layer.weights]  # Keras 2's name


@translates("ZeroPadding1D", "SpatialDropout1D")
def _channels_last_only(layer: Keras2Layer) -> None:
    """tf-keras 2's 1-D padding and spatial dropout have no data_format: they are channels-last."""
    data_format = layer.config.pop("data_format", "channels_last")
    if data_format != "channels_last":
        raise layer.refuse(f"data_format={data_format!r}; tf-keras 2's {layer.class_name} is channels-last only")


@translates("LeakyReLU")
def _leaky_relu(layer: Keras2Layer) -> None:
    layer.config["alpha"] = layer.config.pop("negative_slope")


@translates("Rescaling")
def _rescaling(layer: Keras2Layer) -> None:
    for key in ("scale", "offset"):
        value = layer.config.get(key)
        if isinstance(value, dict) and value.get("class_name") == "__numpy__":
            layer.config[key] = value["config"]["value"]
        elif not isinstance(value, (int, float, list)):
            raise layer.refuse(f"{key}={value!r}, not a number or a list of numbers")


@translates("BatchNormalization", "bnkit>BatchNormalization")
def _batch_norm(layer: Keras2Layer) -> None:
    """Keras' batch norm (biased moving variance) -> ``fused=False``; PyTorch's (unbiased) -> ``fused=True``
    on a 4-D/5-D input, with the momentum as the weight of the old value (see the module doc)."""
    from bnkit.conventions import KERAS

    config, source = layer.config, layer.source
    convention = getattr(source, "convention", None) or KERAS
    shown = f"convention={convention.name!r}" if layer.class_name.startswith("bnkit>") else "Keras'"
    layer.shown = f"layer {layer.name!r} (BatchNormalization, {shown})"
    config.pop("convention", None)
    renorm = bool(config.pop("renorm", False))
    renorm_momentum = getattr(source, "renorm_momentum", config.get("renorm_momentum"))
    for key in ("renorm_clipping", "renorm_momentum"):
        value = config.pop(key, None)
        if renorm:  # tf-keras 2's renormalization (never fused) is Keras 3's: measured equal, one training step
            if convention.running_var_estimator == "unbiased":
                raise layer.refuse(
                    "renorm=True with the unbiased moving variance (PyTorch's): tf-keras 2's renormalization "
                    "is never fused, its moving statistics follow the biased variance"
                )
            if key == "renorm_momentum":
                value = _old_weight(layer, convention, renorm_momentum, "renorm_momentum")
            config.update(renorm=True, **{key: value})
    momentum = getattr(source, "momentum", config.get("momentum"))
    config["momentum"] = _old_weight(layer, convention, momentum, "momentum")
    synchronized = bool(config.pop("synchronized", False))
    if convention.running_var_estimator == "unbiased":
        shape = layer.input_shape()
        rank = None if shape is None else len(shape)
        axis = config.get("axis")
        axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
        if rank in (2, 3) and isinstance(axis, int) and axis % rank == rank - 1:
            # (N, C) -> (N, 1, 1, C), (N, L, C) -> (N, L, 1, C): the same values per channel, fused
            layer.as_4d = (1, 1, shape[-1]) if rank == 2 else (-1 if shape[1] is None else shape[1], 1, shape[2])
            config["axis"] = -1
        elif rank not in (4, 5) or not isinstance(axis, int) or axis % rank not in (1, rank - 1):
            where = f"a {rank}-D input, axis {axis!r}" if rank else "an input of unknown rank"
            raise layer.refuse(
                "its moving variance follows the unbiased batch variance (PyTorch's); tf-keras 2's "
                "BatchNormalization does that only fused, on 4-D or 5-D inputs with the channels last or first "
                f"(2-D and 3-D ones channels last are reshaped to 4-D), and this one has {where}: convert with "
                "semantics='target' (--semantics target) for Keras' batch norm"
            )
        if synchronized:
            raise layer.refuse(
                "synchronized=True with the unbiased moving variance (PyTorch's): tf-keras 2's synchronised "
                "batch norm is never fused, its moving variance is biased"
            )
        if keras2_dtype(layer, config.get("dtype")) not in ("float16", "bfloat16", "float32", None):
            raise layer.refuse(f"dtype {config.get('dtype')!r}: tf-keras 2's fused batch norm takes float32 or half")
        config["fused"] = True
    else:
        config["fused"] = False
        if synchronized:
            config["synchronized"] = True
    layer.class_name = "BatchNormalization"
    layer.weights = [(n, v) for n, v in layer.weights if n != "num_batches_tracked"]


@translates("bnkit>ChannelAffine")
def _channel_affine(layer: Keras2Layer) -> None:
    """bnkit's ``x·scale + shift`` per channel (what ``fold_bn`` leaves of a batch norm it cannot fold)
    on a 4-D channels-last input -> a frozen 1×1 ``DepthwiseConv2D`` with a bias: the same product
    and sum, each rounded once."""
    rank, axis = layer.input_rank(), layer.config.get("axis", -1)
    if rank != 4 or axis % 4 != 3:
        where = f"a {rank}-D input, axis {axis!r}" if rank else "an input of unknown rank"
        raise layer.refuse(
            f"bnkit's own Keras layer (a per-channel x·scale + shift), which tf-keras 2 cannot know; it is written "
            f"as a 1x1 DepthwiseConv2D on 4-D channels-last inputs, and this one has {where}"
        )
    weights = dict(layer.weights)
    scale, shift = weights["scale"], weights["shift"]
    layer.class_name = "DepthwiseConv2D"
    layer.config = {
        "name": layer.name, "trainable": False, "dtype": layer.config.get("dtype"), "kernel_size": [1, 1],
        "strides": [1, 1], "padding": "valid", "depth_multiplier": 1, "data_format": "channels_last",
        "dilation_rate": [1, 1], "activation": "linear", "use_bias": True,
    }  # fmt: skip
    layer.weights = [("depthwise_kernel", scale.reshape(1, 1, -1, 1)), ("bias", shift)]


def _old_weight(layer: Keras2Layer, convention, momentum, what: str) -> float:
    """``momentum`` as Keras 2 reads it: the weight of the old value."""
    if momentum is None:
        raise layer.refuse(f"{what}=None (PyTorch's cumulative average), which tf-keras 2 does not have")
    return float(momentum) if convention.momentum_weighs == "old" else 1.0 - float(momentum)


_BNKIT_LAYERS = {
    "bnkit>ElementwiseConstant": "x (op) a constant tensor held as a weight",
    "bnkit>Slice": "a slice of one axis",
    "bnkit>StochasticDepth": "per-sample stochastic depth",
}


def _bnkit_layer(layer: Keras2Layer) -> None:
    raise layer.refuse(
        f"bnkit's own Keras layer ({_BNKIT_LAYERS[layer.class_name]}), which tf-keras 2 cannot know; "
        "save the model as .keras instead"
    )


for _name in _BNKIT_LAYERS:
    TRANSLATORS[_name] = _bnkit_layer


# ----------------------------------------------------------------------------- operation translators


def _operands(layer: Keras2Layer) -> tuple[list[Ref], list]:
    call = layer.calls[0]
    if call.kwargs and any(v is not None for v in call.kwargs.values()):
        raise layer.refuse(f"called with keyword arguments {sorted(call.kwargs)}")
    args = flatten(call.args)
    return [a for a in args if isinstance(a, Ref)], args


def _as_layer(layer: Keras2Layer, class_name: str, inputs: list[Ref], **config) -> None:
    dtype = inputs[0].dtype if inputs[0].dtype in DTYPES else "float32"
    layer.class_name = class_name
    layer.config = {"name": layer.name, "trainable": True, "dtype": dtype, **config}
    layer.calls = [Call([inputs[0]] if len(inputs) == 1 else [inputs], {})]


def _number(layer: Keras2Layer, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise layer.refuse(f"an operand {value!r} that is not a finite number or a tensor")
    return float(value)


@translates("Add", "Subtract", "Multiply", "Maximum", "Minimum", table=OPERATIONS)
def _binary_operation(layer: Keras2Layer) -> None:
    """``a (op) b``: two tensors -> the merge layer; a tensor and a number -> ``Rescaling`` / ``ReLU``."""
    tensors, args = _operands(layer)
    operation = layer.class_name
    if len(tensors) == 2 and len(args) == 2:
        _as_layer(layer, operation, tensors)
        return
    if len(tensors) != 1 or len(args) != 2:
        raise layer.refuse(f"{operation} of {len(args)} operands, {len(tensors)} of them tensors")
    first = not isinstance(args[0], Ref)  # c (op) x
    c = _number(layer, args[0] if first else args[1])
    if operation in ("Maximum", "Minimum"):
        if operation == "Maximum" and c == 0.0:
            _as_layer(layer, "ReLU", tensors, max_value=None, negative_slope=0.0, threshold=0.0)
            return
        raise layer.refuse(f"{operation.lower()}(x, {c!r}): no tf-keras 2 layer computes it (maximum(x, 0) is a ReLU)")
    scale, offset = {
        "Add": (1.0, c),
        "Subtract": (-1.0, c) if first else (1.0, -c),
        "Multiply": (c, 0.0),
    }[operation]
    _as_layer(layer, "Rescaling", tensors, scale=scale, offset=offset)


@translates("Negative", table=OPERATIONS)
def _negative(layer: Keras2Layer) -> None:
    tensors, args = _operands(layer)
    if len(tensors) != 1 or len(args) != 1:
        raise layer.refuse("a negation of other than one tensor")
    _as_layer(layer, "Rescaling", tensors, scale=-1.0, offset=0.0)


# below this, tf-keras' Normalization divides by its epsilon (keras.json, 1e-7 by default) instead
_SMALLEST_DIVISOR = 1e-7


@translates("TrueDivide", "Divide", table=OPERATIONS)
def _divide(layer: Keras2Layer) -> None:
    """``x / c`` -> ``Normalization(mean=0, variance=c²)``: ``(x - 0) / max(sqrt(c²), eps)`` is ``x / c``
    exactly for a float32 ``c >= eps`` (the square root of a correctly rounded square is the number)."""
    tensors, args = _operands(layer)
    if len(tensors) != 1 or len(args) != 2 or not isinstance(args[0], Ref):
        raise layer.refuse("a division other than a tensor by a number (tf-keras 2 has no layer for it)")
    c = np.float32(_number(layer, args[1]))  # the number a float32 tensor is divided by
    if not c >= _SMALLEST_DIVISOR:
        raise layer.refuse(f"x / {args[1]!r}: only a division by a number >= {_SMALLEST_DIVISOR:g} is written exactly")
    _as_layer(layer, "Normalization", tensors, axis=None, invert=False, mean=0.0, variance=float(c) * float(c))
