"""The seed network of the questions that started bnkit.

Keras: ``Conv2D(32, 3x3, same, relu)`` on 64x64x1 → ``BatchNormalization(momentum=0.15)`` →
``Flatten`` → ``Dense(100, relu)`` → ``Dense(10, softmax)``. Keras' ``summary()`` reports
13,108,758 params (64 non-trainable); the same network in PyTorch reports 13,108,694, the
difference being the 2 × 32 running statistics that PyTorch keeps as buffers.
"""

from __future__ import annotations

from typing import Literal

SEED_INPUT_SHAPE = (64, 64, 1)  # Keras layout (H, W, C); PyTorch takes (1, 64, 64)
SEED_CHANNELS = 32
SEED_KERAS_MOMENTUM = 0.15


def keras_seed_model(seed: int | None = 0):
    """The seed network as a Keras 3 functional model (NHWC).

    With a ``seed``, the kernels are drawn from NumPy with Keras' default initializer (Glorot uniform;
    biases zero, batch norm as Keras creates it): the same weights on every Keras backend, so that what
    bnkit reports of the model does not depend on the backend (Keras' own random initializers, seeded,
    draw other numbers on each). ``seed=None``: Keras' own unseeded initialization.
    """
    import numpy as np

    from bnkit.keras import keras  # sets KERAS_BACKEND=torch when none was chosen

    layers = keras.layers
    inputs = keras.Input(shape=SEED_INPUT_SHAPE, name="image")
    x = layers.Conv2D(SEED_CHANNELS, (3, 3), padding="same", activation="relu", name="conv")(inputs)
    x = layers.BatchNormalization(momentum=SEED_KERAS_MOMENTUM, axis=-1, name="bn")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(100, activation="relu", name="dense")(x)
    outputs = layers.Dense(10, activation="softmax", name="head")(x)
    model = keras.Model(inputs, outputs, name="seed")
    if seed is not None:
        rng = np.random.default_rng(seed)
        for layer in model.layers:
            if isinstance(layer, layers.Conv2D | layers.Dense):
                kernel = layer.kernel
                fan_in, fan_out = int(np.prod(kernel.shape[:-1])), kernel.shape[-1]
                if isinstance(layer, layers.Conv2D):  # Keras' fans: each side times the receptive field
                    fan_out *= int(np.prod(kernel.shape[:-2]))
                limit = np.sqrt(6.0 / (fan_in + fan_out))
                kernel.assign(rng.uniform(-limit, limit, size=kernel.shape).astype("float32"))
    return model


def torch_seed_model(port: Literal["naive", "faithful"] = "naive", seed: int | None = 0):
    """The seed network as a PyTorch module (NCHW).

    ``port="naive"`` is what users write first: ``nn.BatchNorm2d(32, momentum=0.15)``, the
    Keras momentum copied literally (it means the opposite in PyTorch) and PyTorch's eps.
    ``port="faithful"`` keeps Keras' semantics with ``bnkit.torch.BatchNorm2d(convention="keras")``.
    """
    import torch
    from torch import nn

    if seed is not None:
        torch.manual_seed(seed)
    if port == "naive":
        bn = nn.BatchNorm2d(SEED_CHANNELS, momentum=SEED_KERAS_MOMENTUM)
    elif port == "faithful":
        from bnkit.torch import BatchNorm2d

        bn = BatchNorm2d(SEED_CHANNELS, momentum=SEED_KERAS_MOMENTUM, convention="keras")
    else:
        raise ValueError(f"port must be 'naive' or 'faithful', got {port!r}")
    h, w, c = SEED_INPUT_SHAPE
    return nn.Sequential(
        nn.Conv2d(c, SEED_CHANNELS, 3, padding=1),
        nn.ReLU(),
        bn,
        nn.Flatten(),
        nn.Linear(SEED_CHANNELS * h * w, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
        nn.Softmax(dim=1),
    )
