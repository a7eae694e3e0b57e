"""Real keras.applications and torchvision networks convert exactly (tests/convert/real_networks.py):
random weights, randomised normalization statistics, 96x96 inputs, batch 2.

Inference within INFERENCE_TOL (1e-5) relative, max |diff| / max |reference|, float32; a training
forward with semantics="source" keeps the outputs and every batch norm's running statistics within
TRAINING_TOL (1e-4; why in real_networks.py).
"""

from __future__ import annotations

import pytest
import torch
from real_networks import INFERENCE_TOL, NETWORKS, TRAINING_TOL, Network, check_network
from torch import nn

# Extension point: the networks of real_networks.NETWORKS that convert, by source framework. The
# others are refused today (python benchmarks/convert_cpu.py says why); add each once it converts.
KERAS_NETWORKS = ["ResNet50", "ConvNeXtTiny", "MobileNetV2", "Xception", "EfficientNetB0", "MobileNetV3Small"]
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
# ConvNeXt normalizes with layer norms only: its training forward is checked, there are no running
# statistics; SqueezeNet and AlexNet have no normalization
WITHOUT_BATCH_NORM = {"ConvNeXtTiny", "convnext_tiny", "squeezenet1_0", "alexnet"}


@pytest.mark.slow
@pytest.mark.parametrize("name", KERAS_NETWORKS + TORCH_NETWORKS)
def test_real_network_converts_exactly(name):
    report = check_network(NETWORKS[name])
    assert (report.batch_norms == 0) == (name in WITHOUT_BATCH_NORM), report
    assert report.inference_error <= INFERENCE_TOL, report
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
