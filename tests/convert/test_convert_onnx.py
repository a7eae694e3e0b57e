"""ONNX → PyTorch (→ Keras): operator grids against onnxruntime, batch-norm semantics, refusals.

Each case is a one-node (or few-node) ONNX graph built with ``onnx.helper``, run by onnxruntime (the
reference) and by the ``torch.fx.GraphModule`` :func:`bnkit.convert.onnx_to_torch` makes of it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bnkit.convert import UnsupportedLayerError, onnx_to_torch, torch_to_keras  # noqa: E402

TOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter says it is legacy
RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, initializers=None, opset=17):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        [numpy_helper.from_array(np.asarray(a), name) for name, a in (initializers or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9 if opset < 21 else 10
    return model


def _run_ort(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def _relative(got, ref):
    return float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-12))


def _check(model, shape, keras=False):
    x = RNG.standard_normal(shape).astype("float32")
    (ref,) = _run_ort(model, x)[:1]
    gm = onnx_to_torch(model)
    with torch.no_grad():
        got = gm(torch.from_numpy(x)).numpy()
    assert got.shape == ref.shape
    assert _relative(got, ref) <= TOL
    if keras:
        km = torch_to_keras(gm, shape[1:])
        out = km.predict(np.moveaxis(x, 1, -1) if x.ndim > 2 else x, verbose=0)
        out = np.moveaxis(out, -1, 1) if out.ndim > 2 else out
        assert _relative(out, ref) <= TOL
    return gm


def _one(op, shape, initializers=None, opset=17, inputs=("x",), **attrs):
    initializers = initializers or {}
    node = helper.make_node(op, [*inputs, *initializers], ["y"], name=f"the_{op.lower()}", **attrs)
    return _model([node], [("x", shape)], ["y"], initializers, opset)


def _w(*shape):
    return RNG.standard_normal(shape).astype("float32") * 0.3


CONV_CASES = [
    ({"pads": [1, 1, 1, 1]}, 4, 3),
    ({"pads": [0, 1, 2, 1], "strides": [2, 2]}, 4, 3),  # asymmetric: a ZeroPad2d in front
    ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, 4, 3),
    ({"auto_pad": "SAME_LOWER", "strides": [2, 2]}, 4, 4),
    ({"auto_pad": "VALID", "dilations": [2, 2]}, 4, 3),
    ({"group": 2, "pads": [1, 1, 1, 1]}, 4, 3),
    ({"group": 4, "pads": [1, 1, 1, 1]}, 4, 3),  # depthwise
]


@pytest.mark.parametrize("attrs,out,k", CONV_CASES)
def test_conv2d_grid(attrs, out, k):
    group = attrs.get("group", 1)
    init = {"W": _w(out, 4 // group, k, k), "B": _w(out)}
    gm = _check(_one("Conv", [2, 4, 9, 9], init, kernel_shape=[k, k], **attrs), (2, 4, 9, 9), keras=True)
    assert any(isinstance(m, torch.nn.Conv2d) for m in gm.modules())


@pytest.mark.parametrize("nd", [1, 3])
def test_conv_1d_3d_without_bias(nd):
    shape = (2, 3, *([6] * nd))
    _check(_one("Conv", list(shape), {"W": _w(5, 3, *([3] * nd))}, pads=[1] * 2 * nd), shape)


def test_conv_transpose():
    init = {"W": _w(4, 3, 3, 3), "B": _w(3)}
    model = _one("ConvTranspose", [2, 4, 5, 5], init, strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])
    gm = _check(model, (2, 4, 5, 5))
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in gm.modules())


ACTIVATIONS = [
    ("Relu", {}, 17),
    ("LeakyRelu", {"alpha": 0.2}, 17),
    ("Sigmoid", {}, 17),
    ("Tanh", {}, 17),
    ("HardSigmoid", {}, 17),  # ONNX's default alpha=0.2: the composed clamp
    ("HardSigmoid", {"alpha": 1 / 6}, 17),  # PyTorch's: nn.Hardsigmoid
    ("HardSwish", {}, 17),
    ("Clip", {"min": 0.0, "max": 6.0}, 9),  # bounds as attributes before opset 11
    ("Clip", {"min": -0.5, "max": 0.5}, 9),
    ("Elu", {"alpha": 0.7}, 17),
    ("Selu", {}, 17),
    ("Softplus", {}, 17),
    ("Softsign", {}, 17),
    ("Gelu", {}, 20),
    ("Gelu", {"approximate": "tanh"}, 20),
    ("Softmax", {"axis": 1}, 13),
    ("LogSoftmax", {}, 13),
    ("Erf", {}, 17),
]


@pytest.mark.parametrize("op,attrs,opset", ACTIVATIONS, ids=[f"{a[0]}-{i}" for i, a in enumerate(ACTIVATIONS)])
def test_activations(op, attrs, opset):
    _check(_one(op, [2, 3, 5, 5], opset=opset, **attrs), (2, 3, 5, 5))


@pytest.mark.parametrize("bounds", [(0.0, 6.0), (-1.0, 2.0), (0.0, None)])
def test_clip_bounds_as_inputs(bounds):
    names = ["x", "lo", "hi" if bounds[1] is not None else ""]
    init = {"lo": np.float32(bounds[0])} | ({"hi": np.float32(bounds[1])} if bounds[1] is not None else {})
    node = helper.make_node("Clip", names, ["y"], name="clip")
    _check(_model([node], [("x", [2, 3, 4, 4])], ["y"], init, 13), (2, 3, 4, 4), keras=True)


def test_softmax_opset_11_last_axis_and_refusal():
    _check(_one("Softmax", [4, 10], opset=11, axis=1), (4, 10))
    with pytest.raises(UnsupportedLayerError, match=r"'the_softmax' \(Softmax\): axis=1 at opset 11"):
        onnx_to_torch(_one("Softmax", [2, 3, 4, 4], opset=11, axis=1))


POOLS = [  # keras: whether torch_to_keras takes it (Keras pools "valid" or "same" only)
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, True),
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, False),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, False),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1}, True),
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}, True),
    ("GlobalAveragePool", {}, True),
    ("GlobalMaxPool", {}, True),
]


@pytest.mark.parametrize("op,attrs,keras", POOLS)
def test_pooling(op, attrs, keras):
    _check(_one(op, [2, 3, 9, 9], **attrs), (2, 3, 9, 9), keras=keras)


def test_max_pool_opset_9_end_pads_as_ceil_mode():
    # opset 9 has no ceil_mode: torch.onnx.export writes PyTorch's ceil_mode=True as extra end pads
    _check(
        _one("MaxPool", [2, 3, 10, 10], opset=9, kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1]), (2, 3, 10, 10)
    )


@pytest.mark.parametrize("trans_b,alpha,beta", [(1, 1.0, 1.0), (0, 0.5, 2.0)])
def test_gemm(trans_b, alpha, beta):
    w = _w(7, 5) if trans_b else _w(5, 7)
    model = _one("Gemm", [3, 5], {"W": w, "C": _w(7)}, transB=trans_b, alpha=alpha, beta=beta)
    gm = _check(model, (3, 5), keras=True)
    assert any(isinstance(m, torch.nn.Linear) for m in gm.modules())


def test_matmul_constant_weight_on_rank_4():
    _check(_one("MatMul", [2, 3, 4, 5], {"W": _w(5, 6)}), (2, 3, 4, 5))


def test_tensor_ops_chain():
    """Transpose, Reshape (a shape from Shape/Gather arithmetic, as the TorchScript exporter writes it),
    Slice, Split, Concat, Unsqueeze/Squeeze, Pad, arithmetic with constants."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]),
        helper.make_node("Concat", ["n1", "rest"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["r"]),  # (N, 2, 2, 5, 5): a channel shuffle
        helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["t", "back"], ["u"]),
        helper.make_node("Split", ["u", "halves"], ["a", "b"], axis=1),
        helper.make_node("Slice", ["b", "starts", "ends", "axes"], ["c"]),
        helper.make_node("Pad", ["c", "pads"], ["d"]),
        helper.make_node("Mul", ["d", "k"], ["e"]),
        helper.make_node("Concat", ["a", "e"], ["f"], axis=1),
        helper.make_node("Unsqueeze", ["f", "axes2"], ["g"]),
        helper.make_node("Squeeze", ["g", "axes2"], ["h"]),
        helper.make_node("Flatten", ["h"], ["y"], axis=1),
    ]
    init = {
        "zero": np.array(0, dtype="int64"),
        "axes0": np.array([0], dtype="int64"),
        "axes2": np.array([2], dtype="int64"),
        "rest": np.array([2, 2, 5, 5], dtype="int64"),
        "back": np.array([0, 4, 5, 5], dtype="int64"),
        "halves": np.array([2, 2], dtype="int64"),
        # columns 1..4 of W, padded back to 5 in front
        "starts": np.array([1], dtype="int64"),
        "ends": np.array([5], dtype="int64"),
        "axes": np.array([3], dtype="int64"),
        "pads": np.array([0, 0, 0, 1, 0, 0, 0, 0], dtype="int64"),
        "k": np.float32(0.5),
    }
    model = _model(nodes, [("x", [2, 4, 5, 5])], ["y"], init, 13)
    gm = _check(model, (2, 4, 5, 5), keras=True)
    with torch.no_grad():  # the batch is not baked in: another batch size runs too
        assert gm(torch.zeros(3, 4, 5, 5)).shape == (3, 100)


