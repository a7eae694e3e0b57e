"""bnkit.conventions: the presets are the frameworks' documented semantics, and translation is exact.

The preset values are checked against the table in semantics.md and, where the framework
exposes them, against the framework's own defaults (read from the constructors' signatures,
so the test fails if a framework changes its default).
"""

from __future__ import annotations

import inspect
import math
import re

import pytest

import bnkit
from bnkit.conventions import (
    KERAS,
    TF_KERAS_FUSED,
    TORCH,
    Convention,
    biased_to_unbiased,
    get_convention,
    translate_momentum,
    translate_settings,
    unbiased_to_biased,
    with_overrides,
)


def _signature_default(cls, name):
    return inspect.signature(cls.__init__).parameters[name].default


def test_torch_preset_matches_semantics_table():
    assert TORCH.eps == 1e-5
    assert TORCH.momentum == 0.1
    assert TORCH.momentum_weighs == "new"
    assert TORCH.cumulative_average_when_none is True
    assert TORCH.running_var_estimator == "unbiased"
    assert TORCH.unbiased_running_var
    assert TORCH.channel_axis == 1


def test_keras_preset_matches_semantics_table():
    assert KERAS.eps == 1e-3
    assert KERAS.momentum == 0.99
    assert KERAS.momentum_weighs == "old"
    assert KERAS.cumulative_average_when_none is False
    assert KERAS.running_var_estimator == "biased"
    assert not KERAS.unbiased_running_var
    assert KERAS.channel_axis == -1


def test_presets_match_the_real_frameworks_defaults():
    torch = pytest.importorskip("torch")
    keras = pytest.importorskip("keras")
    for cls in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d):
        assert _signature_default(cls, "eps") == TORCH.eps
        assert _signature_default(cls, "momentum") == TORCH.momentum
    bn = keras.layers.BatchNormalization
    assert _signature_default(bn, "epsilon") == KERAS.eps
    assert _signature_default(bn, "momentum") == KERAS.momentum
    assert _signature_default(bn, "axis") == KERAS.channel_axis


def test_public_names_are_the_presets():
    assert bnkit.TORCH is TORCH and bnkit.KERAS is KERAS
    assert bnkit.Convention is Convention


@pytest.mark.parametrize(
    "name, expected",
    [("torch", TORCH), ("pytorch", TORCH), ("TORCH", TORCH), ("keras", KERAS), ("Keras", KERAS)],
)
def test_get_convention_by_name(name, expected):
    assert get_convention(name) is expected


def test_get_convention_passes_a_convention_through():
    custom = with_overrides(TORCH, name="custom", running_var_estimator="biased")
    assert get_convention(custom) is custom
    assert custom.running_var_estimator == "biased" and TORCH.running_var_estimator == "unbiased"


@pytest.mark.parametrize("bad", ["tensorflow", "", None, 3])
def test_get_convention_rejects_unknown(bad):
    with pytest.raises(ValueError, match="convention must be one of 'torch', 'keras'") as info:
        get_convention(bad)
    assert repr(bad) in str(info.value)


def test_convention_is_frozen():
    with pytest.raises(AttributeError):
        TORCH.eps = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("momentum_weighs", "both", "momentum_weighs must be 'new' or 'old', got 'both'"),
        (
            "running_var_estimator",
            "sample",
            "running_var_estimator must be 'unbiased' or 'biased', got 'sample'",
        ),
        ("eps", 0.0, "eps must be positive, got 0.0"),
        ("eps", -1e-5, "eps must be positive, got -1e-05"),
    ],
)
def test_convention_validation_quotes_the_bad_value(field, value, message):
    with pytest.raises(ValueError) as info:
        with_overrides(TORCH, **{field: value})
    assert message in str(info.value)


# --- weights(): (old, new) -------------------------------------------------------------------


@pytest.mark.parametrize("m", [0.0, 0.1, 0.5, 0.99, 1.0])
def test_weights_torch_momentum_weighs_the_new_statistic(m):
    assert TORCH.weights(m) == (1.0 - m, m)
    assert TORCH.new_weight(m) == m


@pytest.mark.parametrize("m", [0.0, 0.1, 0.5, 0.99, 1.0])
def test_weights_keras_momentum_weighs_the_old_value(m):
    assert KERAS.weights(m) == (m, 1.0 - m)
    assert KERAS.new_weight(m) == 1.0 - m


@pytest.mark.parametrize("count", [1, 2, 3, 10])
def test_weights_none_is_a_cumulative_average_in_torch(count):
    old, new = TORCH.weights(None, count)
    assert new == 1.0 / count
    assert old == 1.0 - 1.0 / count


