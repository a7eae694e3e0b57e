"""The small network every crafted and mutated file starts from, in PyTorch and in Keras 3."""

from __future__ import annotations


def small():
    """A ``package.module:factory`` target (``fuzz_models:small``): conv → BN → ReLU → flatten → linear."""
    import torch
    from torch import nn

    class Small(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4 * 8 * 8, 2)

        def forward(self, x):
            return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))

    return Small().eval()


def small_keras():
    from bnkit.keras import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(2, name="fc")(x)
    return keras.Model(inputs, outputs, name="small")
