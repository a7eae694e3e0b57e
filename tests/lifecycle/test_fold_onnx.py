"""``bnkit.fold_bn`` and ``bnkit fold`` on ONNX models, checked with onnxruntime.

Models: one exported by torch 2.13's TorchScript exporter (``dynamo=False``), which folds a Conv's batch
norm itself but keeps a ConvTranspose's, a Linear's (Gemm) and one after a ReLU as BatchNormalization
nodes; and graphs built with ``onnx.helper`` (Conv→BN, ConvTranspose(group=2)→BN, Gemm(transB=1)→BN, and
the cases that must stay). Every folded model is run against the original by onnxruntime (graph
optimisations off) within 1e-5 relative to the largest output value.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import bnkit
from bnkit.io import load_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _run(model, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _assert_same(original, folded, feeds, tol=1e-5):
    for a, b in zip(_run(original, feeds), _run(folded, feeds), strict=True):
        assert np.max(np.abs(a - b)) <= tol * np.max(np.abs(a)), np.max(np.abs(a - b)) / np.max(np.abs(a))


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


class _Exported(torch.nn.Module):
    """Conv→BN (the exporter folds it), ConvTranspose(groups=2)→BN, ReLU→BN, Linear→BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.conv, self.bn0 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.up, self.bn1 = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6)
        self.relu, self.bn2 = nn.ReLU(), nn.BatchNorm2d(6)
        self.fc, self.bn3 = nn.Linear(6, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        y = self.bn2(self.relu(self.bn1(self.up(self.bn0(self.conv(x))))))
        return self.bn3(self.fc(y.mean((2, 3))))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = _Exported().eval()
    with torch.no_grad():
        for bn in (model.bn0, model.bn1, model.bn2, model.bn3):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    path = tmp_path_factory.mktemp("onnx") / "exported.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 12, 12),), str(path), dynamo=False)
    return path, model


def test_fold_exported_model(exported):
    path, model = exported
    original = load_model(path)  # bnkit's safe ONNX reader
    assert _ops(original).count("BatchNormalization") == 3  # the Conv's was folded by the exporter
    before = original.SerializeToString()
    folded, decisions = bnkit.fold_bn(original, report=True)
    assert original.SerializeToString() == before  # left untouched
    outcomes = {d.outcome for d in decisions}
    assert [d.outcome for d in decisions] == ["folded", "kept", "folded"] and outcomes == {"folded", "kept"}
    assert "its input is the output of Relu" in decisions[1].reason
    assert _ops(folded).count("BatchNormalization") == 1
    x = np.random.default_rng(0).normal(size=(2, 3, 12, 12)).astype(np.float32)
    feeds = {original.graph.input[0].name: x}
    _assert_same(original, folded, feeds)
    with torch.no_grad():  # and the PyTorch module it came from
        np.testing.assert_allclose(_run(folded, feeds)[0], model(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)


def _tensor(rng, name, shape, low=None, high=None):
    values = rng.uniform(low, high, shape) if low is not None else rng.normal(size=shape)
    return numpy_helper.from_array(values.astype(np.float32), name)


def _bn_params(rng, prefix, c):
    return [
        _tensor(rng, f"{prefix}_scale", (c,), 0.5, 1.5),
        _tensor(rng, f"{prefix}_B", (c,)),
        _tensor(rng, f"{prefix}_mean", (c,)),
        _tensor(rng, f"{prefix}_var", (c,), 0.2, 2.0),
    ]


def _bn(prefix, x, y, **attrs):
    names = [x] + [f"{prefix}_{k}" for k in ("scale", "B", "mean", "var")]
    return helper.make_node("BatchNormalization", names, [y], name=prefix, **attrs)


def _model(nodes, initializers, inputs, outputs, opset=15):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _hand_built():
    """x → Conv → BN → Relu → ConvTranspose(group=2) → BN → GlobalAveragePool → Flatten → Gemm(transB) → BN."""
    rng = np.random.default_rng(1)
    f32 = TensorProto.FLOAT
    inits = [_tensor(rng, "W0", (4, 3, 3, 3)), _tensor(rng, "b0", (4,)),
             _tensor(rng, "W1", (4, 3, 3, 3)),  # ConvTranspose: (C_in=4, M/group=3): 6 outputs, no bias
             _tensor(rng, "W2", (5, 6)), _tensor(rng, "C2", (5,))]
    inits += _bn_params(rng, "bn0", 4) + _bn_params(rng, "bn1", 6) + _bn_params(rng, "bn2", 5)
    nodes = [
        helper.make_node("Conv", ["x", "W0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        _bn("bn0", "c0", "n0", epsilon=1e-3),
        helper.make_node("Relu", ["n0"], ["r0"], name="relu0"),
        helper.make_node("ConvTranspose", ["r0", "W1"], ["c1"], name="up1", group=2, strides=[2, 2]),
        _bn("bn1", "c1", "n1"),
        helper.make_node("GlobalAveragePool", ["n1"], ["p1"], name="pool"),
        helper.make_node("Flatten", ["p1"], ["f1"], name="flatten"),
        helper.make_node("Gemm", ["f1", "W2", "C2"], ["g2"], name="fc2", transB=1, alpha=0.7, beta=1.3),
        _bn("bn2", "g2", "y", epsilon=1e-4),
    ]
    inputs = [helper.make_tensor_value_info("x", f32, ["N", 3, 8, 8])]
    outputs = [helper.make_tensor_value_info("y", f32, ["N", 5])]
    return _model(nodes, inits, inputs, outputs)


def test_fold_hand_built_conv_convtranspose_gemm():
    model = _hand_built()
    from bnkit.lifecycle._fold_onnx import fold_onnx

    folded, decisions, measured = fold_onnx(model)
    assert [(d.name, d.outcome, d.into) for d in decisions] == [
        ("bn0", "folded", ("conv0",)), ("bn1", "folded", ("up1",)), ("bn2", "folded", ("fc2",))]
    assert "BatchNormalization" not in _ops(folded)
    assert measured <= 1e-5
    assert [o.name for o in folded.graph.output] == ["y"]
    assert not {"W0", "b0", "bn0_scale", "bn1_var"} & {t.name for t in folded.graph.initializer}  # pruned
    feeds = {"x": np.random.default_rng(5).normal(size=(3, 3, 8, 8)).astype(np.float32)}
    _assert_same(model, folded, feeds)


def test_kept_batch_norms_say_why():
    rng = np.random.default_rng(2)
    f32 = TensorProto.FLOAT
    inits = [_tensor(rng, "W", (4, 3, 1, 1))] + _bn_params(rng, "a", 4) + _bn_params(rng, "b", 4)
    inits += _bn_params(rng, "t", 4)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        _bn("a", "c", "ya"),  # the conv's output is read twice: kept
        _bn("b", "c", "yb"),
        helper.make_node("Add", ["ya", "yb"], ["s"], name="add"),
        _bn("t", "s", "y", training_mode=0),  # after an Add
    ]
    inputs = [helper.make_tensor_value_info("x", f32, [2, 3, 4, 4])]
    model = _model(nodes, inits, inputs, [helper.make_tensor_value_info("y", f32, [2, 4, 4, 4])])
    folded, decisions = bnkit.fold_bn(model, report=True)
    reasons = {d.name: d.reason for d in decisions}
    assert all(d.outcome == "kept" for d in decisions)
    assert reasons["a"] == "the output of Conv 'conv' is also read by 'b'"
    assert reasons["t"] == "its input is the output of Add 'add', not of a Conv/ConvTranspose/Gemm"
    assert folded.graph == model.graph

    training = _model([helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
                       helper.make_node("BatchNormalization", ["c", "a_scale", "a_B", "a_mean", "a_var"],
                                        ["y", "rm", "rv"], name="a", training_mode=1)],
                      [inits[0], *inits[1:5]], inputs,
                      [helper.make_tensor_value_info("y", f32, [2, 4, 4, 4]),
                       helper.make_tensor_value_info("rm", f32, [4]), helper.make_tensor_value_info("rv", f32, [4])])
    (decision,) = bnkit.fold_bn(training, report=True).decisions
    assert decision.outcome == "kept" and decision.reason.startswith("training_mode=1")


def test_opset_9_training_by_outputs_and_shared_weights():
    """Opset 9: five outputs mean training; a weight shared by two convs gets a folded copy of its own."""
    rng = np.random.default_rng(3)
    f32 = TensorProto.FLOAT
    inits = [_tensor(rng, "W", (3, 3, 1, 1))] + _bn_params(rng, "a", 3)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c1"], name="conv1"),
        _bn("a", "c1", "n1"),
        helper.make_node("Conv", ["n1", "W"], ["y"], name="conv2"),  # the same W, unfolded
    ]
    inputs = [helper.make_tensor_value_info("x", f32, [2, 3, 4, 4])]
    model = _model(nodes, inits, inputs, [helper.make_tensor_value_info("y", f32, [2, 3, 4, 4])], opset=9)
    folded, decisions = bnkit.fold_bn(model, report=True)
    assert [d.outcome for d in decisions] == ["folded"]
    assert folded.graph.node[1].input[1] == "W"  # conv2 keeps the original weight
    _assert_same(model, folded, {"x": rng.normal(size=(2, 3, 4, 4)).astype(np.float32)})
    nodes[1] = helper.make_node("BatchNormalization", ["c1", "a_scale", "a_B", "a_mean", "a_var"],
                                ["n1", "m", "v", "sm", "sv"], name="a")
    outputs = [helper.make_tensor_value_info("y", f32, [2, 3, 4, 4])]
    (decision,) = bnkit.fold_bn(_model(nodes, inits, inputs, outputs, opset=9), report=True).decisions
    assert decision.outcome == "kept" and "5 outputs, which in opset 9 means training mode" in decision.reason


def test_cli_fold_onnx(exported, run_cli, tmp_path):
    path, _ = exported
    (tmp_path / "in.onnx").write_bytes(path.read_bytes())
    proc = run_cli("fold", "in.onnx", "out.onnx", check=True)
    assert "folded 2 of 3 batch norms into the preceding layer, 1 left as it is; wrote out.onnx" in proc.stdout
    assert "checked with onnxruntime on a random input: max relative difference" in proc.stdout
    assert "its input is the output of Relu" in proc.stdout
    folded = onnx.load(str(tmp_path / "out.onnx"))
    assert _ops(folded).count("BatchNormalization") == 1
    again = run_cli("fold", "in.onnx", "out.onnx")
    assert again.returncode == 2
    assert "bnkit fold: error: out.onnx: already exists; pass --force to replace it" in again.stderr
    assert run_cli("fold", "in.onnx", "out.onnx", "--force").returncode == 0


def test_initializers_listed_as_inputs():
    """IR 3 lists every initializer as a graph input (old exporters): folded, inputs kept in step.
    From IR 4 on an initializer that is also an input may be overridden by the caller: left, by name."""
    rng = np.random.default_rng(4)
    f32 = TensorProto.FLOAT
    inits = [_tensor(rng, "W", (4, 3, 3, 3)), _tensor(rng, "b", (4,))] + _bn_params(rng, "bn", 4)
    nodes = [helper.make_node("Conv", ["x", "W", "b"], ["c"], name="conv"), _bn("bn", "c", "y")]
    inputs = [helper.make_tensor_value_info("x", f32, [2, 3, 6, 6])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", f32, [2, 4, 4, 4])],
                              initializer=inits)
    old = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    old.ir_version = 3
    onnx.checker.check_model(old)
    folded, decisions = bnkit.fold_bn(old, report=True)
    assert [d.outcome for d in decisions] == ["folded"]
    assert {i.name for i in folded.graph.input} == {"x"} | {t.name for t in folded.graph.initializer}
    _assert_same(old, folded, {"x": rng.normal(size=(2, 3, 6, 6)).astype(np.float32)})

    new = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    new.ir_version = 8
    (decision,) = bnkit.fold_bn(new, report=True).decisions
    assert decision.reason == "its scale 'bn_scale' is also a graph input, which a caller may override"


def test_a_model_onnxruntime_cannot_run_is_one_line():
    """Symbolic H, W are checked at 16: a Reshape that fits only 6x6 fails there, said in one line."""
    rng = np.random.default_rng(6)
    f32 = TensorProto.FLOAT
    inits = [_tensor(rng, "W", (4, 3, 3, 3)), numpy_helper.from_array(np.array([-1, 64], np.int64), "shape")]
    inits += _bn_params(rng, "bn", 4)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), _bn("bn", "c", "n"),
             helper.make_node("Reshape", ["n", "shape"], ["y"], name="reshape")]
    inputs = [helper.make_tensor_value_info("x", f32, ["N", 3, "H", "W"])]
    model = _model(nodes, inits, inputs, [helper.make_tensor_value_info("y", f32, ["N", 64])])
    with pytest.raises(ValueError, match=r"^onnxruntime could not run the original model to check the folding \("):
        bnkit.fold_bn(model)


