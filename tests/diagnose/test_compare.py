"""bnkit.compare on real PyTorch and Keras 3 models: each cause in the catalogue is produced by a
deliberately broken pair and named by its code alone; a faithful port is reported as agreeing.

Pairs are small analogues of the seed network (8x8 inputs, 4 channels) ported by hand: the Keras
conv kernel (kh, kw, in, out) becomes PyTorch's (out, in, kh, kw), a dense kernel (in, out)
becomes (out, in) — after Flatten its rows are reordered from H·W·C to C·H·W — and the batch
norm's gamma, beta and moving statistics are copied. Tolerances are compare's float32 defaults.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

import bnkit
from bnkit.diagnose.compare import CAUSES, compare
from bnkit.keras import keras

H, W, C_IN, C = 8, 8, 2, 4


def keras_net(*, momentum=0.15, epsilon=1e-3, bn_trainable=True, seed=0):
    """The seed network in miniature: Conv2D(relu) → BatchNormalization → Flatten → Dense → Dense."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input(shape=(H, W, C_IN))
    x = layers.Conv2D(C, 3, padding="same", activation="relu", name="conv")(inputs)
    bn = layers.BatchNormalization(momentum=momentum, epsilon=epsilon, name="bn")
    x = bn(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(6, activation="relu", name="dense")(x)
    outputs = layers.Dense(3, activation="softmax", name="head")(x)
    model = keras.Model(inputs, outputs, name="mini_seed")
    rng = np.random.default_rng(seed + 1)
    # running statistics as after training: inference differs from the batch statistics
    bn.gamma.assign(rng.uniform(0.5, 1.5, C).astype("float32"))
    bn.beta.assign(rng.normal(0, 0.5, C).astype("float32"))
    bn.moving_mean.assign(rng.normal(0.3, 0.2, C).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.02, 0.1, C).astype("float32"))
    bn.trainable = bn_trainable
    return model


def torch_port(kmodel, bn: nn.Module, *, permute_flatten=True):
    """Hand port of a :func:`keras_net`-shaped Keras model (conv, bn, flatten, dense, head) to
    PyTorch with the given batch norm; the weights are copied."""
    kconv, kbn, kdense, khead = (kmodel.get_layer(n) for n in ("conv", "bn", "dense", "head"))
    h, w, _ = kmodel.input_shape[1:]
    conv_kernel, conv_bias = weights_of(kconv)
    dense_kernel, dense_bias = weights_of(kdense)
    head_kernel, head_bias = weights_of(khead)
    c_in, c = conv_kernel.shape[2:]
    conv = nn.Conv2d(c_in, c, conv_kernel.shape[0], padding=conv_kernel.shape[0] // 2)
    dense = nn.Linear(h * w * c, dense_kernel.shape[1])
    head = nn.Linear(*head_kernel.shape)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(conv_kernel.transpose(3, 2, 0, 1).copy()))
        conv.bias.copy_(torch.from_numpy(conv_bias))
        if permute_flatten:  # Keras rows are in H·W·C order, PyTorch's Flatten gives C·H·W
            dense_kernel = dense_kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
        dense.weight.copy_(torch.from_numpy(dense_kernel.T.copy()))
        dense.bias.copy_(torch.from_numpy(dense_bias))
        head.weight.copy_(torch.from_numpy(head_kernel.T.copy()))
        head.bias.copy_(torch.from_numpy(head_bias))
        gamma, beta, mean, var = weights_of(kbn)
        if bn.affine:
            bn.weight.copy_(torch.from_numpy(gamma))
            bn.bias.copy_(torch.from_numpy(beta))
        if bn.running_mean is not None:
            bn.running_mean.copy_(torch.from_numpy(mean))
            bn.running_var.copy_(torch.from_numpy(var))
    model = nn.Sequential(conv, nn.ReLU(), bn, nn.Flatten(), dense, nn.ReLU(), head, nn.Softmax(dim=1))
    return model.eval()


def weights_of(layer):
    return [v.value.detach().cpu().numpy() for v in layer.weights]  # KERAS_BACKEND=torch


