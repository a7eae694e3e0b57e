"""bnkit.lint: each finding on a model that has the pitfall, none on one that has not, and
each pitfall's premise checked against the real framework."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bnkit
from bnkit.diagnose.lint import Finding
from bnkit.examples import torch_seed_model
from bnkit.keras import keras
from bnkit.torch import BatchNorm2d


def codes(findings) -> list[str]:
    return [f.code for f in findings]


def by_code(findings, code) -> list[Finding]:
    return [f for f in findings if f.code == code]


def clean_cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 2))


# ---------------------------------------------------------------- PyTorch


def test_clean_models_have_no_findings():
    assert bnkit.lint(clean_cnn().eval(), for_inference=True) == []
    assert bnkit.lint(clean_cnn(), batch_size=8, input_shape=(3, 5, 5)) == []
    seed = torch_seed_model()  # Conv -> ReLU -> BN: the ReLU keeps the bias meaningful
    assert bnkit.lint(seed) == []


def test_model_in_train_mode_for_inference_is_an_error():
    model = clean_cnn()
    (finding,) = bnkit.lint(model, for_inference=True)
    assert (finding.code, finding.severity, finding.layer) == ("bn-training-mode", "error", "(model)")
    assert "model.eval()" in finding.message


def test_bn_left_in_train_mode_inside_an_eval_model():
    model = clean_cnn().eval()
    model[1].train()
    (warning,) = bnkit.lint(model)
    assert (warning.code, warning.layer, warning.severity) == ("bn-training-mode", "1", "warning")
    (error,) = bnkit.lint(model, for_inference=True)
    assert error.severity == "error"
    # the premise: that BN really normalises with batch statistics and moves its running mean
    before = model[1].running_mean.clone()
    model(torch.randn(4, 3, 5, 5) + 3)
    assert not torch.equal(model[1].running_mean, before)


def test_bn_without_running_stats():
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4, track_running_stats=False)).eval()
    (finding,) = bnkit.lint(model, for_inference=True)
    assert (finding.code, finding.severity) == ("bn-no-running-stats", "warning")


def test_conv_bias_before_bn_in_sequential():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 5), nn.BatchNorm1d(5))
    found = by_code(bnkit.lint(model), "conv-bias-before-bn")
    assert [(f.layer, f.severity) for f in found] == [("0", "warning"), ("3", "warning")]
    assert "bias=False" in found[0].message and "4 params" in found[0].message


def test_conv_bias_is_really_cancelled_by_training_bn():
    # the premise of conv-bias-before-bn, on real torch layers
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(6, 3, 7, 7)
    y = model(x)
    (y * torch.randn_like(y)).sum().backward()  # a loss that depends on the normalised values
    with torch.no_grad():
        model[0].bias.add_(5.0)
    torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)  # float32 rounding of the shifted mean
    assert model[0].bias.grad.abs().max() < 1e-3 * model[0].weight.grad.abs().max()  # zero up to rounding


def test_linear_bias_along_the_length_axis_is_not_flagged():
    """A Linear over the last axis of (N, C, L) adds a bias along L; BatchNorm1d normalises each of the
    C channels over N and L and does not cancel it (issue 19: flagged when C == L)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16)).train()
    x = torch.randn(4, 16, 16)
    y = model(x)
    with torch.no_grad():
        model[0].bias.add_(torch.linspace(-1.0, 1.0, 16))
    assert (model(x) - y).abs().max() > 0.1  # the bias matters: editing it changes the training output
    assert not by_code(bnkit.lint(model, input_shape=(16, 16)), "conv-bias-before-bn")
    # C != L: the Linear's width is not the batch norm's, so not its channel axis, even without a shape
    other = nn.Sequential(nn.Linear(8, 12), nn.BatchNorm1d(16))
    assert not by_code(bnkit.lint(other), "conv-bias-before-bn")
    # on (N, C) the bias is per channel and cancelled: flagged, with or without the shape
    plain = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16))
    assert by_code(bnkit.lint(plain), "conv-bias-before-bn")
    assert by_code(bnkit.lint(plain, input_shape=(8,)), "conv-bias-before-bn")


def test_conv_bias_found_through_fx_in_a_custom_module_but_not_when_shared():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = BatchNorm2d(4, convention="keras")  # a bnkit BN is recognised too
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            z = self.conv2(y)
            return self.bn2(z) + z  # conv2's output is also used past the BN: its bias matters

    assert [f.layer for f in by_code(bnkit.lint(Net()), "conv-bias-before-bn")] == ["conv"]


def test_conv_bias_falls_back_to_sequential_order_when_fx_cannot_trace():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx refuses
                return self.features(x)
            return self.features(-x)

    assert [f.layer for f in by_code(bnkit.lint(Gated()), "conv-bias-before-bn")] == ["features.0"]


