"""Segmentation networks, both ways: torchvision's LR-ASPP, FCN and DeepLabV3 (dict outputs
``{"out", "aux"}``, bilinear ``F.interpolate`` back to the input size) torch -> Keras -> torch, and a
Keras U-Net (UpSampling2D bilinear + Concatenate decoder) and a DeepLab-style Keras model (dilated
convolutions, ASPP with global pooling resized back) Keras -> PyTorch -> Keras; random weights,
randomised batch-norm statistics, 64x64 inputs. compare agrees with each conversion (inference and a
training forward), lint finds nothing to flag in the converted models, fold_bn runs on the Keras ones.
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
SIZE = 64


def torchvision_segmentation(name: str, size: int = SIZE, **kwargs) -> Network:
    """``torchvision.models.segmentation.<name>`` with random weights, 5 classes, a ``size``×``size`` input."""

    def build():
        torchvision = import_torchvision()
        torch.manual_seed(0)
        module = getattr(torchvision.models.segmentation, name)(
            weights=None, weights_backbone=None, num_classes=5, **kwargs
        )
        randomize_normalization(module)
        return module.eval()

    return Network(name, "torch", build, (3, size, size))


def _conv_bn_relu(x, filters, kernel=3, strides=1, dilation=1, name=""):
    x = L.Conv2D(
        filters, kernel, strides=strides, dilation_rate=dilation, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    x = L.BatchNormalization(name=f"{name}_bn")(x)
    return L.ReLU(name=f"{name}_relu")(x)


def keras_unet(size: int = SIZE) -> Network:
    """A small U-Net: Conv2D+BN+ReLU encoder, MaxPooling2D, UpSampling2D(bilinear) + Concatenate decoder."""

    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((size, size, 3))
        e1 = _conv_bn_relu(_conv_bn_relu(inputs, 8, name="enc1a"), 8, name="enc1b")
        e2 = _conv_bn_relu(_conv_bn_relu(L.MaxPooling2D(name="pool1")(e1), 16, name="enc2a"), 16, name="enc2b")
        mid = _conv_bn_relu(L.MaxPooling2D(name="pool2")(e2), 32, name="mid")
        d2 = L.UpSampling2D(2, interpolation="bilinear", name="up2")(mid)
        d2 = _conv_bn_relu(L.Concatenate(name="cat2")([d2, e2]), 16, name="dec2")
        d1 = L.UpSampling2D(2, interpolation="bilinear", name="up1")(d2)
        d1 = _conv_bn_relu(L.Concatenate(name="cat1")([d1, e1]), 8, name="dec1")
        model = keras.Model(inputs, L.Conv2D(5, 1, name="logits")(d1), name="unet")
        randomize_normalization(model)
        return model

    return Network("keras_unet", "keras", build, (size, size, 3))


def keras_deeplab(size: int = SIZE) -> Network:
    """DeepLab-style: strided stem, ASPP (1x1, dilated 3x3 at rates 2 and 4, global pooling resized back
    with Resizing), 1x1 projection, logits upsampled to the input with UpSampling2D(bilinear)."""

    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((size, size, 3))
        x = _conv_bn_relu(inputs, 16, strides=2, name="stem1")
        x = _conv_bn_relu(x, 32, strides=2, name="stem2")
        features = size // 4
        branches = [
            _conv_bn_relu(x, 16, kernel=1, name="aspp0"),
            _conv_bn_relu(x, 16, dilation=2, name="aspp1"),
            _conv_bn_relu(x, 16, dilation=4, name="aspp2"),
        ]
        pooled = L.GlobalAveragePooling2D(keepdims=True, name="aspp_pool")(x)
        pooled = _conv_bn_relu(pooled, 16, kernel=1, name="aspp_pool_proj")
        branches.append(L.Resizing(features, features, interpolation="bilinear", name="aspp_pool_resize")(pooled))
        x = _conv_bn_relu(L.Concatenate(name="aspp_cat")(branches), 16, kernel=1, name="project")
        logits = L.Conv2D(5, 1, name="logits")(x)
        model = keras.Model(inputs, L.UpSampling2D(4, interpolation="bilinear", name="upsample")(logits))
        randomize_normalization(model)
        return model

    return Network("keras_deeplab", "keras", build, (size, size, 3))


NETWORKS = {
    net.name: net
    for net in [
        torchvision_segmentation("lraspp_mobilenet_v3_large"),
        torchvision_segmentation("fcn_resnet50", aux_loss=True),
        torchvision_segmentation("deeplabv3_mobilenet_v3_large", aux_loss=True),
        keras_unet(),
        keras_deeplab(),
    ]
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NETWORKS))
def test_segmentation_network_converts_there_and_back(name):
    report = check_network(NETWORKS[name], round_trip=True)
    summary = (
        f"{name}: inference {format_error(report.inference_error)}, training {format_error(report.training_error)}, "
        f"statistics {format_error(report.statistics_error)}, back {format_error(report.round_trip_error)}"
    )
    assert report.inference_error < INFERENCE_TOL, summary
    assert report.round_trip_error < INFERENCE_TOL, summary
    assert report.training_error < TRAINING_TOL, summary
    assert report.statistics_error < TRAINING_TOL, summary
    assert report.weights_lost == (), summary
    assert report.batch_norms > 0


def _converted(net: Network):
    source = net.build()
    if net.framework == "torch":
        return source, torch_to_keras(source, net.input_shape)
    return source, keras_to_torch(source)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "keras_unet", "keras_deeplab"])
def test_compare_and_lint_agree_on_the_conversion(name):
    net = NETWORKS[name]
    source, target = _converted(net)
    x = net.example_input()
    for training in (False, True):
        report = bnkit.compare(source, target, x, training=training)
        assert report.agree, (training, report.causes, report.first_divergence)
    findings = []
    for model in (source, target):
        if isinstance(model, torch.nn.Module) and not isinstance(model, keras.Model):
            model.eval()
        findings.append(sorted((f.code, f.severity) for f in bnkit.lint(model, for_inference=True)))
    # the same model in both frameworks: the same findings, none of them a warning or an error (the Keras
    # networks' convolutions have no bias before their batch norms; LR-ASPP mixes eps 1e-3 and 1e-5: info)
    assert findings[0] == findings[1], findings
    assert all(severity == "info" for _, severity in findings[0]), findings


@pytest.mark.parametrize(
    "name",
    [
        "keras_unet",
        "keras_deeplab",
    ],
)
def test_fold_bn_on_the_keras_networks(name):
    net = NETWORKS[name]
    model = net.build()
    folded = bnkit.fold_bn(model)
    x = net.example_input()
    # training=False said: Keras 3.15.1's Resizing declares call(training=True), and model(x) without it runs
    # the batch norms after a Resizing (project_bn here) in training mode, updating their statistics
    expected = np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))
    got = np.asarray(keras.ops.convert_to_numpy(folded(x, training=False)))
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
