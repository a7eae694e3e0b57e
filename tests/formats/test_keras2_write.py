"""Keras 2 ``.h5`` files written by bnkit (``bnkit.formats.keras_h5.write``), loaded by the real tf-keras 2.21.

Real networks and real tools: torchvision ResNet-18 and MobileNetV2 converted by bnkit, keras.applications
MobileNet, a PyTorch module of the operations bnkit's converter writes as Keras operations, and a Keras
model of the other layer classes bnkit writes; each is written as ``.h5``, loaded by tf-keras 2.21 in one
subprocess (TensorFlow is imported once, beside this test process, which holds torch; each file is loaded
as soon as it is written), and its outputs
compared with the source model's (PyTorch's or Keras 3's) on the same input. Batch norms are also checked
in training: one step of tf-keras on the written file against one step of PyTorch (``train()``) and of
Keras 3, outputs and moving statistics.

Tolerance: relative to the largest output, 1e-5. TensorFlow and PyTorch (or Keras 3 on torch) sum
convolutions and matrix products in other orders, so float32 results differ by a few units in the last
place per layer (measured here: below 1.1e-6); a misplaced weight or another formula is off by far more.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnkit.torch as bt
from bnkit.convert import torch_to_keras
from bnkit.io import ModelFileError, load_model, save_model
from bnkit.keras import keras
from bnkit.lifecycle.fold import fold_bn
from conftest import import_torchvision
from convert.real_networks import randomize_normalization  # every batch norm 1d/2d: statistics, gamma, beta

L = keras.layers
RTOL = 1e-5

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tf_keras") is None, reason="tf-keras 2 not installed")

# Loads each job's .h5 with tf-keras 2 as soon as it is written (a job a line) and runs it on the job's
# input; for "train", one call with training=True, and every batch norm's weights after it.
_TF_KERAS = r"""
import json, sys
import numpy as np
import tf_keras
for line in sys.stdin:
    job = json.loads(line)
    model = tf_keras.models.load_model(job["file"], compile=False)
    data = np.load(job["x"])
    x = [data[f"x{i}"] for i in range(len(data.files))]
    y = model(x[0] if len(x) == 1 else x, training=job["train"])
    out = {f"y{i}": v.numpy() for i, v in enumerate(y)} if isinstance(y, (list, tuple)) else {"y": y.numpy()}
    for layer in model.layers:
        if isinstance(layer, tf_keras.layers.BatchNormalization):
            out.update({f"{layer.name}/{w.name.split('/')[-1].split(':')[0]}": w.numpy() for w in layer.weights})
            out[f"{layer.name}/fused"] = np.array(bool(layer.fused))
    np.savez(job["out"], **out)
    print("done", flush=True)
"""


def _start_tf_keras():
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen(
        [sys.executable, "-c", _TF_KERAS], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env,
    )  # fmt: skip


class _Operations(nn.Module):
    """What bnkit's converter writes as Keras operations (x * c, x + c, -x, x / c, c - x, maximum) or
    activations (leaky ReLU, SiLU, ELU, GELU, ReLU6, log-softmax), around convolutions and batch norms."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.dw_bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x):
        x = F.leaky_relu(self.bn(self.conv(x)), 0.1) * 2.0 + 1.0
        x = 1.0 - (-x / 3.0)
        y = F.elu(F.silu(self.dw_bn(self.dw(x))))
        x = torch.cat([torch.clamp(x, min=0), y], 1)
        x = F.max_pool2d(F.gelu(x) + F.relu6(x), 2)
        x = torch.maximum(x, x * 0.5)
        return F.log_softmax(self.fc(x.flatten(1)), 1)


