"""bnkit's ONNX writer (bnkit.formats.onnx_write) against the real tools: files run by onnxruntime
against real torch.nn modules and real Keras models, every batch norm a BatchNormalization node with
the layer's epsilon and its momentum in ONNX's meaning (checked on the file with onnx itself)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from bnkit.formats import ModelFileError  # noqa: E402
from bnkit.formats.onnx_write import newest_opset, write  # noqa: E402
from bnkit.keras import keras  # noqa: E402

L = keras.layers
TOL = 1e-5  # relative to the largest output, as the writer's own check


def run_file(path, *inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: x for i, x in zip(session.get_inputs(), inputs, strict=True)}
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))


def relative(expected, got) -> float:
    expected, got = np.asarray(expected), np.asarray(got)
    return float(np.max(np.abs(expected - got)) / max(float(np.max(np.abs(expected))), 1e-30))


def batch_norm_nodes(path) -> list:
    model = onnx.load(str(path))
    return [
        (n.name, {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}, len(n.output))
        for n in model.graph.node
        if n.op_type == "BatchNormalization"
    ]


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return module.eval()


def ort_opsets() -> list[int]:
    """Opsets from 9 to the newest onnx defines (onnxruntime 1.32 runs them all): old, the exporter's newest, newer."""
    return [9, 11, 13, 14, 15, 17, 20, 21, 23, newest_opset()]


# ------------------------------------------------------------------------------------------ op grid


def _conv_bn():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6, eps=1e-3, momentum=0.3), nn.ReLU())


def _relu_bn():
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.BatchNorm2d(6, eps=2e-5), nn.Flatten(), nn.Linear(216, 4))


def _bn1d():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 7), nn.BatchNorm1d(7, eps=1e-4, momentum=0.05))


def _bn_no_affine():
    return nn.Sequential(nn.Conv2d(3, 5, 1, bias=False), nn.BatchNorm2d(5, affine=False, eps=0.01))


def _bnkit_keras_convention():
    from bnkit.torch import BatchNorm2d

    return nn.Sequential(nn.Conv2d(3, 4, 3), BatchNorm2d(4, convention="keras", momentum=0.97, eps=1e-3))


