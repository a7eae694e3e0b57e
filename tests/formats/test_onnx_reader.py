"""The ``.onnx`` reader (bnkit.formats.onnx): real exports read as onnx reads them, crafted files refused in one line.

The reference for what a readable file holds is onnx's own loader (``onnx.load`` with its external data)
and onnxruntime running the model; the reference for the network is torchvision's resnet18 in torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bnkit.formats import ModelFileError  # noqa: E402
from bnkit.formats.limits import ReadLimits  # noqa: E402
from bnkit.io import load_model  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "src"


def _export(model, x, path: Path, dynamo: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (x,), str(path), dynamo=dynamo, external_data=True, verbose=False)
    return path


@pytest.fixture(scope="module")
def resnet18_exports(tmp_path_factory):
    """resnet18 (random weights, eval) exported by both of torch 2.13's exporters, with external data."""
    from conftest import import_torchvision

    torchvision = import_torchvision()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    for m in model.modules():  # statistics that are not the defaults, so that a lost tensor would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x).numpy()
    root = tmp_path_factory.mktemp("resnet18")
    files = {
        "torchscript": _export(model, x, root / "ts" / "resnet18.onnx", dynamo=False),
        "dynamo": _export(model, x, root / "dynamo" / "resnet18.onnx", dynamo=True),
    }
    return files, x.numpy(), expected


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_resnet18_exports_read_as_onnx_reads_them(resnet18_exports, exporter):
    files, x, expected = resnet18_exports
    path = files[exporter]
    model = load_model(path)
    assert isinstance(model, onnx.ModelProto)
    assert all(t.data_location == TensorProto.DEFAULT for t in model.graph.initializer)
    reference = onnx.load(str(path))  # onnx's own loader, external data included
    ours = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    theirs = {t.name: numpy_helper.to_array(t) for t in reference.graph.initializer}
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    np.testing.assert_allclose(_run(model, x), expected, rtol=1e-4, atol=1e-4)


