"""compare on real networks: keras.applications ResNet50, InceptionV3 and DenseNet121 converted with
keras_to_torch, torchvision resnet18 and googlenet converted with torch_to_keras (random weights,
randomised batch-norm statistics, small inputs, batch 2).

Exact conversions — the PyTorch side written to .pt2 and read back — get no cause; deliberate
faults are named at the layer they were put in: one batch norm's eps changed, one convolution's
weights replaced, one batch norm left in training mode, a Flatten order not permuted, a momentum
copied literally.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _networks import KERAS_APPS, TORCHVISION, keras_app, keras_batch, torch_batch, torchvision_net
from torch import nn

from bnkit.convert import keras_to_torch, torch_to_keras
from bnkit.diagnose.compare import compare
from bnkit.io import load_model, save_model
from bnkit.keras import keras

pytestmark = pytest.mark.slow


class Pair:
    """A network, its exact conversion and a batch in the source's layout."""

    def __init__(self, name: str, torchvision=None) -> None:
        self.name = name
        if name in KERAS_APPS:
            self.source = keras_app(name)
            self.converted = keras_to_torch(self.source)
            self.x = keras_batch(name)
            h, w, c = KERAS_APPS[name]
            self.torch_shape = (c, h, w)
        else:
            self.source = torchvision_net(torchvision, name)
            self.torch_shape = TORCHVISION[name]
            self.converted = torch_to_keras(self.source, self.torch_shape)
            self.x = torch_batch(name)

    @property
    def keras_first(self) -> bool:
        return self.name in KERAS_APPS

    @property
    def torch_model(self):
        return self.converted if self.keras_first else self.source

    def fresh_torch(self, torchvision):
        """A new copy of the PyTorch side, to put a fault in."""
        return keras_to_torch(self.source) if self.keras_first else torchvision_net(torchvision, self.name)

    def compare(self, torch_model=None, keras_model=None, training=False):
        torch_model = torch_model if torch_model is not None else self.torch_model
        keras_model = keras_model if keras_model is not None else (self.source if self.keras_first else self.converted)
        if self.keras_first:
            return compare(keras_model, torch_model, self.x, training=training)
        return compare(torch_model, keras_model, self.x, training=training)


_PAIRS: dict[str, Pair] = {}


@pytest.fixture
def pair(request, torchvision):
    name = request.param
    if name not in _PAIRS:  # built once per session: building and converting takes seconds
        _PAIRS[name] = Pair(name, torchvision)
    return _PAIRS[name]


ALL = [*KERAS_APPS, *TORCHVISION]


def _torch_layer(model: nn.Module, kind, index: float) -> str:
    """The name of the layer of type ``kind`` at fraction ``index`` of the model's layers of that type."""
    names = [n for n, m in model.named_modules() if isinstance(m, kind)]
    return names[int(index * (len(names) - 1))]


def _row_names(report, layer: str) -> set[str]:
    """Names a report may give the paired layer whose PyTorch name is ``layer``."""
    return {r.name for r in report.rows if layer in (r.name_a, r.name_b)}


@pytest.mark.parametrize("pair", ALL, indirect=True)
def test_exact_conversion_written_to_pt2_gets_no_cause(pair, tmp_path):
    path = save_model(pair.torch_model, tmp_path / f"{pair.name}.pt2", input_shape=pair.torch_shape)
    report = pair.compare(torch_model=load_model(path))
    assert report.agree and report.causes == [], str(report)
    if report.rounding_measured:  # some layer differs by more than atol: held to atol + its rounding
        assert max(r.tolerance_ratio for r in report.rows) < 0.25  # far from crying wolf
    kinds = {r.kind for r in report.rows}
    assert {"conv", "bn", "act", "dense"} <= kinds
    assert not report.unmatched_a or all("pad" in n for n in report.unmatched_a)  # explicit zero padding only
    assert not report.unmatched_b or all("pad" in n for n in report.unmatched_b)
    # every convolution and batch norm of the PyTorch side is paired
    torch_side = report.rows and (
        [r.name_b for r in report.rows] if pair.keras_first else [r.name_a for r in report.rows]
    )
    paired = sum(r.kind in ("conv", "bn") for r in report.rows)
    layers = sum(isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)) for m in pair.torch_model.modules())
    assert paired == layers, torch_side


@pytest.mark.parametrize("pair", ["resnet18", "ResNet50"], indirect=True)
def test_exact_conversion_agrees_in_a_training_step(pair):
    report = pair.compare(training=True)
    assert report.agree and report.causes == [], str(report)
    assert any(r.running_mean_abs_diff is not None for r in report.rows)


@pytest.mark.parametrize("pair", ["ResNet50", "googlenet"], indirect=True)
def test_changed_eps_is_named_at_its_layer(pair, torchvision):
    model = pair.fresh_torch(torchvision)
    layer = _torch_layer(model, nn.modules.batchnorm._BatchNorm, 0.5)
    model.get_submodule(layer).eps = 1e-3 if model.get_submodule(layer).eps < 1e-4 else 1e-5
    report = pair.compare(torch_model=model)
    assert report.cause_codes == ["eps"], str(report)
    assert report.causes[0].layers == sorted(_row_names(report, layer))
    assert report.first_divergence.name in _row_names(report, layer)


@pytest.mark.parametrize("pair", ["InceptionV3", "resnet18"], indirect=True)
def test_replaced_conv_weights_are_named_at_their_layer(pair, torchvision):
    model = pair.fresh_torch(torchvision)
    layer = _torch_layer(model, nn.Conv2d, 0.6)
    weight = model.get_submodule(layer).weight
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)) * weight.std())
    report = pair.compare(torch_model=model)
    assert report.cause_codes == ["weights"], str(report)
    assert report.causes[0].layers == sorted(_row_names(report, layer))
    assert "fed model A's input does not reproduce" in report.causes[0].evidence