def _keras_layers_model():
    """Keras layers the converter does not write but Keras users have, which bnkit writes to .h5."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 3))
    x = L.SeparableConv2D(6, 3, padding="same", name="sep")(inputs)
    x = L.LeakyReLU(0.2, name="leaky")(L.Cropping2D(1, name="crop")(x))
    x = L.LayerNormalization(name="ln")(L.Rescaling(0.5, offset=0.25, name="rescale")(x))
    a = L.AveragePooling2D(2, name="avg")(x)
    b = L.Activation("mish", name="mish")(L.Permute((2, 1, 3), name="permute")(a))
    x = L.Concatenate(name="concat")([L.Subtract(name="sub")([a, b]), L.Multiply(name="mul")([a, b])])
    x = L.Reshape((25, 12), name="reshape")(L.Identity(name="identity")(x))
    x = L.Softmax(axis=1, name="softmax")(L.Dropout(0.5, name="dropout")(x))
    x = L.GlobalMaxPooling1D(name="gmp")(x)
    x = L.BatchNormalization(momentum=0.9, name="bn_flat")(L.Dense(8, activation="selu", name="dense")(x))
    model = keras.Model(inputs, L.Dense(4, name="head")(x), name="keras_layers")
    bn = model.get_layer("bn_flat")
    bn.moving_mean.assign(np.linspace(-0.3, 0.3, 8).astype("float32"))
    bn.moving_variance.assign(np.linspace(0.5, 1.5, 8).astype("float32"))
    return model


def _keras_sequential_model():
    """A Sequential with bnkit's PyTorch-convention batch norm on a 2-D input (written between two Reshapes)."""
    from bnkit.keras import BatchNormalization

    keras.utils.set_random_seed(2)
    bn = BatchNormalization(convention="torch", momentum=0.2, name="torch_bn")
    model = keras.Sequential([keras.Input((5,)), L.Dense(4, name="dense"), bn, L.Dense(2, name="head")], name="seq")
    bn.moving_variance.assign(np.linspace(0.5, 2.0, 4).astype("float32"))
    return model


def _keras_shared_layer_model():
    """Two inputs, a layer called on both (two nodes), two outputs."""
    keras.utils.set_random_seed(3)
    a, b = keras.Input((6,), name="a"), keras.Input((6,), name="b")
    shared = L.Dense(3, name="shared")
    ya, yb = shared(a), shared(b)
    outputs = [L.Add(name="sum")([ya, yb]), L.Activation("tanh", name="tanh")(yb)]
    return keras.Model([a, b], outputs, name="shared_layer")


def _keras_conv_relu_bn_model():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 3))
    x = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, activation="relu", name="conv")(inputs))
    model = keras.Model(inputs, L.Dense(2, name="head")(L.Flatten(name="flatten")(x)), name="conv_relu_bn")
    bn = model.get_layer("bn")
    bn.set_weights([np.linspace(0.5, 1.5, 4), np.linspace(-0.5, 0.5, 4), np.linspace(-1, 1, 4), np.linspace(0.5, 2, 4)])
    return model


def _keras_batch_norm_model(renorm=False):
    keras.utils.set_random_seed(4)
    inputs = keras.Input((6, 6, 3))
    renormalization = dict(renorm=True, renorm_clipping={"rmax": 2.0, "rmin": 0.5, "dmax": 1.0}, renorm_momentum=0.9)
    bn = L.BatchNormalization(momentum=0.8, epsilon=1e-4, name="bn", **(renormalization if renorm else {}))
    model = keras.Model(inputs, bn(L.Conv2D(4, 3, name="conv")(inputs)), name="keras_bn")
    for i, weight in enumerate(bn.non_trainable_weights):
        weight.assign(np.linspace(0.5, 2.0, 4).astype("float32") + i / 10)
    return model


