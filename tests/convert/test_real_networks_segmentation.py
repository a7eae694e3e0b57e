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
from real_networks import INFERENCE_TOL, TRAINING_TOL, Network, check_network, format_error
from real_networks_beyond import SEGMENTATION_NETWORKS as NETWORKS

import bnkit
from bnkit.convert import keras_to_torch, torch_to_keras
from bnkit.keras import keras


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