CASES = {
    "conv_bn": (_conv_bn, (3, 8, 8), [(1e-3, 0.7)]),
    "relu_bn": (_relu_bn, (3, 8, 8), [(2e-5, 0.9)]),
    "bn1d": (_bn1d, (3, 8, 8), [(1e-4, 0.95)]),
    "no_affine": (_bn_no_affine, (3, 8, 8), [(0.01, 0.9)]),
    "bnkit_keras": (_bnkit_keras_convention, (3, 8, 8), [(1e-3, 0.97)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("opset", [9, 13, 17])
def test_torch_layers_against_onnxruntime(tmp_path, case, opset):
    build, shape, expected = CASES[case]
    torch.manual_seed(0)
    module = randomize(build())
    path = tmp_path / "m.onnx"
    result = write(module, path, input_shape=shape, opset=opset)
    x = np.random.default_rng(1).standard_normal((3, *shape)).astype("float32")  # not the writer's batch of 2
    with torch.no_grad():
        reference = module(torch.from_numpy(x)).numpy()
    (got,) = run_file(path, x).values()
    assert relative(reference, got) <= TOL
    nodes = batch_norm_nodes(path)
    assert result.batch_norms == len(nodes) == len(expected)
    for (_, attributes, outputs), (eps, momentum) in zip(nodes, expected, strict=True):
        assert attributes["epsilon"] == np.float32(eps)  # the layer's eps, as ONNX's float attribute holds it
        assert attributes["momentum"] == pytest.approx(momentum, abs=1e-7)
        assert outputs == 1 and attributes.get("training_mode", 0) == 0
    assert onnx.load(str(path)).opset_import[0].version == opset


@pytest.mark.parametrize("opset", ort_opsets())
def test_every_opset_runs(tmp_path, opset):
    """A conv followed by a batch norm (the pair the exporters fold) stays two nodes at every opset."""
    module = randomize(_conv_bn())
    path = tmp_path / "m.onnx"
    write(module, path, input_shape=(3, 8, 8), opset=opset)
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node] == ["Conv", "BatchNormalization", "Relu"]
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype("float32")
    with torch.no_grad():
        assert relative(module(torch.from_numpy(x)).numpy(), run_file(path, x)["output"]) <= TOL


def test_bn_node_named_after_its_layer(tmp_path):
    module = nn.Sequential()
    module.add_module("stem", nn.Conv2d(3, 4, 3))
    module.add_module("stem_bn", nn.BatchNorm2d(4))
    path = tmp_path / "m.onnx"
    write(randomize(module), path, input_shape=(3, 8, 8))
    assert [name for name, _, _ in batch_norm_nodes(path)] == ["stem_bn"]


# ------------------------------------------------------------------------------------------ Keras


def _keras_model(momentum=0.95, eps=1e-3):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same")(inputs)
    x = L.BatchNormalization(momentum=momentum, epsilon=eps, name="bn")(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    outputs = L.Dense(4)(x)
    model = keras.Model(inputs, outputs)
    bn = model.get_layer("bn")
    rng = np.random.default_rng(3)
    bn.moving_mean.assign(rng.uniform(-0.5, 0.5, 6).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2, 6).astype("float32"))
    bn.gamma.assign(rng.uniform(0.5, 1.5, 6).astype("float32"))
    bn.beta.assign(rng.uniform(-0.5, 0.5, 6).astype("float32"))
    return model


def test_keras_model_against_keras(tmp_path):
    model = _keras_model()
    path = tmp_path / "k.onnx"
    result = write(model, path)  # the input shape read from the model
    x = np.random.default_rng(4).standard_normal((3, 8, 8, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    (got,) = run_file(path, np.ascontiguousarray(np.moveaxis(x, -1, 1))).values()  # the file takes N, C, H, W
    assert relative(expected, got) <= TOL
    ((_, attributes, _),) = batch_norm_nodes(path)
    assert attributes["epsilon"] == np.float32(1e-3)
    assert attributes["momentum"] == pytest.approx(0.95, abs=1e-7)  # Keras' momentum weighs the old value, as ONNX's
    assert result.round_trip.relative <= TOL


@pytest.mark.parametrize("opset", [14, 17, 28])
def test_keras_training_mode_against_keras(tmp_path, opset):
    """Keras' convention in a training-mode file: onnxruntime's output and updated statistics are Keras'
    (opset 14: training_mode's first; 17: the default; 28: past the exporter's 20, through version_converter)."""
    model = _keras_model(momentum=0.9, eps=1e-3)
    path = tmp_path / "t.onnx"
    result = write(model, path, training=True, opset=min(opset, newest_opset()))
    ((name, attributes, outputs),) = batch_norm_nodes(path)
    assert attributes["training_mode"] == 1 and outputs == 3
    assert attributes["momentum"] == pytest.approx(0.9, abs=1e-7)
    x = np.random.default_rng(5).standard_normal((4, 8, 8, 3)).astype("float32")
    got = run_file(path, np.ascontiguousarray(np.moveaxis(x, -1, 1)))
    expected = keras.ops.convert_to_numpy(model(x, training=True))  # updates the moving statistics
    bn = model.get_layer("bn")
    # the batch statistics: Keras' E[x²]−E[x]² against onnxruntime's two passes, over 4·8·8 values
    assert relative(expected, got["output"]) <= 1e-4
    assert relative(keras.ops.convert_to_numpy(bn.moving_mean), got[f"{name}.running_mean"]) <= TOL
    assert relative(keras.ops.convert_to_numpy(bn.moving_variance), got[f"{name}.running_var"]) <= TOL
    assert result.training_error is not None and result.training_error <= 1e-4


# ------------------------------------------------------------------------------------------ refusals


def test_torch_convention_training_refused(tmp_path):
    module = randomize(_conv_bn())
    with pytest.raises(ModelFileError, match=r"layer '1' \(BatchNorm2d\).*unbiased.*biased") as e:
        write(module, tmp_path / "t.onnx", input_shape=(3, 8, 8), training=True)
    assert "\n" not in str(e.value)
    assert not os.listdir(tmp_path)


def test_no_running_statistics_refused(tmp_path):
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.raises(ModelFileError, match=r"layer '1' \(BatchNorm2d\).*track_running_stats=False"):
        write(module, tmp_path / "m.onnx", input_shape=(3, 8, 8))


def test_cumulative_average_training_refused(tmp_path):
    from bnkit.torch import BatchNorm1d

    module = nn.Sequential(nn.Linear(4, 3), BatchNorm1d(3, momentum=None, convention="torch")).eval()
    with pytest.raises(ModelFileError, match="momentum=None"):
        write(module, tmp_path / "m.onnx", input_shape=(4,), training=True)


@pytest.mark.parametrize("opset", [8, 0, 10_000, 14.0])
def test_opset_out_of_range_refused(tmp_path, opset):
    with pytest.raises(ModelFileError, match=f"opset .* not supported; give 9 to {newest_opset()}"):
        write(_conv_bn().eval(), tmp_path / "m.onnx", input_shape=(3, 8, 8), opset=opset)


def test_training_needs_opset_14(tmp_path):
    with pytest.raises(ModelFileError, match="training-mode file needs opset 14"):
        write(_keras_model(), tmp_path / "m.onnx", training=True, opset=13)


def test_no_overwrite_without_force_and_atomic(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"keep me")
    module = randomize(_conv_bn())
    with pytest.raises(ModelFileError, match="already exists; pass --force"):
        write(module, path, input_shape=(3, 8, 8))
    assert path.read_bytes() == b"keep me"
    # a refusal after the export: nothing written, nothing left beside it
    with pytest.raises(ModelFileError):
        write(module, path, input_shape=(3, 8, 8), training=True, force=True)
    assert path.read_bytes() == b"keep me" and sorted(os.listdir(tmp_path)) == ["m.onnx"]
    write(module, path, input_shape=(3, 8, 8), force=True)
    assert len(batch_norm_nodes(path)) == 1 and sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_wrong_input_shape_named(tmp_path):
    with pytest.raises(ModelFileError, match=r"does not run on inputs of shapes \[\(2, 4, 8, 8\)\]"):
        write(_conv_bn().eval(), tmp_path / "m.onnx", input_shape=(4, 8, 8))


def test_caller_model_untouched(tmp_path):
    module = randomize(_conv_bn())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    write(module, tmp_path / "m.onnx", input_shape=(3, 8, 8))
    assert isinstance(module[1], nn.BatchNorm2d) and not module.training
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


# ------------------------------------------------------------------------------------------ entry points


def test_save_model_writes_onnx(tmp_path):
    from bnkit.io import load_model, save_model

    path = save_model(randomize(_conv_bn()), tmp_path / "m.onnx", input_shape=(3, 8, 8))
    assert len(batch_norm_nodes(path)) == 1
    read = load_model(str(path))  # bnkit's safe reader takes the file: standard domains only
    assert [n.op_type for n in read.graph.node] == ["Conv", "BatchNormalization", "Relu"]


def test_resnet18_keeps_every_batch_norm(tmp_path):
    """torchvision's resnet18: torch.onnx.export folds all 20 batch norms; bnkit's file keeps them."""
    from conftest import import_torchvision

    torchvision = import_torchvision()
    torch.manual_seed(0)
    module = randomize(torchvision.models.resnet18(weights=None, num_classes=10))
    path = tmp_path / "r.onnx"
    result = write(module, path, input_shape=(3, 64, 64))
    nodes = batch_norm_nodes(path)
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert result.batch_norms == len(nodes) == len(bns) == 20
    assert all(a["epsilon"] == np.float32(1e-5) and a["momentum"] == pytest.approx(0.9) for _, a, _ in nodes)
    x = np.random.default_rng(6).standard_normal((2, 3, 64, 64)).astype("float32")
    with torch.no_grad():
        assert relative(module(torch.from_numpy(x)).numpy(), run_file(path, x)["output"]) <= TOL


def _cli(capsys, *argv):
    from bnkit.cli import main

    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_convert_keras_and_pt2_to_onnx(tmp_path, capsys):
    """``bnkit convert x.keras out.onnx`` and ``bnkit convert x.pt2 out.onnx``: the files keep their batch norms."""
    import json

    from bnkit.io import save_model

    keras_path = tmp_path / "m.keras"
    _keras_model().save(keras_path)
    status, out, _ = _cli(capsys, "convert", keras_path, tmp_path / "k.onnx", "--json")
    assert status == 0
    report = json.loads(out)
    assert report["from"] == "keras" and report["opset"] == 17 and report["relative_difference"] <= TOL
    assert [(r["epsilon"], round(r["momentum"], 6)) for r in report["batch_norms"]] == [(np.float32(1e-3), 0.95)]

    pt2 = save_model(randomize(_conv_bn()), tmp_path / "m.pt2", input_shape=(3, 8, 8))
    status, out, _ = _cli(capsys, "convert", pt2, tmp_path / "t.onnx", "--opset", "13")
    assert status == 0 and "1 BatchNormalization node" in out and "opset 13" in out
    assert [round(a["momentum"], 6) for _, a, _ in batch_norm_nodes(tmp_path / "t.onnx")] == [0.7]

    status, _, err = _cli(capsys, "convert", pt2, tmp_path / "t.onnx")
    assert status != 0 and "already exists" in err and len(err.strip().splitlines()) == 1
    status, _, err = _cli(capsys, "convert", pt2, tmp_path / "u.onnx", "--training")
    assert status != 0 and "unbiased" in err and len(err.strip().splitlines()) == 1


def test_frozen_batch_norms_are_inference_nodes(tmp_path):
    """torchvision's FrozenBatchNorm2d (fixed statistics, also in training) and bnkit's: inference nodes,
    in a training-mode file too."""
    from bnkit.torch.frozen import FrozenBatchNorm2d
    from conftest import import_torchvision

    torchvision = import_torchvision()
    frozen = torchvision.ops.misc.FrozenBatchNorm2d(4, eps=1e-4)
    g = torch.Generator().manual_seed(1)
    for name in ("weight", "bias", "running_mean"):
        getattr(frozen, name).copy_(torch.rand(4, generator=g) - 0.5)
    frozen.running_var.copy_(torch.rand(4, generator=g) + 0.5)
    ours = FrozenBatchNorm2d.from_batchnorm(randomize(nn.BatchNorm2d(4, eps=2e-3)))
    module = nn.Sequential(nn.Conv2d(3, 4, 3), frozen, nn.ReLU(), ours).eval()
    x = np.random.default_rng(8).standard_normal((2, 3, 8, 8)).astype("float32")
    for training in (False, True):
        path = tmp_path / f"f{training}.onnx"
        write(module, path, input_shape=(3, 8, 8), training=training)
        nodes = batch_norm_nodes(path)
        assert [(np.float32(a["epsilon"]), a.get("training_mode", 0), n) for _, a, n in nodes] == [
            (np.float32(1e-4), 0, 1), (np.float32(2e-3), 0, 1)
        ]  # fmt: skip
        with torch.no_grad():
            assert relative(module(torch.from_numpy(x)).numpy(), run_file(path, x)["output"]) <= TOL
