"""Real networks for the diagnosis tests: keras.applications and torchvision classifiers with random
weights and randomised batch-norm statistics, small inputs, and their exact conversions."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bnkit.keras import keras

#: (builder name, input shape in the source framework's layout without the batch)
KERAS_APPS = {
    "ResNet50": (64, 64, 3),
    "InceptionV3": (75, 75, 3),
    "DenseNet121": (64, 64, 3),
}
TORCHVISION = {"resnet18": (3, 64, 64), "googlenet": (3, 64, 64)}


def randomize_keras_bn(model, seed: int = 1) -> None:
    """Batch-norm statistics and affine parameters as after training: not the identity."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.uniform(-0.5, 0.5, c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype("float32"))
            if layer.gamma is not None:
                layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
            if layer.beta is not None:
                layer.beta.assign(rng.uniform(-0.5, 0.5, c).astype("float32"))


def randomize_torch_bn(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5, generator=gen)
                    m.bias.uniform_(-0.5, 0.5, generator=gen)


def keras_app(name: str, seed: int = 0, **kwargs):
    """keras.applications.<name> with random weights and randomised batch norms (10 classes)."""
    keras.utils.set_random_seed(seed)
    shape = KERAS_APPS[name]
    builder = getattr(keras.applications, name)
    kwargs.setdefault("classes", 10)
    model = builder(weights=None, input_shape=shape, **kwargs)
    randomize_keras_bn(model, seed + 1)
    return model


def torchvision_net(torchvision, name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    kwargs = {"num_classes": 10}
    if name == "googlenet":
        kwargs.update(aux_logits=False, init_weights=True)
    model = getattr(torchvision.models, name)(weights=None, **kwargs)
    randomize_torch_bn(model, seed + 1)
    return model.eval()


def keras_batch(name: str, n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, *KERAS_APPS[name])).astype("float32")


def torch_batch(name: str, n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, *TORCHVISION[name])).astype("float32")
