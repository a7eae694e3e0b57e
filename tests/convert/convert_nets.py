"""Small networks for the conversion tests, written by hand in each framework."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnkit.keras import keras

L = keras.layers


def keras_resnet(seed: int = 0):
    """Stem + one residual block with a strided 3x3 path and a strided 1x1 shortcut."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = L.BatchNormalization(momentum=0.9, name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    y = L.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="block_conv1")(x)
    y = L.BatchNormalization(epsilon=1e-5, name="block_bn1")(y)
    y = L.Activation("relu", name="block_relu")(y)
    y = L.Conv2D(16, 3, padding="same", use_bias=False, name="block_conv2")(y)
    y = L.BatchNormalization(momentum=0.5, center=False, name="block_bn2")(y)
    shortcut = L.Conv2D(16, 1, strides=2, name="shortcut")(x)
    x = L.Add(name="add")([y, shortcut])
    x = L.ReLU(name="out_relu")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    outputs = L.Dense(5, name="head")(x)
    return keras.Model(inputs, outputs, name="resnet")


def keras_mlp(seed: int = 0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((20,), name="features")
    x = L.Dense(32, activation="gelu", name="fc1")(inputs)
    x = L.BatchNormalization(momentum=0.8, name="bn1")(x)
    x = L.Dropout(0.25, name="drop")(x)
    outputs = L.Dense(5, activation="softmax", name="fc2")(x)
    return keras.Model(inputs, outputs, name="mlp")


class TorchBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=None)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=2)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class TorchResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8, eps=1e-3, momentum=0.3)
        self.block = TorchBlock(8, 16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.pool(self.block(x))
        return self.head(torch.flatten(x, 1))


def torch_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TorchResNet()


def torch_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(20, 32),
        nn.BatchNorm1d(32, momentum=0.2),
        nn.ReLU(),
        nn.Dropout(0.25),
        nn.Linear(32, 5),
    )


def randomize_bn_state(model) -> None:
    """Non-trivial running statistics and affine parameters, so that mix-ups show."""
    gen = torch.Generator().manual_seed(1)
    if isinstance(model, nn.Module):
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                with torch.no_grad():
                    m.running_mean.uniform_(-1, 1, generator=gen)
                    m.running_var.uniform_(0.5, 2, generator=gen)
                    if m.weight is not None:
                        m.weight.uniform_(0.5, 1.5, generator=gen)
                    if m.bias is not None:
                        m.bias.uniform_(-0.5, 0.5, generator=gen)
        return
    import numpy as np

    rng = np.random.default_rng(1)
    for layer in model._flatten_layers(include_self=False, recursive=True):  # nested models' layers too
        if isinstance(layer, L.BatchNormalization):
            for w in layer.weights:
                if w.name == "moving_variance":
                    w.assign(rng.uniform(0.5, 2, w.shape).astype("float32"))
                elif w.name != "num_batches_tracked":
                    w.assign(rng.uniform(-0.5, 1.5, w.shape).astype("float32"))