def nhwc_batch(n=4, seed=0):
    return np.random.default_rng(seed).normal(0, 1, (n, H, W, C_IN)).astype("float32")


def codes(report):
    return [c.code for c in report.causes]


def faithful_bn(momentum=0.15, eps=1e-3):
    return bnkit.torch.BatchNorm2d(C, momentum=momentum, eps=eps, convention="keras")


# --------------------------------------------------------------------------------------------
# agreement
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_faithful_port_agrees(training):
    kmodel = keras_net()
    tmodel = torch_port(kmodel, faithful_bn())
    report = compare(kmodel, tmodel, nhwc_batch(), training=training)
    assert report.agree, str(report)
    assert report.causes == []
    assert report.first_divergence is None
    assert [r.kind for r in report.rows] == ["conv", "bn", "flatten", "dense", "dense"]
    assert report.output_max_abs_diff < 1e-5
    if training:
        bn_row = report.rows[1]
        assert bn_row.running_mean_abs_diff is not None and bn_row.running_var_abs_diff < 1e-5


def test_faithful_port_agrees_with_torch_as_model_a():
    kmodel = keras_net()
    tmodel = torch_port(kmodel, faithful_bn())
    x_nchw = np.ascontiguousarray(nhwc_batch().transpose(0, 3, 1, 2))
    report = compare(tmodel, kmodel, x_nchw)
    assert report.agree and report.causes == []
    assert (report.framework_a, report.framework_b) == ("torch", "keras")


# --------------------------------------------------------------------------------------------
# one broken pair per cause: exactly that code
# --------------------------------------------------------------------------------------------


def test_training_mode_torch_module_left_in_train():
    kmodel = keras_net()
    tmodel = torch_port(kmodel, faithful_bn()).train()  # forgot model.eval()
    report = compare(kmodel, tmodel, nhwc_batch())
    assert codes(report) == ["training-mode"]
    assert report.first_divergence.kind == "bn"
    assert report.causes[0].layers == ["bn / 2"]
    assert tmodel.training, "compare must not change the caller's module"


class _FrozenBatchNormNet(nn.Sequential):
    """The detection-codebase pattern: train() keeps the batch norms in eval()."""

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self


def test_training_mode_torch_batchnorm_kept_in_eval_under_training():
    kmodel = keras_net()
    tmodel = _FrozenBatchNormNet(*torch_port(kmodel, faithful_bn()))
    report = compare(kmodel, tmodel, nhwc_batch(), training=True)
    assert codes(report) == ["training-mode"]


def test_eps():
    kmodel = keras_net(epsilon=1e-3)
    tmodel = torch_port(kmodel, faithful_bn(eps=1e-5))  # PyTorch's default eps kept
    report = compare(kmodel, tmodel, nhwc_batch())
    assert codes(report) == ["eps"]
    assert "0.001" in report.causes[0].explanation and "1e-05" in report.causes[0].explanation


def test_eps_between_two_keras_models():
    report = compare(keras_net(epsilon=1e-3), keras_net(epsilon=1e-5), nhwc_batch())
    assert codes(report) == ["eps"]


def test_momentum_same_number_opposite_meaning():
    # PyTorch's meaning of momentum (weight of the new batch) with Keras' biased estimator and eps,
    # so that only the meaning of 0.15 differs from the Keras layer
    torch_meaning = bnkit.Convention("torch-biased", 1e-3, 0.1, "new", True, "biased", 1)
    kmodel = keras_net(momentum=0.15)
    tmodel = torch_port(kmodel, bnkit.torch.BatchNorm2d(C, momentum=0.15, convention=torch_meaning))
    report = compare(kmodel, tmodel, nhwc_batch(), training=True)
    assert codes(report) == ["momentum-convention"]
    assert "both say momentum=0.15" in report.causes[0].explanation
    # the outputs of the training step agree: only the running statistics tell
    assert not report.rows[1].diverges and report.rows[1].running_stats_diverge
    # in inference the momentum plays no part: the models agree
    assert compare(kmodel, tmodel, nhwc_batch()).causes == []


