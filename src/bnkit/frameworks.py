"""Which framework a model belongs to, without importing a framework that is not loaded."""

from __future__ import annotations

import sys

__all__ = ["is_keras_model", "is_torch_module", "framework_of"]


def is_keras_model(model) -> bool:
    """True for Keras layers and models (which, on the torch backend, are also ``nn.Module``s)."""
    keras = sys.modules.get("keras")
    # Keras 3 layers on the torch backend are torch.nn.Modules too: ask Keras first.
    return keras is not None and isinstance(model, keras.layers.Layer)


def is_torch_module(model) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def framework_of(model, what: str = "bnkit") -> str:
    """``"keras"`` or ``"torch"``; a ``TypeError`` naming ``what`` refused it otherwise."""
    if is_keras_model(model):
        return "keras"
    if is_torch_module(model):
        return "torch"
    raise TypeError(f"{what} takes a torch.nn.Module or a Keras 3 model, got {type(model).__name__}")
