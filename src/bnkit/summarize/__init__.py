"""Model summaries that count parameters both ways: Keras' (running statistics are
non-trainable params) and PyTorch's (running statistics are buffers).

Data first: :func:`summary` returns a :class:`ModelSummary` of :class:`LayerRow` rows and
totals; :func:`render` prints it with rich, in the style of Keras' ``summary()`` and torchinfo.
"""

from __future__ import annotations

from bnkit.frameworks import accepts_tf_keras, is_keras_model, is_onnx_model
from bnkit.summarize.rows import LayerRow, MemoryEstimate, ModelSummary

__all__ = ["summary", "render", "ModelSummary", "LayerRow", "MemoryEstimate", "is_keras_model"]


@accepts_tf_keras("model")
def summary(model, input_shape=None, *, dtype=None) -> ModelSummary:
    """Layers, output shapes and parameter counts of a ``torch.nn.Module`` or ``keras.Model``.

    ``input_shape`` excludes the batch dimension and is in the model's own layout, as in
    ``keras.Input(shape=...)``: ``(64, 64, 1)`` for an NHWC Keras model, ``(1, 64, 64)`` for
    an NCHW PyTorch one; a list of shapes for several inputs. A built Keras model knows its
    shapes; a PyTorch module is run once on zeros of that shape (batch 1, ``eval()`` mode,
    no gradients, every module's mode restored afterwards) to measure them, and without
    ``input_shape`` its output shapes are unknown (``None``, shown as ``?``).
    ``dtype`` (PyTorch only) is the input's dtype; the first floating parameter's by default.
    A live tf-keras 2 model is summarised as the Keras 3 model bnkit reads it as
    (:mod:`bnkit.keras.from_tf_keras`; ``source`` says so, and the title).
    """
    if is_keras_model(model):
        from bnkit.summarize._keras import summarize_keras

        return summarize_keras(model, input_shape)
    if is_onnx_model(model):  # an onnx.ModelProto (bnkit.io reads .onnx files as one)
        from bnkit.summarize._onnx import summarize_onnx

        return summarize_onnx(model, input_shape)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(model, torch.nn.Module):
        from bnkit.summarize._torch import summarize_torch

        return summarize_torch(model, input_shape, dtype=dtype)
    raise TypeError(
        f"summary() takes a torch.nn.Module or a keras.Model (or an onnx.ModelProto), got {type(model).__name__}"
    )


def render(model_summary: ModelSummary, console=None) -> None:
    """Print ``model_summary`` as a rich table with both accountings and a memory estimate."""
    from bnkit.summarize.table import render as _render

    _render(model_summary, console)
