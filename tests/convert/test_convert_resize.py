"""Resizing both ways against the real frameworks: F.interpolate / nn.Upsample grids (modes, sizes and
factors, odd and even, up and down, antialias, align_corners) that convert exactly or are refused by name;
Keras UpSampling1D/2D, Resizing and ops.image.resize to PyTorch and back; what Keras' resize computes on
its JAX and TensorFlow backends (a subprocess each), the definition the conversion relies on.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from layer_checks import check_keras, check_torch, random_array, to_numpy
from torch import nn

from bnkit.convert import UnsupportedLayerError, keras_to_torch, torch_to_keras
from bnkit.convert.families.resize import keras_resize_call
from bnkit.keras import keras

L = keras.layers


class Interpolate(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.kwargs = kwargs

    def forward(self, x):
        return F.interpolate(x, **self.kwargs)


def _converts(module, shape) -> bool:
    """True when ``module`` converts (and then exactly, both ways); False when refused by name."""
    try:
        check_torch(module, shape)
    except UnsupportedLayerError as e:
        assert "interpolate" in str(e) or "Upsampl" in str(e), e
        assert "mode=" in e.reason or "scale_factor=" in e.reason, e.reason
        return False
    return True


_SIZES = [(5, 6), (8, 8)]
_OUTS = [(10, 12), (16, 16), (7, 9), (3, 4), (4, 4), (2, 3)]  # integer up, other up, down (x2 and other)


@pytest.mark.parametrize(
    ("mode", "extra"),
    [
        ("nearest", {}),
        ("nearest-exact", {}),
        ("bilinear", {"align_corners": False}),
        ("bilinear", {"align_corners": False, "antialias": True}),
        ("bilinear", {"align_corners": True}),
        ("bicubic", {"align_corners": False, "antialias": True}),
    ],
)
def test_torch_interpolate_size_grid(mode, extra):
    """Every size pair either converts (exact against torch, and back) or is refused naming the mode."""
    converted = []
    for (h, w), out in itertools.product(_SIZES, _OUTS):
        if _converts(Interpolate(size=out, mode=mode, **extra), (2, h, w)):
            converted.append(((h, w), out))
    if mode == "bilinear" and not extra.get("align_corners") or mode == "nearest-exact" or mode == "bicubic":
        assert len(converted) == len(_SIZES) * len(_OUTS)  # Keras' resize is this function at every size
    elif mode == "nearest":  # floor(i*in/out) is Keras' floor((i+0.5)*in/out) for integer upsampling
        assert ((5, 6), (10, 12)) in converted and ((8, 8), (16, 16)) in converted
        assert ((8, 8), (4, 4)) not in converted and ((5, 6), (7, 9)) not in converted
    else:  # align_corners=True: never Keras' half-pixel centres at these sizes
        assert converted == []


@pytest.mark.parametrize(
    ("kwargs", "converts"),
    [
        ({"scale_factor": 2, "mode": "nearest"}, True),
        ({"scale_factor": 3, "mode": "nearest"}, True),
        ({"scale_factor": (2, 3), "mode": "bilinear", "align_corners": False}, True),
        ({"scale_factor": 2, "mode": "bilinear", "align_corners": False, "antialias": True}, True),
        ({"scale_factor": 0.5, "mode": "bilinear", "align_corners": False}, True),  # 8 -> 4: 1/s == in/out
        ({"scale_factor": 1.5, "mode": "bilinear", "align_corners": False}, True),  # 8 -> 12
        ({"scale_factor": 1.7, "mode": "bilinear", "align_corners": False}, False),  # 8 -> 13: 1/1.7 != 8/13
        ({"scale_factor": 1.7, "mode": "bilinear", "align_corners": False, "recompute_scale_factor": True}, True),
        ({"scale_factor": 0.5, "mode": "nearest"}, False),  # floor(2i) vs floor(2i + 1)
        ({"scale_factor": 1.5, "mode": "nearest-exact"}, True),
        ({"scale_factor": 2, "mode": "bicubic", "align_corners": False}, False),  # A=-0.75 vs TF/JAX A=-0.5
        ({"size": (16, 16), "mode": "area"}, True),  # adaptive average pooling
        ({"size": (3, 3), "mode": "area"}, True),
    ],
)
def test_torch_interpolate_scale_factor(kwargs, converts):
    assert _converts(Interpolate(**kwargs), (3, 8, 8)) == converts


@pytest.mark.parametrize(
    ("module", "converts"),
    [
        (nn.Upsample(scale_factor=2), True),
        (nn.Upsample(scale_factor=2, mode="bilinear"), True),
        (nn.Upsample(size=(11, 5), mode="bilinear"), True),
        (nn.UpsamplingNearest2d(scale_factor=2), True),
        (nn.UpsamplingBilinear2d(scale_factor=2), False),  # align_corners=True
        (nn.Upsample(size=(8, 8), mode="bilinear", align_corners=True), True),  # the identity: same points
    ],
)
def test_torch_upsample_modules(module, converts):
    assert _converts(module, (3, 8, 8)) == converts


def test_keras_layers_chosen():
    """Integer upsampling becomes UpSampling2D, other sizes Resizing; 1-D nearest UpSampling1D."""
    model = torch_to_keras(Interpolate(scale_factor=2, mode="bilinear"), (3, 4, 4))
    assert [type(la).__name__ for la in model.layers[1:]] == ["UpSampling2D"]
    model = torch_to_keras(Interpolate(size=(5, 7), mode="bilinear"), (3, 4, 4))
    assert [type(la).__name__ for la in model.layers[1:]] == ["Resizing"]
    model = torch_to_keras(Interpolate(scale_factor=3, mode="nearest"), (3, 4))
    assert [type(la).__name__ for la in model.layers[1:]] == ["UpSampling1D"]


@pytest.mark.parametrize(
    ("kwargs", "length"),
    [
        ({"scale_factor": 2, "mode": "linear"}, 6),
        ({"size": 9, "mode": "linear"}, 6),
        ({"size": 4, "mode": "linear"}, 9),
        ({"scale_factor": 3, "mode": "nearest"}, 5),
        ({"size": 7, "mode": "nearest-exact"}, 5),
    ],
)
def test_torch_interpolate_1d(kwargs, length):
    check_torch(Interpolate(**kwargs), (3, length))


@pytest.mark.parametrize(
    ("kwargs", "shape", "reason"),
    [
        ({"size": (4, 4), "mode": "nearest"}, (3, 8, 8), "floor((i+0.5)*in/out)"),
        ({"size": (10, 10), "mode": "bilinear", "align_corners": True}, (3, 5, 5), "align_corners=True"),
        ({"size": (10, 10), "mode": "bicubic"}, (3, 5, 5), "A=-0.75"),
        ({"scale_factor": 1.7, "mode": "bilinear"}, (3, 8, 8), "1/scale_factor"),
        ({"size": (4, 4, 4), "mode": "trilinear"}, (3, 2, 2, 2), "no Keras equivalent"),
    ],
)
def test_torch_refusals_name_the_mode(kwargs, shape, reason):
    with pytest.raises(UnsupportedLayerError, match="interpolate") as info:
        torch_to_keras(Interpolate(**kwargs), shape)
    assert reason in info.value.reason


# ---- Keras -> PyTorch -----------------------------------------------------------------------


def _keras_model(layer, shape):
    inputs = keras.Input(shape)
    return keras.Model(inputs, layer(inputs))


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (lambda: L.UpSampling2D(2), (5, 6, 3)),
        (lambda: L.UpSampling2D((3, 2), interpolation="bilinear"), (5, 6, 3)),
        (lambda: L.UpSampling2D(2, interpolation="bilinear"), (4, 4, 3)),
        (lambda: L.UpSampling1D(3), (5, 3)),
        (lambda: L.Resizing(9, 7), (5, 6, 3)),
        (lambda: L.Resizing(3, 4, interpolation="nearest"), (8, 7, 3)),
        (lambda: L.Resizing(3, 2, antialias=True), (8, 7, 3)),
        (lambda: L.Resizing(16, 12, interpolation="bicubic", antialias=True), (5, 6, 3)),
        (lambda: L.Resizing(3, 4, interpolation="bicubic", antialias=True), (8, 7, 3)),
    ],
)
def test_keras_resize_layers(layer, shape):
    check_keras(_keras_model(layer(), shape), random_array((2, *shape)))


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_keras_ops_image_resize(interpolation):
    inputs = keras.Input((6, 5, 3))
    x = L.Conv2D(4, 3, padding="same")(inputs)
    y = keras.ops.image.resize(x, (9, 11), interpolation=interpolation)
    check_keras(keras.Model(inputs, y), random_array((2, 6, 5, 3)))


@pytest.mark.parametrize(
    ("layer", "reason"),
    [
        (lambda: L.UpSampling2D(2, interpolation="bicubic"), "A=-0.75"),
        (lambda: L.Resizing(9, 9, interpolation="bicubic"), "A=-0.75"),
        (lambda: L.Resizing(9, 9, interpolation="lanczos3"), "no PyTorch equivalent"),
        (lambda: L.Resizing(9, 9, crop_to_aspect_ratio=True), "crop_to_aspect_ratio=True"),
        (lambda: L.Resizing(9, 9, pad_to_aspect_ratio=True), "pad_to_aspect_ratio=True"),
    ],
)
def test_keras_refusals(layer, reason):
    with pytest.raises(UnsupportedLayerError) as info:
        keras_to_torch(_keras_model(layer(), (5, 6, 3)))
    assert reason in info.value.reason


def test_dict_outputs_both_ways():
    """A Keras model with named outputs becomes a module returning a dict, and back."""
    inputs = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, padding="same")(inputs)
    model = keras.Model(inputs, {"out": L.UpSampling2D(2, interpolation="bilinear")(x), "aux": x})
    data = random_array((2, 6, 6, 3))
    expected = {k: to_numpy(v) for k, v in model(data).items()}
    module = keras_to_torch(model)
    got = module(torch.from_numpy(np.ascontiguousarray(np.moveaxis(data, -1, 1))))
    assert set(got) == {"out", "aux"}
    for key, value in got.items():
        np.testing.assert_allclose(np.moveaxis(to_numpy(value), 1, -1), expected[key], rtol=1e-5, atol=1e-5)
    back = torch_to_keras(module, (3, 6, 6))
    for key, value in back(data).items():
        np.testing.assert_allclose(to_numpy(value), expected[key], rtol=1e-5, atol=1e-5)


# ---- what Keras computes on its other backends ------------------------------------------------

_BACKEND_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras
    rng = np.random.default_rng(0)
    results = []
    for (h, w), (oh, ow) in [((5, 6), (10, 12)), ((8, 8), (3, 5)), ((7, 7), (9, 16))]:
        x = rng.standard_normal((1, h, w, 2)).astype("float32")
        for interpolation, antialias in [("nearest", False), ("bilinear", False), ("bilinear", True),
                                         ("bicubic", True), ("bicubic", False)]:
            y = keras.layers.Resizing(oh, ow, interpolation=interpolation, antialias=antialias)(x)
            results.append([[h, w], [oh, ow], interpolation, antialias, x.tolist(),
                            np.asarray(keras.ops.convert_to_numpy(y)).tolist()])
        for interpolation in ("nearest", "bilinear"):
            y = keras.layers.UpSampling2D(2, interpolation=interpolation)(x)
            results.append([[h, w], [2 * h, 2 * w], interpolation, False, x.tolist(),
                            np.asarray(keras.ops.convert_to_numpy(y)).tolist()])
    json.dump(results, sys.stdout)
    """
)


@pytest.mark.slow
def test_keras_resize_definition_on_other_backends():
    """Keras' resize on the JAX and TensorFlow backends (one process each, run side by side) is the
    PyTorch call the conversion uses (keras_resize_call), except 'bicubic' without antialias, which
    the conversion refuses both ways."""
    runs = {}
    for backend in ("jax", "tensorflow"):
        pytest.importorskip(backend)
        env = {**os.environ, "KERAS_BACKEND": backend, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
        command = [sys.executable, "-c", _BACKEND_SCRIPT]
        runs[backend] = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for backend, run in runs.items():
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-2000:]
        for (h, w), out, interpolation, antialias, x, y in json.loads(stdout):
            x = torch.tensor(x).permute(0, 3, 1, 2)
            call = keras_resize_call(tuple(out), interpolation, antialias)
            expected = F.interpolate(x, **call).permute(0, 2, 3, 1).numpy()
            error = float(np.abs(np.asarray(y) - expected).max() / np.abs(expected).max())
            where = (backend, (h, w), out, interpolation, antialias, error)
            if interpolation == "bicubic" and not antialias:
                assert error > 1e-2, where  # Keys' A=-0.5 against PyTorch's A=-0.75: refused
            else:
                assert error < 1e-5, where
