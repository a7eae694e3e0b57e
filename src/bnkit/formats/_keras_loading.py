"""Loading a Keras file (``.keras`` or ``.h5``) with Keras itself, in safe mode, once its reader has checked it."""

from __future__ import annotations

from pathlib import Path

from bnkit.formats import ModelFileError
from bnkit.formats.keras_variables import register_bnkit_keras_layers
from bnkit.text import has_control_characters, one_line, printable

__all__ = ["load_with_keras"]


def load_with_keras(path: Path, config: dict):
    """``keras.models.load_model(path)`` in safe mode, once its reader has checked the file and charged
    what Keras takes; ``config`` is the file's model config as the reader parsed it (bounded): the
    synchronised batch norms are rerouted from it, not from a second read."""
    from bnkit.keras import keras
    from bnkit.keras.saved import routed_to_bnkit

    register_bnkit_keras_layers()
    try:
        # a BatchNormalization with synchronized=True, which Keras refuses off TensorFlow, loads as bnkit's
        with routed_to_bnkit(path, config) as routed:
            model = keras.models.load_model(routed, safe_mode=True, compile=False)
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
