"""Real 3-D networks, converted and converted back: torchvision's video classifiers (random weights,
randomised batch-norm statistics) torch -> Keras -> torch, and a small Keras 3-D U-Net Keras -> torch ->
Keras, each checked by ``check_network`` (inference 1e-5, a training forward and the updated running
statistics 1e-4, the round trip); ``bnkit.compare`` agrees with the source on each, in inference and
training, and ``bnkit.lint`` finds nothing wrong in the sources.

Clips are the smallest the video models take comfortably: (3, 4, 32, 32) leaves layer4 of the ResNets
1x1x1 per sample (a training batch norm there normalises 2 values, as a 2-clip batch does). torchvision's
``s3d`` needs (3, 13, 209, 209) (its AvgPool3d((2, 7, 7)) runs on features 32x smaller): ~40 s on two
cores, so it is measured in the benchmark only (see ``VIDEO_NETWORKS``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from real_networks import (
    INFERENCE_TOL,
    TRAINING_TOL,
    Network,
    check_network,
    format_error,
    randomize_normalization,
)

import bnkit
from bnkit.convert import keras_to_torch, torch_to_keras
from bnkit.keras import keras
from conftest import import_torchvision

L = keras.layers


def torchvision_video_model(name: str, shape: tuple[int, int, int, int] = (3, 4, 32, 32), **kwargs) -> Network:
    """``torchvision.models.video.<name>`` with random weights, 10 classes and a ``(C, T, H, W)`` clip."""

    def build():
        torchvision = import_torchvision()
        torch.manual_seed(0)
        module = getattr(torchvision.models.video, name)(weights=None, num_classes=10, **kwargs)
        randomize_normalization(module)
        return module.eval()

    return Network(name, "torch", build, shape)


def keras_unet3d(shape: tuple[int, int, int, int] = (8, 16, 16, 2)) -> Network:
    """A small Keras 3-D U-Net-style classifier: Conv3D + BN + ReLU blocks, MaxPooling3D, a
    Conv3DTranspose upsampling concatenated with the skip, GlobalAveragePooling3D and Dense."""

    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input(shape)

        def block(x, filters, name):
            x = L.Conv3D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
            x = L.BatchNormalization(name=f"{name}_bn")(x)
            return L.ReLU(name=f"{name}_relu")(x)

        skip = block(block(inputs, 8, "enc1a"), 8, "enc1b")
        x = L.MaxPooling3D(2, name="pool1")(skip)
        x = block(x, 16, "enc2")
        x = L.MaxPooling3D((1, 2, 2), padding="same", name="pool2")(x)
        x = block(x, 32, "bottom")
        x = L.Conv3DTranspose(16, (1, 2, 2), strides=(1, 2, 2), name="up2")(x)
        x = L.Conv3DTranspose(8, 3, strides=2, padding="same", name="up1")(x)
        x = L.Concatenate(name="skip1")([x, skip])
        x = L.Conv3D(8, 3, padding="same", activation="relu", name="dec1_conv")(x)
        x = L.BatchNormalization(momentum=0.9, epsilon=1e-5, name="dec1_bn")(x)
        x = L.GlobalAveragePooling3D(name="gap")(x)
        outputs = L.Dense(10, name="head")(x)
        model = keras.Model(inputs, outputs, name="unet3d")
        randomize_normalization(model)
        return model

    return Network("unet3d", "keras", build, shape)


# In the suite; torchvision's s3d (its smallest clip is large) is in the benchmark only.
VIDEO_NETWORKS = {
    net.name: net
    for net in [
        torchvision_video_model("r3d_18"),
        torchvision_video_model("mc3_18"),
        torchvision_video_model("r2plus1d_18"),
        keras_unet3d(),
    ]
}
BENCHMARK_ONLY = {"s3d": torchvision_video_model("s3d", (3, 13, 209, 209))}


@pytest.mark.parametrize("name", list(VIDEO_NETWORKS))
def test_video_network_converts_and_back(name):
    report = check_network(VIDEO_NETWORKS[name], round_trip=True)
    figures = (
        f"{name}: inference {format_error(report.inference_error)}, training {format_error(report.training_error)}, "
        f"statistics {format_error(report.statistics_error)}, back {format_error(report.round_trip_error)}, "
        f"{report.convert_seconds:.2f} s"
    )
    assert report.batch_norms > 0, figures
    assert report.inference_error < INFERENCE_TOL, figures
    assert report.round_trip_error < INFERENCE_TOL, figures
    assert report.training_error < TRAINING_TOL, figures
    assert report.statistics_error < TRAINING_TOL, figures
    assert not report.weights_lost, figures


@pytest.mark.parametrize("name", ["r2plus1d_18", "unet3d"])
def test_compare_agrees_and_lint_is_quiet(name):
    net = VIDEO_NETWORKS[name]
    source = net.build()
    if net.framework == "torch":
        converted = torch_to_keras(source, net.input_shape)
        findings = bnkit.lint(source, input_shape=net.input_shape, batch_size=2)
    else:
        converted = keras_to_torch(source)
        findings = bnkit.lint(source, batch_size=2)
    assert [f for f in findings if f.severity != "info"] == [], findings
    x = net.example_input()
    for training in (False, True):
        report = bnkit.compare(source, converted, x, training=training)
        assert report.agree, report.render()
        # explicit paddings have no partner (the other side pads inside its conv); neither has the
        # transposed conv Keras crops inside ('same', odd kernel, stride 2) and PyTorch after it: shapes differ
        unmatched = [n for n in report.unmatched_a + report.unmatched_b if not n.endswith("pad") and n != "up1"]
        assert not unmatched, (report.unmatched_a, report.unmatched_b)
        if isinstance(source, torch.nn.Module):
            source.eval()
    assert np.isfinite(report.output_max_abs_diff)