# ---- batch normalization ---------------------------------------------------------------------


def _bn_model(opset, training=False, eps=1e-3, momentum=0.8, c=3, outputs=("y",)):
    init = {
        "scale": RNG.uniform(0.5, 1.5, c).astype("float32"),
        "B": _w(c),
        "mean": RNG.uniform(-0.5, 0.5, c).astype("float32"),
        "var": RNG.uniform(0.5, 2.0, c).astype("float32"),
    }
    attrs = {"epsilon": eps, "momentum": momentum}
    if training and opset >= 14:
        attrs["training_mode"] = 1
    node = helper.make_node("BatchNormalization", ["x", *init], list(outputs), name="bn", **attrs)
    return _model([node], [("x", [4, c, 5, 5])], list(outputs), init, opset), init


@pytest.mark.parametrize("opset", [9, 14, 15, 21, onnx.defs.onnx_opset_version()])  # 28 in onnx 1.23
def test_batch_norm_inference_is_onnx_convention(opset):
    model, _ = _bn_model(opset)
    gm = _check(model, (4, 3, 5, 5), keras=True)
    (bn,) = [m for m in gm.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    from bnkit.torch import BatchNorm2d

    assert isinstance(bn, BatchNorm2d)
    assert bn.convention.name == "onnx" and bn.convention.momentum_weighs == "old"
    assert not bn.convention.unbiased_running_var
    assert bn.eps == pytest.approx(1e-3) and bn.momentum == pytest.approx(0.8)


def test_batch_norm_training_forward_and_running_statistics_match_onnxruntime():
    """The converted layer trained one step == onnxruntime's training-mode node (output, running stats)."""
    model, init = _bn_model(15)
    training, _ = _bn_model(15, training=True, outputs=("y", "running_mean", "running_var"))
    training.graph.ClearField("initializer")
    training.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in init.items())
    x = (RNG.standard_normal((4, 3, 5, 5)) * 2 + 1).astype("float32")
    y, running_mean, running_var = _run_ort(training, x)
    gm = onnx_to_torch(model).train()
    with torch.no_grad():
        got = gm(torch.from_numpy(x)).numpy()
    (bn,) = [m for m in gm.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert _relative(got, y) <= 1e-5
    assert np.max(np.abs(bn.running_mean.numpy() - running_mean)) <= 1e-6
    assert np.max(np.abs(bn.running_var.numpy() - running_var)) <= 1e-6


@pytest.mark.parametrize("opset", [9, 15])
def test_batch_norm_node_in_training_mode_computes_batch_statistics(opset):
    # opset 9: training is implied by the extra outputs; opset 14+: training_mode=1
    outputs = ("y", "m", "v") if opset >= 14 else ("y", "m", "v", "sm", "sv")
    model, _ = _bn_model(opset, training=True, outputs=outputs)
    del model.graph.output[1:]
    x = (RNG.standard_normal((4, 3, 5, 5)) * 2 + 1).astype("float32")
    (ref,) = _run_ort(model, x)
    gm = onnx_to_torch(model)  # in eval(): the node still normalises with the batch's statistics
    with torch.no_grad():
        assert _relative(gm(torch.from_numpy(x)).numpy(), ref) <= 1e-5


def test_batch_norm_kept_in_an_exported_network(tmp_path):
    """A BN after a ReLU stays a node in torch.onnx.export; it comes back as an onnx-convention batch norm."""
    from bnkit.torch import BatchNorm2d

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(4, eps=1e-3)).eval()
    with torch.no_grad():
        net[2].running_mean.uniform_(-0.5, 0.5)
        net[2].running_var.uniform_(0.5, 2.0)
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17)
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node].count("BatchNormalization") == 1
    gm = _check(model, (1, 3, 8, 8), keras=True)
    (bn,) = [m for m in gm.modules() if isinstance(m, BatchNorm2d)]
    # the float32 attributes read as the decimals written (1e-3, 0.9), not 0.0010000000474974513
    assert bn.convention.name == "onnx" and bn.eps == 1e-3 and bn.momentum == 0.9


