"""bnkit.summary against the frameworks' own counts: Keras' count_params() and weights,
PyTorch's parameters() and buffers(), and the shapes the layers really produce."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from rich.console import Console
from torch import nn

import bnkit
from bnkit.examples import SEED_INPUT_SHAPE, keras_seed_model, torch_seed_model
from bnkit.keras import keras
from bnkit.summarize import render

TORCH_SEED_SHAPE = (SEED_INPUT_SHAPE[2], SEED_INPUT_SHAPE[0], SEED_INPUT_SHAPE[1])  # NCHW without batch


def size(variable) -> int:
    return math.prod(variable.shape)


@pytest.fixture(scope="module")
def keras_seed():
    return keras_seed_model()


def rendered(model_summary) -> str:
    console = Console(record=True, width=200)
    render(model_summary, console)
    return console.export_text()


def test_keras_seed_totals_match_keras(keras_seed):
    s = bnkit.summary(keras_seed)
    assert s.framework == "keras"  # on the torch backend a Keras model is an nn.Module too
    assert s.total == keras_seed.count_params() == 13_108_758
    assert s.trainable == sum(size(v) for v in keras_seed.trainable_weights) == 13_108_694
    assert s.non_trainable == sum(size(v) for v in keras_seed.non_trainable_weights) == 64
    bn = keras_seed.get_layer("bn")
    assert s.torch_buffers == size(bn.moving_mean) + size(bn.moving_variance) == 64
    assert s.torch_params == s.total - s.torch_buffers == 13_108_694
    assert s.torch_trainable == s.trainable and s.torch_counters == 0


def test_keras_seed_rows_match_layers(keras_seed):
    s = bnkit.summary(keras_seed)
    assert [r.name for r in s.rows] == [layer.name for layer in keras_seed.layers]
    for row, layer in zip(s.rows, keras_seed.layers, strict=True):
        assert row.output_shape == tuple(layer.output.shape)
        assert row.type == type(layer).__name__
        assert row.params == layer.count_params()
        assert row.non_trainable_params == sum(size(v) for v in layer.non_trainable_weights)
    assert sum(r.params for r in s.rows) == s.total


def test_torch_seed_counts_match_torch_and_keras(keras_seed):
    for port in ("naive", "faithful"):
        model = torch_seed_model(port)
        s = bnkit.summary(model, TORCH_SEED_SHAPE)
        params = sum(p.numel() for p in model.parameters())
        running = sum(b.numel() for b in model.buffers() if b.is_floating_point())
        assert s.torch_params == s.torch_trainable == params == 13_108_694
        assert s.torch_buffers == running == 64
        assert s.torch_counters == model[2].num_batches_tracked.numel() == 1
        # Keras accounting of the PyTorch network = what Keras reports for the Keras network
        assert (s.total, s.trainable, s.non_trainable) == (
            keras_seed.count_params(),
            sum(size(v) for v in keras_seed.trainable_weights),
            sum(size(v) for v in keras_seed.non_trainable_weights),
        )


def test_torch_rows_have_the_shapes_the_layers_produce():
    model = torch_seed_model().eval()
    s = bnkit.summary(model, TORCH_SEED_SHAPE)
    x = torch.randn(1, *TORCH_SEED_SHAPE)
    activation_bytes = 0
    with torch.no_grad():
        for row, (name, layer) in zip(s.rows, model.named_children(), strict=True):
            x = layer(x)
            assert row.name == name and row.type == type(layer).__name__
            assert row.output_shape == tuple(x.shape)
            if any(True for _ in layer.parameters()):
                activation_bytes += x.numel() * x.element_size()
    # torchinfo's estimate: the outputs of layers with parameters counted twice (forward and
    # backward), batch 1; parameters only, the running statistics are buffers
    assert s.memory.activations == 2 * activation_bytes
    assert s.memory.input == math.prod(TORCH_SEED_SHAPE) * 4
    assert s.memory.params == 13_108_694 * 4 and s.memory.buffers == 64 * 4
    assert s.memory.total == s.memory.input + s.memory.activations + s.memory.params


def test_torch_summary_restores_modes_and_leaves_no_gradients_or_state():
    model = torch_seed_model()
    model.train()
    model[2].eval()  # mixed modes must come back exactly
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bnkit.summary(model, TORCH_SEED_SHAPE)
    assert model.training and not model[2].training and model[0].training
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # eval mode: running statistics untouched


def test_torch_without_input_shape_shows_unknown_shapes():
    s = bnkit.summary(torch_seed_model())
    assert all(r.output_shape is None for r in s.rows) and s.memory is None
    assert s.total == 13_108_758
    table = rendered(s)
    assert " ? " in table


def test_frozen_and_nested_modules_are_counted_like_torch():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))  # a container's own parameter gets a row
            self.body = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4))

        def forward(self, x):
            return self.body(x) * self.scale

    model = nn.Sequential(Block(), nn.Linear(4, 2))
    model[1].weight.requires_grad_(False)
    s = bnkit.summary(model, (3,))
    assert s.torch_params == sum(p.numel() for p in model.parameters())
    assert s.torch_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert s.torch_frozen == model[1].weight.numel()
    assert s.non_trainable == s.torch_frozen + 8  # frozen weight + BN running mean and var
    assert sum(r.params for r in s.rows) == s.total
    assert {r.name: r.depth for r in s.rows}["0.body.1"] == 2
    assert {r.name: r.output_shape for r in s.rows}["0"] == (1, 4)


def test_keras_nested_and_frozen_layers_match_count_params():
    inner = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(5, name="d"), keras.layers.BatchNormalization(name="bn")], name="inner"
    )
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(2, name="out")(inner(inputs))
    model = keras.Model(inputs, outputs)
    inner.layers[0].trainable = False
    s = bnkit.summary(model)
    assert s.total == model.count_params()
    assert s.trainable == sum(size(v) for v in model.trainable_weights)
    assert s.torch_buffers == 10 and s.torch_frozen == 35  # 2*5 statistics; frozen Dense(6->5)
    assert [(r.name, r.depth) for r in s.rows][-3:] == [("inner/d", 1), ("inner/bn", 1), ("out", 0)]
    assert sum(r.params for r in s.rows) == s.total


def test_unbuilt_keras_model_needs_input_shape():
    model = keras.Sequential([keras.layers.Dense(3), keras.layers.BatchNormalization()])
    with pytest.raises(ValueError, match="not built yet: pass input_shape"):
        bnkit.summary(model)
    s = bnkit.summary(model, (4,))
    assert s.total == model.count_params() == 15 + 12
    assert s.rows[-1].output_shape == (None, 3)


def test_bad_inputs_have_clear_errors(keras_seed):
    with pytest.raises(ValueError, match=r"zeros of shape \(1, 64, 64\).*expected 4D input"):
        bnkit.summary(torch_seed_model(), (64, 64))
    with pytest.raises(ValueError, match=r"takes input of shape \(64, 64, 1\)"):
        bnkit.summary(keras_seed, (1, 64, 64))
    with pytest.raises(ValueError, match="positive ints"):
        bnkit.summary(torch_seed_model(), (1, 0, 64))
    with pytest.raises(TypeError, match="torch.nn.Module or a keras.Model"):
        bnkit.summary("model.keras")


def test_render_shows_both_accountings_and_explains_the_difference(keras_seed):
    text = rendered(bnkit.summary(keras_seed))
    for expected in ("13,108,758", "13,108,694", "Non-trainable params", "Buffers (running statistics)"):
        assert expected in text
    assert "Keras counts running statistics as non-trainable params; PyTorch keeps them as buffers." in text
    assert "print 13,108,694" in text and "13,108,694 + 64 = 13,108,758" in text
    assert "Estimated total size" in text


def test_to_dict_is_json(keras_seed):
    data = json.loads(json.dumps(bnkit.summary(keras_seed).to_dict()))
    assert data["keras"] == {"total": 13_108_758, "trainable": 13_108_694, "non_trainable": 64}
    assert data["torch"]["params"] == 13_108_694 and data["torch"]["buffers"] == 64
    assert data["rows"][2]["output_shape"] == [None, 64, 64, 32]
    assert data["memory"]["megabytes"]["total"] == pytest.approx(data["memory"]["bytes"]["total"] / 1e6)
    assert data["keras_backend"] == keras.backend.backend() == os.environ["KERAS_BACKEND"]  # which one ran


def test_subclassed_keras_model_counts_without_shapes():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)
            self.bn = keras.layers.BatchNormalization()

        def call(self, x):
            return self.bn(self.dense(x))

    model = Sub()
    s = bnkit.summary(model, (5,))  # built by calling it on zeros
    assert s.total == model.count_params() == 18 + 12 and s.torch_buffers == 6
    assert [r.output_shape for r in s.rows] == [None, None] and s.memory is None
    assert "subclassed" in s.notes[0]


def test_tied_torch_weights_count_once():
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7, bias=False))
    model[1].weight = model[0].weight  # weight tying, as in language models
    s = bnkit.summary(model)
    assert s.torch_params == sum(p.numel() for p in model.parameters()) == 28


def test_keras_integer_counter_weights_are_counters_not_params():
    # like bnkit.keras.BatchNormalization(convention="torch"), which keeps num_batches_tracked as a weight
    class Counting(keras.layers.BatchNormalization):
        def build(self, input_shape):
            super().build(input_shape)
            self.steps = self.add_weight(shape=(), name="steps", initializer="zeros", dtype="int64", trainable=False)

    inputs = keras.Input((4,))
    model = keras.Model(inputs, Counting()(inputs))
    s = bnkit.summary(model)
    assert s.total == model.count_params() == 17 and s.non_trainable == 9
    assert (s.torch_params, s.torch_buffers, s.torch_counters) == (8, 8, 1)
    assert "8 + 8 + 1 = 17" in rendered(s)


def test_printing_a_summary_shows_the_table_and_the_explanation():
    """``print(bnkit.summary(model))`` shows the table, as torchinfo's summary does, not a dataclass repr."""
    s = bnkit.summary(torch_seed_model(), (1, 64, 64))
    text = str(s)
    assert "BatchNorm2d" in text and "13,108,758" in text and "print 13,108,694" in text
    assert "ModelSummary(" not in text
    assert s.explanation in " ".join(text.split())  # the sentence, wrapped over lines
    assert json.loads(json.dumps(s.to_dict()))["explanation"] == s.explanation


