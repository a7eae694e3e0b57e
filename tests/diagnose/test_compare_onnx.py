"""compare with ONNX models (issue 20): an ``onnx.ModelProto`` run by onnxruntime, layer by layer, against
the PyTorch module it was exported from (``torch.onnx.export``, dynamo=False and True) or another ONNX model.

Both exporters of torch 2.13 fold every batch norm that follows a convolution into the convolution, so
the torchvision networks' exports hold no BatchNormalization node: compare pairs each conv+BN of the
module with the folded Conv ("folded by the exporter") and finds them in agreement with no cause. Faults
planted in the .onnx (an epsilon, a conv kernel, training_mode=1, a literal momentum) and a fold with stale
statistics are named at their node with their cause.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bnkit.diagnose.compare import compare
from bnkit.diagnose.exporter_folds import NOTE
from conftest import import_torchvision
from convert.real_networks import randomize_normalization

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import helper, numpy_helper  # noqa: E402


def _export(module, x, path, dynamo: bool):
    torch.onnx.export(module, (x,), str(path), dynamo=dynamo, verbose=False)
    return onnx.load(str(path))


def _bn_count(module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(module, input, ModelProto) of a torchvision network at 64x64 with randomised batch-norm statistics,
    exported once per exporter."""
    torchvision = import_torchvision()
    folder = tmp_path_factory.mktemp("torchvision_onnx")
    cache: dict = {}

    def get(name: str, dynamo: bool):
        if (name, dynamo) not in cache:
            torch.manual_seed(0)
            module = getattr(torchvision.models, name)(num_classes=10).eval()
            randomize_normalization(module)
            x = torch.randn(2, 3, 64, 64)
            cache[name, dynamo] = module, x, _export(module, x, folder / f"{name}_{dynamo}.onnx", dynamo)
        return cache[name, dynamo]

    return get


# the dynamo exporter takes 5-20 s per network here
_EXPORTERS = [False, pytest.param(True, marks=pytest.mark.slow)]


@pytest.mark.parametrize("dynamo", _EXPORTERS, ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_export_agrees_with_folded_pairs(exported, name, dynamo):
    module, x, model = exported(name, dynamo)
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]  # the exporter folded them all
    report = compare(module, model, x.numpy())
    assert report.agree, str(report)
    assert report.causes == []
    assert report.unmatched_a == [] and report.unmatched_b == []
    folded = [r for r in report.rows if r.note == NOTE]
    assert len(folded) == _bn_count(module)  # every conv+BN of the module paired with its folded Conv
    assert report.framework_b == "onnx"
    # the ONNX side's output is onnxruntime's own
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ours = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(ours - module(x).numpy()).max() <= report.output_atol + report.rtol * np.abs(ours).max()


def test_onnx_first_and_onnx_against_onnx(exported, tmp_path):
    module, x, model = exported("resnet18", False)
    report = compare(model, module, x.numpy())
    assert report.agree and report.causes == [] and report.unmatched_a == report.unmatched_b == []
    assert sum(r.note == NOTE for r in report.rows) == _bn_count(module)
    page = (tmp_path / "report.html").read_text() if report.to_html(tmp_path / "report.html") else ""
    assert page.count(f"[{NOTE}]") == _bn_count(module)
    same = compare(model, model, x.numpy())
    assert same.agree and same.unmatched_a == [] and not any(r.note for r in same.rows)


# ---- a small network whose batch norms after a ReLU stay nodes ------------------------------------


