"""Loading a Keras file (``.keras`` or ``.h5``) with Keras itself, in safe mode."""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

from bnkit.formats import ModelFileError
from bnkit.text import one_line

__all__ = ["load_with_keras"]


def load_with_keras(path: Path):
    from bnkit.keras import keras
    from bnkit.keras.saved import routed_to_bnkit

    _register_bnkit_keras_layers()
    try:
        # a BatchNormalization with synchronized=True, which Keras refuses off TensorFlow, loads as bnkit's
        with routed_to_bnkit(path) as routed:
            return keras.models.load_model(routed, safe_mode=True, compile=False)
    except Exception as e:  # Keras raises many types for a bad file
        raise ModelFileError(f"{path}: not a readable Keras model ({type(e).__name__}: {one_line(e)})") from e


def _register_bnkit_keras_layers() -> None:
    """Import bnkit's Keras layers so that files that use them deserialize."""
    for name in ("bnkit.keras.batchnorm", "bnkit.lifecycle.keras_layers", "bnkit.convert.keras_layers"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
