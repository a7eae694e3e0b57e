"""compare on the networks whose layers issue 8 taught the converter: keras.applications MobileNetV2,
EfficientNetB0 (pixel input, preprocessing layers), ConvNeXtTiny, Xception, MobileNetV3Small and
torchvision mobilenet_v3_small, shufflenet_v2_x0_5, convnext_tiny, efficientnet_b0, regnet_y_400mf
(tests/convert/real_networks.py: random weights, randomised normalization, 96x96, batch 2).

Exact conversions get no cause and every recorded layer is paired (explicit zero padding, which one
side does inside its convolutions, excepted); deliberate faults in the new kinds — a depthwise or
separable convolution's weights, a layer norm's eps, a layer scale, a squeeze-excitation
convolution, a batch norm left in training mode, a channel shuffle — are named at their layer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnkit.convert import keras_to_torch, torch_to_keras
from bnkit.convert.torch_modules import SeparableConv1d, SeparableConv2d
from bnkit.diagnose.compare import compare
from bnkit.io import load_model, save_model
from convert.real_networks import NETWORKS

pytestmark = pytest.mark.slow

KERAS = ["MobileNetV2", "EfficientNetB0", "ConvNeXtTiny", "Xception", "MobileNetV3Small"]
TORCH = ["mobilenet_v3_small", "shufflenet_v2_x0_5", "convnext_tiny", "efficientnet_b0", "regnet_y_400mf"]

# the kinds each network must show (the ones that were not traced before)
NEW_KINDS = {
    "MobileNetV2": {"conv"},
    "EfficientNetB0": {"mul", "scale"},  # squeeze-excitation gates; Normalization of the pixels
    "ConvNeXtTiny": {"ln", "scale"},  # layer norms, layer scales (and the Normalization)
    "Xception": {"conv"},
    "MobileNetV3Small": {"mul"},
    "mobilenet_v3_small": {"mul"},
    "shufflenet_v2_x0_5": {"concat"},
    "convnext_tiny": {"ln", "scale"},
    "efficientnet_b0": {"mul"},
    "regnet_y_400mf": {"mul"},
}


class Pair:
    """A network, its exact conversion and a batch in the source's layout."""

    def __init__(self, name: str) -> None:
        net = NETWORKS[name]
        self.name, self.net = name, net
        self.source = net.build()
        self.keras_first = net.framework == "keras"
        self.converted = (
            keras_to_torch(self.source) if self.keras_first else torch_to_keras(self.source, net.input_shape)
        )
        self.x = net.example_input(2, 0)

    @property
    def torch_model(self) -> nn.Module:
        return self.converted if self.keras_first else self.source

    def faulty_torch(self) -> nn.Module:
        """A copy of the PyTorch side to put a fault in."""
        return copy.deepcopy(self.torch_model)

    def compare(self, torch_model=None, training: bool = False):
        torch_model = self.torch_model if torch_model is None else torch_model
        if self.keras_first:
            return compare(self.source, torch_model, self.x, training=training)
        return compare(torch_model, self.converted, self.x, training=training)


@pytest.fixture(scope="module")
def pairs():
    return {}


@pytest.fixture
def pair(request, pairs, torchvision):
    name = request.param
    if name not in pairs:  # built and converted once for the module
        pairs[name] = Pair(name)
    return pairs[name]


def _recorded_modules(model: nn.Module) -> int:
    """The PyTorch layers compare must pair: convolutions (a separable one is one layer), batch and
    layer norms, linears."""
    inner = {id(c) for m in model.modules() if isinstance(m, SeparableConv1d | SeparableConv2d) for c in m.children()}
    kinds = (nn.modules.conv._ConvNd, SeparableConv1d, SeparableConv2d, nn.modules.batchnorm._BatchNorm)
    kinds += (nn.LayerNorm, nn.Linear)
    return sum(isinstance(m, kinds) and id(m) not in inner for m in model.modules())


def _rows_of(report, torch_name: str) -> list[str]:
    """The rows whose PyTorch layer is ``torch_name`` (a module path, or an operation in it)."""
    found = []
    for r in report.rows:
        name = r.name_b if report.framework_b == "torch" else r.name_a
        if name == torch_name or name.startswith(torch_name + ".") or name == torch_name.replace(".", "_"):
            found.append(r.name)
    return found


