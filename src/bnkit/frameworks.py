"""Which framework a model belongs to, without importing a framework that is not loaded; and the
optional frameworks (extras), imported only where a command needs one."""

from __future__ import annotations

import importlib
import importlib.util
import sys

__all__ = [
    "MissingFramework",
    "is_keras_model",
    "is_torch_module",
    "framework_of",
    "import_optional",
    "tensorflow_beside_torch",
]


class MissingFramework(ImportError):
    """An optional framework that is not installed; the message names the extra that installs it."""


# package -> the bnkit extra that installs it
_EXTRAS = {"tensorflow": "tensorflow", "tf_keras": "tensorflow", "jax": "jax"}


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
        extra = _EXTRAS.get(package.split(".")[0], package)
        raise MissingFramework(
            f"{needed_for} needs {package}, which is not installed (pip install 'bnkit[{extra}]')"
        ) from e


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
