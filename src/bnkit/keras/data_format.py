"""Which layout a Keras model's tensors are in: channels-last (Keras' default) or channels_first."""

from __future__ import annotations

__all__ = ["is_channels_first"]


def is_channels_first(model) -> bool:
    """Whether a Keras model is channels_first: its layers with a ``data_format`` (Flatten aside, whose
    default stays channels_last in such models) all say ``"channels_first"``. Its tensors are then
    ``(N, C, *spatial)``, as PyTorch's, and so are its conversion's inputs and outputs."""
    from bnkit.keras import keras

    formats = {
        getattr(layer, "data_format", None)
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if not isinstance(layer, keras.layers.Flatten)
    } - {None}
    return formats == {"channels_first"}