@pytest.fixture(scope="module")
def small():
    """Conv+BN+ReLU (folded by the exporters), then two Conv+ReLU+BN (kept as BatchNormalization nodes)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(16),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(16),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()  # fmt: skip
    randomize_normalization(net)
    return net, torch.randn(4, 3, 16, 16)


@pytest.fixture(scope="module")
def small_exports(small, tmp_path_factory):
    net, x = small
    folder = tmp_path_factory.mktemp("onnx")
    cache: dict = {}

    def get(dynamo: bool):
        if dynamo not in cache:
            cache[dynamo] = _export(net, x, folder / f"small_{dynamo}.onnx", dynamo)
        return cache[dynamo]

    return get


def _copy(model):
    work = onnx.ModelProto()
    work.CopyFrom(model)
    return work


def _set(node, name, value):
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def _nodes(model, op_type):
    return [n for n in model.graph.node if n.op_type == op_type]


def _named_at(report, code, node_name):
    cause = next(c for c in report.causes if c.code == code)
    assert any(node_name in layer for layer in cause.layers), cause.layers
    return cause


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_small_export_agrees_and_reads_onnx_bn_state(small, small_exports, dynamo):
    net, x = small
    model = small_exports(dynamo)
    bns = _nodes(model, "BatchNormalization")
    assert len(bns) == 2  # the two after a ReLU are kept
    report = compare(net, model, x.numpy())
    assert report.agree and report.causes == [] and report.unmatched_a == report.unmatched_b == []
    assert [r.note for r in report.rows].count(NOTE) == 1
    assert len(report.batch_norms) == 2
    for pair in report.batch_norms:
        attrs = {a.name: helper.get_attribute_value(a) for a in bns[report.batch_norms.index(pair)].attribute}
        assert pair.b.framework == "onnx" and pair.b.momentum_weighs == "old"
        assert pair.b.momentum == pytest.approx(attrs.get("momentum", 0.9))  # the exporter's 1 - 0.1
        assert pair.b.new_weight == pytest.approx(pair.a.new_weight)
        assert pair.b.eps == pytest.approx(attrs.get("epsilon", 1e-5)) and not pair.b.uses_batch_stats


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_planted_epsilon_named_at_its_node(small, small_exports, dynamo):
    net, x = small
    model = _copy(small_exports(dynamo))
    node = _nodes(model, "BatchNormalization")[0]
    _set(node, "epsilon", 1e-2)
    report = compare(net, model, x.numpy())
    assert report.cause_codes == ["eps"]
    _named_at(report, "eps", node.name)


def test_planted_training_mode_named_at_its_node(small, small_exports):
    net, x = small
    model = _copy(small_exports(False))
    node = _nodes(model, "BatchNormalization")[1]
    _set(node, "training_mode", 1)
    node.output.extend(["planted_running_mean", "planted_running_var"])  # onnxruntime requires them then
    report = compare(net, model, x.numpy())
    assert report.cause_codes == ["training-mode"]
    cause = _named_at(report, "training-mode", node.name)
    assert "training_mode=1" in cause.explanation


@pytest.mark.parametrize("which", ["kept", "folded"])
def test_planted_conv_weights_named_at_its_node(small, small_exports, which):
    net, x = small
    model = _copy(small_exports(False))
    node = _nodes(model, "Conv")[1 if which == "kept" else 0]
    init = next(i for i in model.graph.initializer if i.name == node.input[1])
    w = numpy_helper.to_array(init).copy()
    w[0, 0, 1, 1] += 0.5
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    report = compare(net, model, x.numpy())
    assert report.cause_codes == ["weights"]
    _named_at(report, "weights", node.name)


def test_fold_with_stale_statistics_is_named(small, small_exports):
    """The module's first batch norm changed after the export (recalibrated): the folded Conv holds the old
    statistics: exporter-fold, not weights."""
    net, x = small
    moved = copy.deepcopy(net)
    with torch.no_grad():
        moved[1].running_var.mul_(1.5)
        moved[1].running_mean.add_(0.1)
    model = small_exports(False)
    report = compare(moved, model, x.numpy())
    assert report.cause_codes == ["exporter-fold"]
    _named_at(report, "exporter-fold", _nodes(model, "Conv")[0].name)


def test_training_compare_runs_onnx_batch_norms_in_training_mode(small, small_exports):
    """training=True: the kept BatchNormalization nodes run ONNX's training mode (onnxruntime), whose
    running variance takes the biased batch variance where PyTorch's takes the unbiased one; the folded
    conv+BN can only be inference."""
    net, x = small
    model = small_exports(False)
    report = compare(net, model, x.numpy(), training=True)
    assert set(report.cause_codes) == {"training-mode", "running-variance-estimator"}
    _named_at(report, "training-mode", _nodes(model, "Conv")[0].name)
    for node in _nodes(model, "BatchNormalization"):
        _named_at(report, "running-variance-estimator", node.name)
    assert all(p.b.uses_batch_stats and p.b.running_mean_after is not None for p in report.batch_norms)
    # momentum 0.1 written literally (PyTorch's meaning) into the ONNX node: a momentum-convention cause
    literal = _copy(model)
    node = _nodes(literal, "BatchNormalization")[0]
    _set(node, "momentum", 0.1)
    report = compare(net, literal, x.numpy(), training=True)
    _named_at(report, "momentum-convention", node.name)


def test_refusals_name_the_problem(small, small_exports):
    net, x = small
    model = _copy(small_exports(False))
    model.graph.node[1].domain = "com.example"
    with pytest.raises(ValueError, match=r"custom domain 'com.example'") as e:
        compare(net, model, x.numpy())
    assert model.graph.node[1].name in str(e.value)
    two = _copy(small_exports(False))
    two.graph.input.append(helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, [1]))
    with pytest.raises(ValueError, match="one input; this graph has 2"):
        compare(two, net, x.numpy())


def test_cli_compares_an_onnx_file_with_a_pt2(small, small_exports, tmp_path, capsys):
    """``bnkit compare m.onnx m.pt2``: the .onnx read by bnkit's safe reader, the input shape from the
    graph's declared input; a planted epsilon gives exit status 1 and the cause in the JSON."""
    import json

    from bnkit.cli import main

    net, x = small
    pt2 = tmp_path / "small.pt2"
    torch.export.save(torch.export.export(net, (x,)), str(pt2))
    good = tmp_path / "small.onnx"
    onnx.save(small_exports(False), str(good))
    batch = str(x.shape[0])  # the TorchScript export fixes the batch dimension
    assert main(["compare", str(good), str(pt2), "--batch-size", batch, "--json"]) == 0
    agreed = json.loads(capsys.readouterr().out)
    assert agreed["agree"] and agreed["model_a"]["framework"] == "onnx"
    assert [row["note"] for row in agreed["layers"]].count(NOTE) == 1
    bad_model = _copy(small_exports(False))
    node = _nodes(bad_model, "BatchNormalization")[0]
    _set(node, "epsilon", 1e-2)
    bad = tmp_path / "eps.onnx"
    onnx.save(bad_model, str(bad))
    assert main(["compare", str(pt2), str(bad), "--input-shape", "3,16,16", "--batch-size", batch, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [c["code"] for c in report["causes"]] == ["eps"]
    assert node.name in report["causes"][0]["layers"][0]
    assert main(["compare", str(good), str(pt2), "--batch-size", "3"]) == 2
    assert f"give --batch-size {batch}" in capsys.readouterr().err


def test_keras_against_onnx(small, small_exports):
    """The module converted to Keras (bnkit.convert) against the module's ONNX export: the Keras conv+BN+ReLU
    pairs with the folded Conv, the kept batch norms with their nodes; a planted epsilon is named."""
    from bnkit.convert import torch_to_keras

    net, x = small
    keras_model = torch_to_keras(net, tuple(x.shape[1:]))
    model = small_exports(False)
    x_keras = np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))
    report = compare(keras_model, model, x_keras)
    assert report.agree and report.causes == [] and report.unmatched_a == report.unmatched_b == []
    assert [r.note for r in report.rows].count(NOTE) == 1 and len(report.batch_norms) == 2
    assert compare(model, keras_model, x.numpy()).agree
    planted = _copy(model)
    node = _nodes(planted, "BatchNormalization")[1]
    _set(node, "epsilon", 1e-2)
    report = compare(keras_model, planted, x_keras)
    assert report.cause_codes == ["eps"]
    _named_at(report, "eps", node.name)