def _keras_numpy(tensor) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(tensor))


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Every case written by bnkit as .h5, run by tf-keras 2.21: ``{name: (file, expected, tf-keras' npz)}``.
    ``expected`` holds the source model's own outputs (and statistics, for the training cases)."""
    folder = tmp_path_factory.mktemp("keras2_write")
    tf_keras = _start_tf_keras()  # TensorFlow imports while the files are written
    rng = np.random.default_rng(0)
    cases = {}

    def add(name, keras_model, x, expected, train=False, written=False):
        path = folder / f"{name}.h5"
        if not written:
            save_model(keras_model, path)
        np.savez(folder / f"{name}_x.npz", **{f"x{i}": a for i, a in enumerate(x if isinstance(x, list) else [x])})
        job = {"file": str(path), "x": str(folder / f"{name}_x.npz"), "train": train, "out": str(folder / name)}
        tf_keras.stdin.write(json.dumps(job) + "\n")
        tf_keras.stdin.flush()
        cases[name] = (path, x, expected)

    torchvision = import_torchvision()
    x = rng.standard_normal((2, 3, 32, 32)).astype("float32")
    for name in ("resnet18", "mobilenet_v2"):
        torch.manual_seed(0)
        net = getattr(torchvision.models, name)(num_classes=10).eval()
        randomize_normalization(net)
        with torch.no_grad():
            expected = net(torch.from_numpy(x)).numpy()
        add(name, torch_to_keras(net, (3, 32, 32)), _nhwc(x), {"y": expected})

    keras.utils.set_random_seed(0)
    app = keras.applications.MobileNet(input_shape=(32, 32, 3), alpha=0.25, weights=None, classes=10)
    for layer in app.layers:
        if isinstance(layer, L.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.uniform(-0.5, 0.5, c), rng.uniform(-0.5, 0.5, c),
                               rng.uniform(0.5, 2.0, c)])  # fmt: skip
    xk = rng.standard_normal((2, 32, 32, 3)).astype("float32")
    add("keras_mobilenet", app, xk, {"y": _keras_numpy(app(xk, training=False))})

    operations = _Operations().eval()
    randomize_normalization(operations, seed=1)
    x16 = rng.standard_normal((2, 3, 16, 16)).astype("float32")
    with torch.no_grad():
        expected = operations(torch.from_numpy(x16)).numpy()
    add("operations", torch_to_keras(operations, (3, 16, 16)), _nhwc(x16), {"y": expected})

    layers = _keras_layers_model()
    x12 = rng.standard_normal((2, 12, 12, 3)).astype("float32")
    add("keras_layers", layers, x12, {"y": _keras_numpy(layers(x12, training=False))})

    sequential, shared = _keras_sequential_model(), _keras_shared_layer_model()
    x5 = rng.standard_normal((3, 5)).astype("float32")
    add("sequential", sequential, x5, {"y": _keras_numpy(sequential(x5, training=False))})
    pair = [rng.standard_normal((3, 6)).astype("float32") for _ in range(2)]
    add("shared_layer", shared, pair, {f"y{i}": _keras_numpy(y) for i, y in enumerate(shared(pair, training=False))})

    folded = fold_bn(_keras_conv_relu_bn_model())  # the batch norm after a ReLU becomes a ChannelAffine
    x8 = rng.standard_normal((2, 8, 8, 3)).astype("float32")
    add("folded", folded, x8, {"y": _keras_numpy(folded(x8, training=False))})

    # training: PyTorch's batch norm (unbiased running variance, momentum on the new value) ...
    torch_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3, eps=1e-4))
    randomize_normalization(torch_bn, seed=2)
    x6 = rng.standard_normal((4, 3, 6, 6)).astype("float32")
    converted = torch_to_keras(torch_bn.eval(), (3, 6, 6))
    with torch.no_grad():
        y = torch_bn.train()(torch.from_numpy(x6)).numpy()
    stats = {"mean": torch_bn[1].running_mean.numpy(), "variance": torch_bn[1].running_var.numpy()}
    add("torch_bn_training", converted, _nhwc(x6), {"y": y, **stats}, train=True)
    linear = _Linear(momentum=0.3)  # BatchNorm1d: written between two Reshapes, as a 4-D fused batch norm
    randomize_normalization(linear, seed=3)
    x4 = rng.standard_normal((5, 4)).astype("float32")
    converted = torch_to_keras(linear.eval(), (4,))
    with torch.no_grad():
        y = linear.train()(torch.from_numpy(x4)).numpy()
    stats = {"mean": linear.bn.running_mean.numpy(), "variance": linear.bn.running_var.numpy()}
    add("torch_bn1d_training", converted, x4, {"y": y, **stats}, train=True)
    # ... and Keras' (biased, momentum on the old value)
    keras_bn = _keras_batch_norm_model()
    x6k = _nhwc(x6)
    save_model(keras_bn, folder / "keras_bn_training.h5")  # before the training step changes the statistics
    y = _keras_numpy(keras_bn(x6k, training=True))
    bn = keras_bn.get_layer("bn")
    stats = {"mean": _keras_numpy(bn.moving_mean), "variance": _keras_numpy(bn.moving_variance)}
    add("keras_bn_training", keras_bn, x6k, {"y": y, **stats}, train=True, written=True)
    renorm = _keras_batch_norm_model(renorm=True)  # batch renormalization: tf-keras 2's is Keras 3's
    save_model(renorm, folder / "keras_renorm_training.h5")
    y = _keras_numpy(renorm(x6k, training=True))
    stats = {w.name: _keras_numpy(w) for w in renorm.get_layer("bn").non_trainable_weights}
    stats["mean"], stats["variance"] = stats.pop("moving_mean"), stats.pop("moving_variance")
    add("keras_renorm_training", renorm, x6k, {"y": y, **stats}, train=True, written=True)

    out, err = tf_keras.communicate(timeout=300)
    assert tf_keras.returncode == 0 and out.split() == ["done"] * len(cases), err[-3000:]
    return {name: (*case, dict(np.load(folder / f"{name}.npz"))) for name, case in cases.items()}