def test_each_framework_counts_in_its_own_column():
    """A 32-channel BatchNorm2d: PyTorch (torchinfo, parameters()) counts 64, Keras 128."""
    torch_text = rendered(bnkit.summary(torch_seed_model(), TORCH_SEED_SHAPE))
    bn_line = next(line for line in torch_text.splitlines() if "(BatchNorm2d)" in line)
    assert bn_line.split()[-2:] == ["64", "128"]  # Param # (PyTorch's own), then Keras #
    assert "Param #" in torch_text and "Keras #" in torch_text and "PyTorch's own count" in torch_text
    keras_text = rendered(bnkit.summary(keras_seed_model()))
    bn_line = next(line for line in keras_text.splitlines() if "(BatchNormalization)" in line)
    assert bn_line.split()[-2:] == ["128", "64"]  # Param # (Keras' own), then PyTorch #
    assert "PyTorch #" in keras_text


def test_folded_scale_and_shift_are_buffers_but_not_running_statistics():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))  # nothing before the BN to fold into
    folded = bnkit.fold_bn(model.eval())
    s = bnkit.summary(folded, (4, 5, 5))
    assert s.torch_buffers == 8 and s.running_stats == 0 and s.other_buffers == 8
    text = rendered(s)
    assert "running statistics (running_mean, running_var)" not in text
    assert "folded scale/shift" in text and "scale and shift" in s.explanation
    unfolded = bnkit.summary(model, (4, 5, 5))
    assert unfolded.running_stats == 8 and unfolded.other_buffers == 0
    data = s.to_dict()["torch"]
    assert (data["running_stats"], data["other_buffers"]) == (0, 8)