def test_weights_none_first_batch_replaces_the_running_value():
    # count 0 is treated as the first batch (no division by zero)
    assert TORCH.weights(None, 0) == (0.0, 1.0)
    assert TORCH.weights(None, 1) == (0.0, 1.0)


def test_weights_none_is_refused_in_keras():
    with pytest.raises(ValueError, match=r"momentum=None .* not part of the keras convention.*0\.99"):
        KERAS.weights(None, 1)


@pytest.mark.parametrize("m", [-0.1, 1.01, float("nan"), float("inf")])
@pytest.mark.parametrize("conv", [TORCH, KERAS], ids=["torch", "keras"])
def test_momentum_out_of_range(conv, m):
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got"):
        conv.check_momentum(m)


@pytest.mark.parametrize("m", ["0.1", True, [0.1]])
def test_momentum_wrong_type(m):
    with pytest.raises(TypeError, match="momentum must be a float or None"):
        TORCH.check_momentum(m)


def test_momentum_accepts_numpy_scalars():
    np = pytest.importorskip("numpy")
    TORCH.check_momentum(np.float32(0.1))
    assert KERAS.weights(np.float64(0.9)) == (0.9, 1.0 - 0.9)


# --- translate_momentum ---------------------------------------------------------------------


def test_translate_momentum_keras_default_is_torch_001_and_back():
    assert translate_momentum(0.99, "keras", "torch") == 0.01
    assert translate_momentum(0.01, "torch", "keras") == 0.99
    assert translate_momentum(0.1, "torch", "keras") == 0.9
    assert translate_momentum(0.15, "keras", "torch") == 0.85


@pytest.mark.parametrize("m", [0.0, 0.01, 0.1, 0.15, 0.5, 0.9, 0.99, 0.999, 1.0])
def test_translate_momentum_gives_the_same_weights(m):
    translated = translate_momentum(m, "torch", "keras")
    old_t, new_t = TORCH.weights(m)
    old_k, new_k = KERAS.weights(translated)
    # the translation rounds to 15 decimals to print 0.01, not 0.010000000000000009
    assert math.isclose(old_t, old_k, abs_tol=1e-15) and math.isclose(new_t, new_k, abs_tol=1e-15)
    assert translate_momentum(translated, "keras", "torch") == pytest.approx(m, abs=1e-15)


def test_translate_momentum_same_convention_is_identity():
    assert translate_momentum(0.3, "torch", "torch") == 0.3
    assert translate_momentum(0.3, KERAS, "keras") == 0.3
    assert translate_momentum(None, "torch", "torch") is None


def test_translate_momentum_none_rules():
    # said in both conventions' terms: Keras' default 0.99 alone reads, to a PyTorch user, as the opposite
    with pytest.raises(ValueError, match=r"momentum=None \(a cumulative average in the torch convention\) has no "
                       r"equivalent in the keras convention, whose momentum weighs the old value \(its default, "
                       r"0\.99, is momentum=0\.01 in the torch convention\)"):
        translate_momentum(None, "torch", "keras")
    with pytest.raises(ValueError, match="not part of the keras convention"):
        translate_momentum(None, "keras", "torch")  # None is not a Keras momentum to start with
    cumulative_old = with_overrides(KERAS, name="keras-cumulative", cumulative_average_when_none=True)
    assert translate_momentum(None, "torch", cumulative_old) is None


@pytest.mark.parametrize("m", [1.5, -0.1])
def test_translate_momentum_out_of_range_gives_the_same_weights(m):
    """Both frameworks accept such a momentum (bnkit lint flags it): a model that has one converts."""
    translated = translate_momentum(m, "torch", "keras")
    assert KERAS.weights(translated) == pytest.approx(TORCH.weights(m), abs=1e-15)
    assert translate_momentum(torch_scalar(m), "torch", "torch") == pytest.approx(m)


def torch_scalar(m):
    torch = pytest.importorskip("torch")
    return torch.tensor(m, dtype=torch.float64)


@pytest.mark.parametrize("m", ["0.1", True, [0.1]])
def test_translate_momentum_refuses_what_is_not_a_number(m):
    with pytest.raises(TypeError, match="momentum must be a float or None"):
        translate_momentum(m, "torch", "keras")


# --- translate_settings ---------------------------------------------------------------------


def test_translate_settings_defaults_keras_to_torch():
    assert translate_settings("keras", "torch") == {
        "eps": 1e-3,
        "momentum": 0.01,
        "running_var_factor": "n/(n-1)",
    }


