"""Real 3-D networks, converted and converted back: torchvision's video classifiers (random weights,
randomised batch-norm statistics) torch -> Keras -> torch, and a small Keras 3-D U-Net Keras -> torch ->
Keras, each checked by ``check_network`` (inference 1e-5, a training forward and the updated running
statistics 1e-4, the round trip); ``bnkit.compare`` agrees with the source on each, in inference and
training, and ``bnkit.lint`` finds nothing wrong in the sources.

Clips are the smallest the video models take comfortably: (3, 4, 32, 32) leaves layer4 of the ResNets
1x1x1 per sample (a training batch norm there normalises 2 values, as a 2-clip batch does). torchvision's
``s3d`` needs (3, 13, 209, 209) (its AvgPool3d((2, 7, 7)) runs on features 32x smaller): ~40 s on two
cores, so it is measured in the benchmark only (real_networks_beyond.BEYOND).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from real_networks import INFERENCE_TOL, TRAINING_TOL, check_network, format_error
from real_networks_beyond import VIDEO_NETWORKS

import bnkit
from bnkit.convert import keras_to_torch, torch_to_keras


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
