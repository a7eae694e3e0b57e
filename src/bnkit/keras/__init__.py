"""bnkit's Keras 3 side. Importing it imports Keras.

The backend is the one you chose: ``KERAS_BACKEND`` if set, else the ``"backend"`` of
``keras.json`` (in ``$KERAS_HOME`` or ``~/.keras``), as Keras itself reads them. Only when
neither chose one, or the chosen backend's package is not installed (Keras writes
``"tensorflow"`` into a fresh ``keras.json``), does bnkit pick ``torch``: bnkit needs no TensorFlow.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings

# Keras backend name -> the package it imports.
_BACKEND_PACKAGES = {
    "tensorflow": "tensorflow",
    "jax": "jax",
    "torch": "torch",
    "numpy": "numpy",
    "openvino": "openvino",
}


def _keras_json_backend() -> str | None:
    """The backend named in Keras' config file, read from where Keras reads it."""
    if "KERAS_HOME" in os.environ:
        keras_dir = os.environ["KERAS_HOME"]
    else:
        base = os.path.expanduser("~")
        if not os.access(base, os.W_OK):
            base = "/tmp"
        keras_dir = os.path.join(base, ".keras")
    try:
        with open(os.path.join(os.path.expanduser(keras_dir), "keras.json")) as f:
            backend = json.load(f).get("backend")
    except (OSError, ValueError, AttributeError):
        return None
    return backend if isinstance(backend, str) else None


def _choose_backend() -> None:
    if "KERAS_BACKEND" in os.environ:
        return
    backend = _keras_json_backend()
    if backend is None:
        os.environ["KERAS_BACKEND"] = "torch"
        return
    package = _BACKEND_PACKAGES.get(backend, backend)
    if importlib.util.find_spec(package) is None:
        os.environ["KERAS_BACKEND"] = "torch"
        if backend == "tensorflow":  # Keras' own default in a keras.json it wrote: no real choice
            return
        warnings.warn(
            f"keras.json chooses the Keras backend {backend!r}, but {package!r} is not installed; "
            "bnkit uses the 'torch' backend (set KERAS_BACKEND to choose one)",
            RuntimeWarning,
            stacklevel=3,
        )


_choose_backend()

import keras  # noqa: E402

from bnkit.keras.batchnorm import BatchNormalization  # noqa: E402

__all__ = ["keras", "BatchNormalization"]