def _check_named(report, code: str, torch_name: str) -> None:
    rows = _rows_of(report, torch_name)
    assert rows, f"no row for {torch_name}: {report}"
    assert report.cause_codes == [code], str(report)
    assert report.causes[0].layers == rows, str(report)
    assert report.first_divergence.name == rows[0], str(report)


@pytest.mark.parametrize("pair", KERAS + TORCH, indirect=True)
def test_exact_conversion_gets_no_cause_and_every_layer_pairs(pair):
    report = pair.compare()
    assert report.agree and report.causes == [], str(report)
    keras_unmatched = report.unmatched_a if pair.keras_first else report.unmatched_b
    torch_unmatched = report.unmatched_b if pair.keras_first else report.unmatched_a
    assert keras_unmatched == [] and torch_unmatched == [] or all("pad" in n for n in keras_unmatched + torch_unmatched)
    kinds = {r.kind for r in report.rows}
    assert NEW_KINDS[pair.name] <= kinds, kinds
    paired = sum(r.kind in ("conv", "bn", "ln", "dense") for r in report.rows)
    assert paired == _recorded_modules(pair.torch_model)
    if report.rounding_measured:
        assert max(r.tolerance_ratio for r in report.rows) < 0.5


@pytest.mark.parametrize("pair", ["Xception", "ConvNeXtTiny", "EfficientNetB0"], indirect=True)
def test_exact_conversion_written_to_pt2_gets_no_cause(pair, tmp_path):
    """Read back from a .pt2 program, the PyTorch side's layers are sub-programs calling aten
    operators (a separable convolution one sub-program holding two): traced as the same layers."""
    h, w, c = pair.net.input_shape
    path = save_model(pair.converted, tmp_path / f"{pair.name}.pt2", input_shape=(c, h, w))
    report = pair.compare(load_model(path))
    assert report.agree and report.causes == [], str(report)
    assert report.unmatched_a == report.unmatched_b == []
    assert NEW_KINDS[pair.name] <= {r.kind for r in report.rows}


def _first(model: nn.Module, test, index: float = 0.5, suffix: str | None = None) -> str:
    """The module at fraction ``index`` of those that pass ``test`` (or whose path ends in ``suffix``)."""
    names = [n for n, m in model.named_modules() if (n.endswith(suffix) if suffix else test(m))]
    assert names
    return names[int(index * (len(names) - 1))]


def _replace_weight(module: nn.Module, seed: int = 5) -> None:
    w = module.weight
    with torch.no_grad():
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)) * w.std())


def _depthwise(m) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


@pytest.mark.parametrize("pair", ["MobileNetV2", "efficientnet_b0"], indirect=True)
def test_depthwise_convolution_weights_replaced_are_named(pair):
    model = pair.faulty_torch()
    layer = _first(model, _depthwise)
    _replace_weight(model.get_submodule(layer))
    _check_named(pair.compare(model), "weights", layer)


@pytest.mark.parametrize("pair", ["Xception"], indirect=True)
def test_separable_convolution_pointwise_weights_replaced_are_named(pair):
    model = pair.faulty_torch()
    layer = _first(model, lambda m: isinstance(m, SeparableConv2d))
    _replace_weight(model.get_submodule(layer).pointwise)
    _check_named(pair.compare(model), "weights", layer)


@pytest.mark.parametrize("pair", ["ConvNeXtTiny", "convnext_tiny"], indirect=True)
def test_layer_norm_eps_changed_is_named(pair):
    model = pair.faulty_torch()
    layer = _first(model, lambda m: isinstance(m, nn.LayerNorm), 0.3)
    model.get_submodule(layer).eps = 1e-2
    report = pair.compare(model)
    _check_named(report, "eps", layer)
    assert "layer norm" in report.causes[0].explanation


@pytest.mark.parametrize("pair", ["convnext_tiny"], indirect=True)
def test_layer_scale_changed_is_named(pair):
    model = pair.faulty_torch()
    block = _first(model, lambda m: hasattr(m, "layer_scale"), 0.4)
    with torch.no_grad():
        model.get_submodule(block).layer_scale.mul_(1.5)
    report = pair.compare(model)
    assert report.cause_codes == ["weights"], str(report)
    (row,) = report.causes[0].layers
    assert report.first_divergence.name == row
    assert next(r for r in report.rows if r.name == row).kind == "scale"
    assert _rows_of(report, block) and row in _rows_of(report, block)