# ---- refusals ----------------------------------------------------------------------------------


def test_unsupported_operator_named_in_one_line():
    with pytest.raises(UnsupportedLayerError) as e:
        onnx_to_torch(_one("Hardmax", [2, 5]))
    assert (
        str(e.value)
        == "cannot convert layer 'the_hardmax' (Hardmax): this ONNX operator is not supported by bnkit.convert"
    )


def test_custom_domain_refused():
    node = helper.make_node("Relu", ["x"], ["y"], name="vendor", domain="com.example")
    model = _model([node], [("x", [2, 3])], ["y"])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(UnsupportedLayerError, match=r"'vendor' \(Relu\): operator domain 'com.example'"):
        onnx_to_torch(model)


def test_computed_weight_refused():
    nodes = [helper.make_node("Relu", ["w0"], ["w"]), helper.make_node("Conv", ["x", "w"], ["y"], name="c")]
    model = _model(nodes, [("x", [1, 3, 5, 5]), ("w0", [2, 3, 1, 1])], ["y"])
    with pytest.raises(UnsupportedLayerError, match=r"'c' \(Conv\): the weight \(input W\) is computed in the graph"):
        onnx_to_torch(model)


def test_used_second_output_refused():
    node = helper.make_node("MaxPool", ["x"], ["y", "idx"], name="mp", kernel_shape=[2, 2])
    model = _model([node], [("x", [1, 3, 4, 4])], ["y", "idx"])
    with pytest.raises(UnsupportedLayerError, match=r"'mp' \(MaxPool\): its output 'idx' is used"):
        onnx_to_torch(model)


