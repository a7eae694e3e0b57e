"""Keras layers that :func:`bnkit.fold_bn` puts into folded models (importing this registers them)."""

from __future__ import annotations

from bnkit.keras import keras

__all__ = ["ChannelAffine"]


@keras.saving.register_keras_serializable(package="bnkit")
class ChannelAffine(keras.layers.Layer):
    """``y = x * scale + shift`` per channel along ``axis``: an inference-mode batch norm.

    ``scale = gamma / sqrt(moving_variance + epsilon)`` and
    ``shift = beta - moving_mean * scale``; both are non-trainable weights.
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
        self.scale = self.add_weight(shape=(channels,), initializer="ones", trainable=False, name="scale")
        self.shift = self.add_weight(shape=(channels,), initializer="zeros", trainable=False, name="shift")

    def call(self, inputs):
        ops = keras.ops
        rank = len(inputs.shape)
        shape = [1] * rank
        shape[self.axis % rank] = -1
        return inputs * ops.reshape(ops.cast(self.scale, inputs.dtype), shape) + ops.reshape(
            ops.cast(self.shift, inputs.dtype), shape
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "axis": self.axis}