def test_dynamo_export_has_external_data(resnet18_exports):
    """The dynamo exporter writes the large tensors to a file beside the model: the reader resolves them."""
    files, _, _ = resnet18_exports
    raw = onnx.load(str(files["dynamo"]), load_external_data=False)
    external = [t for t in raw.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert len(external) > 10


# ------------------------------------------------------------------------------------------ crafted files


def _small_model(opset: int = 17):
    """x (1, 4) -> MatMul W (4, 3) -> Add b: two initializers, W large enough to go to external data."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "b"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w, b],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _save_external(folder: Path, name: str = "m.onnx", location: str = "m.data") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save(_small_model(), str(path), save_as_external_data=True, location=location, size_threshold=0)
    return path


def _rewrite(path: Path, tensor: str, **entries) -> None:
    """Change ``tensor``'s external-data entries (location, offset, length) in the saved file."""
    model = onnx.load(str(path), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.name == tensor)
    current = {e.key: e.value for e in t.external_data}
    current.update({k: str(v) for k, v in entries.items()})
    del t.external_data[:]
    for key, value in current.items():
        t.external_data.add(key=key, value=value)
    path.write_bytes(model.SerializeToString())


def _refused(path: Path, *words: str) -> str:
    with pytest.raises(ModelFileError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def test_small_external_model_reads_and_runs(tmp_path):
    path = _save_external(tmp_path / "ok")
    model = load_model(path)
    x = np.ones((1, 4), np.float32)
    np.testing.assert_allclose(_run(model, x), _run(onnx.load(str(path)), x), rtol=0, atol=0)


def test_external_data_with_dotdot_refused(tmp_path):
    path = _save_external(tmp_path / "a" / "model")
    (tmp_path / "a" / "m.data").write_bytes((tmp_path / "a" / "model" / "m.data").read_bytes())
    _rewrite(path, "W", location="../m.data")
    _refused(path, "'W'", "'../m.data'", "leads out of the model's folder")


def test_external_data_absolute_path_refused(tmp_path):
    path = _save_external(tmp_path / "abs")
    _rewrite(path, "W", location=str(tmp_path / "abs" / "m.data"))
    _refused(path, "'W'", "absolute path")


def test_external_data_symlink_out_of_folder_refused(tmp_path):
    path = _save_external(tmp_path / "link" / "model")
    outside = tmp_path / "link" / "secret.bin"
    outside.write_bytes((tmp_path / "link" / "model" / "m.data").read_bytes())
    os.symlink(outside, tmp_path / "link" / "model" / "evil.data")
    _rewrite(path, "W", location="evil.data")
    _refused(path, "'W'", "'evil.data'", "link leading out of the model's folder")


def test_symlink_inside_folder_accepted(tmp_path):
    path = _save_external(tmp_path / "inside")
    os.symlink(tmp_path / "inside" / "m.data", tmp_path / "inside" / "alias.data")
    _rewrite(path, "W", location="alias.data")
    assert isinstance(load_model(path), onnx.ModelProto)


def test_truncated_external_data_refused(tmp_path):
    path = _save_external(tmp_path / "trunc")
    data = tmp_path / "trunc" / "m.data"
    data.write_bytes(data.read_bytes()[:20])
    _refused(path, "'W'", "'m.data'", "runs past the end of the file (20 bytes: truncated?)")


def test_offset_past_the_end_refused(tmp_path):
    path = _save_external(tmp_path / "offset")
    _rewrite(path, "W", offset=10_000)
    _refused(path, "'W'", "runs past the end of the file")


def test_oversized_declared_tensor_refused(tmp_path):
    """W declares (4000, 3) floats (48,000 bytes) over 48 bytes of data: refused before anything is read."""
    path = _save_external(tmp_path / "big")
    model = onnx.load(str(path), load_external_data=False)
    w = next(t for t in model.graph.initializer if t.name == "W")
    w.dims[0] = 4000
    entries = {e.key: e.value for e in w.external_data}
    del w.external_data[:]
    for key, value in entries.items():
        if key != "length":
            w.external_data.add(key=key, value=value)
    path.write_bytes(model.SerializeToString())
    _refused(path, "'W'", "48,000 bytes", "holds")


def test_huge_declared_tensor_charged_before_reading(tmp_path):
    """A tensor that declares more than the memory limit is refused by the budget, not allocated."""
    path = _save_external(tmp_path / "huge")
    big = tmp_path / "huge" / "m.data"
    with open(big, "r+b") as f:  # a sparse file: large on paper, nothing on disk
        f.truncate(64 * 2**20)
    model = onnx.load(str(path), load_external_data=False)
    w = next(t for t in model.graph.initializer if t.name == "W")
    w.dims[:] = [4 * 2**20, 3]  # 48 MiB
    _rewrite_model = model.SerializeToString()
    path.write_bytes(_rewrite_model)
    _rewrite(path, "W", length=48 * 2**20, offset=0)
    with pytest.raises(ModelFileError) as info:
        load_model(path, limits=ReadLimits(max_model_bytes=16 * 2**20))
    assert "over the limit" in str(info.value) and "'W'" in str(info.value)


def test_inline_raw_data_shorter_than_dims_refused(tmp_path):
    model = _small_model()
    w = model.graph.initializer[0]
    w.raw_data = w.raw_data[:8]
    path = tmp_path / "short.onnx"
    path.write_bytes(model.SerializeToString())
    _refused(path, "'W'", "48 bytes", "stores 8 bytes")


def test_custom_domain_node_refused(tmp_path):
    model = _small_model()
    model.graph.node.append(helper.make_node("FusedGelu", ["y"], ["z"], name="gelu_1", domain="com.microsoft"))
    model.graph.output[0].name = "z"
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    path = tmp_path / "custom.onnx"
    path.write_bytes(model.SerializeToString())
    _refused(path, "'gelu_1'", "'FusedGelu'", "'com.microsoft'", "custom-operator library")


def test_unknown_operator_in_the_standard_domain_refused(tmp_path):
    model = _small_model()
    model.graph.node[1].op_type = "MyAdd"
    path = tmp_path / "unknown.onnx"
    path.write_bytes(model.SerializeToString())
    _refused(path, "'add'", "'MyAdd'")


def test_not_an_onnx_file_refused(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\xff\xfe this is not a protobuf \x00\x01" * 4)
    _refused(path, "junk.onnx", "ONNX")


def test_checker_error_kept_as_the_cause(tmp_path):
    model = _small_model()
    model.graph.node[0].input[1] = "missing"
    path = tmp_path / "invalid.onnx"
    path.write_bytes(model.SerializeToString())
    _refused(path, "not a valid ONNX model", "missing")


def test_missing_onnx_names_the_extra(tmp_path, monkeypatch):
    from bnkit.frameworks import MissingFramework

    path = _save_external(tmp_path / "noonnx")
    monkeypatch.setitem(sys.modules, "onnx", None)  # what an environment without onnx gives import onnx
    with pytest.raises((MissingFramework, ModelFileError)) as info:
        load_model(path)
    assert "pip install 'bnkit[onnx]'" in str(info.value) and "\n" not in str(info.value)


def test_import_bnkit_imports_neither_onnx_nor_onnxruntime():
    env = dict(os.environ, PYTHONPATH=str(SRC))
    code = (
        "import sys, bnkit, bnkit.io, bnkit.summarize, bnkit.diagnose.lint\n"
        "print(sorted(m for m in ('onnx', 'onnxruntime', 'onnxscript') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_custom_node_inside_a_subgraph_refused(tmp_path):
    """An If branch is a graph too: its nodes are checked like the main graph's."""
    branch = helper.make_graph(
        [helper.make_node("Evil", ["x"], ["o"], name="hidden", domain="my.ops")], "then",
        [], [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["o2"], name="same")], "else",
        [], [helper.make_tensor_value_info("o2", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    cond = numpy_helper.from_array(np.array(True), "c")
    node = helper.make_node("If", ["c"], ["y"], name="branch", then_branch=branch, else_branch=other)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [cond],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)])
    path = tmp_path / "if.onnx"
    path.write_bytes(model.SerializeToString())
    _refused(path, "'hidden'", "'Evil'", "'my.ops'", "node 'branch' attribute 'then_branch'")


def test_constant_attribute_with_external_data_out_of_folder_refused(tmp_path):
    """A Constant node's tensor may be stored outside the model too: the same rules apply."""
    (tmp_path / "outside.bin").write_bytes(b"\0" * 64)
    folder = tmp_path / "model"
    folder.mkdir()
    value = TensorProto(name="k", data_type=TensorProto.FLOAT, dims=[4])
    value.data_location = TensorProto.EXTERNAL
    for key, text in (("location", "../outside.bin"), ("offset", "0"), ("length", "16")):
        value.external_data.add(key=key, value=text)
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["y"], name="const", value=value)], "g", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )  # fmt: skip
    path = folder / "const.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    _refused(path, "node 'const''s attribute 'value'", "'../outside.bin'", "leads out of the model's folder")


def test_model_local_function_is_read_and_its_body_checked(tmp_path):
    """A call of a function defined in the model is standard operators in the end: read, and run by onnxruntime;
    a custom operator inside the function's body is refused by name."""

    def model_with(body_op, body_domain=""):
        body = [helper.make_node(body_op, ["a", "b"], ["c"], name="inner", domain=body_domain)]
        opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(body_domain, 1)] if body_domain else [])
        function = helper.make_function("local.fns", "MyAdd", ["a", "b"], ["c"], body, opsets)
        model = _small_model()
        model.graph.node[1].op_type, model.graph.node[1].domain = "MyAdd", "local.fns"
        model.opset_import.append(helper.make_opsetid("local.fns", 1))
        model.functions.append(function)
        return model

    path = tmp_path / "fn.onnx"
    path.write_bytes(model_with("Add").SerializeToString())
    x = np.ones((1, 4), np.float32)
    np.testing.assert_allclose(_run(load_model(path), x), _run(_small_model(), x), rtol=1e-6)
    path.write_bytes(model_with("Evil", "my.ops").SerializeToString())
    _refused(path, "'inner'", "'Evil'", "function local.fns.MyAdd")
