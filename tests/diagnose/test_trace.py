"""The tracers (bnkit.diagnose.trace_torch, trace_keras): which layers they record, the data flow
between them, and that every layer bnkit.convert supports is traced — and paired — on both sides."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bnkit.convert import keras_to_torch, torch_to_keras
from bnkit.diagnose.compare import compare
from bnkit.diagnose.trace import INPUT
from bnkit.diagnose.trace_keras import trace_keras
from bnkit.diagnose.trace_torch import trace_torch
from bnkit.keras import keras

L = keras.layers


def batch(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def keras_every_layer_2d():
    """One of every 2-D Keras layer keras_to_torch converts, in branches."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 3))
    x = L.ZeroPadding2D(1, name="pad")(inputs)
    x = L.Conv2D(8, 3, name="conv", activation="relu")(x)
    x = L.BatchNormalization(name="bn")(x)
    a = L.MaxPooling2D(2, name="maxpool")(x)
    b = L.AveragePooling2D(2, name="avgpool")(x)
    x = L.Add(name="add")([a, b])
    y = L.Conv2D(8, 3, strides=2, padding="same", name="strided")(x)
    y = L.Activation("tanh", name="tanh")(y)
    z = L.Conv2D(8, 1, name="pointwise")(x)
    z = L.LeakyReLU(0.1, name="leaky")(L.MaxPooling2D(2, name="zpool")(z))
    x = L.Concatenate(name="concat")([y, z])
    x = L.ELU(name="elu")(L.ReLU(name="relu")(x))
    g = L.GlobalAveragePooling2D(name="gap")(x)
    m = L.GlobalMaxPooling2D(name="gmp")(x)
    f = L.Flatten(name="flatten")(L.Permute((3, 1, 2), name="to_channels_first")(x))
    f = L.Dropout(0.3, name="drop")(f)
    f = L.Dense(8, name="dense")(f)
    x = L.Concatenate(name="heads")([g, m, f])
    outputs = L.Softmax(name="softmax")(L.Dense(5, name="out")(x))
    return keras.Model(inputs, outputs)


def keras_every_layer_1d():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 3))
    x = L.ZeroPadding1D(1, name="pad1d")(inputs)
    x = L.Conv1D(6, 3, name="conv1d")(x)
    x = L.BatchNormalization(name="bn1d")(x)
    x = L.Activation("relu", name="act1d")(x)
    x = L.AveragePooling1D(2, name="avg1d")(L.MaxPooling1D(2, strides=1, name="max1d")(x))
    x = L.GlobalMaxPooling1D(name="gmp1d")(x)
    outputs = L.Dense(3, name="dense1d")(x)
    return keras.Model(inputs, outputs)


def _randomize(model):
    rng = np.random.default_rng(3)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.3, c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2, c).astype("float32"))


def test_every_keras_layer_keras_to_torch_converts_is_traced_and_paired():
    for model, shape in ((keras_every_layer_2d(), (2, 12, 12, 3)), (keras_every_layer_1d(), (2, 16, 3))):
        _randomize(model)
        report = compare(model, keras_to_torch(model), batch(shape))
        assert report.agree and report.causes == [], str(report)
        traced = {r.name_a for r in report.rows}
        untraced = {"drop", "to_channels_first"}  # no kind: data flows through them
        folded = {"tanh": "strided", "softmax": "out"}  # activations folded into the layer they follow
        expected = {layer.name for layer in model.layers[1:]} - untraced
        assert traced == expected - set(folded), expected ^ traced
        types = {r.name_a: r.type_a for r in report.rows}
        for activation, layer in folded.items():
            if activation in expected:
                assert f"+{type(model.get_layer(activation)).__name__}" in types[layer]  # +Activation(tanh)
        # only the zero padding PyTorch needs where Keras pads inside a strided 'same' convolution
        assert report.unmatched_a == [] and all(name.endswith("_pad") for name in report.unmatched_b)


