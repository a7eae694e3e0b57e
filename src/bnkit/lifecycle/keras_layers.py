"""Keras layers that :func:`bnkit.fold_bn` puts into folded models (importing this registers them)."""

from __future__ import annotations

from bnkit.keras import keras

__all__ = ["ChannelAffine"]


@keras.saving.register_keras_serializable(package="bnkit")
class ChannelAffine(keras.layers.Layer):
    """``y = x * scale + shift`` per channel along ``axis``: an inference-mode batch norm.

    ``scale = gamma / sqrt(moving_variance + epsilon)`` and
    ``shift = beta - moving_mean * scale``; both are non-trainable weights, in float32 at least.
    Half-precision inputs are computed in float32 and rounded once, as BatchNormalization does.
    """

    def __init__(self, axis: int = -1, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"axis must be an int, got {axis!r}")
        self.axis = axis

    def build(self, input_shape) -> None:
        rank = len(input_shape)
        if not -rank <= self.axis < rank:
            raise ValueError(f"axis {self.axis} is out of range for an input of rank {rank}")
        channels = input_shape[self.axis]
        if channels is None:
            raise ValueError(f"the channel axis {self.axis} of input shape {input_shape} must be known")
        # float32 at least and never autocast to a half compute dtype (BatchNormalization's own
        # weights are not either): scale and shift keep the precision the statistics had
        dtype = self.variable_dtype if self.variable_dtype not in ("float16", "bfloat16") else "float32"
        weight = dict(shape=(channels,), trainable=False, dtype=dtype, autocast=False)
        self.scale = self.add_weight(initializer="ones", name="scale", **weight)
        self.shift = self.add_weight(initializer="zeros", name="shift", **weight)

    def call(self, inputs):
        ops = keras.ops
        rank = len(inputs.shape)
        shape = [1] * rank
        shape[self.axis % rank] = -1
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        # half inputs in float32, rounded once, as BatchNormalization computes them
        compute = "float32" if dtype in ("float16", "bfloat16") else dtype
        outputs = ops.cast(inputs, compute) * ops.reshape(ops.cast(self.scale, compute), shape) + ops.reshape(
            ops.cast(self.shift, compute), shape
        )
        return ops.cast(outputs, dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "axis": self.axis}
