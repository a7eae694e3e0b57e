"""bnkit's Keras 3 side. Importing it imports Keras.

The backend is the one you chose: ``KERAS_BACKEND`` if set, else the ``"backend"`` of a
``keras.json`` you wrote (in ``$KERAS_HOME`` or ``~/.keras``), as Keras itself reads them. bnkit
picks ``torch`` (it needs no TensorFlow) when nothing chose one: no ``keras.json``, or the very file
Keras writes on its first import where there is none (``"backend": "tensorflow"`` and the other
defaults; left alone, the second run would use TensorFlow where the first used torch), or a chosen
backend whose package is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import warnings

from bnkit.frameworks import tensorflow_beside_torch
from bnkit.streams import fd_output_logged

# Keras backend name -> the package it imports.
_BACKEND_PACKAGES = {
    "tensorflow": "tensorflow",
    "jax": "jax",
    "torch": "torch",
    "numpy": "numpy",
    "openvino": "openvino",
}


# what Keras (3, and tf.keras 2) writes into keras.json on its first import where there is none
KERAS_WRITTEN_CONFIG = {
    "floatx": "float32",
    "epsilon": 1e-07,
    "backend": "tensorflow",
    "image_data_format": "channels_last",
}


def _keras_json() -> dict | None:
    """Keras' config file, read from where Keras reads it (None if absent or not a JSON object)."""
    if "KERAS_HOME" in os.environ:
        keras_dir = os.environ["KERAS_HOME"]
    else:
        base = os.path.expanduser("~")
        if not os.access(base, os.W_OK):
            base = "/tmp"
        keras_dir = os.path.join(base, ".keras")
    try:
        with open(os.path.join(os.path.expanduser(keras_dir), "keras.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _choose_backend() -> None:
    if "KERAS_BACKEND" in os.environ:
        return
    config = _keras_json()
    backend = config.get("backend") if config else None
    if not isinstance(backend, str) or config == KERAS_WRITTEN_CONFIG:  # no choice of the user's
        os.environ["KERAS_BACKEND"] = "torch"
        return
    package = _BACKEND_PACKAGES.get(backend, backend)
    if importlib.util.find_spec(package) is None:
        os.environ["KERAS_BACKEND"] = "torch"
        if backend == "tensorflow":  # Keras' own default: TensorFlow is not installed, no real choice
            return
        warnings.warn(
            f"keras.json chooses the Keras backend {backend!r}, but {package!r} is not installed; "
            "bnkit uses the 'torch' backend (set KERAS_BACKEND to choose one)",
            RuntimeWarning,
            stacklevel=3,
        )


def _tensorflow_only_where_loaded() -> None:
    """Off the TensorFlow backend, Keras imports TensorFlow wherever it is installed just to ask whether
    an object is one of TensorFlow's types (saving a model, ``set_random_seed``): seconds per command,
    and TensorFlow beside Triton aborts a process that loads them in that order (see
    :func:`bnkit.frameworks.tensorflow_beside_torch`). No object is a TensorFlow type where TensorFlow is
    not loaded, so Keras' lazy TensorFlow module is told "available" only once TensorFlow is loaded."""
    from keras.src.utils import module_utils

    lazy = module_utils.tensorflow

    class _LoadedOnly(type(lazy)):
        @property
        def available(self):
            return "tensorflow" in sys.modules and super().available

    lazy.__class__ = _LoadedOnly


_choose_backend()
_backend_chosen = os.environ.get("KERAS_BACKEND") or (_keras_json() or {}).get("backend")
if _backend_chosen == "tensorflow" and "tensorflow" not in sys.modules:
    tensorflow_beside_torch()  # before Keras loads TensorFlow: see bnkit.frameworks
    with fd_output_logged("tensorflow"):  # its CUDA and CPU notices as it loads: shown with --verbose
        import keras
elif "tensorflow" in sys.modules:
    tensorflow_beside_torch()

import keras  # noqa: E402

from bnkit.keras.batchnorm import BatchNormalization  # noqa: E402

if keras.backend.backend() != "tensorflow":
    _tensorflow_only_where_loaded()

__all__ = ["keras", "BatchNormalization", "backend_name"]


def backend_name() -> str:
    """The Keras backend bnkit runs on ("torch", "tensorflow", "jax"), as reports name it."""
    return keras.backend.backend()
