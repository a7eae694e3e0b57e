"""bnkit.lint on ONNX models: each finding names its node, and what it claims is checked with onnxruntime.

Models are real torch.onnx exports where an exporter writes the case, otherwise graphs built with
onnx.helper (the operator as its specification defines it), run by onnxruntime's CPU provider.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from torch import nn  # noqa: E402

import bnkit  # noqa: E402
from bnkit.io import load_model  # noqa: E402

C = 3
X = np.random.default_rng(0).standard_normal((4, C, 2, 2)).astype(np.float32) * 2 + 1


def _bn_model(opset=15, outputs=("y",), attributes=None, var=None, scale=None, conv_bias=None, extra_bn=None):
    """x -> [Conv 1x1 with bias] -> BatchNormalization(name 'bn') with initializers s, b, m, v."""
    inits = [
        numpy_helper.from_array(np.ones(C, np.float32) if scale is None else scale, "s"),
        numpy_helper.from_array(np.zeros(C, np.float32), "b"),
        numpy_helper.from_array(np.zeros(C, np.float32), "m"),
        numpy_helper.from_array(np.ones(C, np.float32) if var is None else var, "v"),
    ]
    nodes, source = [], "x"
    if conv_bias is not None:
        inits += [numpy_helper.from_array(np.eye(C, dtype=np.float32).reshape(C, C, 1, 1), "W"),
                  numpy_helper.from_array(conv_bias.astype(np.float32), "cb")]  # fmt: skip
        nodes.append(helper.make_node("Conv", ["x", "W", "cb"], ["h"], name="conv"))
        source = "h"
    nodes.append(helper.make_node("BatchNormalization", [source, "s", "b", "m", "v"], list(outputs), name="bn",
                                  **(attributes or {})))  # fmt: skip
    last = outputs[0]
    if extra_bn is not None:
        nodes.append(helper.make_node("BatchNormalization", [last, "s", "b", "m", "v"], ["z"], name="bn2",
                                      epsilon=extra_bn))  # fmt: skip
        last = "z"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(X.shape))],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in (last, *outputs[1:])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _run(model, x=X):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def _codes(model, **kwargs):
    return {(f.code, f.layer, f.severity) for f in bnkit.lint(model, **kwargs)}


def _batch_normalised(x, eps=1e-5):
    mean, var = x.mean(axis=(0, 2, 3), keepdims=True), x.var(axis=(0, 2, 3), keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def test_clean_export_has_no_findings(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4, momentum=0.1)).eval()
    path = tmp_path / "clean.onnx"
    torch.onnx.export(net, (torch.randn(2, 3, 8, 8),), str(path), dynamo=False)
    model = load_model(path)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    # PyTorch's momentum 0.1 (weight of the new batch) is written as ONNX's 0.9 (weight of the old value)
    assert helper.get_attribute_value(next(a for a in bn.attribute if a.name == "momentum")) == pytest.approx(0.9)
    assert bnkit.lint(model, for_inference=True) == []


def test_training_export_is_flagged(tmp_path):
    """The TorchScript exporter's TrainingMode.TRAINING writes training_mode=1 with 3 outputs; onnxruntime then
    normalises with the batch's statistics, as torch does in train()."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).train()
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "train.onnx"
    torch.onnx.export(net, (x,), str(path), dynamo=False, training=torch.onnx.TrainingMode.TRAINING)
    model = load_model(path)
    with torch.no_grad():
        expected = net(x).numpy()
    np.testing.assert_allclose(_run(model, x.numpy())[0], expected, rtol=1e-4, atol=1e-5)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    assert ("bn-training-mode", bn.name, "error") in _codes(model, for_inference=True)
    assert ("bn-training-mode", bn.name, "warning") in _codes(model)
    (finding,) = [f for f in bnkit.lint(model) if f.code == "bn-training-mode"]
    assert "training_mode=1 with 3 outputs" in finding.message


def test_opset9_training_by_output_count():
    model = _bn_model(opset=9, outputs=("y", "rm", "rv", "sm", "sv"))
    np.testing.assert_allclose(_run(model)[0], _batch_normalised(X), rtol=1e-4, atol=1e-5)  # onnxruntime trains
    (finding,) = [f for f in bnkit.lint(model) if f.code == "bn-training-mode"]
    assert finding.layer == "bn" and "opset 9 and 5 outputs" in finding.message
    inference = _bn_model(opset=9)
    np.testing.assert_allclose(_run(inference)[0], X / np.sqrt(1 + 1e-5), rtol=1e-6)
    assert bnkit.lint(inference) == []


def test_training_mode_with_one_output_refused_by_onnxruntime():
    model = _bn_model(attributes={"training_mode": 1})
    with pytest.raises(Exception, match="should be 3 when Training_mode"):
        _run(model)
    assert ("bn-outputs-mismatch", "bn", "error") in _codes(model)


