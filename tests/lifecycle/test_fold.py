"""bnkit.fold_bn on PyTorch models: folded models equal the originals in eval.

Tolerance 1e-5 (float32): folding reassociates (W x) * s + t as (s W) x + (s b + t), a few
float32 roundings per output on values of order 1-10.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _lifecycle_models import ResNetStyle, randomize_batchnorms
from torch import nn

import bnkit
import bnkit.torch as bt

TOL = dict(rtol=1e-5, atol=1e-5)


def _batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _affines(model):
    return [m for m in model.modules() if isinstance(m, bt.ChannelAffine)]


def _assert_folds_exactly(model, x, *, affines=0, **kwargs):
    model = randomize_batchnorms(model).eval()
    state = copy.deepcopy(model.state_dict())
    folded = fold_bn_checked(model, **kwargs)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL)
    assert not _batchnorms(folded)
    assert len(_affines(folded)) == affines
    for key, value in model.state_dict().items():  # the original is untouched
        assert torch.equal(value, state[key]), key
    return folded


def fold_bn_checked(model, **kwargs):
    folded = bnkit.fold_bn(model, **kwargs)
    assert folded is not model and not folded.training
    return folded


def test_resnet_style_network_folds_every_batchnorm():
    torch.manual_seed(0)
    model = ResNetStyle()
    assert len(_batchnorms(model)) == 9
    _assert_folds_exactly(model, torch.randn(2, 3, 16, 16))
    assert model.stem[1].training is False  # randomize put it in eval(); fold_bn left it so
    model.train()
    folded = bnkit.fold_bn(model)
    assert model.training and all(m.training for m in model.modules())  # flags of the original kept
    assert not folded.training


class TransposeBlock(nn.Module):
    """torchvision-like decoder block: grouped ConvTranspose2d + BN + ReLU, and a BN after a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(6, 8, 3, stride=2, padding=1, output_padding=1, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.up2 = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.bn2 = bt.BatchNorm2d(4, convention="keras")
        self.post = nn.BatchNorm2d(4)  # follows a ReLU: becomes a ChannelAffine

    def forward(self, x):
        return self.post(torch.relu(self.bn2(self.up2(torch.relu(self.bn(self.up(x)))))))


def test_block_with_grouped_conv_transpose():
    torch.manual_seed(1)
    folded = _assert_folds_exactly(TransposeBlock(), torch.randn(2, 6, 5, 5), affines=1)
    assert folded.up.bias is not None  # created where the layer had none


def test_linear_batchnorm1d_mlp():
    torch.manual_seed(2)
    mlp = nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16, bias=False),
                        bt.BatchNorm1d(16, convention="keras"), nn.ReLU(), nn.Linear(16, 3))
    _assert_folds_exactly(mlp, torch.randn(7, 12))


def test_conv1d_and_conv3d():
    torch.manual_seed(3)
    _assert_folds_exactly(nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4, affine=False)), torch.randn(3, 2, 9))
    _assert_folds_exactly(nn.Sequential(nn.Conv3d(2, 4, 2, groups=2), nn.BatchNorm3d(4)),
                          torch.randn(2, 2, 3, 4, 4))


