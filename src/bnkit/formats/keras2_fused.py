"""tf-keras 2's fused batch norm, read as tf-keras 2 trains it.

tf-keras 2's ``BatchNormalization`` runs TensorFlow's fused kernel where it can: ``fused=None`` (its
default, and what its configs imply: tf-keras 2.21 does not write ``fused``) or ``fused=True``, a 4-D or
5-D input with the channel axis 1 or last, no ``renorm`` (nor ``virtual_batch_size``, ``adjustment``,
``synchronized``), a float16, bfloat16 or float32 compute dtype (tf-keras' ``_fused_can_be_used`` and
``build``). The fused kernel updates the moving variance with the *unbiased* batch variance
(``n / (n - 1)`` times the biased one), the unfused layer (and Keras 3's) with the biased one; both
normalise with the biased one and weigh the old value with ``momentum``. bnkit reads a fused one as
:class:`bnkit.keras.BatchNormalization` with :data:`bnkit.conventions.TF_KERAS_FUSED`, the same
``epsilon`` and ``momentum``, so that it trains as tf-keras 2 trained it (measured one training step
equal with tf-keras 2.21, ``tests/formats/test_keras2_files.py``); inference is the same either way.

Whether it runs fused depends on the rank of its input, which its config does not say, so it is decided
in two steps, both in every Keras 2 reader (``.h5``, tf-keras ``.keras``, SavedModel, live ``tf_keras``
models: they all translate with :mod:`bnkit.formats.keras2_config` and build with
:func:`bnkit.formats._keras_loading.build_keras2_model`):

* in the config (:func:`unfused`, the ``BatchNormalization`` translator): ``fused`` is dropped; a batch
  norm with ``fused: false`` (bnkit's ``.h5`` writer writes it for Keras' batch norms; a live tf-keras
  layer built with it) becomes bnkit's layer in the Keras convention, Keras' own computation, which
  :func:`adopt_fused` leaves as it is;
* in the built model (:func:`adopt_fused`, before the weights are read): every Keras
  ``BatchNormalization`` left on which tf-keras 2 runs fused becomes bnkit's, in place
  (:func:`bnkit.keras.batchnorm.adopt`: the same layer object and variables).

A legacy ``.h5`` file that Keras 3 wrote (``keras_version`` 3.x: :func:`written_by_keras2`) goes through
the same reader; its batch norms are Keras 3's and stay so.
"""

from __future__ import annotations

import re

__all__ = ["unfused", "runs_fused", "adopt_fused", "written_by_keras2"]

_REGISTERED = "bnkit>BatchNormalization"
_FUSED_DTYPES = ("float16", "bfloat16", "float32")


def written_by_keras2(keras_version) -> bool:
    """Whether a legacy ``.h5`` file with this ``keras_version`` attribute is Keras 2's (tf.keras, tf-keras 2):
    Keras 3 writes the same format with its own version (3.x), and its batch norms never run fused. A file
    without the attribute is taken for Keras 2's."""
    if isinstance(keras_version, bytes):
        keras_version = keras_version.decode("utf-8", "replace")
    match = re.match(r"\s*(\d+)\.", keras_version) if isinstance(keras_version, str) else None
    return match is None or int(match[1]) < 3


def unfused(layer: dict) -> None:
    """A Keras 2 ``BatchNormalization`` config (translated in place): without ``fused``; bnkit's layer
    in the Keras convention where it says ``fused: false``."""
    inner = layer["config"]
    if inner.pop("fused", None) is False:
        layer["class_name"] = _REGISTERED
        layer.pop("module", None)
        layer.pop("registered_name", None)
        inner["convention"] = "keras"


def runs_fused(layer) -> bool:
    """True where tf-keras 2 runs the built Keras 3 batch norm ``layer`` (read from a Keras 2 config whose
    ``fused`` was None or True) with its fused kernel."""
    spec = getattr(layer, "input_spec", None)
    rank = getattr(spec, "ndim", None)
    if rank not in (4, 5) or not isinstance(layer.axis, int):
        return False
    return (
        layer.axis % rank in (1, rank - 1)
        and not layer.renorm
        and not layer.synchronized
        and layer.compute_dtype in _FUSED_DTYPES
    )


def adopt_fused(model) -> list[str]:
    """Every Keras ``BatchNormalization`` of ``model`` (nested models' included) that
    tf-keras 2 runs fused, made bnkit's in :data:`~bnkit.conventions.TF_KERAS_FUSED`, in place; returns
    their names."""
    from bnkit.conventions import TF_KERAS_FUSED
    from bnkit.keras import keras
    from bnkit.keras.batchnorm import adopt

    adopted = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if type(layer) is keras.layers.BatchNormalization and runs_fused(layer):
            adopt(layer, TF_KERAS_FUSED)
            adopted.append(layer.name)
    return adopted
