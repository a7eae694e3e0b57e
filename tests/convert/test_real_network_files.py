"""Real networks as files through the ``bnkit`` commands: ``.pt2`` programs (read without unpickling,
their layers rebuilt) converted to ``.keras`` and back, compared and summarised.

torchvision MobileNetV3-Small (hardswish, hardsigmoid, squeeze-and-excitation: layers left as
sub-programs of ATen operators) is saved as ``.pt2`` by bnkit.io with a free batch size;
keras.applications EfficientNetB0 (with its preprocessing layers) goes ``.keras`` -> ``.pt2`` ->
``.keras``. (Every network of real_networks.py goes through a ``.pt2`` file in
benchmarks/convert_pt2_files.py; a channel shuffle with the batch read from the input, in
tests/torch/test_eager_ops.py.) Every file is checked against the source network on a batch of
3 (the programs were exported with a batch of 2): within INFERENCE_TOL (1e-5) relative,
max |diff| / max |reference|, float32.
"""

from __future__ import annotations

import json

import pytest
import torch
from real_networks import (
    INFERENCE_TOL,
    NETWORKS,
    _run,
    _to_keras_layout,
    _to_torch_layout,
    lost_weights,
    relative_error,
)

from _cli_batch import run_cli_batch
from bnkit.io import load_model, save_model

TORCH_FILES = ["mobilenet_v3_small"]
KERAS_FILES = ["EfficientNetB0"]


@pytest.mark.slow
def test_real_networks_convert_as_files(tmp_path):
    sources, inputs = {}, {}
    for name in TORCH_FILES + KERAS_FILES:
        net = NETWORKS[name]
        sources[name], inputs[name] = net.build(), net.example_input(batch=3, seed=1)
        if net.framework == "torch":
            save_model(sources[name], tmp_path / f"{name}.pt2", input_shape=net.input_shape)
        else:
            save_model(sources[name], tmp_path / f"{name}.keras")
    commands = [["convert", f"{name}.pt2", f"{name}.keras", "--json"] for name in TORCH_FILES]
    for name in KERAS_FILES:
        commands += [
            ["convert", f"{name}.keras", f"{name}_converted.pt2", "--json"],
            ["convert", f"{name}_converted.pt2", f"{name}_back.keras", "--json"],
        ]
    # compare and summary on one (tests/diagnose compares others, as files too)
    commands += [
        ["compare", "mobilenet_v3_small.pt2", "mobilenet_v3_small.keras"],
        ["summary", "mobilenet_v3_small.pt2"],
    ]
    results = run_cli_batch(commands, tmp_path)
    for command, proc in zip(commands, results, strict=True):
        assert proc.returncode == 0, f"bnkit {' '.join(command)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        if "--json" in command:
            assert json.loads(proc.stdout)["max_abs_difference"] <= 1e-5, command
        if command[0] == "compare":
            assert "The models agree." in proc.stdout, proc.stdout

    for name in TORCH_FILES:
        expected = _run(sources[name], inputs[name], False)
        program = load_model(tmp_path / f"{name}.pt2")
        with torch.no_grad():
            assert relative_error(program(torch.from_numpy(inputs[name])).numpy(), expected) <= INFERENCE_TOL
        keras_model = load_model(tmp_path / f"{name}.keras")
        got = _to_torch_layout(_run(keras_model, _to_keras_layout(inputs[name]), False))
        assert relative_error(got, expected) <= INFERENCE_TOL, name
    for name in KERAS_FILES:
        expected = _run(sources[name], inputs[name], False)
        program = load_model(tmp_path / f"{name}_converted.pt2")
        with torch.no_grad():
            got = program(torch.from_numpy(_to_torch_layout(inputs[name]))).numpy()
        assert relative_error(_to_keras_layout(got), expected) <= INFERENCE_TOL, name
        back = load_model(tmp_path / f"{name}_back.keras")
        assert relative_error(_run(back, inputs[name], False), expected) <= INFERENCE_TOL, name
        assert lost_weights(sources[name], back) == (), name