class SharedOutput(nn.Module):
    """The conv's output is read by the BN and by the skip: folding would change the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        z = self.conv(x)
        return self.bn(z) + z


def test_batchnorm_whose_input_has_other_readers_becomes_affine():
    torch.manual_seed(4)
    _assert_folds_exactly(SharedOutput(), torch.randn(2, 3, 4, 4), affines=1)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.extra = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.features(x)
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = self.extra(x)
        return x


def test_untraceable_model_falls_back_to_sequential_with_a_warning():
    torch.manual_seed(5)
    with pytest.warns(UserWarning, match="torch.fx could not trace Untraceable"):
        folded = _assert_folds_exactly(Untraceable(), torch.randn(2, 3, 6, 6), affines=1)
    assert isinstance(folded.features[1], nn.Identity) and isinstance(folded, Untraceable)


class UntraceableWithSharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
        self.side = self.features[0]  # the same conv, also called without the batch norm

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: torch.fx cannot trace this
            return self.features(x) + self.side(x)
        return self.features(x) - self.side(x)


def test_untraceable_fallback_does_not_fold_into_a_layer_used_elsewhere():
    torch.manual_seed(12)
    with pytest.warns(UserWarning, match="torch.fx could not trace"):
        _assert_folds_exactly(UntraceableWithSharedConv(), torch.rand(2, 3, 4, 4), affines=1)


def test_linear_on_3d_input_needs_example_inputs():
    # Linear acts on the last axis, BatchNorm1d on axis 1: with 4 == 4 the pair looks foldable
    torch.manual_seed(6)
    model = randomize_batchnorms(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))).eval()
    x = torch.randn(5, 4, 4)
    folded = bnkit.fold_bn(model, example_inputs=(x,))
    assert len(_affines(folded)) == 1
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL)
    unchecked = bnkit.fold_bn(model)  # assumes (N, C): right there, and says so on (N, C, L)
    with torch.no_grad():
        torch.testing.assert_close(unchecked(x[:, :, 0]), model(x[:, :, 0]), **TOL)
        with pytest.raises(ValueError, match=r"batch norm '1' into the Linear .* Got input shape \[5, 4, 4\]"):
            unchecked(x)
    assert type(bnkit.fold_bn(model, example_inputs=(x[:, :, 0],))[1]) is nn.Identity  # checked: no guard


def test_linear_then_batchnorm2d_never_folds():
    # (N, C, H, W) with W == C == out_features: a BatchNorm2d normalises axis 1, the Linear maps W
    torch.manual_seed(7)
    _assert_folds_exactly(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm2d(4)), torch.randn(2, 4, 3, 4), affines=1)


class ConvWeightReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + nn.functional.conv2d(x, self.conv.weight, self.conv.bias, padding=1)


def test_conv_whose_weight_is_also_read_directly_is_not_folded():
    torch.manual_seed(8)
    _assert_folds_exactly(ConvWeightReadTwice(), torch.randn(2, 3, 5, 5), affines=1)


class ConvWeightDtypeAsked(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x.to(self.conv.weight.dtype)))


def test_conv_whose_weight_dtype_is_asked_still_folds():
    torch.manual_seed(15)
    _assert_folds_exactly(ConvWeightDtypeAsked(), torch.randn(2, 3, 5, 5))


class AliasedBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.bn_alias = self.bn  # one module, two names; named_modules() yields only "bn"

    def forward(self, x):
        return self.bn_alias(self.conv(x))


def test_batchnorm_registered_under_two_names_is_replaced_under_both():
    torch.manual_seed(9)
    folded = _assert_folds_exactly(AliasedBatchNorm(), torch.randn(2, 3, 5, 5))
    assert isinstance(folded.bn_alias, nn.Identity)
    frozen = bnkit.freeze_bn(AliasedBatchNorm(), convention="keras")
    assert isinstance(frozen.bn_alias, bt.FrozenBatchNorm2d) and frozen.bn_alias is frozen.bn


class FunctionalBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        bn = self.bn
        return nn.functional.batch_norm(self.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                        False, 0.1, bn.eps)


def test_batchnorm_read_as_tensors_is_left_with_a_warning():
    torch.manual_seed(10)
    model = randomize_batchnorms(FunctionalBatchNorm()).eval()
    x = torch.randn(2, 3, 4, 4)
    with pytest.warns(UserWarning, match="BatchNorm2d 'bn' is not only called"):
        folded = bnkit.fold_bn(model)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL)


def test_parametrized_or_hooked_layers_are_not_folded_into():
    # weight_norm / spectral_norm rebuild weight at every call, a hook rewrites the output:
    # scaling the stored weight would be lost or wrong, so those batch norms become ChannelAffine
    from torch.nn.utils import parametrizations

    torch.manual_seed(11)
    hooked = nn.Conv2d(3, 4, 1)
    hooked.register_forward_hook(lambda module, args, output: output * 2)
    model = nn.Sequential(parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4),
                          nn.Flatten(), parametrizations.spectral_norm(nn.Linear(64, 5)), nn.BatchNorm1d(5))
    _assert_folds_exactly(model, torch.randn(2, 3, 6, 6), affines=2)
    _assert_folds_exactly(nn.Sequential(hooked, nn.BatchNorm2d(4)), torch.randn(2, 3, 4, 4), affines=1)


def _assert_rounded_once(actual, exact):
    """``actual`` (half) is ``exact`` (float32) rounded once: within half a unit in the last place."""
    eps = torch.finfo(actual.dtype).eps  # the spacing relative to the value, between 1 and 2 of it
    excess = (actual.float() - exact).abs() - (exact.abs() * eps / 2 * 1.001 + 1e-6)
    assert float(excess.max()) <= 0, f"beyond half an ulp by up to {float(excess.max()):.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_affine_rounds_once_like_batchnorm(dtype):
    # batch norm computes half inputs in float32 and rounds once; so must its replacement
    torch.manual_seed(13)
    model = randomize_batchnorms(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(8))).eval().to(dtype)
    x = (torch.randn(4, 8, 5, 5) * 3).to(dtype)
    with torch.no_grad():
        exact = copy.deepcopy(model).float()(x.float())  # the same (half) statistics, in float32
        _assert_rounded_once(model(x), exact)  # the real batch norm meets the bound
        folded = bnkit.fold_bn(model)(x)
    assert folded.dtype == dtype
    _assert_rounded_once(folded, exact)


def test_batchnorm_kept_in_float32_inside_a_bfloat16_model():
    torch.manual_seed(14)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    model = randomize_batchnorms(model).eval().to(torch.bfloat16)
    model[2].float()  # a common mixed-precision recipe; the batch norm still returns bfloat16
    x = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
        folded = bnkit.fold_bn(model)(x)  # was a dtype error in the next convolution
    assert folded.dtype == torch.bfloat16
    torch.testing.assert_close(folded, expected)


def test_batchnorm_without_running_stats_is_an_error_naming_it():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(ValueError, match=r"BatchNorm2d '1' has track_running_stats=False"):
        bnkit.fold_bn(model)


def test_a_batchnorm_alone_becomes_a_channel_affine():
    bn = randomize_batchnorms(nn.BatchNorm1d(3)).eval()
    folded = bnkit.fold_bn(bn)
    assert isinstance(folded, bt.ChannelAffine)
    x = torch.randn(4, 3, 2)
    torch.testing.assert_close(folded(x), bn(x), **TOL)


def test_not_a_model_is_a_type_error():
    with pytest.raises(TypeError, match="fold_bn takes a torch.nn.Module or a Keras 3 model, got list"):
        bnkit.fold_bn([1, 2])


def test_public_names_import_no_framework():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, bnkit; bnkit.fold_bn, bnkit.freeze_bn, bnkit.recalibrate; "
            "print(sorted(m for m in ('torch', 'keras', 'tensorflow') if m in sys.modules))")
    src = Path(__file__).resolve().parents[2] / "src"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(src), "PATH": ""}).stdout
    assert out.strip() == "[]"