@pytest.mark.parametrize("pair", ["DenseNet121", "resnet18"], indirect=True)
def test_batch_norm_left_in_training_mode_is_named(pair, torchvision):
    model = pair.fresh_torch(torchvision)
    layer = _torch_layer(model, nn.modules.batchnorm._BatchNorm, 0.4)
    model.get_submodule(layer).train()
    report = pair.compare(torch_model=model)
    assert report.cause_codes == ["training-mode"], str(report)
    assert report.causes[0].layers == sorted(_row_names(report, layer))


@pytest.mark.parametrize("pair", ["ResNet50", "googlenet"], indirect=True)
def test_momentum_copied_literally_is_named_in_a_training_step(pair, torchvision):
    if pair.keras_first:  # the Keras momentum (0.99) given to a PyTorch batch norm as it stands
        model = keras_to_torch(pair.source, semantics="target")
        layer = _torch_layer(model, nn.modules.batchnorm._BatchNorm, 0.5)
        model.get_submodule(layer).momentum = 0.99
        report = pair.compare(torch_model=model, training=True)
    else:  # the PyTorch momentum (0.1) given to a Keras batch norm as it stands
        converted = torch_to_keras(pair.source, pair.torch_shape, semantics="target")
        layer = _torch_layer(pair.source, nn.modules.batchnorm._BatchNorm, 0.5)
        keras_layer = converted.get_layer(layer.replace(".", "_"))
        keras_layer.momentum = 0.1
        report = pair.compare(keras_model=converted, training=True)
    assert "momentum-convention" in report.cause_codes, str(report)
    momentum = next(c for c in report.causes if c.code == "momentum-convention")
    assert momentum.layers == sorted(_row_names(report, layer))
    # semantics="target" gives the native layers: their running-variance estimators differ too
    assert set(report.cause_codes) <= {"momentum-convention", "running-variance-estimator"}


def test_flatten_order_not_permuted_in_a_keras_application_port():
    keras.utils.set_random_seed(0)
    base = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(64, 64, 3))
    x = keras.layers.Flatten(name="flatten")(base.output)
    outputs = keras.layers.Dense(10, name="head")(x)
    model = keras.Model(base.input, outputs)
    port = keras_to_torch(model)
    head = model.get_layer("head")
    with torch.no_grad():  # the Keras kernel copied without reordering its rows from H·W·C to C·H·W
        port.head.weight.copy_(torch.from_numpy(np.ascontiguousarray(head.kernel.numpy().T)))
    report = compare(model, port, keras_batch("ResNet50"))
    assert report.cause_codes == ["layout"], str(report)
    assert report.causes[0].layers == ["head"] and report.first_divergence.name == "head"


def test_flatten_order_not_permuted_in_a_torchvision_port(torchvision):
    net = torchvision_net(torchvision, "resnet18")
    net.avgpool = nn.Identity()  # flatten the 512×2×2 feature map
    net.fc = nn.Linear(512 * 2 * 2, 10)
    converted = torch_to_keras(net, TORCHVISION["resnet18"])
    fc = converted.get_layer("fc")
    kernel, bias = (v.numpy() for v in fc.weights)
    fc.set_weights([net.fc.weight.detach().numpy().T.copy(), bias])  # rows left in C·H·W order
    assert kernel.shape == net.fc.weight.shape[::-1]
    report = compare(net, converted, torch_batch("resnet18"))
    assert report.cause_codes == ["layout"], str(report)
    assert report.causes[0].layers == ["fc"]


def test_cli_compares_the_keras_file_with_its_pt2_conversion(run_cli, tmp_path):
    model = keras_app("ResNet50")
    save_model(model, tmp_path / "resnet50.keras")
    save_model(keras_to_torch(model), tmp_path / "resnet50.pt2", input_shape=(3, 64, 64))
    proc = run_cli("compare", "resnet50.keras", "resnet50.pt2", "--batch-size", "2", "--json")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    data = json.loads(proc.stdout)
    assert data["agree"] and data["causes"] == [] and data["unmatched_a"] == data["unmatched_b"] == []
    assert all(row["tolerance"]["atol"] >= 1e-5 for row in data["layers"])


@pytest.mark.parametrize("pair", ALL, indirect=True)
def test_lint_finds_nothing_in_a_conversion_that_it_does_not_find_in_the_source(pair):
    """No rule fires on what bnkit itself produced correctly: the converted model's findings are the
    source's (a biased convolution before a batch norm is carried over, and flagged on both)."""
    import bnkit

    source, converted = bnkit.lint(pair.source), bnkit.lint(pair.converted)
    assert sorted((f.code, f.severity) for f in converted) == sorted((f.code, f.severity) for f in source)
    assert {f.code for f in source} <= {"conv-bias-before-bn"}  # keras.applications' ResNet50 has such biases


@pytest.mark.parametrize("name", ["convnext_tiny", "mobilenet_v3_small"])
def test_other_torchvision_networks_get_no_cause(torchvision, name):
    """Networks the issue does not name: ConvNeXt (Linear layers on channels-last data between
    permutes, LayerNorm), MobileNetV3 (depthwise convolutions, hardswish, squeeze-excitation)."""
    from _networks import randomize_torch_bn

    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
    randomize_torch_bn(net)
    converted = torch_to_keras(net, (3, 64, 64))
    report = compare(net, converted, np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype("float32"))
    assert report.agree and report.causes == [], str(report)
    assert report.unmatched_a == [] and all(n.endswith("_pad") for n in report.unmatched_b)
    assert sum(r.kind == "dense" for r in report.rows) == sum(isinstance(m, nn.Linear) for m in net.modules())
