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

The models of :data:`TRAINING` are for one training step: tf-keras 2 runs a ``BatchNormalization`` on a
4-D or 5-D input *fused* (``fused=None``, its default and what its configs imply) and its fused kernel
updates the moving variance with the unbiased batch variance, the unfused layer with the biased one.
Each is saved, loaded back by tf-keras (what tf-keras makes of the file), run once in inference and once
with ``training=True`` (which updates the moving statistics in tf-keras 2); ``NAME.npz`` holds ``x``,
``y`` (inference), ``y_train`` (the training step's output) and, per batch norm, ``LAYER/moving_mean``,
``LAYER/moving_variance`` after the step and ``LAYER/fused`` (tf-keras' own ``layer.fused``).

    TF_USE_LEGACY_KERAS=1 python tests/formats/keras2/make_files.py tests/formats/keras2 NAME ...

writes only the files of the :data:`TRAINING` models named (each has a random sequence of its own).
"""

from __future__ import annotations

import json
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


def fused_batch_norm():
    """Two batch norms on 4-D channels-last inputs: fused by tf-keras 2 (its default, fused=None)."""
    inputs = keras.Input((4, 4, 3))
    x = layers.Conv2D(4, 1, name="conv")(inputs)
    x = layers.BatchNormalization(momentum=0.9, name="bn")(x)
    x = layers.Conv2D(4, 1, name="conv_2")(layers.ReLU()(x))
    x = layers.BatchNormalization(epsilon=1e-5, name="bn_2")(x)
    return keras.Model(inputs, x, name="fused_batch_norm")


def unfused_batch_norm():
    """fused_batch_norm's first half with fused=False, which tf-keras 2.21 does not write in its config: the
    file gets "fused": false written into it (:data:`FUSED_FALSE`), so that tf-keras loads it unfused."""
    inputs = keras.Input((4, 4, 3))
    x = layers.Conv2D(4, 1, name="conv")(inputs)
    x = layers.BatchNormalization(momentum=0.9, fused=False, name="bn")(x)
    return keras.Model(inputs, x, name="unfused_batch_norm")


def dense_batch_norm():
    """A batch norm on a 2-D input: never fused."""
    inputs = keras.Input((5,))
    x = layers.Dense(4, name="dense")(inputs)
    x = layers.BatchNormalization(momentum=0.8, name="bn")(x)
    return keras.Model(inputs, x, name="dense_batch_norm")


def fused_axes():
    """Where tf-keras 2 fuses and where not: channels first on a 4-D input (fused), axis 2 of a 4-D input
    (not fused), channels last on a 5-D input (fused), in float64 (not fused)."""
    inputs = keras.Input((4, 4, 3))
    x = layers.Conv2D(4, 1, name="conv")(inputs)
    x = layers.Permute((3, 1, 2))(x)
    x = layers.BatchNormalization(axis=1, momentum=0.9, name="bn_first")(x)
    x = layers.BatchNormalization(axis=2, name="bn_axis_2")(x)
    x = layers.Reshape((2, 2, 4, 4))(x)
    x = layers.BatchNormalization(momentum=0.5, name="bn_5d")(x)
    y = layers.BatchNormalization(dtype="float64", name="bn_float64")(x)
    return keras.Model(inputs, [x, y], name="fused_axes")


TRAINING = {f.__name__: f for f in (fused_batch_norm, unfused_batch_norm, dense_batch_norm, fused_axes)}
FUSED_FALSE = {"unfused_batch_norm": ("bn",)}  # layers whose config gets "fused": false
TRAINING_SHAPES = {"dense_batch_norm": (6, 5)}  # the input of one step; (2, 4, 4, 3) otherwise


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


def _write_fused_false(path: Path, names) -> None:
    """``"fused": false`` in the saved config of the batch norms ``names`` (tf-keras 2.21 writes no ``fused``)."""
    import h5py

    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        for layer in config["config"]["layers"]:
            if layer["config"]["name"] in names:
                layer["config"]["fused"] = False
        f.attrs["model_config"] = json.dumps(config)


def training_files(out: Path, names) -> None:
    """:data:`TRAINING`'s models, and what tf-keras 2 computes with each file in one training step."""
    for index, name in enumerate(TRAINING):
        if name not in names:
            continue
        rng = np.random.default_rng(100 + index)
        keras.utils.set_random_seed(0)
        model = TRAINING[name]()
        _randomise(model, rng)
        x = rng.normal(size=TRAINING_SHAPES.get(name, (2, 4, 4, 3))).astype("float32")
        path = out / f"{name}.h5"
        model.save(path)
        if name in FUSED_FALSE:
            _write_fused_false(path, FUSED_FALSE[name])
        loaded = keras.models.load_model(path, compile=False)  # the file, as tf-keras reads it
        outputs = {"x": x}
        for key, training in (("y", False), ("y_train", True)):
            y = loaded(x, training=training)
            for i, value in enumerate(y if isinstance(y, list) else [y]):
                outputs[key if not isinstance(y, list) else f"{key}/{i}"] = value.numpy()
        for layer in loaded.layers:
            if isinstance(layer, layers.BatchNormalization):
                outputs[f"{layer.name}/moving_mean"] = layer.moving_mean.numpy()
                outputs[f"{layer.name}/moving_variance"] = layer.moving_variance.numpy()
                outputs[f"{layer.name}/fused"] = np.array(bool(layer.fused))
        np.savez(out / f"{name}.npz", **outputs)
        fused = {k: bool(v) for k, v in outputs.items() if k.endswith("/fused")}
        print(name, path.stat().st_size, "bytes", fused)


def main(folder: str, only=()) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if only:  # the models of MODELS share one random sequence: they are written all together or not at all
        unknown = set(only) - set(TRAINING)
        if unknown:
            raise SystemExit(f"not a model of TRAINING: {', '.join(sorted(unknown))}")
        training_files(out, [name for name in TRAINING if name in only])
        return
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
    training_files(out, TRAINING)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).parent), sys.argv[2:])