def test_statistics_through_identity_and_constant_nodes():
    """torch's exporter stores equal tensors once and reads the copies through Identity nodes; a Constant
    node's tensor is a constant too. Both fold, and the nodes that fed only the batch norm go."""
    rng = np.random.default_rng(7)
    f32 = TensorProto.FLOAT
    scale, bias, mean, var = _bn_params(rng, "bn", 4)
    inits = [_tensor(rng, "W", (4, 3, 3, 3)), scale, mean, var]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node("Identity", ["bn_scale"], ["scale_copy"], name="id1"),
        helper.make_node("Identity", ["scale_copy"], ["scale_copy2"], name="id2"),
        helper.make_node("Constant", [], ["b_const"], name="const", value=bias),
        helper.make_node("BatchNormalization", ["c", "scale_copy2", "b_const", "bn_mean", "bn_var"], ["y"],
                         name="bn"),
    ]
    inputs = [helper.make_tensor_value_info("x", f32, [2, 3, 6, 6])]
    model = _model(nodes, inits, inputs, [helper.make_tensor_value_info("y", f32, [2, 4, 4, 4])])
    folded, decisions = bnkit.fold_bn(model, report=True)
    assert [d.outcome for d in decisions] == ["folded"] and _ops(folded) == ["Conv"]
    _assert_same(model, folded, {"x": rng.normal(size=(2, 3, 6, 6)).astype(np.float32)})


def test_cli_fold_onnx_json(tmp_path, capsys):
    from bnkit.cli import main

    onnx.save(_hand_built(), str(tmp_path / "hand.onnx"))
    assert main(["fold", str(tmp_path / "hand.onnx"), str(tmp_path / "out.onnx"), "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert (report["total"], report["folded"], report["left_as_they_are"]) == (3, 3, 0)
    assert 0 <= report["onnxruntime_max_relative_difference"] <= 1e-5
    assert main(["fold", str(tmp_path / "hand.onnx"), str(tmp_path / "out.pt2")]) == 2
    assert "an ONNX model is written as .onnx; got suffix '.pt2'" in capsys.readouterr().err
    assert not (tmp_path / "out.pt2").exists()