def test_momentum_differs_after_translation():
    kmodel = keras_net(momentum=0.15)
    tmodel = torch_port(kmodel, faithful_bn(momentum=0.85))  # Keras convention, but 0.85
    report = compare(kmodel, tmodel, nhwc_batch(), training=True)
    assert codes(report) == ["momentum-convention"]


def test_running_variance_estimator():
    kmodel = keras_net(momentum=0.15)
    # momentum translated correctly (0.85 on the new batch), eps matched: only the estimator differs
    tmodel = torch_port(kmodel, nn.BatchNorm2d(C, eps=1e-3, momentum=bnkit.translate_momentum(0.15, "keras", "torch")))
    report = compare(kmodel, tmodel, nhwc_batch(), training=True)
    assert codes(report) == ["running-variance-estimator"]
    # the running variances differ by the factor n/(n-1) on the batch part only
    bn = report.batch_norms[0]
    n = 4 * H * W
    new_k = bn.a.running_var_after - 0.15 * bn.a.running_var_before
    new_t = bn.b.running_var_after - 0.15 * bn.b.running_var_before
    np.testing.assert_allclose(new_t, new_k * n / (n - 1), rtol=1e-5)
    assert f"n/(n-1) = {n / (n - 1):.6g} with n = {n}" in report.causes[0].evidence
    assert f"folded in {n / (n - 1):.5g}" in report.causes[0].evidence


def test_running_variance_estimator_between_two_torch_models():
    kmodel = keras_net()
    a = torch_port(kmodel, faithful_bn(momentum=0.9))
    b = torch_port(kmodel, nn.BatchNorm2d(C, eps=1e-3, momentum=0.1))
    x = np.ascontiguousarray(nhwc_batch().transpose(0, 3, 1, 2))
    assert codes(compare(a, b, x, training=True)) == ["running-variance-estimator"]


def test_keras_frozen_inference():
    kmodel = keras_net(bn_trainable=False)
    tmodel = torch_port(kmodel, faithful_bn())
    report = compare(kmodel, tmodel, nhwc_batch(), training=True)
    assert codes(report) == ["keras-frozen-inference"]
    assert report.batch_norms[0].a.uses_batch_stats is False
    assert report.batch_norms[0].b.uses_batch_stats is True


def test_missing_running_stats():
    kmodel = keras_net()
    bn = bnkit.torch.BatchNorm2d(C, momentum=0.15, eps=1e-3, track_running_stats=False, convention="keras")
    tmodel = torch_port(kmodel, bn)
    report = compare(kmodel, tmodel, nhwc_batch())
    assert codes(report) == ["missing-running-stats"]


def test_missing_running_stats_in_a_training_step():
    """The step's outputs agree (both use batch statistics), but only Keras updates running statistics."""
    kmodel = keras_net()
    bn = bnkit.torch.BatchNorm2d(C, momentum=0.15, eps=1e-3, track_running_stats=False, convention="keras")
    report = compare(torch_port(kmodel, bn), kmodel, np.moveaxis(nhwc_batch(), -1, 1), training=True)
    assert not report.agree and codes(report) == ["missing-running-stats"]
    assert report.first_divergence.kind == "bn" and not report.first_divergence.diverges