def test_translate_settings_defaults_torch_to_keras():
    assert translate_settings("torch", "keras") == {
        "eps": 1e-5,
        "momentum": 0.9,
        "running_var_factor": "(n-1)/n",
    }


def test_translate_settings_given_values_and_identity():
    assert translate_settings("keras", "torch", eps=1e-4, momentum=0.15) == {
        "eps": 1e-4,
        "momentum": 0.85,
        "running_var_factor": "n/(n-1)",
    }
    assert translate_settings("torch", "torch", momentum=None)["momentum"] is None
    assert translate_settings("keras", "keras")["running_var_factor"] == "1"
    with pytest.raises(ValueError, match="has no equivalent in the keras convention"):
        translate_settings("torch", "keras", momentum=None)


@pytest.mark.parametrize(
    "eps, error, message",
    [
        (0.0, ValueError, "eps must be a positive float, got 0.0"),
        (-1e-5, ValueError, "eps must be a positive float, got -1e-05"),
        (float("nan"), ValueError, "eps must be a positive float, got nan"),
        ("1e-3", TypeError, "eps must be a positive float, got str '1e-3'"),
        (True, TypeError, "eps must be a positive float, got bool True"),
    ],
)
def test_translate_settings_rejects_a_bad_eps(eps, error, message):
    # torch.nn.BatchNorm2d and Keras' BatchNormalization both need eps > 0 for a finite output
    with pytest.raises(error, match=re.escape(message)):
        translate_settings("keras", "torch", eps=eps)
    np = pytest.importorskip("numpy")
    assert translate_settings("keras", "torch", eps=np.float32(1e-3))["eps"] == float(np.float32(1e-3))


# --- variance estimators --------------------------------------------------------------------


def test_biased_unbiased_helpers_match_numpy_ddof():
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3))
    biased, unbiased = x.var(axis=0, ddof=0), x.var(axis=0, ddof=1)
    np.testing.assert_allclose(biased_to_unbiased(biased, 7), unbiased, rtol=1e-14)  # one rounding step
    np.testing.assert_allclose(unbiased_to_biased(unbiased, 7), biased, rtol=1e-14)
    assert biased_to_unbiased(2.0, 2) == 4.0
    assert unbiased_to_biased(4.0, 2) == 2.0
    assert unbiased_to_biased(4.0, 1) == 0.0


def test_biased_to_unbiased_needs_two_values():
    with pytest.raises(ValueError, match="at least 2 values per channel, got n=1"):
        biased_to_unbiased(1.0, 1)
    with pytest.raises(ValueError, match="n must be positive, got n=0"):
        unbiased_to_biased(1.0, 0)


@pytest.mark.parametrize(
    "value, error, message",
    [
        (1.5, ValueError, "momentum must be in [0, 1], got 1.5"),
        (None, ValueError, "default momentum must be a float in [0, 1], got None"),
        ("0.9", TypeError, "momentum must be a float or None, got str '0.9'"),
    ],
)
def test_convention_default_momentum_is_validated(value, error, message):
    with pytest.raises(error) as info:
        with_overrides(KERAS, momentum=value)
    assert message in str(info.value)


def test_tf_keras_fused_is_a_named_convention_with_pytorchs_running_update_and_keras_momentum():
    """tf-keras 2's fused batch norm (measured: tests/formats/test_keras2_training.py): Keras' momentum on
    the old value, PyTorch's unbiased running variance, tf-keras' defaults."""
    assert get_convention("tf_keras_fused") is TF_KERAS_FUSED and get_convention("TF_KERAS_FUSED") is TF_KERAS_FUSED
    assert (TF_KERAS_FUSED.eps, TF_KERAS_FUSED.momentum, TF_KERAS_FUSED.channel_axis) == (1e-3, 0.99, -1)
    assert TF_KERAS_FUSED.momentum_weighs == "old" and TF_KERAS_FUSED.unbiased_running_var
    assert TF_KERAS_FUSED.weights(0.9) == KERAS.weights(0.9)
    assert translate_momentum(0.9, "tf_keras_fused", "torch") == 0.1
    assert translate_settings("tf_keras_fused", "torch")["running_var_factor"] == "1"
    assert translate_settings("tf_keras_fused", "keras")["running_var_factor"] == "(n-1)/n"
    with pytest.raises(ValueError, match="not part of the tf_keras_fused convention"):
        TF_KERAS_FUSED.check_momentum(None)