class _EveryTorchLayer(nn.Module):
    """Modules and functions torch_to_keras converts, in branches."""

    def __init__(self):
        super().__init__()
        self.pad = nn.ZeroPad2d(1)
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.SiLU()
        self.maxpool = nn.MaxPool2d(2)
        self.avgpool = nn.AvgPool2d(2)
        self.branch = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.gelu = nn.GELU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8 + 8 + 8 * 6 * 6, 5)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x):
        x = self.act(self.bn(self.conv(self.pad(x))))
        x = self.maxpool(x) + self.avgpool(x)
        y = self.gelu(self.branch(x))
        x = torch.relu(x + y)
        pooled = self.flatten(self.gap(x))
        maxed = torch.amax(x, dim=(2, 3))
        flat = torch.flatten(F.hardswish(x), 1)
        return self.softmax(self.fc(self.drop(torch.cat([pooled, maxed, flat], 1))))


def test_every_torch_layer_torch_to_keras_converts_is_traced_and_paired():
    torch.manual_seed(0)
    model = _EveryTorchLayer().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2)
    converted = torch_to_keras(model, (3, 12, 12))
    report = compare(model, converted, batch((2, 3, 12, 12)))
    assert report.agree and report.causes == [], str(report)
    kinds = [r.kind for r in report.rows]
    for kind in ("pad", "conv", "bn", "act", "pool", "add", "gpool", "flatten", "concat", "dense"):
        assert kind in kinds, kind
    names = {r.name_a for r in report.rows}
    assert {"pad", "conv", "bn", "maxpool", "avgpool", "branch", "gap", "flatten", "fc"} <= names
    assert report.unmatched_a == [] and report.unmatched_b == []


def test_torch_data_flow_follows_functional_ops_reshapes_and_dynamic_control_flow():
    class Dynamic(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(3, 4, 1)
            self.head = nn.Linear(4 * 4 * 4, 2)

        def forward(self, x):
            left, right = self.a(x), self.b(x)
            y = left + right if float(x.sum()) > -1e9 else left
            y = y[:, :, :4, :4].contiguous()  # a slice: no kind, data flows through
            return self.head(y.view(y.size(0), -1))

    trace = trace_torch(Dynamic().eval(), batch((2, 3, 6, 6)), training=False)
    by_name = {e.name: e for e in trace.entries}
    assert [e.kind for e in trace.entries] == ["conv", "conv", "add", "flatten", "dense"]
    assert by_name["a"].inputs == [(INPUT,)] and by_name["b"].inputs == [(INPUT,)]
    add = by_name["add"]
    assert add.inputs == [(by_name["a"].index,), (by_name["b"].index,)]
    assert by_name["view"].producers == [add.index] and by_name["head"].producers == [by_name["view"].index]
    assert trace.output_producers == (by_name["head"].index,)


def test_keras_shared_layers_and_nested_models_are_traced_per_call():
    keras.utils.set_random_seed(0)
    inner_in = keras.Input((6,))
    inner = keras.Model(inner_in, L.Dense(6, name="inner_dense")(inner_in), name="inner")
    shared = L.Dense(6, name="shared")
    inputs = keras.Input((6,))
    x = shared(inputs)
    x = shared(inner(x))  # the same layer, called twice
    model = keras.Model(inputs, x)
    trace = trace_keras(model, batch((2, 6)), training=False)
    assert [e.name for e in trace.entries] == ["shared", "inner_dense", "shared_1"]
    assert [e.producers for e in trace.entries] == [[INPUT], [0], [1]]


def test_activation_is_folded_into_the_layer_it_follows_on_both_sides():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    model = keras.Model(inputs, L.Dense(3, activation="relu", name="dense")(inputs))
    port = keras_to_torch(model)  # Linear + ReLU module
    report = compare(model, port, batch((2, 5)))
    assert [(r.type_a, r.type_b) for r in report.rows] == [("Dense(relu)", "Linear+ReLU")]


def test_a_pt2_program_is_traced_through_its_sub_programs(tmp_path):
    """Layers a .pt2 program keeps as sub-programs (ZeroPad2d) and its aten operators are traced."""
    from bnkit.io import load_model, save_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    path = save_model(model, tmp_path / "m.pt2", input_shape=(3, 6, 6))
    loaded = load_model(path)
    trace = trace_torch(loaded, batch((2, 3, 6, 6)), training=False)
    assert [e.kind for e in trace.entries] == ["pad", "conv", "bn", "act"]
    assert trace.entries[0].type == "ZeroPad2d"  # the class the program was exported from
    report = compare(model, loaded, batch((2, 3, 6, 6)))
    assert report.agree and len(report.rows) == 4
