"""Batch renormalization in bnkit's diagnostics: summary counts (Keras counts the renorm weights as
non-trainable, PyTorch keeps them as buffers), compare's ``renorm`` cause, lint's renorm findings,
and explain with renorm=True. Real Keras 3 and PyTorch models; compare's float32 tolerances.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from torch import nn

import bnkit
import bnkit.torch as bt
from bnkit.convert import keras_to_torch
from bnkit.diagnose.compare import CAUSES, compare
from bnkit.explain import explain
from bnkit.keras import keras

L = keras.layers
CLIPPING = {"rmax": 1.1, "rmin": 0.9, "dmax": 0.1}


def _keras_net(**bn_kwargs):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 2))
    h = L.Conv2D(4, 3, padding="same", name="conv")(inputs)
    h = L.BatchNormalization(name="bn", **bn_kwargs)(h)
    h = L.Flatten(name="flatten")(h)
    return keras.Model(inputs, L.Dense(3, name="head")(h))


def _batch(seed=0):
    return np.random.default_rng(seed).normal(1.0, 2.0, (4, 8, 8, 2)).astype("float32")


# --- summary -----------------------------------------------------------------------------------


def test_summary_counts_renorm_weights_as_keras_non_trainable_and_torch_buffers():
    model = _keras_net(renorm=True, renorm_clipping=CLIPPING)
    keras_summary = bnkit.summary(model)
    torch_summary = bnkit.summary(keras_to_torch(model), input_shape=(2, 8, 8))
    conv, c = 2 * 3 * 3 * 4 + 4, 4
    head = 8 * 8 * 4 * 3 + 3
    for s in (keras_summary, torch_summary):
        assert (s.total, s.trainable, s.non_trainable) == (conv + 7 * c + head, conv + 2 * c + head, 5 * c)
        assert (s.torch_params, s.torch_buffers) == (conv + 2 * c + head, 5 * c)
        assert s.renorm_layers == 1
        assert "renorm_mean" in s.explanation and f"{s.torch_params:,} + {5 * c}" in s.explanation
    assert model.count_params() == keras_summary.total
    assert sum(w.numpy().size for w in model.non_trainable_weights) == keras_summary.non_trainable
    (bn_row,) = [r for r in keras_summary.rows if r.type == "BatchNormalization"]
    assert (bn_row.params, bn_row.non_trainable_params, bn_row.buffers) == (7 * c, 5 * c, 5 * c)
    plain = bnkit.summary(_keras_net())
    assert plain.renorm_layers == 0 and "renorm" not in plain.explanation


# --- compare -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def renorm_pair():
    model = _keras_net(renorm=True, renorm_clipping=CLIPPING, renorm_momentum=0.9)
    model(_batch(1), training=True)  # renorm statistics away from their initial values
    return model, keras_to_torch(model)


def test_renorm_is_a_cause_code():
    assert "renorm" in CAUSES


def test_faithful_conversion_agrees_in_training_and_inference(renorm_pair):
    model, torch_model = renorm_pair
    for training in (True, False):
        report = compare(model, torch_model, _batch(), training=training)
        assert report.agree and report.cause_codes == [], (training, report.cause_codes)


def _without_renorm(torch_model):
    broken = copy.deepcopy(torch_model)
    plain = bt.BatchNorm2d(4, momentum=broken.bn.momentum, eps=broken.bn.eps, convention="keras")
    plain.load_state_dict({k: v for k, v in broken.bn.state_dict().items() if k in plain.state_dict()})
    broken.bn = plain.train(broken.training)
    return broken


@pytest.mark.parametrize(
    "break_it",
    [
        _without_renorm,
        lambda m: (setattr(m.bn, "renorm_clipping", {"rmax": 3.0}), m)[1],
        lambda m: (setattr(m.bn, "renorm_momentum", 0.5), m)[1],
    ],
    ids=["renorm-on-one-side", "clipping", "renorm-momentum"],
)
def test_a_renorm_mismatch_is_named_renorm_in_training(renorm_pair, break_it):
    model, torch_model = renorm_pair
    broken = break_it(copy.deepcopy(torch_model))
    report = compare(model, broken, _batch(), training=True)
    assert report.cause_codes == ["renorm"], [c.explanation for c in report.causes]
    assert report.causes[0].layers == ["bn"]
    # inference is plain batch norm: the same running statistics agree whatever renorm does
    assert compare(model, broken.eval(), _batch(), training=False).agree


# --- lint --------------------------------------------------------------------------------------


def test_lint_flags_a_literal_renorm_momentum_and_missing_clipping():
    torch_model = nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), bt.BatchNorm2d(3, renorm=True, renorm_momentum=0.99))
    codes = {(f.code, f.severity) for f in bnkit.lint(torch_model.eval())}
    assert codes == {("renorm-momentum", "warning"), ("renorm-unclipped", "info")}
    keras_model = _keras_net(renorm=True, renorm_momentum=0.01, renorm_clipping={"rmax": 3, "dmax": 5})
    findings = [f for f in bnkit.lint(keras_model) if f.code.startswith("renorm")]
    assert [(f.code, f.layer) for f in findings] == [("renorm-momentum", "bn")]
    assert "0.99" in findings[0].message  # the equivalent
    bad = _keras_net(renorm=True, renorm_momentum=1.5, renorm_clipping=CLIPPING)
    assert [(f.code, f.severity) for f in bnkit.lint(bad) if f.code.startswith("renorm")] == [
        ("renorm-momentum", "error")
    ]
    fine = _keras_net(renorm=True, renorm_clipping=CLIPPING)
    assert not [f for f in bnkit.lint(fine) if f.code.startswith("renorm")]


# --- explain -----------------------------------------------------------------------------------


def test_explain_renorm_counts_and_differences():
    result = explain("keras", channels=4, renorm=True)
    keras_count, torch_count = result.counts
    assert (keras_count.total, keras_count.trainable, keras_count.non_trainable) == (28, 8, 20)
    assert (torch_count.total, torch_count.not_counted) == (8, 21)  # 20 statistics and the counter
    given, equivalent, literal = result.settings
    assert given.renorm and equivalent.renorm and not literal.renorm
    assert "renorm=True" in given.code and equivalent.code.startswith("bnkit.torch.BatchNorm2d(")
    assert not literal.same_as_given
    assert result.difference("training output", "equivalent").relative < 1e-6
    assert result.difference("training output", "literal copy").relative > 0.1
    assert "batch renormalization" in result.difference("training output", "literal copy").why
    with pytest.raises(ValueError, match="torch.nn has none"):
        explain("torch", channels=4, renorm=True)


def test_explain_cli_renorm(run_cli):
    proc = run_cli("explain", "--renorm", "--channels", "4", "--json", check=True)
    assert '"renorm": true' in proc.stdout
    proc = run_cli("explain", "--renorm", "--from", "torch")
    assert proc.returncode == 2 and "torch.nn has none" in proc.stderr