def test_batch_of_one():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 5, bias=False))
    model.append(nn.BatchNorm1d(5))
    findings = by_code(bnkit.lint(model, batch_size=1, input_shape=(3, 5, 5)), "batch-of-one")
    assert [(f.layer, f.severity) for f in findings] == [("4", "error"), ("1", "warning")]
    assert "9 values per channel" in findings[1].message
    # the premise: PyTorch refuses one value per channel in training, and accepts 9
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        model(torch.randn(1, 3, 5, 5))
    assert by_code(bnkit.lint(model, batch_size=2, input_shape=(3, 5, 5)), "batch-of-one") == []
    # serving one sample from an eval() model is fine: running statistics
    assert by_code(bnkit.lint(model.eval(), batch_size=1, for_inference=True), "batch-of-one") == []
    # training with batch size 1 is not, even if the model is in eval() now (a loaded file)
    assert len(by_code(bnkit.lint(model, batch_size=1), "batch-of-one")) == 2
    # a BN kept in eval() inside a model in train() is frozen on purpose
    model.train()
    model[1].eval()
    assert [f.layer for f in by_code(bnkit.lint(model, batch_size=1), "batch-of-one")] == ["4"]


def test_frozen_bn_still_updating():
    model = clean_cnn()
    for p in model[1].parameters():
        p.requires_grad_(False)
    (finding,) = by_code(bnkit.lint(model), "frozen-bn-still-updating")
    assert finding.layer == "1" and ".eval()" in finding.message
    before = model[1].running_var.clone()
    model(torch.randn(4, 3, 5, 5) * 3)
    assert not torch.equal(model[1].running_var, before)  # the premise, on the real layer
    model[1].eval()
    assert by_code(bnkit.lint(model), "frozen-bn-still-updating") == []


def test_momentum_literal_port():
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4, momentum=0.99))
    (finding,) = by_code(bnkit.lint(model), "momentum-literal-port")
    assert "0.01" in finding.message and finding.severity == "warning"
    assert bnkit.translate_momentum(0.99, "keras", "torch") == pytest.approx(0.01)
    # in the Keras convention 0.99 is the usual value; a torch-convention 0.1 is too
    ok = nn.Sequential(BatchNorm2d(4, momentum=0.99, convention="keras"), nn.BatchNorm2d(4, momentum=0.1))
    assert by_code(bnkit.lint(ok), "momentum-literal-port") == []
    assert by_code(bnkit.lint(nn.Sequential(nn.BatchNorm2d(4, momentum=None))), "momentum-literal-port") == []


def test_momentum_literal_port_does_not_fire_on_bnkits_own_conversions():
    """The Keras seed's momentum=0.15 is flagged on the Keras model; its conversion keeps Keras' meaning
    on purpose (bnkit.torch.BatchNorm2d(convention="keras")), and so does torch_to_keras with PyTorch's:
    neither is a number copied literally."""
    from bnkit.convert import keras_to_torch, torch_to_keras
    from bnkit.examples import keras_seed_model

    keras_model = keras_seed_model()
    assert codes(bnkit.lint(keras_model)) == ["momentum-literal-port"]
    assert by_code(bnkit.lint(keras_to_torch(keras_model)), "momentum-literal-port") == []
    torch_model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4, momentum=0.9)).eval()
    assert codes(bnkit.lint(torch_model)) == ["momentum-literal-port"]
    assert by_code(bnkit.lint(torch_to_keras(torch_model, (1, 8, 8))), "momentum-literal-port") == []


def test_eps_mismatch_and_ordering():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm1d(4, eps=1e-3)).eval()
    model[0].train()
    findings = bnkit.lint(model, for_inference=True)
    assert codes(findings) == ["bn-training-mode", "eps-mismatch"]  # errors first
    assert findings[1].severity == "info" and "1e-05" in findings[1].message
    assert findings[0].to_dict()["code"] == "bn-training-mode"


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        bnkit.lint(clean_cnn(), batch_size=0)
    with pytest.raises(TypeError, match="torch.nn.Module or a keras.Model"):
        bnkit.lint(object())


# ---------------------------------------------------------------- Keras