def test_epsilon_zero():
    var = np.array([1.0, 0.0, 1.0], np.float32)
    model = _bn_model(attributes={"epsilon": 0.0}, var=var)
    assert not np.isfinite(_run(model)[0][:, 1]).all()  # the zero-variance channel divides by zero
    assert ("eps-not-positive", "bn", "error") in _codes(model)


def test_momentum_literal_port():
    model = _bn_model(attributes={"momentum": 0.1})
    assert ("momentum-literal-port", "bn", "info") in _codes(model)  # unused in inference
    training = _bn_model(outputs=("y", "rm", "rv"), attributes={"momentum": 0.1, "training_mode": 1})
    _, running_mean, _ = _run(training)
    batch_mean = X.mean(axis=(0, 2, 3))
    np.testing.assert_allclose(running_mean, 0.1 * 0 + 0.9 * batch_mean, rtol=1e-5)  # the new batch weighs 0.9
    assert ("momentum-literal-port", "bn", "warning") in _codes(training)
    assert ("momentum-out-of-range", "bn", "error") in _codes(
        _bn_model(outputs=("y", "rm", "rv"), attributes={"momentum": 1.5, "training_mode": 1})
    )


def test_negative_and_nonfinite_statistics():
    model = _bn_model(var=np.array([1.0, -1.0, 1.0], np.float32))
    assert np.isnan(_run(model)[0][:, 1]).all()
    assert ("bn-negative-variance", "bn", "error") in _codes(model)
    model = _bn_model(scale=np.array([1.0, np.nan, 1.0], np.float32))
    assert np.isnan(_run(model)[0][:, 1]).all()
    (finding,) = [f for f in bnkit.lint(model) if f.code == "bn-nonfinite-statistics"]
    assert finding.layer == "bn" and "scale" in finding.message and "channel 1" in finding.message


def test_spatial_zero_before_opset_9():
    model = _bn_model(opset=7, attributes={"spatial": 0})
    assert ("bn-per-activation", "bn", "warning") in _codes(model)
    assert bnkit.lint(_bn_model(opset=7, attributes={"spatial": 1})) == []


def test_conv_bias_cancelled_by_training_bn():
    def run(bias):
        model = _bn_model(outputs=("y", "rm", "rv"), attributes={"training_mode": 1}, conv_bias=bias)
        return model, _run(model)[0]

    model, y0 = run(np.zeros(C))
    _, y1 = run(np.array([5.0, -3.0, 2.0]))
    np.testing.assert_allclose(y0, y1, atol=1e-5)  # the bias is cancelled
    assert ("conv-bias-before-bn", "conv", "warning") in _codes(model)
    inference = _bn_model(conv_bias=np.ones(C))
    assert bnkit.lint(inference) == []  # in inference the bias is not cancelled: nothing to say


def test_batch_of_one():
    """onnxruntime trains a BN on one value per channel without complaint and outputs B for every input."""
    values = {"s": 1.0, "b": 0.5, "m": 0.0, "v": 1.0}
    inits = [numpy_helper.from_array(np.full(C, v, np.float32), n) for n, v in values.items()]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"], name="bn",
                            training_mode=1)  # fmt: skip
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("y", "rm", "rv")], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    np.testing.assert_array_equal(_run(model, np.array([[3.0, -2.0, 7.0]], np.float32))[0], [[0.5, 0.5, 0.5]])
    assert ("batch-of-one", "bn", "error") in _codes(model, batch_size=1)
    assert not any(f.code == "batch-of-one" for f in bnkit.lint(model, batch_size=2))
    spatial = _bn_model(outputs=("y", "rm", "rv"), attributes={"training_mode": 1})
    (finding,) = [f for f in bnkit.lint(spatial, batch_size=1) if f.code == "batch-of-one"]
    assert finding.severity == "warning" and "(4 values per channel)" in finding.message


def test_eps_mismatch():
    model = _bn_model(extra_bn=1e-3)
    assert ("eps-mismatch", "(model)", "info") in _codes(model)


def test_cli_lint(tmp_path, run_cli):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).train()
    path = tmp_path / "train.onnx"
    torch.onnx.export(net, (torch.randn(2, 3, 8, 8),), str(path), dynamo=False,
                      training=torch.onnx.TrainingMode.TRAINING)  # fmt: skip
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07" + b"\xff" * 30)
    proc = run_cli("lint", path, "--for-inference")
    assert proc.returncode == 1 and "bn-training-mode" in proc.stdout and "/2/BatchNormalization" in proc.stdout
    proc = run_cli("lint", tmp_path / "bad.onnx")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "bad.onnx" in proc.stderr