def test_batch_norms_kept_by_bnkit_writer_against_the_folded_export(small, small_exports, tmp_path):
    """bnkit's .onnx writer keeps every batch norm a node: against the module each pairs with its node;
    against the exporter's folded graph (ONNX against ONNX) the kept Conv+BatchNormalization+Relu is the
    folded Conv."""
    from bnkit.io import load_model, save_model

    net, x = small
    path = tmp_path / "kept.onnx"
    save_model(net, path, input_shape=tuple(x.shape[1:]))
    kept = load_model(path)
    assert len(_nodes(kept, "BatchNormalization")) == _bn_count(net)
    report = compare(net, kept, x.numpy())
    assert report.agree and report.causes == [] and not any(r.note for r in report.rows)
    assert len(report.batch_norms) == _bn_count(net)
    for folded_first in (False, True):
        pair = (small_exports(False), kept) if folded_first else (kept, small_exports(False))
        report = compare(*pair, x.numpy())
        assert report.agree and report.causes == [] and report.unmatched_a == report.unmatched_b == []
        assert [r.note for r in report.rows].count(NOTE) == 1


@pytest.mark.parametrize("opset", [9, 13, 17])
def test_opsets_and_onnx_training_statistics(small, tmp_path, opset):
    """Opsets 9 (training told by the number of outputs: onnxruntime takes 1 or 5), 13 and 17 (training_mode):
    the export agrees in inference; in training, onnxruntime's running mean is PyTorch's (momentum 0.9 on
    the old value = 0.1 on the new) and its running variance folds in the biased batch variance, PyTorch's
    the unbiased: (torch - 0.9·before) / (onnx - 0.9·before) = n / (n - 1)."""
    torch.manual_seed(0)  # no conv+BN: nothing folded, so both sides train every batch norm
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 16 * 16, 10),
    ).eval()  # fmt: skip
    randomize_normalization(net)
    x = small[1]
    torch.onnx.export(net, (x,), str(tmp_path / "o.onnx"), dynamo=False, opset_version=opset)
    model = onnx.load(str(tmp_path / "o.onnx"))
    assert compare(net, model, x.numpy()).agree
    report = compare(net, model, x.numpy(), training=True)
    assert report.cause_codes == ["running-variance-estimator"] and len(report.batch_norms) == 2
    n = x.shape[0] * x.shape[2] * x.shape[3]
    for pair in report.batch_norms:
        a, b = pair.a, pair.b
        assert b.uses_batch_stats and b.in_training_mode  # run in training mode by compare(training=True)
        np.testing.assert_allclose(b.running_mean_after, a.running_mean_after, rtol=1e-5, atol=1e-6)
        ratio = (a.running_var_after - 0.9 * a.running_var_before) / (b.running_var_after - 0.9 * b.running_var_before)
        np.testing.assert_allclose(ratio, n / (n - 1), rtol=1e-4)


