"""bnkit: batch normalization that is exact and fast across PyTorch and Keras.

The core (conventions, the NumPy reference) imports nothing but NumPy. Everything that
needs a framework is loaded on first use: ``bnkit.torch`` imports PyTorch, ``bnkit.keras``
imports Keras (with ``KERAS_BACKEND=torch`` unless you chose another backend), and
``import bnkit`` imports neither Keras nor TensorFlow.
"""

from __future__ import annotations

import importlib

from bnkit.conventions import (
    FLAX,
    KERAS,
    ONNX,
    TORCH,
    Convention,
    biased_to_unbiased,
    get_convention,
    translate_momentum,
    translate_settings,
    unbiased_to_biased,
)

__version__ = "0.1.0"

# public name -> module that defines it, imported on first access
_LAZY = {
    "reference": "bnkit.reference",
    "torch": "bnkit.torch",
    "keras": "bnkit.keras",
    "convert": "bnkit.convert",
    "explain": "bnkit.explain",
}
_LAZY_ATTRS: dict[str, str] = {
    "summary": "bnkit.summarize",
    "lint": "bnkit.diagnose.lint",
    "compare": "bnkit.diagnose.compare",
    "fold_bn": "bnkit.lifecycle.fold",
    "freeze_bn": "bnkit.lifecycle.freeze",
    "recalibrate": "bnkit.lifecycle.recalibrate",
}

__all__ = [
    "Convention",
    "TORCH",
    "KERAS",
    "ONNX",
    "FLAX",
    "get_convention",
    "translate_momentum",
    "translate_settings",
    "biased_to_unbiased",
    "unbiased_to_biased",
    *_LAZY,
    *_LAZY_ATTRS,
]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        globals()[name] = module
        return module
    if name in _LAZY_ATTRS:
        value = getattr(importlib.import_module(_LAZY_ATTRS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bnkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
