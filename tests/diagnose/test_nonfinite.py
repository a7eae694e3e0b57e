"""Non-finite values are never reported as agreement: cause ``non-finite`` names where they come
from; an empty batch is a one-line error before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bnkit.convert import keras_to_torch
from bnkit.diagnose.compare import compare
from bnkit.examples.seed import keras_seed_model, torch_seed_model


@pytest.fixture(scope="module")
def seed_models():
    keras_model = keras_seed_model()
    return keras_model, keras_to_torch(keras_model), torch_seed_model("faithful").eval()


def x_seed(seed=0):
    return np.random.default_rng(seed).normal(size=(2, 64, 64, 1)).astype("float32")


def test_all_nan_input_with_other_weights_is_non_finite_not_agreement(seed_models):
    keras_model, _, other_weights = seed_models
    x = np.full((2, 64, 64, 1), np.nan, dtype="float32")
    report = compare(keras_model, other_weights, x)
    assert not report.agree and report.cause_codes == ["non-finite"]
    assert report.causes[0].layers == ["input"] and "8,192 NaN/Inf values" in report.causes[0].explanation
    assert report.output_nonfinite and report.to_dict()["output"]["nonfinite"] is True


def test_partly_nan_input_of_an_exact_conversion_is_non_finite(seed_models):
    keras_model, converted, _ = seed_models
    x = x_seed()
    x[0, 10, 20, 0] = np.nan
    report = compare(keras_model, converted, x)
    assert not report.agree and report.cause_codes == ["non-finite"]
    assert report.first_divergence.nonfinite and report.first_divergence.kind == "conv"


def test_a_layer_that_produces_nan_from_finite_inputs_is_named(seed_models):
    keras_model, _, _ = seed_models
    broken = keras_to_torch(keras_model)
    with torch.no_grad():
        broken.bn.eps = 0.0
        broken.bn.running_var[3] = -1.0  # a corrupted statistic: sqrt of a negative number
    report = compare(keras_model, broken, x_seed())
    assert "non-finite" in report.cause_codes
    cause = next(c for c in report.causes if c.code == "non-finite")
    assert cause.layers == ["bn"] and "model B (torch)" in cause.explanation
    assert report.first_divergence.name == "bn"


def test_inf_in_a_torch_only_comparison():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    x = np.random.default_rng(0).normal(size=(2, 4)).astype("float32")
    x[1, 2] = np.inf
    report = compare(a, a, x)
    assert report.cause_codes == ["non-finite"] and not report.agree


@pytest.mark.parametrize("shape", [(0, 64, 64, 1), (2, 0, 64, 1)])
def test_an_empty_batch_is_a_one_line_error_before_any_work(seed_models, shape):
    keras_model, converted, _ = seed_models
    with pytest.raises(ValueError, match=r"inputs are empty \(shape") as info:
        compare(keras_model, converted, np.zeros(shape, dtype="float32"))
    assert "\n" not in str(info.value)


def test_cli_empty_batch_is_a_one_line_error(run_cli):
    proc = run_cli("compare", "bnkit.examples:torch_seed_model", "bnkit.examples:torch_seed_model",
                   "--input-shape", "1,64,64", "--batch-size", "0")  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