def test_an_input_the_graph_refuses_is_one_value_error(small, small_exports):
    net, x = small
    wrong = torch.randn(4, 3, 16, 16)[:, :2]  # two channels where the graph's Conv takes three
    with pytest.raises(ValueError, match=r"onnxruntime cannot run the ONNX model on input \(4, 2, 16, 16\)"):
        compare(small_exports(False), small_exports(False), wrong.numpy())


# ---- activations the exporters write as several nodes; a BN after the ReLU after a folded BN -----------


class _ToChannelsLast(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


def _activation_net(name: str) -> nn.Module:
    """A conv (or linear) layer followed by an activation that torch's exporters decompose, then one more layer."""
    torch.manual_seed(0)
    if name == "silu":  # Sigmoid, Mul(x, ·) at every opset
        layers = [nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 4, 1)]
    elif name == "hardswish":  # below opset 14: HardSigmoid, Mul(x, ·)
        layers = [nn.Conv2d(3, 8, 3), nn.Hardswish(), nn.Conv2d(8, 4, 1)]
    elif name == "gelu":  # Gemm then Div, Erf, Add, Mul, Mul
        layers = [nn.Flatten(), nn.Linear(3 * 6 * 6, 16), nn.GELU(), nn.Linear(16, 4)]
    else:  # "gelu_channels_last", ConvNeXt's: MatMul, Add (the bias), then the erf chain
        layers = [nn.Conv2d(3, 8, 3), _ToChannelsLast(), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)]
    net = nn.Sequential(*layers).eval()
    randomize_normalization(net)
    return net


def _export_at(net, x, path, dynamo: bool, opset: int):
    torch.onnx.export(net, (x,), str(path), dynamo=dynamo, opset_version=opset, verbose=False)
    return onnx.load(str(path))