@pytest.mark.parametrize("pair", ["EfficientNetB0", "efficientnet_b0", "regnet_y_400mf"], indirect=True)
def test_squeeze_excitation_convolution_changed_is_named(pair):
    model = pair.faulty_torch()
    if pair.keras_first:  # keras.applications' se_expand: the 1x1 convolution that makes the gate
        layer = _first(model, lambda m: False, 0.5, suffix="se_expand")
    else:  # torchvision's SqueezeExcitation.fc2
        layer = _first(model, lambda m: type(m).__name__ == "SqueezeExcitation", 0.5) + ".fc2"
    _replace_weight(model.get_submodule(layer))
    _check_named(pair.compare(model), "weights", layer)


@pytest.mark.parametrize("pair", ["MobileNetV2", "efficientnet_b0", "shufflenet_v2_x0_5"], indirect=True)
def test_batch_norm_left_in_training_mode_is_named(pair):
    model = pair.faulty_torch()
    layer = _first(model, lambda m: isinstance(m, nn.BatchNorm2d), 0.4)
    model.get_submodule(layer).train()
    _check_named(pair.compare(model), "training-mode", layer)


@pytest.mark.parametrize("pair", ["shufflenet_v2_x0_5"], indirect=True)
def test_wrong_channel_shuffle_is_named_where_its_output_is_read(pair):
    """A port whose channel shuffle reads the groups the wrong way round in one block: the values are
    moved, not computed, so the first traced layer to read them receives other inputs than its twin."""
    model = pair.faulty_torch()
    block = model.stage3[1]

    def forward(x):
        x1, x2 = x.chunk(2, dim=1)
        out = torch.cat((x1, block.branch2(x2)), dim=1)
        n, c, h, w = out.shape
        return out.view(n, c // 2, 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # (2, c/2), not (c/2, 2)

    block.forward = forward
    report = pair.compare(model)
    assert report.cause_codes == ["layout"], str(report)
    assert report.causes[0].layers == [report.first_divergence.name]
    assert report.first_divergence.name == _rows_of(report, "stage3.2.branch2.0")[0]
    assert "other values in other places" in report.causes[0].explanation


@pytest.mark.parametrize("pair", ["convnext_tiny", "efficientnet_b0", "EfficientNetB0"], indirect=True)
def test_exact_conversion_agrees_in_a_training_step(pair):
    """Stochastic depth (torchvision's, bnkit's Keras layer) and dropout are random in training: run in
    inference on both sides; layer norms and batch statistics agree."""
    report = pair.compare(training=True)
    assert report.agree and report.causes == [], str(report)


@pytest.mark.parametrize("pair", ["EfficientNetB0", "ConvNeXtTiny"], indirect=True)
def test_changed_constant_of_a_preprocessing_or_layer_scale_is_named(pair):
    """The PyTorch side's buffer or parameter read by `x - mean` / `x * gamma`: a `scale` row."""
    model = pair.faulty_torch()
    constants = (*model.named_buffers(), *model.named_parameters())
    _, tensor = next(
        (n, t) for n, t in constants if "normalization" in n and n.endswith("_mean") or "layer_scale_gamma" in n
    )
    with torch.no_grad():
        tensor.add_(1.0)
    report = pair.compare(model)
    assert report.cause_codes == ["weights"], str(report)
    (row,) = report.causes[0].layers
    assert report.first_divergence.name == row
    assert next(r for r in report.rows if r.name == row).kind == "scale"


@pytest.mark.parametrize("pair", ["mobilenet_v3_small"], indirect=True)
def test_an_activation_swapped_is_named_as_a_different_function(pair):
    model = pair.faulty_torch()
    layer = _first(model, lambda m: isinstance(m, nn.Hardswish))
    parent, _, leaf = layer.rpartition(".")
    setattr(model.get_submodule(parent), leaf, nn.ReLU())
    report = pair.compare(model)
    _check_named(report, "unexplained", layer)
    assert "different functions" in report.causes[0].explanation
    assert "this ReLU / Activation(hard_silu)" in report.causes[0].explanation  # Keras names hard_swish so
