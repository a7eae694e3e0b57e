"""Which framework a model belongs to, without importing a framework that is not loaded; live tf-keras 2
models taken where bnkit takes a Keras model (:func:`accepts_tf_keras`); and the optional frameworks
(extras), imported only where a command needs one."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import sys

__all__ = [
    "MissingFramework",
    "is_keras_model",
    "is_torch_module",
    "is_onnx_model",
    "framework_of",
    "is_tf_keras_model",
    "accepts_tf_keras",
    "import_optional",
    "missing_framework",
    "tensorflow_beside_torch",
]


class MissingFramework(ImportError):
    """An optional framework that is not installed; the message names the extra that installs it."""


# package -> the bnkit extra that installs it
_EXTRAS = {"tensorflow": "tensorflow", "tf_keras": "tensorflow", "jax": "jax", "onnxruntime": "onnx"}


def import_optional(package: str, needed_for: str):
    """``import package``, or a :class:`MissingFramework` one line long: "<needed_for> needs <package>,
    which is not installed (pip install 'bnkit[<extra>]')"; an import that fails for another reason
    keeps its cause."""
    if package.split(".")[0] in ("tensorflow", "tf_keras"):
        tensorflow_beside_torch()
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as e:
        if e.name != package.split(".")[0]:
            raise
        raise missing_framework(package, needed_for) from e


def missing_framework(package: str, needed_for: str) -> MissingFramework:
    """The :class:`MissingFramework` error :func:`import_optional` raises for ``package``."""
    extra = _EXTRAS.get(package.split(".")[0], package)
    return MissingFramework(f"{needed_for} needs {package}, which is not installed (pip install 'bnkit[{extra}]')")


def is_keras_model(model) -> bool:
    """True for Keras layers and models (which, on the torch backend, are also ``nn.Module``s)."""
    keras = sys.modules.get("keras")
    # Keras 3 layers on the torch backend are torch.nn.Modules too: ask Keras first.
    return keras is not None and isinstance(model, keras.layers.Layer)


def is_torch_module(model) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def is_onnx_model(model) -> bool:
    """True for an ``onnx.ModelProto`` (what bnkit reads an ``.onnx`` file as); False where onnx is not loaded."""
    onnx = sys.modules.get("onnx")
    return onnx is not None and isinstance(model, onnx.ModelProto)


def is_tf_keras_model(model) -> bool:
    """True for a live tf-keras 2 model (``tf_keras.Model``, also ``tf.keras`` with ``TF_USE_LEGACY_KERAS=1``)."""
    tf_keras = sys.modules.get("tf_keras")  # there is no such model where tf_keras is not loaded
    return tf_keras is not None and isinstance(model, getattr(tf_keras, "Model", ()))


def framework_of(model, what: str = "bnkit") -> str:
    """``"keras"``, ``"torch"`` or ``"onnx"`` (an ``onnx.ModelProto``); a ``TypeError`` naming ``what``
    refused it otherwise."""
    if is_keras_model(model):
        return "keras"
    if is_torch_module(model):
        return "torch"
    if is_onnx_model(model):
        return "onnx"
    if is_tf_keras_model(model):
        raise TypeError(
            f"{what} takes a torch.nn.Module or a Keras 3 model, got the tf-keras 2 model {type(model).__name__}: "
            "bnkit.keras.from_tf_keras.from_tf_keras(model) gives its Keras 3 equivalent"
        )
    raise TypeError(f"{what} takes a torch.nn.Module or a Keras 3 model, got {type(model).__name__}")


def accepts_tf_keras(*names: str, in_place: bool = False):
    """Let a function that takes Keras 3 models take live tf-keras 2 models for its parameters ``names``:
    each is replaced by its Keras 3 equivalent (:func:`bnkit.keras.from_tf_keras.from_tf_keras`) for
    the call. ``in_place``: the function changes its (one) model in place and returns it; the change is
    then written back into the tf-keras model, which is returned (``recalibrate``, ``freeze_bn``).
    Costs nothing where tf_keras is not loaded."""

    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if "tf_keras" not in sys.modules:
                return function(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            given = {n: bound.arguments[n] for n in names if is_tf_keras_model(bound.arguments.get(n))}
            if not given:
                return function(*args, **kwargs)
            from bnkit.keras.from_tf_keras import convert_tf_keras, write_back

            converted = {n: convert_tf_keras(model) for n, model in given.items()}
            bound.arguments.update({n: model for n, (model, _) in converted.items()})
            result = function(*bound.args, **bound.kwargs)
            if not in_place:
                return result
            (name, original), = given.items()
            model, pairs = converted[name]
            if result is not model:  # pragma: no cover - in-place functions return their model
                return result
            write_back(pairs, f"tf-keras model {original.name!r}")
            return original

        return wrapper

    return decorate


def tensorflow_beside_torch() -> None:
    """Make TensorFlow and PyTorch's compiler stack safe in one process; call it before TensorFlow loads.

    TensorFlow and Triton (which ``torch.export`` imports through ``torch._dynamo`` wherever it is
    installed, as beside every CUDA build of PyTorch) each carry their own LLVM: with TensorFlow loaded
    first, loading Triton aborts the process ("LLVM ERROR: inconsistency in registered CommandLine
    options"); with Triton first, both load. So Triton is loaded first where it is installed; where
    TensorFlow is already loaded and Triton is not, Triton is made unimportable (torch then runs without
    it, on the CPU as on a machine without Triton) rather than left to abort the process.
    """
    if "triton" in sys.modules or importlib.util.find_spec("triton") is None:
        return
    if "tensorflow" in sys.modules:
        sys.modules["triton"] = None  # an ImportError for torch's "is Triton there?", not an abort
        return
    try:
        importlib.import_module("triton")
    except Exception:  # a broken Triton: torch will find it broken too, without an abort
        sys.modules["triton"] = None