def test_keras_folded_model_counts_channel_affine_as_buffers():
    keras_model = keras.Sequential([keras.Input((5, 5, 4)), keras.layers.BatchNormalization(),
                                    keras.layers.Conv2D(2, 1)])  # fmt: skip
    folded = bnkit.fold_bn(keras_model)
    s = bnkit.summary(folded)
    assert s.total == folded.count_params() and s.other_buffers == 8 and s.running_stats == 0
    assert s.torch_params == s.total - 8


def test_a_pt2_program_shows_the_layer_classes_it_was_exported_from(tmp_path):
    from bnkit.io import load_model, save_model

    model = nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6()).eval()
    loaded = load_model(save_model(model, tmp_path / "m.pt2", input_shape=(3, 6, 6)))
    s = bnkit.summary(loaded, (3, 6, 6))
    assert [r.type for r in s.rows] == ["ZeroPad2d", "Conv2d", "BatchNorm2d", "ReLU6"]
    assert type(loaded).__name__ == "Sequential"
    assert "InterpreterModule" not in rendered(s) and "ExportedModel" not in rendered(s)


def test_memory_estimate_follows_torchinfos_definition(torchvision):
    """torchinfo: Forward/backward pass size = 2 × the outputs of every call of a leaf layer that has
    parameters; Params size = the parameters (buffers not counted); Input size = the input."""
    model = torchvision.models.resnet18(weights=None).eval()
    shape = (3, 64, 64)
    s = bnkit.summary(model, shape)
    outputs = 0

    def count(module, args, output):
        nonlocal outputs
        outputs += output.numel() * output.element_size()

    leaves = [m for m in model.modules() if not list(m.children()) and list(m.parameters(recurse=False))]
    handles = [m.register_forward_hook(count) for m in leaves]
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    for h in handles:
        h.remove()
    assert s.memory.activations == 2 * outputs
    assert s.memory.params == sum(p.numel() * 4 for p in model.parameters())
    assert s.memory.buffers == sum(b.numel() * 4 for b in model.buffers() if b.is_floating_point())
    assert s.memory.input == 3 * 64 * 64 * 4
    assert s.memory.total == s.memory.input + s.memory.activations + s.memory.params
    assert "Buffers (not in the total)" in rendered(s)


def test_summary_table_fits_80_columns_with_whole_layer_names(torchvision):
    model = torchvision.models.resnet18(weights=None)
    console = Console(record=True, width=80)
    render(bnkit.summary(model, (3, 64, 64)), console)
    lines = console.export_text().splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    for name in ("layer1.0.conv1", "layer4.1.bn2", "fc"):
        assert any(name in line for line in lines), name
    header = next(line for line in lines if "Layer (type)" in line)
    assert "Output Shape" in header and "Param #" in header and "Keras #" in header


def test_names_from_a_model_are_shown_as_text_not_rich_markup():
    """A model file names its model and layers; rich would read ``[bold]`` or ``[link=...]`` in them
    as markup (hiding text, or making a hyperlink) unless they are passed as Text."""
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2, name="fc[red]x")(inputs)
    text = rendered(bnkit.summary(keras.Model(inputs, outputs, name="net[bold]y")))
    assert 'Model: "net[bold]y" (Keras, torch backend)' in text
    assert "fc[red]x (Dense)" in text
