"""Real keras.applications and torchvision networks convert exactly (tests/convert/real_networks.py):
random weights, randomised normalization statistics, 96x96 inputs, batch 2.

Inference within INFERENCE_TOL (1e-5) relative, max |diff| / max |reference|, float32; a training
forward with semantics="source" keeps the outputs and every batch norm's running statistics within
TRAINING_TOL (1e-4; why in real_networks.py). Each converted model is converted back to its source
framework (Keras -> PyTorch -> Keras, PyTorch -> Keras -> PyTorch): the same outputs, within
INFERENCE_TOL, and every source weight's values again.
"""

from __future__ import annotations

import pytest
import torch
from real_networks import (
    INFERENCE_TOL,
    NETWORKS,
    TRAINING_TOL,
    Network,
    check_network,
    lost_weights,
    randomize_normalization,
)
from torch import nn

from bnkit.convert import keras_to_torch, torch_to_keras

# Extension point: the networks of real_networks.NETWORKS checked here, by source framework (every one
# of NETWORKS converts: python benchmarks/convert_cpu.py).
KERAS_NETWORKS = ["ResNet50", "ConvNeXtTiny", "MobileNetV2", "Xception", "EfficientNetB0", "MobileNetV3Small"]
KERAS_NETWORKS += ["ResNet50V2", "MobileNet", "MobileNetV3Large", "EfficientNetV2B0"]  # not named by the issue
TORCH_NETWORKS = [
    "resnet18",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "regnet_y_400mf",
    "shufflenet_v2_x0_5",
    "convnext_tiny",
    "squeezenet1_0",
    "vgg11_bn",
    "alexnet",
]
TORCH_NETWORKS += [  # not named by the issue
    "mnasnet0_5",
    "mobilenet_v3_large",
    "shufflenet_v2_x1_0",
    "regnet_x_400mf",
    "resnext50_32x4d",
    "efficientnet_v2_s",
    "inception_v3",
]
# Converted by benchmarks/convert_cpu.py only, for time: larger networks of the layers of networks above
# (Keras DenseNet121/169, InceptionV3, VGG16; torchvision resnet50, wide_resnet50_2, densenet121, googlenet),
# and InceptionResNetV2, whose one layer of its own (CustomScaleLayer) test_convert_elementwise.py checks.
# ConvNeXt normalizes with layer norms only: its training forward is checked, there are no running
# statistics; SqueezeNet and AlexNet have no normalization
WITHOUT_BATCH_NORM = {"ConvNeXtTiny", "convnext_tiny", "squeezenet1_0", "alexnet"}


@pytest.mark.slow
@pytest.mark.parametrize("name", KERAS_NETWORKS + TORCH_NETWORKS)
def test_real_network_converts_exactly_and_back(name):
    report = check_network(NETWORKS[name], round_trip=True)
    assert (report.batch_norms == 0) == (name in WITHOUT_BATCH_NORM), report
    assert report.inference_error <= INFERENCE_TOL, report
    # converted back: the source's own framework again, the same weights; only the layers' order of
    # summation may differ (a depthwise convolution comes back as a DepthwiseConv2D or grouped Conv2D)
    assert report.round_trip_error <= INFERENCE_TOL, report
    assert report.weights_lost == (), report
    assert report.training_error <= TRAINING_TOL, report
    assert report.statistics_error <= TRAINING_TOL, report


def _tiny():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    return module.eval()


def test_the_check_sees_a_change_of_training_semantics():
    """The harness can fail: with semantics="target", Keras' BN updates its moving variance with the
    biased batch variance where PyTorch's uses the unbiased one (n = 2*2*2 = 8 values: 1/7 apart)."""
    tiny = Network("tiny", "torch", _tiny, (3, 2, 2))
    assert check_network(tiny).statistics_error <= TRAINING_TOL
    report = check_network(tiny, semantics="target")
    assert report.inference_error <= INFERENCE_TOL and report.training_error <= TRAINING_TOL
    assert report.statistics_error > 10 * TRAINING_TOL


def test_the_round_trip_check_sees_a_changed_weight():
    source = _tiny()
    randomize_normalization(source)  # else the running variance holds the same values as the gamma: ones
    back = keras_to_torch(torch_to_keras(source, (3, 2, 2)))
    assert lost_weights(source, back) == ()
    name, norm = next((n, m) for n, m in back.named_modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        norm.running_var[2] += 2**-10
    assert lost_weights(source, back) == ("1.running_var",), name
