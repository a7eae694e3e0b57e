"""Real torchvision networks exported by torch's two ONNX exporters, converted back to PyTorch and on to
Keras, against onnxruntime running the ``.onnx`` (random weights, randomised batch-norm statistics).

A few, to stay fast; ``benchmarks/onnx_files.py`` runs the whole coverage table.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from bnkit.convert import onnx_to_torch, torch_to_keras  # noqa: E402
from conftest import import_torchvision  # noqa: E402
from convert.real_networks import randomize_normalization  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")
TOL = 1e-5


def _export(name, path, dynamo: bool, opset: int, size=64):
    tv = import_torchvision()
    model = getattr(tv.models, name)(weights=None, num_classes=10).eval()
    randomize_normalization(model)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path), dynamo=dynamo, opset_version=opset)
    return onnx.load(str(path))


def _relative(got, ref):
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def _check(model, path, keras=True):
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype("float32")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (ref,) = session.run(None, {session.get_inputs()[0].name: x})
    gm = onnx_to_torch(model)
    with torch.no_grad():
        assert _relative(gm(torch.from_numpy(x)).numpy(), ref) <= TOL
    if keras:
        km = torch_to_keras(gm, (3, 64, 64))
        assert _relative(km.predict(np.moveaxis(x, 1, -1), verbose=0), ref) <= TOL
    return gm


@pytest.mark.parametrize(
    "name,dynamo,opset",
    [("resnet18", True, 18), ("mobilenet_v3_small", False, 9), ("shufflenet_v2_x0_5", False, 13)],
)
def test_network_round_trip(tmp_path, name, dynamo, opset):
    path = tmp_path / f"{name}.onnx"
    _check(_export(name, path, dynamo, opset), path)


def test_batch_norms_kept_by_the_exporter_stay_onnx_batch_norms(tmp_path):
    """densenet121's BNs after a concat or a ReLU are nodes in the export; each comes back as an
    onnx-convention batch norm with the node's epsilon and momentum, and one training step of the
    converted network updates the running statistics as ONNX's formula says."""
    from bnkit.torch import BatchNorm2d

    tv = import_torchvision()
    model = tv.models.densenet121(weights=None, num_classes=10).features[:5].eval()  # stem + first dense block
    randomize_normalization(model)
    path = tmp_path / "dense.onnx"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(model, (torch.zeros(1, 3, 64, 64),), str(path), dynamo=False, opset_version=17)
    proto = onnx.load(str(path))
    nodes = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    gm = _check(proto, path, keras=False)
    bns = [m for m in gm.modules() if isinstance(m, BatchNorm2d)]
    assert len(bns) == len(nodes) >= 6
    assert all(bn.convention.name == "onnx" and bn.momentum == pytest.approx(0.9) for bn in bns)
    bn = bns[0]
    before = bn.running_mean.clone()
    gm.train()
    x = torch.randn(2, 3, 64, 64)
    captured = {}
    bn.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0].detach().clone()))
    with torch.no_grad():
        gm(x)
    batch_mean = captured["x"].mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean, 0.9 * before + 0.1 * batch_mean, rtol=1e-5, atol=1e-6)


def test_cli_converts_an_export_to_keras(tmp_path):
    from bnkit.cli import main

    path = tmp_path / "sq.onnx"
    _export("squeezenet1_0", path, False, 17)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["convert", str(path), str(tmp_path / "sq.keras"), "--json"]) == 0
    report = json.loads(out.getvalue())
    assert report["from"] == "onnx" and report["to"] == "keras" and report["relative_difference"] <= 1e-5
    assert (tmp_path / "sq.keras").exists()