def test_not_a_model_proto():
    with pytest.raises(TypeError, match="onnx.ModelProto"):
        onnx_to_torch(torch.nn.ReLU())


# ---- exporters' decompositions ---------------------------------------------------------------------


@pytest.mark.parametrize("half_first", [False, True])  # TorchScript: x * (1 + erf) * 0.5; dynamo: x * (0.5 * ...)
def test_exact_gelu_chain_becomes_nn_gelu(half_first):
    scaled = ["half", "plus"] if half_first else ["x", "plus"]
    nodes = [
        helper.make_node("Div", ["x", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["plus"]),
        helper.make_node("Mul", scaled, ["m"]),
        helper.make_node("Mul", ["x", "m"] if half_first else ["m", "half"], ["y"], name="gelu"),
    ]
    init = {"sqrt2": np.float32(np.sqrt(2)), "one": np.float32(1.0), "half": np.float32(0.5)}
    gm = _check(_model(nodes, [("x", [2, 3, 4, 4])], ["y"], init, 13), (2, 3, 4, 4), keras=True)
    assert [type(m).__name__ for m in gm.children()] == ["GELU"]


def test_layer_norm_chain_becomes_nn_layer_norm():
    """The TorchScript exporter's nn.LayerNorm before opset 17 (ConvNeXt's, over the last axis)."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1]),
        helper.make_node("Sub", ["x", "mean"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["std"]),
        helper.make_node("Div", ["d", "std"], ["n"]),
        helper.make_node("Mul", ["n", "g"], ["s"]),
        helper.make_node("Add", ["s", "b"], ["y"], name="ln"),
    ]
    init = {"two": np.float32(2.0), "eps": np.float32(1e-6), "g": _w(6) + 1, "b": _w(6)}
    gm = _check(_model(nodes, [("x", [2, 5, 6])], ["y"], init, 13), (2, 5, 6))
    (ln,) = gm.children()
    assert isinstance(ln, torch.nn.LayerNorm) and ln.eps == pytest.approx(1e-6)


def test_cli_refuses_an_unsupported_operator_in_one_line(tmp_path, capsys):
    from bnkit.cli import main

    path = tmp_path / "m.onnx"
    model = _one("Hardmax", [2, 5])
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5]))  # for the checker
    onnx.save(model, str(path))
    status = main(["convert", str(path), str(tmp_path / "m.pt2")])
    err = capsys.readouterr().err.strip()
    assert status != 0 and not (tmp_path / "m.pt2").exists()
    assert "cannot convert layer 'the_hardmax' (Hardmax): this ONNX operator is not supported" in err
    assert len(err.splitlines()) == 1


def test_cli_writes_a_verified_pt2(tmp_path, capsys):
    from bnkit.cli import main

    model, _ = _bn_model(15)
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3, 5, 5]))
    path = tmp_path / "bn.onnx"
    onnx.save(model, str(path))
    assert main(["convert", str(path), str(tmp_path / "bn.pt2"), "--json"]) == 0
    report = __import__("json").loads(capsys.readouterr().out)
    assert report["relative_difference"] <= 1e-5 and report["batch_norms"][0]["epsilon"] == pytest.approx(1e-3)
    assert (tmp_path / "bn.pt2").exists()