@pytest.mark.parametrize(
    ("name", "dynamo", "opset", "written_as"),
    [
        ("silu", False, 17, "SiLU"),
        ("silu", True, 18, "SiLU"),
        ("hardswish", False, 13, "Hardswish"),
        ("hardswish", False, 9, "Hardswish"),
        ("gelu", False, 17, "GELU"),
        ("gelu", True, 18, "GELU"),
        ("gelu_channels_last", False, 17, "GELU"),
        ("gelu_channels_last", False, 9, "GELU"),
    ],
)
def test_activation_written_as_several_nodes_folds_into_its_layer(tmp_path, name, dynamo, opset, written_as):
    """SiLU as Sigmoid·Mul, Hardswish as x·HardSigmoid(x), GELU as the erf chain: one activation entry of the
    ONNX trace (named by its values), folded into the Conv/Gemm/MatMul+Add it follows as PyTorch's module is
    folded into its layer, so compare agrees with no cause (it said 'weights' before: the bare Conv was held
    against conv+activation). onnxruntime's output is checked against the module first."""
    net = _activation_net(name)
    x = torch.randn(2, 3, 6, 6)
    model = _export_at(net, x, tmp_path / "a.onnx", dynamo, opset)
    assert "Mul" in [n.op_type for n in model.graph.node]  # decomposed: no single activation node
    ort_out = _ort_run(model, x.numpy())
    np.testing.assert_allclose(ort_out, net(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    report = compare(net, model, x.numpy())
    assert report.agree and report.causes == [], report.render()
    assert any(row.type_b.endswith(f"+{written_as}") for row in report.rows), [r.type_b for r in report.rows]
    assert not report.unmatched_a and not report.unmatched_b


def _ort_run(model, x):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_a_changed_decomposed_activation_is_still_found(tmp_path):
    """The matcher hides nothing: the erf chain's 0.5 planted as 0.6 is no GELU any more (an 'Elementwise'
    activation), and compare disagrees at the Gemm it follows; a planted kernel in the SiLU export too."""
    net = _activation_net("gelu")
    x = torch.randn(2, 3, 6, 6)
    model = _export_at(net, x, tmp_path / "g.onnx", False, 17)
    half = next(n for n in model.graph.node if n.op_type == "Constant" and np.isclose(_constant(n), 0.5))
    half.attribute[0].t.CopyFrom(numpy_helper.from_array(np.asarray(0.6, dtype=np.float32)))
    report = compare(net, model, x.numpy())
    assert not report.agree
    first = next(row for row in report.rows if row.differs)
    assert first.type_b == "Gemm+Elementwise"
    silu = _activation_net("silu")
    model = _export_at(silu, x, tmp_path / "s.onnx", False, 17)
    conv = _nodes(model, "Conv")[0]
    weight = next(t for t in model.graph.initializer if t.name == conv.input[1])
    w = numpy_helper.to_array(weight).copy()
    w[0, 0, 0, 0] += 0.5
    weight.CopyFrom(numpy_helper.from_array(w, weight.name))
    report = compare(silu, model, x.numpy())
    assert "weights" in report.cause_codes and report.rows[0].differs and report.rows[0].type_b == "Conv+SiLU"


def _constant(node):
    return numpy_helper.to_array(node.attribute[0].t)


def _bn_relu_bn() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1),
    ).eval()  # fmt: skip
    randomize_normalization(net)
    return net


@pytest.mark.parametrize(("dynamo", "opset"), [(False, 17), (False, 9), (True, 18)])
def test_conv_bn_relu_bn_pairs_the_kept_node_with_the_second_batch_norm(tmp_path, dynamo, opset):
    """conv → BN → ReLU → BN exports as Conv (the first BN folded) + Relu, then the second BN as a node.
    The first BN was paired with that node (compare said 'weights'); now conv+BN+ReLU pairs with the
    folded Conv+Relu ('folded by the exporter') and the second BN with the BatchNormalization node."""
    net = _bn_relu_bn()
    x = torch.randn(2, 3, 8, 8)
    model = _export_at(net, x, tmp_path / "b.onnx", dynamo, opset)
    assert [n.op_type for n in model.graph.node].count("BatchNormalization") == 1
    report = compare(net, model, x.numpy())
    assert report.agree and report.causes == [], report.render()
    assert [row.type_a for row in report.rows] == ["Conv2d+BatchNorm2d+ReLU", "BatchNorm2d", "Conv2d"]
    assert report.rows[0].note == NOTE and report.rows[1].type_b == "BatchNormalization"
    assert report.rows[1].name_a == "3" and len(report.batch_norms) == 1


def test_cli_pt2_against_its_own_torchscript_export(tmp_path, capsys):
    """``bnkit compare m.pt2 m.onnx`` (the .pt2 first) on the conv → BN → ReLU → BN network and a SiLU one:
    exit status 0, agree, no cause."""
    import json

    from bnkit.cli import main

    x = torch.randn(2, 3, 8, 8)
    for name, net in (("bnrelubn", _bn_relu_bn()), ("silu", _activation_net("silu"))):
        pt2, path = tmp_path / f"{name}.pt2", tmp_path / f"{name}.onnx"
        torch.export.save(torch.export.export(net, (x,)), str(pt2))
        _export_at(net, x, path, False, 17)
        assert main(["compare", str(pt2), str(path), "--input-shape", "3,8,8", "--batch-size", "2", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["agree"] and report["causes"] == [], name
