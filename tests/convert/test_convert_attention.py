"""Attention and transformer blocks: nn.MultiheadAttention ⇄ keras.layers.MultiHeadAttention against the
real layers (both directions, self- and cross-attention, bias, kdim/vdim, dropout in training), einsum,
static shape checks, torchvision's VisionTransformer both ways, a Keras transformer block with a BN
stem, and the refusals (masks, add_bias_kv, batch_first=False, Swin's and MaxViT's attention blocks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from layer_checks import TOL, to_numpy
from real_networks import INFERENCE_TOL, TRAINING_TOL, check_network
from real_networks_beyond import TRANSFORMER_BLOCK, keras_transformer_block, small_vision_transformer
from torch import nn

from bnkit.convert import UnsupportedLayerError, keras_to_torch, torch_to_keras
from bnkit.keras import keras
from conftest import import_torchvision

L = keras.layers


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class SelfAttention(nn.Module):
    def __init__(self, d=8, heads=2, bias=True, need_weights=False, dropout=0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, bias=bias, dropout=dropout, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x):
        return self.attn(x, x, x, need_weights=self.need_weights)[0]


class CrossAttention(nn.Module):
    def __init__(self, d=8, heads=2, kdim=None, vdim=None, bias=True):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, bias=bias, kdim=kdim, vdim=vdim, batch_first=True)

    def forward(self, q, k, v):
        out, _ = self.attn(q, k, v)
        return out


def _randomized(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    return module.eval()


def _both_ways(module, shapes):
    """torch -> Keras and back, each against the real PyTorch module. The converted model takes and
    returns the mapped layout: a PyTorch (N, L, E) tensor is (N, E, L) in Keras."""
    xs = [_x(2, *s, seed=i) for i, s in enumerate(shapes)]
    with torch.no_grad():
        expected = module(*xs).numpy()
    model = torch_to_keras(module, shapes if len(shapes) > 1 else shapes[0])
    keras_xs = [np.moveaxis(x.numpy(), 1, -1) for x in xs]
    got = np.moveaxis(to_numpy(model(keras_xs if len(xs) > 1 else keras_xs[0])), -1, 1)
    np.testing.assert_allclose(got, expected, rtol=TOL, atol=TOL)
    back = keras_to_torch(model)
    with torch.no_grad():
        np.testing.assert_allclose(back(*xs).numpy(), expected, rtol=TOL, atol=TOL)
    return model


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_self_attention_from_torch(bias, need_weights):
    model = _both_ways(_randomized(SelfAttention(bias=bias, need_weights=need_weights)), [(5, 8)])
    layer = next(la for la in model.layers if isinstance(la, L.MultiHeadAttention))
    assert layer.num_heads == 2 and layer.key_dim == 4 and layer.use_bias is bias


@pytest.mark.parametrize("kdim, vdim", [(None, None), (6, 3)])
def test_cross_attention_from_torch(kdim, vdim):
    d = 8
    _both_ways(_randomized(CrossAttention(d, 4, kdim, vdim)), [(5, d), (7, kdim or d), (7, vdim or d)])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cross", [False, True])
def test_multi_head_attention_from_keras(bias, cross):
    keras.utils.set_random_seed(0)
    q = keras.Input((5, 8))
    kv = keras.Input((7, 6)) if cross else q
    layer = L.MultiHeadAttention(2, 4, use_bias=bias, name="mha")
    out = layer(q, kv)
    model = keras.Model([q, kv] if cross else q, out)
    xs = [
        np.random.default_rng(i).standard_normal((2, *t.shape[1:])).astype("float32")
        for i, t in enumerate(model.inputs)
    ]
    expected = to_numpy(model(xs if cross else xs[0]))
    module = keras_to_torch(model)  # takes and returns PyTorch's mapped layout: Keras (N, L, E) is (N, E, L)
    assert isinstance(module.mha, nn.MultiheadAttention) and module.mha.batch_first
    torch_xs = [torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))) for x in xs]
    with torch.no_grad():
        got = np.moveaxis(module(*torch_xs).numpy(), 1, -1)
    np.testing.assert_allclose(got, expected, rtol=TOL, atol=TOL)
    shapes = [tuple(x.shape[1:]) for x in torch_xs]
    back = torch_to_keras(module, shapes if cross else shapes[0])
    np.testing.assert_allclose(to_numpy(back(xs if cross else xs[0])), expected, rtol=TOL, atol=TOL)


def test_attention_dropout_in_training_keeps_the_rate():
    model = torch_to_keras(_randomized(SelfAttention(dropout=0.25)), (5, 8))
    layer = next(la for la in model.layers if isinstance(la, L.MultiHeadAttention))
    assert layer.dropout == 0.25
    assert keras_to_torch(model).get_submodule(layer.name).dropout == 0.25


@pytest.mark.parametrize(
    "module, call, message",
    [
        (nn.MultiheadAttention(8, 2, batch_first=False), "self", "batch_first=False"),
        (nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True), "self", "add_bias_kv=True"),
        (nn.MultiheadAttention(8, 2, batch_first=True, add_zero_attn=True), "self", "add_zero_attn=True"),
        (nn.MultiheadAttention(8, 2, batch_first=True), "weights", "need_weights=True"),
        (nn.MultiheadAttention(8, 2, batch_first=True), "mask", "attn_mask="),
    ],
)
def test_torch_attention_refusals(module, call, message):
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = module
            self.register_buffer("mask", torch.zeros(5, 5))

        def forward(self, x):
            if call == "weights":
                out, weights = self.attn(x, x, x)
                return out + weights.sum()
            if call == "mask":
                return self.attn(x, x, x, attn_mask=self.mask)[0]
            return self.attn(x, x, x)[0]

    with pytest.raises(UnsupportedLayerError, match=message):
        torch_to_keras(Wrapper().eval(), (5, 8))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda q: L.MultiHeadAttention(2, 3)(q, q), "key_dim=3"),
        (lambda q: L.MultiHeadAttention(2, 4, use_gate=True)(q, q), "use_gate=True"),
        (lambda q: L.MultiHeadAttention(2, 4)(q, q, use_causal_mask=True), "use_causal_mask=True"),
        (lambda q: L.MultiHeadAttention(2, 4, output_shape=6)(q, q), "output width 6"),
    ],
)
def test_keras_attention_refusals(make, message):
    q = keras.Input((5, 8))
    with pytest.raises(UnsupportedLayerError, match=message):
        keras_to_torch(keras.Model(q, make(q)))


# ---- einsum and shape checks ------------------------------------------------------------------


class Einsum(nn.Module):
    def __init__(self, equation):
        super().__init__()
        self.equation = equation

    def forward(self, x):
        return torch.einsum(self.equation, x, x)


def test_batched_matmul_einsum_both_ways():
    _both_ways(Einsum("bij,bkj->bik"), [(5, 8)])


def test_einsum_mixing_the_batch_is_refused():
    with pytest.raises(UnsupportedLayerError, match=r"einsum\('bij,cij->bc'\).*batch"):
        torch_to_keras(Einsum("bij,cij->bc"), (5, 8))


class Checked(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.size = size

    def forward(self, x):
        n, c, h, w = x.shape
        torch._assert(h == self.size, "Wrong image height!")
        torch._assert(x.dim() == 4, "Expected 4-D input")
        return x * 2.0


def test_a_true_shape_check_emits_nothing():
    model = torch_to_keras(Checked(6), (3, 6, 6))
    assert [type(op).__name__ for op in model.operations] == ["InputLayer", "Multiply"]


def test_a_false_shape_check_is_refused_naming_it():
    # the walker runs the module on input_shape first, where the check itself fails
    with pytest.raises(ValueError, match=r"does not run on input_shape \[\(3, 6, 6\)\].*Wrong image height"):
        torch_to_keras(Checked(8), (3, 6, 6))


# ---- whole networks -----------------------------------------------------------------------------


def test_small_vision_transformer_both_ways():
    net = small_vision_transformer()
    report = check_network(net, round_trip=True)
    assert report.inference_error <= INFERENCE_TOL, report
    assert report.round_trip_error <= INFERENCE_TOL, report
    assert report.training_error <= TRAINING_TOL, report
    # every weight comes back; the position embedding transposed (lost_weights accepts that): Keras' (N, L, E)
    # sequences are (N, E, L) in PyTorch's mapped layout until the first layer norm
    assert report.weights_lost == (), report


def test_keras_transformer_block_both_ways():
    report = check_network(TRANSFORMER_BLOCK, round_trip=True)
    assert report.batch_norms == 1, report
    assert report.inference_error <= INFERENCE_TOL, report
    assert report.round_trip_error <= INFERENCE_TOL, report
    assert report.training_error <= TRAINING_TOL and report.statistics_error <= TRAINING_TOL, report


@pytest.mark.parametrize(
    "name, size, layer, message",
    [
        ("swin_t", 32, "features.1.0.attn", r"window attention \(torchvision.models.swin_transformer"),
        ("maxvit_t", 224, "blocks.0.layers.0.layers.window_attention.attn_layer.1", "relative position bias"),
    ],
)
def test_swin_and_maxvit_are_refused_at_their_attention(name, size, layer, message):
    torchvision = import_torchvision()
    module = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
    with pytest.raises(UnsupportedLayerError, match=message) as refused:
        torch_to_keras(module, (3, size, size))
    assert refused.value.layer_name == layer and "relative_position_index" in refused.value.reason


@pytest.mark.parametrize("training", [False, True])
def test_compare_agrees_on_a_converted_transformer_block(training):
    from bnkit.diagnose.compare import compare
    from bnkit.diagnose.lint import lint

    kmodel = keras_transformer_block()  # attention dropout 0.1: compare runs it off on both sides itself
    tmodel = keras_to_torch(kmodel)
    x = np.random.default_rng(0).standard_normal((4, 16, 16, 3)).astype("float32")
    report = compare(kmodel, tmodel, x, training=training)
    assert report.agree and report.causes == [], str(report)
    assert lint(kmodel) == [] and lint(tmodel) == []


class IndexedTable(nn.Module):
    """A relative-position-bias pattern outside torchvision: a table indexed with an integer buffer."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 4))
        self.register_buffer("index", torch.arange(4))

    def forward(self, x):
        return x + self.table[self.index].sum(0)


def test_an_integer_buffer_is_refused_naming_its_dtype_and_reader():
    with pytest.raises(UnsupportedLayerError, match=r"'index' is a torch.int64 tensor, read by indexing"):
        torch_to_keras(IndexedTable(), (3, 4))