def _relative(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


_INFERENCE = ["resnet18", "mobilenet_v2", "keras_mobilenet", "operations", "keras_layers", "sequential", "shared_layer"]


@pytest.mark.parametrize("name", [*_INFERENCE, "folded"])
def test_tf_keras_loads_the_file_and_computes_what_the_source_model_computes(written, name):
    _, _, expected, tf_keras_out = written[name]
    outputs = [key for key in expected if key.startswith("y")]
    assert outputs and sorted(outputs) == sorted(key for key in tf_keras_out if key.startswith("y"))
    for key in outputs:
        assert _relative(tf_keras_out[key], expected[key]) <= RTOL


@pytest.mark.parametrize("name", ["operations", "keras_layers"])
def test_bnkit_reads_the_file_back_as_the_source_model(written, name):
    """(The writer itself reads every file back against the model it wrote; here against the source.)"""
    path, x, expected, _ = written[name]
    assert _relative(_keras_numpy(load_model(path)(x, training=False)), expected["y"]) <= RTOL


@pytest.mark.parametrize("name", ["torch_bn_training", "torch_bn1d_training"])
def test_pytorch_batch_norms_are_written_fused_and_train_in_tf_keras_as_in_pytorch(written, name):
    """tf-keras 2's fused batch norm updates its moving variance with the unbiased batch variance, as
    PyTorch does; its momentum weighs the old value (1 - 0.3 = 0.7 here). A BatchNorm1d runs on its
    input reshaped to 4-D (N, 1, 1, C): the same values per channel."""
    path, _, expected, tf_keras_out = written[name]
    name = next(k.split("/")[0] for k in tf_keras_out if k.endswith("/fused"))
    assert bool(tf_keras_out[f"{name}/fused"])
    y = expected["y"] if expected["y"].ndim == 2 else _nhwc(expected["y"])
    np.testing.assert_allclose(tf_keras_out["y"], y, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(tf_keras_out[f"{name}/moving_mean"], expected["mean"], rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(tf_keras_out[f"{name}/moving_variance"], expected["variance"], rtol=RTOL, atol=1e-6)


def test_the_pytorch_networks_batch_norms_are_all_fused(written):
    resnet = [bool(v) for k, v in written["resnet18"][3].items() if k.endswith("/fused")]
    assert len(resnet) == 20 and all(resnet)


@pytest.mark.parametrize("name", ["keras_bn_training", "keras_renorm_training"])
def test_keras_batch_norms_are_written_unfused_and_train_in_tf_keras_as_in_keras_3(written, name):
    """Fused, tf-keras 2 would update the moving variance with the unbiased variance; Keras 3 uses the biased one."""
    _, _, expected, tf_keras_out = written[name]
    assert not bool(tf_keras_out["bn/fused"])
    for statistic in ("moving_stddev", "renorm_mean", "renorm_stddev"):
        if statistic in expected:
            np.testing.assert_allclose(tf_keras_out[f"bn/{statistic}"], expected[statistic], rtol=RTOL, atol=1e-6)
    application = [bool(v) for k, v in written["keras_mobilenet"][3].items() if k.endswith("/fused")]
    assert len(application) == 27 and not any(application)
    np.testing.assert_allclose(tf_keras_out["y"], expected["y"], rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(tf_keras_out["bn/moving_mean"], expected["mean"], rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(tf_keras_out["bn/moving_variance"], expected["variance"], rtol=RTOL, atol=1e-6)


class _Linear(nn.Module):
    def __init__(self, momentum=0.1) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 3), nn.BatchNorm1d(3, momentum=momentum)

    def forward(self, x):
        return self.bn(self.fc(x))


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.scale = nn.Conv2d(3, 4, 1), nn.Parameter(torch.full((4, 1, 1), 0.5))

    def forward(self, x):
        return self.conv(x) * self.scale


@pytest.mark.parametrize(
    "module, shape, fragments",
    [
        (nn.Sequential(nn.Conv2d(3, 4, 1), bt.BatchNorm2d(4, renorm=True)), (3, 5, 5),
         ("layer '_1' (BatchNormalization, convention='torch')", "renorm=True with the unbiased")),
        (nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4)), (3, 5, 5),
         ("layer '_1' (BatchNormalization, convention='torch')", "synchronized=True with the unbiased")),
        (nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=None)), (3, 5, 5),
         ("layer '_1' (BatchNormalization, convention='torch')", "momentum=None")),
        (nn.Sequential(nn.Conv2d(3, 4, 1), nn.Hardsigmoid()), (3, 5, 5),
         ("layer '_1' (Activation)", "activation 'hard_sigmoid'", "0.2·x + 0.5")),
        (_Scaled(), (3, 5, 5), ("layer 'mul' (bnkit>ElementwiseConstant)", "bnkit's own Keras layer")),
        (nn.Sequential(nn.Conv2d(3, 4, 1), nn.GELU(approximate="tanh")), (3, 5, 5),
         ("layer '_1' (Activation)", "activation 'bnkit>gelu_tanh'")),
        (nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(2)), (3, 5, 5),
         ("layer '_1' (AdaptiveAveragePooling2D)", "no Keras 2 translation")),
    ],
)  # fmt: skip
def test_what_tf_keras_2_could_not_load_exactly_is_refused_by_layer_in_one_line(tmp_path, module, shape, fragments):
    converted = torch_to_keras(module.eval(), shape)
    with pytest.raises(ModelFileError) as caught:
        save_model(converted, tmp_path / "model.h5")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'model.h5'}: not written")
    for fragment in fragments:
        assert fragment in message
    assert os.listdir(tmp_path) == []  # no file, no temporary file


