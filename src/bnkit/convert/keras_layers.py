"""Keras layers (and an activation) that :mod:`bnkit.convert` puts into converted models where Keras
has none of its own. Importing this module registers them for ``.keras`` save/load
(``package="bnkit"``); ``bnkit.io.load_model`` imports it.

* :class:`ElementwiseConstant` — ``x (op) c`` or ``c (op) x`` with a constant tensor ``c`` held as a
  weight (a PyTorch parameter or buffer used in arithmetic: a layer scale, a normalization mean).
* :class:`Slice` — ``x[..., start:stop, ...]`` on one axis (PyTorch ``chunk``, ``split``, ``narrow``).
* :class:`StochasticDepth` — drops whole samples (or the whole batch) in training, as torchvision's.
* :class:`BatchConstant` — a weight repeated for every sample (ViT's class token, ``token.expand(n, -1, -1)``).
* :func:`gelu_tanh` — GELU with the tanh approximation, as ``nn.GELU(approximate="tanh")``.
"""

from __future__ import annotations

from bnkit.keras import keras

__all__ = ["ElementwiseConstant", "Slice", "StochasticDepth", "BatchConstant", "gelu_tanh", "OPERATIONS"]

ops = keras.ops

# name -> the Keras op, applied as op(x, constant) (or op(constant, x) with constant_first)
OPERATIONS = {"add": ops.add, "subtract": ops.subtract, "multiply": ops.multiply, "divide": ops.divide}


@keras.saving.register_keras_serializable(package="bnkit")
def gelu_tanh(x):
    """``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))``: ``keras.activations.gelu(x, approximate=True)``,
    PyTorch's ``nn.GELU(approximate="tanh")``, as an activation Keras can save and load by name."""
    return keras.activations.gelu(x, approximate=True)


@keras.saving.register_keras_serializable(package="bnkit")
class ElementwiseConstant(keras.layers.Layer):
    """``x (operation) constant``, or ``constant (operation) x`` with ``constant_first=True``.

    ``operation`` is ``"add"``, ``"subtract"``, ``"multiply"`` or ``"divide"``; the constant, a
    weight named ``constant`` of shape ``constant_shape``, broadcasts against ``x`` as NumPy
    broadcasts (trailing axes aligned). It is trainable when the layer is (``trainable=False``:
    a fixed constant, e.g. a PyTorch buffer).
    """

    def __init__(self, operation: str, constant_shape=(), constant_first: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        if operation not in OPERATIONS:
            raise ValueError(f"operation must be one of {sorted(OPERATIONS)}, got {operation!r}")
        if not isinstance(constant_shape, (tuple, list)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in constant_shape
        ):
            raise ValueError(f"constant_shape must be a tuple of positive ints, got {constant_shape!r}")
        self.operation = operation
        self.constant_shape = tuple(constant_shape)
        self.constant_first = bool(constant_first)

    def build(self, input_shape) -> None:
        if len(self.constant_shape) > len(input_shape):
            raise ValueError(
                f"constant_shape {self.constant_shape} has more axes than the input shape {tuple(input_shape)}"
            )
        self.constant = self.add_weight(name="constant", shape=self.constant_shape, initializer="zeros")

    def call(self, inputs):
        constant = ops.cast(self.constant, inputs.dtype)
        op = OPERATIONS[self.operation]
        return op(constant, inputs) if self.constant_first else op(inputs, constant)

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        for i, d in enumerate(reversed(self.constant_shape)):
            if shape[-1 - i] == 1:
                shape[-1 - i] = d
        return tuple(shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            operation=self.operation, constant_shape=list(self.constant_shape), constant_first=self.constant_first
        )
        return config


@keras.saving.register_keras_serializable(package="bnkit")
class Slice(keras.layers.Layer):
    """``x[:, ..., start:stop]`` on axis ``axis`` (not the batch): one piece of a split."""

    def __init__(self, axis: int, start: int, stop: int, **kwargs) -> None:
        super().__init__(**kwargs)
        for name, value in (("axis", axis), ("start", start), ("stop", stop)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if axis == 0:
            raise ValueError("axis must not be 0, the batch axis")
        if not 0 <= start < stop:
            raise ValueError(f"need 0 <= start < stop, got start={start}, stop={stop}")
        self.axis, self.start, self.stop = axis, start, stop

    def _axis(self, rank: int) -> int:
        axis = self.axis % rank
        if axis == 0:
            raise ValueError(f"axis {self.axis} is the batch axis of a rank-{rank} input")
        return axis

    def call(self, inputs):
        axis = self._axis(len(inputs.shape))
        return inputs[(slice(None),) * axis + (slice(self.start, self.stop),)]

    def compute_output_shape(self, input_shape):
        axis = self._axis(len(input_shape))
        shape = list(input_shape)
        size = shape[axis]
        if size is not None and self.stop > size:
            raise ValueError(f"stop={self.stop} is past the size {size} of axis {self.axis}")
        shape[axis] = self.stop - self.start
        return tuple(shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(axis=self.axis, start=self.start, stop=self.stop)
        return config


@keras.saving.register_keras_serializable(package="bnkit")
class StochasticDepth(keras.layers.Layer):
    """Identity in inference; in training, each sample (``mode="row"``) or the whole batch
    (``mode="batch"``) is zeroed with probability ``rate`` and what is kept is divided by
    ``1 - rate``, as ``torchvision.ops.StochasticDepth``. The random draws are Keras' own: the
    same probabilities as PyTorch, not the same masks."""

    def __init__(self, rate: float, mode: str = "row", seed=None, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= float(rate) <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate!r}")
        if mode not in ("row", "batch"):
            raise ValueError(f"mode must be 'row' or 'batch', got {mode!r}")
        self.rate, self.mode, self.seed = float(rate), mode, seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=False):
        if not training or self.rate == 0.0:
            return inputs
        if self.rate == 1.0:
            return ops.zeros_like(inputs)
        rank = len(inputs.shape)
        noise_shape = (ops.shape(inputs)[0] if self.mode == "row" else 1,) + (1,) * (rank - 1)
        return keras.random.dropout(inputs, self.rate, noise_shape=noise_shape, seed=self.seed_generator)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(rate=self.rate, mode=self.mode, seed=self.seed)
        return config


@keras.saving.register_keras_serializable(package="bnkit")
class BatchConstant(keras.layers.Layer):
    """A weight repeated for every sample of the batch of its input: ``(N, *constant_shape)``, the
    input's values unused (it only gives the batch size). A learned token prepended to a sequence
    (ViT's class token, ``self.class_token.expand(n, -1, -1)`` in PyTorch); trainable as the layer is."""

    def __init__(self, constant_shape, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(constant_shape, (tuple, list)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in constant_shape
        ):
            raise ValueError(f"constant_shape must be a tuple of positive ints, got {constant_shape!r}")
        self.constant_shape = tuple(constant_shape)

    def build(self, input_shape) -> None:
        self.constant = self.add_weight(name="constant", shape=self.constant_shape, initializer="zeros")

    def call(self, inputs):
        constant = ops.cast(self.constant, inputs.dtype)
        return ops.broadcast_to(constant[None], (ops.shape(inputs)[0], *self.constant_shape))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.constant_shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(constant_shape=list(self.constant_shape))
        return config
