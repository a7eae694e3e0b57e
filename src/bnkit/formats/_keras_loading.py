"""Loading a Keras file (``.keras`` or ``.h5``) with Keras itself, in safe mode, once its reader has checked it."""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

from bnkit.formats import ModelFileError
from bnkit.formats.keras_variables import charge_variables
from bnkit.formats.limits import Budget, LimitExceeded
from bnkit.text import has_control_characters, one_line, printable

__all__ = ["load_with_keras"]


def load_with_keras(path: Path, config: dict, budget: Budget, *, legacy: bool):
    """``keras.models.load_model(path)`` in safe mode; ``config`` is the file's model config, as its
    reader parsed it (bounded): the synchronised batch norms are rerouted from it, not from a second
    read, and the variables it declares are charged to ``budget`` before Keras creates them.
    ``legacy``: an ``.h5`` file."""
    from bnkit.keras import keras
    from bnkit.keras.saved import routed_to_bnkit

    _register_bnkit_keras_layers()
    try:
        # a BatchNormalization with synchronized=True, which Keras refuses off TensorFlow, loads as bnkit's
        with routed_to_bnkit(path, config) as routed:
            charge_variables(config, budget, legacy=legacy)
            model = keras.models.load_model(routed, safe_mode=True, compile=False)
    except LimitExceeded:
        raise
    except Exception as e:  # Keras raises many types for a bad file
        raise ModelFileError(f"{path}: not a readable Keras model ({type(e).__name__}: {one_line(e)})") from e
    _check_names(model, path)
    return model


def _check_names(model, path: Path) -> None:
    """Refuse a layer name with control characters: tables and messages would print it (rich passes ESC on)."""
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if has_control_characters(layer.name):
            raise ModelFileError(
                f"{printable(str(path))}: the {type(layer).__name__} layer named {one_line(repr(layer.name), 120)} "
                "has control characters in its name (terminal escape sequences?); refused"
            )


def _register_bnkit_keras_layers() -> None:
    """Import bnkit's Keras layers so that files that use them deserialize."""
    for name in ("bnkit.keras.batchnorm", "bnkit.lifecycle.keras_layers", "bnkit.convert.keras_layers"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