def test_with_keras_batch_norms_the_same_module_is_written(tmp_path):
    converted = torch_to_keras(_Linear().eval(), (4,), semantics="target")
    save_model(converted, tmp_path / "model.h5")
    x = np.random.default_rng(0).standard_normal((3, 4)).astype("float32")
    got = _keras_numpy(load_model(tmp_path / "model.h5")(x, training=False))
    np.testing.assert_allclose(got, _keras_numpy(converted(x, training=False)), rtol=RTOL, atol=1e-6)


def test_an_existing_file_is_replaced_only_with_force(tmp_path):
    model = _keras_batch_norm_model()
    path = tmp_path / "model.h5"
    path.write_bytes(b"keep me")
    with pytest.raises(ModelFileError, match="already exists; pass --force"):
        save_model(model, path)
    assert path.read_bytes() == b"keep me"
    save_model(model, path, force=True)
    assert load_model(path).get_layer("bn").momentum == pytest.approx(0.8)
    assert sorted(os.listdir(tmp_path)) == ["model.h5"]


def test_save_model_names_the_keras_formats(tmp_path):
    with pytest.raises(ModelFileError, match=r"\.keras or \.h5 files hold Keras models; convert the PyTorch"):
        save_model(nn.Linear(2, 2), tmp_path / "m.h5")
    with pytest.raises(ModelFileError, match=r"a Keras model is saved as \.keras or \.h5; got suffix '\.pt'"):
        save_model(_keras_batch_norm_model(), tmp_path / "m.pt")


def _main(capsys, *argv):
    from bnkit.cli import main

    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert status == 0, err
    return json.loads(out)


def test_bnkit_convert_writes_h5_from_pt2_and_from_keras(tmp_path, capsys):
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    randomize_normalization(module)
    save_model(module.eval(), tmp_path / "m.pt2", input_shape=(3, 6, 6))
    report = _main(capsys, "convert", tmp_path / "m.pt2", tmp_path / "m.h5", "--json")
    assert (report["from"], report["to"]) == ("torch", "keras")
    assert report["relative_difference"] <= 1e-5 and report["read_back"]["relative_difference"] <= 1e-5
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype("float32")
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    assert _relative(_keras_numpy(load_model(tmp_path / "m.h5")(_nhwc(x), training=False)), expected) <= RTOL

    _keras_batch_norm_model().save(tmp_path / "k.keras")
    report = _main(capsys, "convert", tmp_path / "k.keras", tmp_path / "k.h5", "--json")
    assert (report["from"], report["to"]) == ("keras", "keras")
    assert report["read_back"]["relative_difference"] <= 1e-5
    assert load_model(tmp_path / "k.h5").get_layer("bn").momentum == pytest.approx(0.8)