def numpy(tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()  # Keras on its torch backend returns torch tensors


def keras_dense_bn(bias_activation=None, momentum=0.99, trainable=True):
    inputs = keras.Input((3,))
    x = keras.layers.Dense(4, activation=bias_activation, name="dense")(inputs)
    bn = keras.layers.BatchNormalization(momentum=momentum, name="bn")
    bn.trainable = trainable
    return keras.Model(inputs, bn(x))


def test_keras_conv_bias_before_bn():
    (finding,) = by_code(bnkit.lint(keras_dense_bn()), "conv-bias-before-bn")
    assert finding.layer == "dense" and "use_bias=False" in finding.message
    assert by_code(bnkit.lint(keras_dense_bn("relu")), "conv-bias-before-bn") == []
    assert by_code(bnkit.lint(keras_dense_bn(trainable=False)), "conv-bias-before-bn") == []
    # the premise on real Keras layers: in training, shifting the bias changes nothing
    model = keras_dense_bn()
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    y = numpy(model(x, training=True))
    dense = model.get_layer("dense")
    dense.bias.assign(dense.bias + 5.0)
    np.testing.assert_allclose(numpy(model(x, training=True)), y, atol=1e-4)


def test_keras_batch_of_one_frozen_and_momentum():
    findings = bnkit.lint(keras_dense_bn(momentum=0.1), batch_size=1)
    assert codes(findings) == ["batch-of-one", "conv-bias-before-bn", "momentum-literal-port"]
    assert findings[0].severity == "error" and "outputs beta" in findings[0].message
    assert "0.9" in findings[2].message
    # the premise: Keras silently outputs beta for a batch of one in training
    model = keras_dense_bn()
    out = numpy(model(np.ones((1, 3), "float32"), training=True))
    np.testing.assert_allclose(out, numpy(model.get_layer("bn").beta.value)[None], atol=1e-6)
    assert by_code(bnkit.lint(keras_dense_bn(), batch_size=1, for_inference=True), "batch-of-one") == []

    (frozen,) = by_code(bnkit.lint(keras_dense_bn(trainable=False)), "keras-frozen-inference")
    assert frozen.severity == "info" and "inference mode" in frozen.message


# ---------------------------------------------------------------- settings both frameworks accept


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), "tiny"])
def test_torch_eps_not_positive(eps):
    model = nn.Sequential(nn.BatchNorm2d(4, eps=eps), nn.BatchNorm2d(4))
    (finding,) = by_code(bnkit.lint(model), "eps-not-positive")
    assert finding.layer == "0" and finding.severity == "error" and "1e-5" in finding.message
    # the premise: PyTorch builds the layer, and refuses a training forward pass (NaN: all output NaN)
    if isinstance(eps, float) and eps != eps:
        assert torch.isnan(model[0](torch.randn(2, 4, 3, 3))).all()
        return
    with pytest.raises((ValueError, TypeError)):
        model[0](torch.randn(2, 4, 3, 3))


def test_torch_momentum_out_of_range():
    model = nn.Sequential(
        nn.BatchNorm1d(3, momentum=1.5),
        BatchNorm2d(3, momentum=-0.1, convention="keras"),
        nn.BatchNorm1d(3, momentum=torch.tensor(2.0)),
        nn.BatchNorm1d(3, momentum=1.0),
        nn.BatchNorm1d(3, momentum=0),
        nn.BatchNorm1d(3, momentum=None),
    )
    findings = bnkit.lint(model)
    assert [f.layer for f in by_code(findings, "momentum-out-of-range")] == ["0", "1", "2"]
    assert all(f.severity == "error" for f in by_code(findings, "momentum-out-of-range"))
    # an out-of-range momentum is not also reported as a literal port
    assert [f.layer for f in by_code(findings, "momentum-literal-port")] == ["3"]
    # the premise: PyTorch accepts momentum=1.5, and a batch of small variance makes the running variance negative
    bn = nn.BatchNorm1d(3, momentum=1.5)
    bn(torch.randn(64, 3, generator=torch.Generator().manual_seed(0)) * 0.1)
    assert (bn.running_var < 0).all()


def test_clean_settings_have_no_settings_findings():
    model = nn.Sequential(nn.BatchNorm1d(3, eps=1e-5, momentum=0.1), BatchNorm2d(3, convention="keras"))
    assert by_code(bnkit.lint(model), "eps-not-positive") == by_code(bnkit.lint(model), "momentum-out-of-range") == []


def test_keras_eps_not_positive_and_momentum_out_of_range():
    inputs = keras.Input((3,))
    x = keras.layers.BatchNormalization(epsilon=0.0, name="bn_eps")(inputs)
    x = keras.layers.BatchNormalization(momentum=1.2, name="bn_momentum")(x)
    findings = bnkit.lint(keras.Model(inputs, x))
    (eps,) = by_code(findings, "eps-not-positive")
    (momentum,) = by_code(findings, "momentum-out-of-range")
    assert (eps.layer, momentum.layer) == ("bn_eps", "bn_momentum")
    assert "1e-3" in eps.message and "NaN" in eps.message
    assert by_code(findings, "momentum-literal-port") == []
    # the premise: Keras builds epsilon=0 and gives NaN for a constant channel in training
    bn = keras.layers.BatchNormalization(epsilon=0.0)
    y = numpy(bn(np.array([[1.0, 2.0], [1.0, 3.0]], "float32"), training=True))
    assert np.isnan(y[:, 0]).all() and np.isfinite(y[:, 1]).all()
