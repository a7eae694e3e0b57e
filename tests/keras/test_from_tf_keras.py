"""Live tf-keras 2 models (``tf_keras.Model``) in bnkit's Python API, read as Keras 3 (bnkit.keras.from_tf_keras).

The expected numbers come from tf-keras itself, in this process: its ``count_params()`` and trainable
weights, its outputs on the same input, its own layers' outputs for the recalibrated statistics.
TensorFlow is imported once for the module (after Triton: bnkit.frameworks.tensorflow_beside_torch).
Tolerance: TensorFlow's and PyTorch's convolutions sum in different orders (outputs O(1); measured
differences below 4e-7 relative).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import bnkit

ATOL = 2e-5
KERAS2_FILES = Path(__file__).parents[1] / "formats" / "keras2"


@pytest.fixture(scope="module")
def tf_keras():
    from bnkit.frameworks import MissingFramework, import_optional

    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        return import_optional("tf_keras", "these tests")
    except MissingFramework as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def builders(tf_keras):
    """tests/formats/keras2/make_files.py: the tf-keras 2 models whose files the format tests read."""
    sys.path.insert(0, str(KERAS2_FILES))
    try:
        import make_files
    finally:
        sys.path.remove(str(KERAS2_FILES))
    return make_files


def _model(builders, name: str):
    """A fresh tf-keras model of make_files.py, random weights and statistics, and a batch for it."""
    rng = np.random.default_rng(0)
    model = builders.MODELS[name]()
    builders._randomise(model, rng)
    return model, rng.normal(size=(2, *builders.SHAPE)).astype("float32")


@pytest.fixture(scope="module")
def small(builders):
    """BN, depthwise and separable convs, names with '/', TFOpLambda arithmetic and residuals."""
    return _model(builders, "mobile_blocks")


def _trainable(model) -> int:
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def _torch_output(module, x):
    import torch

    with torch.no_grad():
        return module(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


def test_summary_counts_what_tf_keras_counts_and_says_where_the_model_came_from(small):
    model, _ = small
    summary = bnkit.summary(model)
    assert (summary.total, summary.trainable) == (model.count_params(), _trainable(model)) == (572, 524)
    assert summary.non_trainable == 48 and summary.source == "tf-keras 2"
    assert 'Model: "mobile_blocks" (tf-keras 2 model, read as Keras, ' in str(summary)
    assert summary.to_dict()["source"] == "tf-keras 2"


def test_convert_compare_lint_and_fold_take_it(small):
    model, x = small
    expected = model(x, training=False).numpy()
    module = bnkit.convert.keras_to_torch(model)
    np.testing.assert_allclose(_torch_output(module, x), expected, rtol=0, atol=ATOL)
    assert bnkit.compare(model, module, x).agree
    assert bnkit.compare(model, module, x, training=True).agree
    codes = {(f.code, f.layer) for f in bnkit.lint(model)}
    assert ("conv-bias-before-bn", "conv1_conv") in codes  # Keras 3's name for conv1/conv
    folded = bnkit.fold_bn(model)
    assert not any(type(layer).__name__ == "BatchNormalization" for layer in folded.layers)
    np.testing.assert_allclose(np.asarray(folded(x, training=False).detach()), expected, rtol=0, atol=1e-4)


def test_recalibrate_writes_the_statistics_back_into_the_tf_keras_model(tf_keras, builders):
    model, x = _model(builders, "mobile_blocks")
    batches = [x, x[::-1] * 2.0 + 0.5]
    inputs = tf_keras.Model(model.input, model.get_layer("conv1/conv").output)  # the first batch norm's input
    seen = np.concatenate([inputs(b, training=False).numpy() for b in batches]).astype(np.float64)
    assert bnkit.recalibrate(model, batches, progress=False) is model
    bn = model.get_layer("conv1/bn")
    assert bn.fused  # tf-keras runs it fused: its moving variance follows the unbiased variance (keras2_fused)
    np.testing.assert_allclose(bn.moving_mean.numpy(), seen.mean(axis=(0, 1, 2)), rtol=0, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), seen.var(axis=(0, 1, 2), ddof=1), rtol=1e-5, atol=1e-5)


def test_freeze_bn_freezes_the_tf_keras_model_or_refuses_what_it_cannot_hold(builders):
    model, _ = _model(builders, "nested_and_scales")
    with pytest.raises(ValueError, match="tf-keras holds trainable per layer") as caught:
        bnkit.freeze_bn(model, "torch", freeze_stats=False)  # gamma/beta frozen in a trainable layer
    assert "\n" not in str(caught.value)
    norms = [layer for layer in model.submodules if type(layer).__name__ == "BatchNormalization"]
    assert len(norms) == 2 and all(layer.trainable for layer in norms)  # unchanged
    assert bnkit.freeze_bn(model, "keras") is model
    assert not any(layer.trainable for layer in norms)


def test_what_cannot_be_read_exactly_is_refused_by_layer(tf_keras, builders):
    from bnkit.keras.from_tf_keras import TfKerasModelError

    model, _ = _model(builders, "tf_function")
    with pytest.raises(TfKerasModelError, match=r"layer 'tf.math.reduce_max' \(TFOpLambda\)"):
        bnkit.summary(model)

    class Subclassed(tf_keras.Model):
        def call(self, x):
            return x

    subclassed = Subclassed()
    subclassed(np.zeros((1, 2), "float32"))
    with pytest.raises(TfKerasModelError, match="is a subclassed model"):
        bnkit.lint(subclassed)


def test_mobilenet_v2_from_tf_keras_counts_and_converts_as_tf_keras_computes(tf_keras):
    rng = np.random.default_rng(1)
    model = tf_keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10, classifier_activation=None
    )
    for layer in model.layers:
        if isinstance(layer, tf_keras.layers.BatchNormalization):  # statistics that matter
            c = layer.gamma.shape
            draws = [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c), rng.uniform(0.5, 2, c)]
            layer.set_weights([d.astype("float32") for d in draws])
    x = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    expected = model(x, training=False).numpy()
    summary = bnkit.summary(model)
    assert (summary.total, summary.trainable) == (model.count_params(), _trainable(model))
    module = bnkit.convert.keras_to_torch(model)
    got = _torch_output(module, x)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("name, fused", [("fused_batch_norm", True), ("unfused_batch_norm", False)])
def test_its_batch_norms_train_one_step_as_tf_keras_trains_them(tf_keras, builders, name, fused):
    """tf-keras runs a batch norm on a 4-D input fused (unbiased moving variance) unless built with
    fused=False, which its config does not record but its live layer does (bnkit.formats.keras2_fused)."""
    from bnkit.keras.from_tf_keras import from_tf_keras

    model = builders.TRAINING[name]()
    rng = np.random.default_rng(2)
    builders._randomise(model, rng)
    x = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    converted = from_tf_keras(model)
    assert model.get_layer("bn").fused is fused
    assert converted.get_layer("bn").convention.name == ("tf_keras_fused" if fused else "keras")
    got = np.asarray(converted(x, training=True).detach().cpu())
    expected = model(x, training=True).numpy()  # tf-keras 2 updates the moving statistics here
    assert np.abs(got - expected).max() <= 2e-6 * np.abs(expected).max()
    for layer in model.layers:
        if isinstance(layer, tf_keras.layers.BatchNormalization):
            for statistic in ("moving_mean", "moving_variance"):
                want = getattr(layer, statistic).numpy()
                have = np.asarray(getattr(converted.get_layer(layer.name), statistic))
                assert np.abs(have - want).max() <= 2e-6 * np.abs(want).max(), (layer.name, statistic)
