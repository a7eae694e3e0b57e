"""bnkit.summary of an ONNX model: counts checked against the real frameworks that built the same network.

The PyTorch side is the exported module itself (``parameters()``, ``buffers()``); the Keras side is the same
network built in Keras (``count_params()``, trainable/non-trainable weights); shapes against onnxruntime.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import bnkit  # noqa: E402
from bnkit.io import load_model  # noqa: E402


def _torch_net():
    """Conv -> ReLU -> BN (after the ReLU: kept as a node) -> Flatten -> Linear -> ReLU -> BN1d -> Linear."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.BatchNorm2d(8), nn.Flatten(),
        nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 4),
    ).eval()  # fmt: skip
    return net


def _randomise_statistics(net):
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-1, 1)


def _export(net, path, dynamo=False):
    torch.onnx.export(net, (torch.randn(2, 3, 8, 8),), str(path), dynamo=dynamo)
    return load_model(path)


def _torch_counts(net):
    params = sum(p.numel() for p in net.parameters())
    stats = sum(b.numel() for b in net.buffers() if b.is_floating_point())
    return params, stats


def _keras_counts():
    """The same network in Keras (NHWC): count_params and the non-trainable weights Keras reports."""
    import keras

    model = keras.Sequential([
        keras.Input((8, 8, 3)), keras.layers.Conv2D(8, 3), keras.layers.ReLU(), keras.layers.BatchNormalization(),
        keras.layers.Flatten(), keras.layers.Dense(16), keras.layers.ReLU(), keras.layers.BatchNormalization(),
        keras.layers.Dense(4),
    ])  # fmt: skip
    non_trainable = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    return model.count_params(), non_trainable


@pytest.fixture(scope="module")
def torchscript_export(tmp_path_factory):
    net = _torch_net()
    _randomise_statistics(net)
    path = tmp_path_factory.mktemp("ts") / "net.onnx"
    return net, _export(net, path), path


def test_counts_match_pytorch_and_keras(torchscript_export):
    net, model, _ = torchscript_export
    s = bnkit.summary(model)
    params, stats = _torch_counts(net)
    assert (s.framework, s.torch_params, s.torch_trainable, s.torch_buffers) == ("onnx", params, params, stats)
    keras_total, keras_non_trainable = _keras_counts()
    assert (s.total, s.non_trainable, s.trainable) == (keras_total, keras_non_trainable, keras_total - stats)
    # statistics set apart from the weights: ONNX stores every value once, as Keras counts them
    assert s.onnx_stored == keras_total


def test_rows_per_node_and_shapes(torchscript_export):
    net, model, _ = torchscript_export
    s = bnkit.summary(model)
    types = [r.type for r in s.rows]
    assert types == ["Conv", "BatchNormalization", "Gemm", "BatchNormalization", "Gemm"]
    bn2d = s.rows[1]
    assert (bn2d.trainable_params, bn2d.non_trainable_params, bn2d.buffers) == (16, 16, 16)
    assert bn2d.torch_params == net[2].weight.numel() + net[2].bias.numel()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: np.zeros((2, 3, 8, 8), np.float32)})[0]
    assert s.rows[-1].output_shape == out.shape
    assert s.input_shape == (2, 3, 8, 8)


def test_dynamo_export_shares_fresh_statistics(tmp_path):
    """torch 2.13's dynamo exporter stores a fresh BN's zeros/ones once: ONNX stores less than Keras counts."""
    net = _torch_net()  # fresh: running_mean == bias == 0, running_var == weight == 1
    model = _export(net, tmp_path / "fresh.onnx", dynamo=True)
    s = bnkit.summary(model)
    params, stats = _torch_counts(net)
    assert (s.torch_params, s.torch_buffers, s.total) == (params, stats, params + stats)
    stored = sum(
        onnx.numpy_helper.to_array(t).size for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
    )
    assert s.onnx_stored == stored < s.total
    assert any("stored equal tensors once" in note for note in s.notes)


def test_folded_resnet18_counts(tmp_path):
    """The exporter folds every BN of resnet18 into its conv: the conv gains a bias of C, the BN's 4·C go.
    Fresh batch norms make every folded bias zeros, which the exporter stores once per width."""
    from conftest import import_torchvision

    net = import_torchvision().models.resnet18(num_classes=10).eval()
    model = _export(net, tmp_path / "r18.onnx")
    s = bnkit.summary(model)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    params = sum(p.numel() for p in net.parameters())
    assert s.torch_params == params - sum(bn.num_features for bn in bns)
    assert s.torch_buffers == 0 and s.total == s.torch_params
    assert any("No BatchNormalization node" in note for note in s.notes)
    assert s.onnx_stored < s.total
    assert str(s)  # renders


def test_cli_summary(torchscript_export, run_cli, tmp_path):
    net, _, path = torchscript_export
    proc = run_cli("summary", path, "--json", check=True)
    data = json.loads(proc.stdout)
    params, stats = _torch_counts(net)
    assert data["framework"] == "onnx" and data["name"] == "net"
    counts = (data["torch"]["params"], data["torch"]["buffers"], data["keras"]["total"])
    assert counts == (params, stats, params + stats)
    assert str(bnkit.summary(load_model(path))).startswith('Model: "main_graph" (ONNX)')
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all \xff\xff\xff")
    proc = run_cli("summary", bad)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.onnx" in lines[0] and "not a readable ONNX model" in lines[0]
