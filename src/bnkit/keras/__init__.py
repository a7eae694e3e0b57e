"""bnkit's Keras 3 side. Importing it imports Keras, on the torch backend unless
``KERAS_BACKEND`` (or ``~/.keras/keras.json``) chose another: bnkit needs no TensorFlow."""

import os

if "KERAS_BACKEND" not in os.environ:
    os.environ["KERAS_BACKEND"] = "torch"

import keras  # noqa: E402

__all__ = ["keras"]
