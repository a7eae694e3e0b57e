"""Convert whole models between Keras 3 and PyTorch, batch-norm semantics included.

* :func:`keras_to_torch` — a functional or Sequential Keras model → ``torch.fx.GraphModule``.
* :func:`torch_to_keras` — an ``nn.Module`` (traced with ``torch.fx``) → Keras functional model.
* :func:`onnx_to_torch` — an ``onnx.ModelProto`` → ``torch.fx.GraphModule`` of ``torch.nn`` layers
  (batch norms in the "onnx" convention); ``torch_to_keras`` takes it on to Keras.

Layouts are each framework's own: the PyTorch side takes ``(N, C, H, W)``, the Keras side
``(N, H, W, C)``; weights are transposed, and the Dense/Linear after a Flatten has its rows
reordered (Keras flattens ``H, W, C``, PyTorch ``C, H, W``). ``semantics`` chooses, for every
batch norm, between the source framework's training semantics (``"source"``: bnkit's layer with
the source convention) and the target's native layer with translated settings (``"target"``).
See docs/conversion.md. Importing this package imports PyTorch and Keras on first use only.
"""

from __future__ import annotations

from bnkit.convert._common import UnsupportedLayerError
from bnkit.frameworks import accepts_tf_keras

__all__ = ["keras_to_torch", "torch_to_keras", "onnx_to_torch", "UnsupportedLayerError"]


@accepts_tf_keras("keras_model")
def keras_to_torch(keras_model, *, semantics="source"):
    _expect(keras_model, "keras", "keras_to_torch")
    from bnkit.convert.keras_walker import keras_to_torch as convert

    return convert(keras_model, semantics=semantics)


def torch_to_keras(module, input_shape, *, semantics="source"):
    _expect(module, "torch", "torch_to_keras")
    from bnkit.convert.torch_walker import torch_to_keras as convert

    return convert(module, input_shape, semantics=semantics)


def onnx_to_torch(model_proto):
    """Convert an ONNX ``ModelProto`` to a ``torch.fx.GraphModule`` of ``torch.nn`` layers (returned in
    ``eval()``). Every BatchNormalization becomes ``bnkit.torch.BatchNorm*d(convention="onnx")`` with the
    node's epsilon and momentum; one in training mode, a batch norm with ``track_running_stats=False``.
    Raises :class:`UnsupportedLayerError` naming the first node (name, op_type) it cannot convert."""
    from bnkit.frameworks import import_optional

    onnx = import_optional("onnx", "converting an ONNX model")
    if not isinstance(model_proto, onnx.ModelProto):
        raise TypeError(f"onnx_to_torch converts an onnx.ModelProto; got {type(model_proto).__name__}")
    from bnkit.convert.onnx_walker import onnx_to_torch as convert

    return convert(model_proto)


def _expect(model, framework: str, function: str) -> None:
    """A ``TypeError`` that names the framework expected, for a model of the other one (or none)."""
    from bnkit.frameworks import is_keras_model, is_torch_module

    keras = is_keras_model(model)  # first: on the torch backend a Keras model is an nn.Module too
    if (framework == "keras") == keras and (keras or is_torch_module(model)):
        return
    got = "a Keras model" if keras else "a PyTorch module" if is_torch_module(model) else "an object"
    if framework == "keras":
        fix = " (use torch_to_keras(module, input_shape) for a PyTorch module)" if got == "a PyTorch module" else ""
        raise TypeError(f"{function} converts a Keras 3 model; got {got} of type {type(model).__name__}{fix}")
    fix = " (use keras_to_torch(model) for a Keras model)" if keras else ""
    raise TypeError(f"{function} converts a PyTorch torch.nn.Module; got {got} of type {type(model).__name__}{fix}")


keras_to_torch.__doc__ = """Convert a Keras 3 functional or Sequential model to a ``torch.fx.GraphModule``.

The module takes and returns PyTorch's layout (``N, C, *spatial``) and is returned in ``eval()``
mode (a Keras model infers unless called with ``training=True``). ``semantics="source"``
(default) keeps Keras' batch-norm training semantics (``bnkit.torch.BatchNorm*d(convention="keras")``);
``"target"`` gives ``torch.nn.BatchNorm*d`` with ``momentum = 1 - keras_momentum`` and the same eps.
Per layer: a dict of Keras layer name -> ``"source"``/``"target"`` (layers left out: ``"source"``).
Raises :class:`UnsupportedLayerError` (a ``ValueError``) naming the first layer it cannot convert.
A live tf-keras 2 model is converted as the Keras 3 model bnkit reads it as (:mod:`bnkit.keras.from_tf_keras`).
"""

torch_to_keras.__doc__ = """Convert a PyTorch module to a Keras 3 functional model (channels-last).

``input_shape`` is in **PyTorch's layout without the batch**: ``(C, H, W)``, ``(C, L)`` or ``(F,)``
(or a list of them). The Keras model takes ``(N, H, W, C)``. ``semantics="source"`` (default) keeps
PyTorch's batch-norm training semantics (``bnkit.keras.BatchNormalization(convention="torch")``);
``"target"`` gives ``keras.layers.BatchNormalization`` with ``momentum = 1 - torch_momentum``.
Per layer: a dict of module path (``"block.bn1"``) -> ``"source"``/``"target"`` (left out: ``"source"``).
The module is traced on a copy in ``eval()``: the original is not changed.
Raises :class:`UnsupportedLayerError` (a ``ValueError``) naming the first layer it cannot convert.
"""