@pytest.mark.parametrize("keras_first", [True, False])
def test_layout_flatten_weights_not_permuted(keras_first):
    kmodel = keras_net()
    tmodel = torch_port(kmodel, faithful_bn(), permute_flatten=False)
    x = nhwc_batch()
    if keras_first:
        report = compare(kmodel, tmodel, x)
    else:
        report = compare(tmodel, kmodel, np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    assert codes(report) == ["layout"]
    assert report.first_divergence.kind == "dense"
    flatten_row = report.rows[2]
    assert flatten_row.kind == "flatten" and not flatten_row.diverges


class _ChannelsLast(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


def _flatten_channels_last(tmodel):
    """The port written the other way: permute the data to NHWC before Flatten, as Keras flattens."""
    layers = list(tmodel)
    return nn.Sequential(*layers[:3], _ChannelsLast(), *layers[3:]).eval()


@pytest.mark.parametrize("keras_first", [True, False])
def test_port_that_flattens_channels_last_agrees_and_permuted_weights_there_are_layout(keras_first):
    kmodel = keras_net()
    x = nhwc_batch()
    for permute_flatten, expected in ((False, []), (True, ["layout"])):
        tmodel = _flatten_channels_last(torch_port(kmodel, faithful_bn(), permute_flatten=permute_flatten))
        if keras_first:
            report = compare(kmodel, tmodel, x)
        else:
            report = compare(tmodel, kmodel, np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        assert codes(report) == expected
        assert report.agree is (expected == [])


def test_layout_conv_kernel_with_spatial_axes_swapped():
    kmodel = keras_net()
    tmodel = torch_port(kmodel, faithful_bn())
    with torch.no_grad():  # transpose(3, 2, 1, 0) instead of (3, 2, 0, 1): kh and kw swapped
        tmodel[0].weight.copy_(torch.from_numpy(weights_of(kmodel.get_layer("conv"))[0].transpose(3, 2, 1, 0).copy()))
    report = compare(kmodel, tmodel, nhwc_batch())
    assert codes(report) == ["layout"] and report.first_divergence.kind == "conv"


def test_weights_differ():
    kmodel = keras_net()
    tmodel = torch_port(kmodel, faithful_bn())
    with torch.no_grad():
        tmodel[0].bias.add_(0.1)
    report = compare(kmodel, tmodel, nhwc_batch())
    assert codes(report) == ["weights"]
    assert report.first_divergence.kind == "conv"


def test_outputs_below_atol_are_flagged_and_a_smaller_atol_compares_them():
    """atol is absolute: a network whose outputs are ~1e-12 agrees within it whatever its head holds
    (as torchvision's efficientnet_b1 at initialisation, outputs 3e-13). The report says so, and a
    smaller atol finds the changed head."""
    from rich.console import Console

    from bnkit.convert import keras_to_torch
    from bnkit.diagnose.render import render_rich

    kmodel = keras_net()
    assert compare(kmodel, torch_port(kmodel, faithful_bn()), nhwc_batch()).below_atol is False
    x = keras.layers.Flatten()(kmodel.get_layer("bn").output)
    tiny = keras.Model(kmodel.input, keras.layers.Dense(3, name="tiny_head")(x))
    head = tiny.get_layer("tiny_head")
    head.kernel.assign(head.kernel * 1e-12)
    tmodel = keras_to_torch(tiny)
    report = compare(tiny, tmodel, nhwc_batch())
    assert report.agree and report.below_atol and 0 < report.output_max_abs < 1e-10
    console = Console(record=True, width=100)
    render_rich(report, console)
    assert "below atol 1e-05" in console.export_text()
    assert report.to_dict()["output"]["below_atol"] is True

    (linear,) = [m for m in tmodel.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        linear.weight.mul_(1.1)
    assert compare(tiny, tmodel, nhwc_batch()).agree  # the limit: 10% of 1e-12 is below atol
    report = compare(tiny, tmodel, nhwc_batch(), atol=1e-20)
    assert not report.agree and not report.below_atol
    assert codes(report) == ["weights"] and report.first_divergence.name.startswith("tiny_head")


def test_weights_and_training_mode_are_both_named():
    kmodel = keras_net()
    tmodel = torch_port(kmodel, faithful_bn()).train()
    with torch.no_grad():
        tmodel[0].weight.mul_(1.5)
    report = compare(kmodel, tmodel, nhwc_batch())
    assert codes(report) == ["training-mode", "weights"]


def test_every_catalogue_code_is_documented():
    assert set(CAUSES) >= {
        "training-mode",
        "eps",
        "momentum-convention",
        "running-variance-estimator",
        "layout",
        "keras-frozen-inference",
        "missing-running-stats",
    }


# --------------------------------------------------------------------------------------------
# side effects, inputs, renderings
# --------------------------------------------------------------------------------------------


def test_compare_leaves_both_models_unchanged():
    kmodel = keras_net()
    tmodel = torch_port(kmodel, faithful_bn())
    before_k = [w.copy() for w in weights_of(kmodel.get_layer("bn"))]
    before_t = copy.deepcopy(tmodel.state_dict())
    compare(kmodel, tmodel, nhwc_batch(), training=True)
    for old, new in zip(before_k, weights_of(kmodel.get_layer("bn")), strict=True):
        np.testing.assert_array_equal(old, new)
    for key, value in tmodel.state_dict().items():
        assert torch.equal(value, before_t[key]), key
    assert not tmodel.training


def test_bad_inputs_give_clear_errors():
    kmodel = keras_net()
    with pytest.raises(TypeError, match="torch.nn.Module or a keras.Model"):
        compare(kmodel, object(), nhwc_batch())
    with pytest.raises(TypeError, match="floating point"):
        compare(kmodel, kmodel, np.zeros((2, H, W, C_IN), dtype=np.int64))


def test_to_dict_is_json():
    kmodel = keras_net()
    report = compare(kmodel, torch_port(kmodel, faithful_bn()).train(), nhwc_batch())
    data = json.loads(json.dumps(report.to_dict()))
    assert data["agree"] is False
    assert [c["code"] for c in data["causes"]] == ["training-mode"]
    assert data["first_divergence"]["kind"] == "bn"
    assert len(data["layers"]) == 5
    assert data["keras_backend"] == keras.backend.backend()  # which backend ran the Keras model
    torch_model = torch_port(kmodel, faithful_bn())
    two_torch = compare(torch_model, torch_model, nhwc_batch().transpose(0, 3, 1, 2))
    assert two_torch.to_dict()["keras_backend"] is None


def test_html_report_is_self_contained(tmp_path):
    kmodel = keras_net()
    report = compare(kmodel, torch_port(kmodel, faithful_bn(eps=1e-5)), nhwc_batch())
    path = tmp_path / "report.html"
    assert report.to_html(path) == str(path)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "<svg" in text
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in text and "src=" not in text and "<link" not in text and "<script" not in text
    assert "eps" in text and "bn / 2" in text
    with pytest.raises(FileExistsError, match="force"):
        report.to_html(path)
    path.write_text("old")
    report.to_html(path, force=True)
    assert "<svg" in path.read_text(encoding="utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temp files left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file, not mkstemp's private 0600


def test_public_api_is_lazy():
    assert bnkit.compare is compare


def test_seed_network_naive_port_and_faithful_port():
    """The bundled seed network (64x64x1, 32 channels, a 131072x100 dense layer)."""
    from bnkit.examples.seed import SEED_CHANNELS, SEED_KERAS_MOMENTUM, keras_seed_model

    kmodel = keras_seed_model()
    x = np.random.default_rng(0).uniform(0, 1, (2, 64, 64, 1)).astype("float32")
    naive = torch_port(kmodel, nn.BatchNorm2d(SEED_CHANNELS, momentum=SEED_KERAS_MOMENTUM))
    report = compare(kmodel, naive, x, training=True)
    assert codes(report) == ["eps", "momentum-convention", "running-variance-estimator"]
    faithful = torch_port(
        kmodel, bnkit.torch.BatchNorm2d(SEED_CHANNELS, momentum=SEED_KERAS_MOMENTUM, convention="keras")
    )
    report = compare(kmodel, faithful, x, training=True)
    assert report.agree and report.causes == [], str(report)


# --------------------------------------------------------------------------------------------
# the command line (the real console script, on model files)
# --------------------------------------------------------------------------------------------


def test_cli_agreeing_files_exit_0_with_json_and_html(run_cli, tmp_path):
    from bnkit.io import save_model

    kmodel = keras_net()
    save_model(kmodel, tmp_path / "a.keras")
    save_model(torch_port(kmodel, faithful_bn()), tmp_path / "b.pt2", input_shape=(C_IN, H, W))
    proc = run_cli("compare", "a.keras", "b.pt2", "--training", "--json", "--report", "r.html")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["agree"] is True and data["causes"] == [] and data["training"] is True
    assert [row["kind"] for row in data["layers"]] == ["conv", "bn", "flatten", "dense", "dense"]
    assert "<svg" in (tmp_path / "r.html").read_text(encoding="utf-8")
    # an existing report is kept unless --force
    proc = run_cli("compare", "a.keras", "b.pt2", "--report", "r.html")
    assert proc.returncode == 2 and "already exists" in proc.stderr and "--force" in proc.stderr


def test_cli_disagreeing_files_exit_1_and_name_the_cause(run_cli, tmp_path):
    from bnkit.io import save_model

    save_model(keras_net(epsilon=1e-3), tmp_path / "a.keras")
    save_model(keras_net(epsilon=1e-5), tmp_path / "b.keras")
    proc = run_cli("compare", "a.keras", "b.keras", "--seed", "3")
    assert proc.returncode == 1, proc.stderr
    assert "The models disagree" in proc.stdout and "eps" in proc.stdout and "✗ first" in proc.stdout


def test_cli_reads_the_input_shape_of_pt2_programs(run_cli, tmp_path):
    """Two PyTorch models and no --input-shape: the .pt2 program recorded its example input."""
    from bnkit.io import save_model

    tmodel = torch_port(keras_net(), faithful_bn())
    save_model(tmodel, tmp_path / "a.pt2", input_shape=(C_IN, H, W))
    proc = run_cli("compare", "a.pt2", "a.pt2", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["agree"] and report["input_shape"] == [2, C_IN, H, W]  # batch 2 by default


def test_cli_errors_exit_2_with_one_line(run_cli, tmp_path):
    proc = run_cli("compare", "missing.keras", "other.pt2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["bnkit compare: error: missing.keras: no such file"]
    proc = run_cli("compare", "a.keras", "b.keras", "--input-shape", "8,eight")
    assert proc.returncode == 2 and "--input-shape" in proc.stderr


# --------------------------------------------------------------------------------------------
# pairing beyond Sequential stacks
# --------------------------------------------------------------------------------------------


class _TorchResidual(nn.Module):
    """Functional ``x + y`` and ``flatten``: seen through torch.fx, not hooks."""

    def __init__(self, bn_momentum=0.01):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(4, eps=1e-3, momentum=bn_momentum)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(4, eps=1e-3, momentum=bn_momentum)
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(x + self.b2(self.c2(x)))
        return self.head(self.drop(torch.flatten(self.gap(self.pool(x)), 1)))


def _keras_residual():
    keras.utils.set_random_seed(0)
    layers = keras.layers
    inputs = keras.Input((H, W, 3))
    x = layers.Conv2D(4, 3, padding="same", use_bias=False, name="c1")(inputs)
    x = layers.ReLU(name="r1")(layers.BatchNormalization(name="b1")(x))
    y = layers.BatchNormalization(name="b2")(layers.Conv2D(4, 3, padding="same", use_bias=False, name="c2")(x))
    x = layers.ReLU(name="r2")(layers.Add(name="add")([x, y]))
    x = layers.GlobalAveragePooling2D(name="gap")(layers.MaxPooling2D(name="pool")(x))
    outputs = layers.Dense(3, name="head")(layers.Dropout(0.5, name="drop")(x))
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("training", [False, True])
def test_residual_pair_with_functional_add(training):
    kmodel = _keras_residual()
    tmodel = _TorchResidual().eval()
    with torch.no_grad():
        for name in ("c1", "c2"):
            kernel = weights_of(kmodel.get_layer(name))[0]
            getattr(tmodel, name).weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
        kernel, bias = weights_of(kmodel.get_layer("head"))
        tmodel.head.weight.copy_(torch.from_numpy(kernel.T.copy()))
        tmodel.head.bias.copy_(torch.from_numpy(bias))
    x = np.random.default_rng(0).normal(size=(4, H, W, 3)).astype("float32")
    report = compare(kmodel, tmodel, x, training=training)
    pairs = [(r.name_a, r.name_b) for r in report.rows]
    assert ("add", "add") in pairs and ("b2", "b2") in pairs and ("head", "head") in pairs
    if training:  # Keras 0.99 is PyTorch 0.01; the variance estimators still differ
        assert codes(report) == ["running-variance-estimator"]
    else:
        assert report.agree and report.causes == [], str(report)


def test_models_ending_in_flatten_compare_in_one_order():
    kmodel = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.BatchNormalization(), keras.layers.Flatten()])
    tmodel = nn.Sequential(bnkit.torch.BatchNorm2d(3, convention="keras"), nn.Flatten())
    x = np.random.default_rng(0).normal(size=(5, 4, 4, 3)).astype("float32")
    report = compare(kmodel, tmodel, x, training=True)
    assert report.agree and report.output_max_abs_diff < 1e-5, str(report)


def test_html_chart_has_one_row_per_layer_for_dozens_of_batch_norms(tmp_path):
    torch.manual_seed(0)
    layers = []
    for i in range(24):
        layers += [nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()]
    a = nn.Sequential(*layers)
    x = np.random.default_rng(0).normal(size=(2, 3, 6, 6)).astype("float32")
    with torch.no_grad():  # running statistics of this data, as after training
        for m in a.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        a(torch.from_numpy(x))
    a.eval()
    b = copy.deepcopy(a)
    b[3 * 20 + 1].eps = 1e-2  # one batch norm out of 24
    report = compare(a, b, x)
    assert codes(report) == ["eps"] and report.causes[0].layers == ["61"]
    assert report.first_divergence.name == "61"
    report.to_html(tmp_path / "deep.html")
    svg = (tmp_path / "deep.html").read_text(encoding="utf-8").split("<svg", 1)[1].split("</svg>", 1)[0]
    assert svg.count('font-weight="bold"') == 24  # every batch norm labelled, in bold
    assert svg.count("<rect") >= len(report.rows) == 72  # conv, bn, relu: one bar each
    assert "▶ 61" in svg  # the first divergence is marked


def test_causes_read_as_their_codes():
    from bnkit.diagnose.compare import Cause

    causes = [Cause("eps", "eps differs", ["bn"]), Cause("training-mode", "one side trains")]
    assert "eps" in causes and "layout" not in causes
    assert causes == ["eps", "training-mode"] and set(causes) == {"eps", "training-mode"}
    assert sorted(causes, reverse=True) == ["training-mode", "eps"]
    assert str(causes[0]) == "eps" and causes[0] != Cause("eps", "another explanation")


def test_rich_table_fits_80_columns():
    """Piped output and CI logs are 80 columns wide: layer names stay readable, no column is cut."""
    import io

    from rich.console import Console

    kmodel = keras_net()
    bn = bnkit.torch.BatchNorm2d(C, momentum=0.15, eps=1e-3, track_running_stats=False, convention="keras")
    report = compare(kmodel, torch_port(kmodel, bn), nhwc_batch(), training=True)
    out = io.StringIO()
    report.render(Console(file=out, width=80, color_system=None))
    lines = out.getvalue().splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    assert any("✗ first" in line and "missing" in line for line in lines)  # the stats column says why
    assert any(line.split()[:3] == ["0", "conv", "/"] for line in lines)


def test_rounding_of_a_wide_dense_is_not_blamed_on_its_weights():
    """The seed's Dense sums 131,072 terms: in float32 the two frameworks' sums differ by ~4e-5 on the
    same input. compare must not call that 'weights' (the weights are the same, converted)."""
    from bnkit.convert import keras_to_torch
    from bnkit.examples import keras_seed_model

    kmodel = keras_seed_model()
    tmodel = keras_to_torch(kmodel, semantics="target")  # PyTorch's own BatchNorm2d: same weights
    x = np.random.default_rng(0).standard_normal((2, 64, 64, 1)).astype("float32")
    report = compare(kmodel, tmodel, x, training=True)
    assert "weights" not in codes(report)
    if not report.agree:
        assert codes(report) == ["unexplained"] and "rounding" in report.causes[0].explanation


def test_cli_all_shows_every_row_of_a_large_network(run_cli, tmp_path):
    from bnkit.io import save_model

    torch.manual_seed(0)
    layers = []
    for i in range(20):
        layers += [nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()]
    save_model(nn.Sequential(*layers).eval(), tmp_path / "deep.pt2", input_shape=(3, 6, 6))
    short = run_cli("compare", "deep.pt2", "deep.pt2")
    full = run_cli("compare", "deep.pt2", "deep.pt2", "--all")
    assert short.returncode == full.returncode == 0, short.stderr + full.stderr
    assert "of 60 paired layers shown; --all" in short.stdout
    assert all(f"\n {k:>2}  " in full.stdout or f"\n{k:>3}  " in full.stdout for k in (0, 30, 59))
    assert "paired layers shown" not in full.stdout


@pytest.mark.parametrize("length", [16, 12])
def test_linear_over_the_length_axis_agrees_whether_or_not_channels_equal_steps(length):
    """Issue 19, defect 2: a Linear mixing the length axis of (N, C, L) runs on PyTorch's layout in the
    converted Keras model too (a Permute, then a Dense on the last axis); with C == L the shapes read
    the same either way, and compare reported a layout divergence on an exact conversion. A changed
    weight there is still found."""
    from bnkit.convert import torch_to_keras

    torch.manual_seed(0)
    channels = 16
    tmodel = nn.Sequential(
        nn.Conv1d(3, channels, 3, padding=1), nn.BatchNorm1d(channels), nn.ReLU(),
        nn.Linear(length, length), nn.Flatten(), nn.Linear(channels * length, 4),
    ).eval()  # fmt: skip
    kmodel = torch_to_keras(tmodel, (3, length))
    x = np.random.default_rng(0).standard_normal((2, 3, length)).astype("float32")
    for training in (False, True):
        report = compare(tmodel, kmodel, x, training=training)
        assert report.agree and codes(report) == [], report
    dense = next(layer for layer in kmodel.layers if isinstance(layer, keras.layers.Dense))
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel, bias + 0.1])
    report = compare(tmodel, kmodel, x)
    assert not report.agree and codes(report) == ["weights"]


class _TwoTransposedConvs(nn.Module):
    """Two transposed convolutions of one input, one of which Keras computes as a larger window and a crop."""

    def __init__(self) -> None:
        super().__init__()
        self.cropped = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1)
        self.plain = nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.cropped(x) + self.plain(x))


def test_a_transposed_convolution_cropped_on_one_side_pairs_with_its_twin():
    """A crop after a transposed convolution (Keras' Cropping2D, PyTorch's F.pad by negative amounts) folds into
    it, so the cropped convolution has its twin's shape and pairs with it, not with a sibling of that shape
    (it was paired with the sibling: a false 'weights' alarm on an exact conversion), both directions."""
    from bnkit.convert import keras_to_torch, torch_to_keras

    torch.manual_seed(0)
    tmodel = _TwoTransposedConvs().eval()
    kmodel = torch_to_keras(tmodel, (4, 6, 6))
    x = np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype("float32")
    report = compare(tmodel, kmodel, x)
    assert report.agree and codes(report) == [], report
    assert {(row.name_a, row.name_b) for row in report.rows if row.kind == "conv"} == {
        ("cropped", "cropped"), ("plain", "plain")
    }
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 4))
    up = keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same", name="up")(inputs)  # PyTorch crops after
    side = keras.layers.Conv2DTranspose(4, 4, strides=2, padding="same", name="side")(inputs)
    kmodel = keras.Model(inputs, keras.layers.Add()([up, side]))
    report = compare(kmodel, keras_to_torch(kmodel), np.moveaxis(x, 1, -1))
    assert report.agree and codes(report) == [], report
