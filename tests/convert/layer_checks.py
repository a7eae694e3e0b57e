"""Checks shared by the per-family conversion tests: convert one way, compare with the source, convert
back and compare again. Tolerance 1e-5 (float32, different summation orders); weights move exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from bnkit.convert import keras_to_torch, torch_to_keras
from bnkit.keras import keras

TOL = 1e-5


def to_numpy(x):
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(keras.ops.convert_to_numpy(x))


def check_keras(model, x_nhwc, semantics="source"):
    """keras -> torch agrees with Keras; torch -> keras again agrees too."""
    torch_model = keras_to_torch(model, semantics=semantics).eval()
    x_t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_nhwc, -1, 1)))
    expected = to_numpy(model(x_nhwc))
    got = to_numpy(torch_model(x_t))
    if expected.ndim > 2:
        got = np.moveaxis(got, 1, -1)
    np.testing.assert_allclose(got, expected, rtol=TOL, atol=TOL)
    back = torch_to_keras(torch_model, tuple(x_t.shape[1:]), semantics=semantics)
    np.testing.assert_allclose(to_numpy(back(x_nhwc)), expected, rtol=TOL, atol=TOL)
    return torch_model


def check_torch(module, shape, semantics="source"):
    module.eval()
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module(x).numpy()
    model = torch_to_keras(module, shape, semantics=semantics)
    got = to_numpy(model(np.moveaxis(x.numpy(), 1, -1) if x.dim() > 2 else x.numpy()))
    if expected.ndim > 2:
        got = np.moveaxis(got, -1, 1)
    np.testing.assert_allclose(got, expected, rtol=TOL, atol=TOL)
    with torch.no_grad():
        np.testing.assert_allclose(keras_to_torch(model).eval()(x).numpy(), expected, rtol=TOL, atol=TOL)
    return model


def random_array(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def saved_and_loaded(model, directory):
    """``model`` saved as .keras and loaded back as bnkit loads files (``safe_mode=True``)."""
    from bnkit.io import load_model

    path = directory / f"{model.name}.keras"
    model.save(path)
    return load_model(path)


def check_saves(model, x_nhwc, directory):
    """The .keras file of ``model`` loads (bnkit's layers registered) and computes the same."""
    loaded = saved_and_loaded(model, directory)
    np.testing.assert_array_equal(to_numpy(loaded(x_nhwc)), to_numpy(model(x_nhwc)))
    return loaded
