"""Write the Keras 2 ``.h5`` files of ``tests/formats/test_keras2_files.py``, and the SavedModel folders of
``tests/formats/test_saved_model.py``, with the real tf-keras 2.

    TF_USE_LEGACY_KERAS=1 python tests/formats/keras2/make_files.py tests/formats/keras2

Needs ``tensorflow-cpu==2.21.0`` and ``tf-keras==2.21.0`` (not bnkit's test dependencies: the files
are kept in the repository). Each model uses what Keras 3 cannot read in a Keras 2 file (see
``bnkit.formats.keras2_config``); its weights and batch-norm statistics are random, and tf-keras'
own outputs on a fixed input are kept beside it (``NAME.npz``: ``x``, ``y``) for the test to compare
with, so the expected numbers come from tf-keras, not from bnkit. The models of :data:`SAVED_MODELS`
are also saved as SavedModel folders (``NAME_saved_model/``, ``model.save(folder, save_format="tf")``),
the same model object as the ``.h5``, so ``NAME.npz`` holds tf-keras' outputs for both.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras as keras
from tf_keras import layers
from tf_keras.src.applications.convnext import LayerScale
from tf_keras.src.applications.inception_resnet_v2 import CustomScaleLayer

SHAPE = (12, 12, 3)


def _hard_swish(x):
    return layers.Multiply()([x, layers.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)])  # two TFOpLambda with numbers


def mobile_blocks():
    """Names with "/", DepthwiseConv2D and SeparableConv2D (groups=1 in their configs), TFOpLambda
    with numbers (x + 3, x * 1/6) and with another tensor (a residual x + y, x - y)."""
    inputs = keras.Input(SHAPE)
    x = layers.Conv2D(8, 3, padding="same", name="conv1/conv")(inputs)
    x = layers.BatchNormalization(name="conv1/bn")(x)
    x = _hard_swish(x)
    y = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="block/dw")(x)
    y = layers.BatchNormalization(name="block/dw_bn")(y)
    y = layers.SeparableConv2D(8, 3, padding="same", name="block/sep")(y)
    y = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name="block/sep_bn")(y)
    x = x + y
    x = x - layers.ReLU()(y)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(4, name="head/fc")(x), name="mobile_blocks")


def nested_and_scales():
    """A Sequential stem built on an Input (referred to as its node 1), ConvNeXt's LayerScale and
    InceptionResNetV2's CustomScaleLayer."""
    stem = keras.Sequential(
        [keras.Input(SHAPE), layers.Conv2D(8, 2, strides=2), layers.BatchNormalization()], name="stem"
    )
    inputs = keras.Input(SHAPE)
    x = stem(inputs)
    y = layers.Conv2D(8, 1, name="pointwise")(x)
    y = LayerScale(1e-1, 8, name="layer_scale")(y)
    x = CustomScaleLayer(0.17, name="custom_scale")([x, y])
    x = layers.BatchNormalization(name="bn")(x)
    return keras.Model(inputs, layers.GlobalAveragePooling2D()(x), name="nested_and_scales")


def sync_batch_norm():
    inputs = keras.Input(SHAPE)
    x = layers.Conv2D(8, 3, name="conv")(inputs)
    x = layers.experimental.SyncBatchNormalization(name="sync_bn")(x)
    return keras.Model(inputs, x, name="sync_batch_norm")


def ghost_batch_norm():
    inputs = keras.Input(SHAPE)
    x = layers.Conv2D(8, 3, name="conv")(inputs)
    return keras.Model(inputs, layers.BatchNormalization(virtual_batch_size=2, name="ghost_bn")(x))


def tf_function():
    inputs = keras.Input(SHAPE)
    x = layers.Conv2D(8, 3, name="conv")(inputs)
    return keras.Model(inputs, tf.math.reduce_max(x, axis=-1))  # a TFOpLambda bnkit does not translate


def nested_functional():
    """A Functional block called from a Functional model: its layers' variables listed layer by layer in
    the SavedModel (Keras 2's Model.variables) but trainable-first in an .h5; a frozen batch norm (all
    four weights non-trainable) and a name with "/" inside the block."""
    block_inputs = keras.Input((6, 6, 8))
    y = layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv_a")(block_inputs)
    y = layers.BatchNormalization(name="bn_a")(y)
    y = layers.ReLU()(y)
    y = layers.Conv2D(8, 1, name="block/conv_b")(y)
    frozen = layers.BatchNormalization(epsilon=1e-5, name="bn_frozen")
    frozen.trainable = False
    block = keras.Model(block_inputs, frozen(y), name="block")
    inputs = keras.Input(SHAPE)
    x = layers.Conv2D(8, 3, strides=2, padding="same", name="stem")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.GlobalAveragePooling2D()(block(x))
    return keras.Model(inputs, layers.Dense(4, name="head")(x), name="nested_functional")


def normalization():
    """tf-keras' Normalization (EfficientNet's second layer): a SavedModel lists no variables for it, only
    its mean, variance and count as named children of its node."""
    inputs = keras.Input(SHAPE)
    x = layers.Normalization(name="normalization")(inputs)
    x = layers.Conv2D(8, 3, name="conv")(x)
    x = layers.BatchNormalization(name="bn")(x)
    return keras.Model(inputs, layers.GlobalAveragePooling2D()(x), name="normalization")


MODELS = {
    f.__name__: f
    for f in (
        mobile_blocks, nested_and_scales, sync_batch_norm, ghost_batch_norm, tf_function, nested_functional,
        normalization,
    )
}  # fmt: skip
SAVED_MODELS = ("mobile_blocks", "nested_and_scales", "nested_functional", "normalization")
# also saved as tf-keras' own .keras archive (NAME.keras: a zip of a Keras 2 config and its weights),
# the same model object as the .h5: NAME.npz holds tf-keras' outputs for it too (test_keras2_archives.py)
KERAS_ARCHIVES = ("mobile_blocks", "nested_and_scales", "nested_functional", "tf_function")


def _randomise(model, rng) -> None:
    for layer in model.submodules:
        if not isinstance(layer, layers.Layer) or not layer.weights or isinstance(layer, keras.Model):
            continue
        values = []
        for weight in layer.weights:
            shape = tuple(weight.shape)
            if "variance" in weight.name:  # a batch norm's moving_variance, a Normalization's variance
                values.append(rng.uniform(0.5, 2.0, shape))
            elif "gamma" in weight.name and "layer_scale" not in weight.name:
                values.append(rng.uniform(0.5, 1.5, shape))
            else:
                values.append(rng.normal(0.0, 0.3, shape))
        layer.set_weights([v.astype("float32") for v in values])


def saved_models(folder: Path) -> None:
    """A tf-keras 2 SavedModel of a synchronised batch norm (its Keras config in keras_metadata.pb),
    and one by tf.saved_model.save (no Keras model in it: refused)."""
    model = sync_batch_norm()
    model.save(folder / "tf_keras_saved_model", save_format="tf")
    tf.saved_model.save(tf.Module(), str(folder / "plain_saved_model"))


def main(folder: str) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, *SHAPE)).astype("float32")
    for name, build in MODELS.items():
        keras.utils.set_random_seed(0)
        model = build()
        _randomise(model, rng)
        model.save(out / f"{name}.h5")
        np.savez(out / f"{name}.npz", x=x, y=model(x, training=False).numpy())
        print(name, (out / f"{name}.h5").stat().st_size, "bytes")
        if name in SAVED_MODELS:
            model.save(out / f"{name}_saved_model", save_format="tf")
        if name in KERAS_ARCHIVES:
            model.save(out / f"{name}.keras")
    saved_models(out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).parent))
