"""A bnkit layer in the Keras convention and Keras 3's own ``BatchNormalization`` with the same settings
and the same gamma and beta, for the tests that compare the two (plain and renorm)."""

from __future__ import annotations

import keras
import torch

import bnkit.torch as bt

OURS = {2: bt.BatchNorm1d, 3: bt.BatchNorm1d, 4: bt.BatchNorm2d, 5: bt.BatchNorm3d}
# ours -> keras
AFFINE = {
    "affine": ({"affine": True}, {"center": True, "scale": True}),
    "no-affine": ({"affine": False}, {"center": False, "scale": False}),
    "no-bias": ({"affine": True, "bias": False}, {"center": False, "scale": True}),
}


def keras_pair(shape, momentum, eps, affine="affine", **options):
    """(bnkit layer, built Keras layer) for inputs of ``shape`` (N, C, ...), channels on axis 1;
    ``options`` (renorm settings) go to both."""
    ours_kwargs, keras_kwargs = AFFINE[affine]
    channels = shape[1]
    ours = OURS[len(shape)](channels, eps=eps, momentum=momentum, convention="keras", **options, **ours_kwargs)
    theirs = keras.layers.BatchNormalization(axis=1, momentum=momentum, epsilon=eps, **options, **keras_kwargs)
    theirs.build(shape)
    g = torch.Generator().manual_seed(7)
    gamma, beta = torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g)
    with torch.no_grad():
        if ours.weight is not None:
            ours.weight.copy_(gamma)
            theirs.gamma.assign(gamma.numpy())
        if ours.bias is not None:
            ours.bias.copy_(beta)
            theirs.beta.assign(beta.numpy())
    return ours, theirs
