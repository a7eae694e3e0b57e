"""Reading and writing models for the command line.

A model spec is one of:

* ``model.keras`` (Keras 3) or ``model.h5`` (legacy Keras/TF 2) — loaded with Keras' safe mode;
  a ``BatchNormalization`` with ``synchronized=True`` (which Keras refuses on any backend but
  TensorFlow) loads as :class:`bnkit.keras.BatchNormalization`, synchronised over ``torch.distributed``;
* ``model.pt2`` — a ``torch.export`` program. It is rebuilt into a ``torch.fx.GraphModule``
  whose leaves are real ``torch.nn`` (and bnkit) layers again, read from the exported
  parameters and operator arguments, so that summaries, conversion and diagnosis see
  ``BatchNorm2d(eps=…, momentum=…)`` rather than anonymous operators. Layers bnkit does not
  know stay as the exported sub-programs: they still run;
* ``package.module:factory`` — a Python callable returning a ``torch.nn.Module`` or a
  ``keras.Model``, with optional weights: a ``.pt`` state dict (read with
  ``torch.load(weights_only=True)``: a pickle of arbitrary objects is refused) or a
  ``.safetensors`` file.

Writing never replaces an existing file unless ``force=True``, and always goes through a
temporary file in the same folder renamed into place, so a failed write loses nothing.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

from bnkit.frameworks import framework_of

__all__ = ["ModelFileError", "load_model", "save_model", "framework_of", "atomic_path", "check_writable"]

_BNKIT_META = "bnkit.json"


class ModelFileError(ValueError):
    """A model file or spec that cannot be read or written; the message is one line."""


# ---------------------------------------------------------------------------- reading


def load_model(spec: str | os.PathLike, weights: str | os.PathLike | None = None):
    """Load a model from a file or a ``package.module:factory`` spec (see the module doc)."""
    spec = str(spec)
    path = Path(spec)
    suffix = path.suffix.lower()
    if path.is_dir():
        raise ModelFileError(
            f"{spec}: is a folder, not a model file (bnkit reads .keras, .h5 and .pt2 files, "
            "or a package.module:factory spec)"
        )
    if suffix in (".keras", ".h5", ".hdf5", ".pt2"):
        if weights is not None:
            raise ModelFileError(f"{spec}: weights are only taken with a package.module:factory spec")
        _check_readable(path)
        return _load_keras(path) if suffix != ".pt2" else _load_torch_export(path)
    if ":" in spec and not path.exists():
        model = _load_factory(spec)
        if weights is not None:
            _load_weights(model, Path(weights))
        return model
    if path.exists():
        raise ModelFileError(
            f"{spec}: unknown model format {suffix or '(no suffix)'!r}; expected .keras, .h5, .pt2 "
            "or a package.module:factory spec (with --weights for .pt/.safetensors)"
        )
    raise ModelFileError(f"{spec}: no such file, and not a package.module:factory spec")


def _check_readable(path: Path, what: str = "file") -> None:
    """A file that exists, can be opened and is not empty: each named, not a library's later error."""
    if not path.exists():
        raise ModelFileError(f"{path}: no such {what}")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder, not a {what}")
    try:
        with open(path, "rb") as f:
            empty = not f.read(1)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read the {what} ({e.strerror or e})") from e
    if empty:
        raise ModelFileError(f"{path}: the {what} is empty (0 bytes: an interrupted copy or download?)")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _load_keras(path: Path):
    from bnkit.keras import keras

    _register_bnkit_keras_layers()
    # Keras answers "File not found" for a .keras file that is not a zip archive: say what is wrong
    if path.suffix.lower() == ".keras" and not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path}: not a Keras .keras archive (not a zip file: truncated, or another format?)")
    if path.suffix.lower() in (".h5", ".hdf5"):
        import h5py

        if not h5py.is_hdf5(path):
            raise ModelFileError(
                f"{path}: not a legacy Keras .h5 model (not an HDF5 file: truncated, or another format?)"
            )
    from bnkit.keras.saved import routed_to_bnkit

    try:
        # a BatchNormalization with synchronized=True, which Keras refuses off TensorFlow, loads as bnkit's
        with routed_to_bnkit(path) as routed:
            return keras.models.load_model(routed, safe_mode=True, compile=False)
    except Exception as e:  # Keras raises many types for a bad file
        raise ModelFileError(f"{path}: not a readable Keras model ({type(e).__name__}: {_one_line(e)})") from e


def _register_bnkit_keras_layers() -> None:
    """Import bnkit's Keras layers so that files that use them deserialize."""
    for name in ("bnkit.keras.batchnorm", "bnkit.lifecycle.keras_layers", "bnkit.convert.keras_layers"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _import(module_name: str):
    """Import the user's module; from the current folder too, as ``python -m`` would."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        top = module_name.split(".")[0]
        here = os.getcwd()
        if e.name != top or here in sys.path or not (Path(top).is_dir() or Path(f"{top}.py").is_file()):
            raise
        sys.path.insert(0, here)
        importlib.invalidate_caches()
        return importlib.import_module(module_name)


def _load_factory(spec: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelFileError(f"{spec}: expected package.module:factory, e.g. mymodels:build_net")
    try:
        module = _import(module_name)
    except ImportError as e:
        raise ModelFileError(f"{spec}: cannot import {module_name!r} ({_one_line(e)})") from e
    except Exception as e:  # the user's module raised while importing: one line, not a traceback
        raise ModelFileError(f"{spec}: importing {module_name!r} raised {type(e).__name__}: {_one_line(e)}") from e
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelFileError(f"{spec}: {module_name!r} has no callable {attr!r}")
    try:
        model = factory()
    except Exception as e:  # the user's code: one line, not a traceback
        raise ModelFileError(f"{spec}: the factory raised {type(e).__name__}: {_one_line(e)}") from e
    try:
        framework_of(model)
    except TypeError as e:
        raise ModelFileError(f"{spec}: the factory returned {type(model).__name__}, not a model") from e
    return model


def _load_weights(model, path: Path) -> None:
    _check_readable(path, "weights file")
    suffix = path.suffix.lower()
    if framework_of(model) != "torch":
        raise ModelFileError(f"{path}: weights files are for PyTorch factories; a Keras model carries its own")
    import torch

    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:
            raise ModelFileError(f"{path}: not a readable safetensors file ({_one_line(e)})") from e
    elif suffix in (".pt", ".pth", ".bin"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                raise ModelFileError(
                    f"{path}: refused by torch.load(weights_only=True): the file pickles objects other "
                    "than tensors and could run code; save model.state_dict() instead"
                ) from e
            raise ModelFileError(f"{path}: not a readable PyTorch file ({_one_line(e)})") from e
        if not isinstance(state, dict):
            raise ModelFileError(f"{path}: expected a state dict, got {type(state).__name__}")
    else:
        raise ModelFileError(f"{path}: unknown weights format {suffix!r}; expected .pt or .safetensors")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelFileError(f"{path}: weights do not fit the model ({_one_line(e)})") from e


def _load_torch_export(path: Path):
    """A ``.pt2`` program, read without unpickling or evaluating anything in it (see pt2_archive)."""
    from bnkit.torch.pt2_archive import ArchiveError, UnsafeArchiveError, read_exported_program

    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path}: not a torch.export program (not a zip archive: truncated, or another format?)")
    try:
        with warnings.catch_warnings():  # torch.export's pytree code warns about itself
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            program, extra = read_exported_program(path)
    except UnsafeArchiveError as e:
        raise ModelFileError(f"{path}: refused, bnkit runs nothing from a model file: {e}") from e
    except ArchiveError as e:
        raise ModelFileError(f"{path}: not a readable torch.export program ({e})") from e
    try:
        meta = json.loads(extra.get(_BNKIT_META) or "{}")
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: its {_BNKIT_META} is not valid JSON ({e})") from e
    from bnkit.torch.rebuild import rebuild_exported

    meta = meta if isinstance(meta, dict) else {}
    layers = meta.get("layers", {})
    try:
        return rebuild_exported(program, layers if isinstance(layers, dict) else {}, meta)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:  # a damaged bnkit.json or graph
        raise ModelFileError(f"{path}: its layers cannot be rebuilt ({type(e).__name__}: {_one_line(e)})") from e


# ---------------------------------------------------------------------------- writing


def check_writable(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse to replace an existing file unless ``force``; the folder must exist and take a new file.

    Writing is tried (a temporary file, removed at once), so a read-only folder, a full disk or a
    read-only mount is found before any slow work, whoever runs it.
    """
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder; give a file name inside it")
    if path.exists() and not force:
        raise ModelFileError(f"{path}: already exists; pass --force to replace it")
    folder = path.parent
    if not folder.exists():
        raise ModelFileError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise ModelFileError(f"{folder}: is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".probe", dir=folder)
    except OSError as e:
        raise ModelFileError(f"{folder}: cannot write in this folder ({e.strerror or e})") from e
    os.close(fd)
    os.unlink(probe)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, force: bool = False):
    """Yield a temporary path beside ``path``; on success flush it to disk and rename it into place.

    The writer creates the temporary file itself, so it gets the usual permissions (not
    ``mkstemp``'s private 0600).
    """
    path = check_writable(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # some writers refuse an existing file
    try:
        yield Path(tmp)
        if path.exists() and not force:  # appeared meanwhile
            raise ModelFileError(f"{path}: already exists; pass --force to replace it")
        with open(tmp, "rb") as written:  # a crash after the rename must not leave an empty file
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def save_model(model, path: str | os.PathLike, *, force: bool = False, input_shape=None) -> Path:
    """Write ``model`` to ``path``, choosing the format from its suffix.

    ``.keras`` for Keras models; ``.pt2`` (a ``torch.export`` program of the model in eval
    mode, with bnkit's layer conventions stored beside it; needs ``input_shape`` without the
    batch dimension), ``.pt`` (state dict) or ``.safetensors`` for PyTorch modules.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    framework = framework_of(model)
    if suffix == ".keras":
        if framework != "keras":
            raise ModelFileError(f"{path}: .keras files hold Keras models; convert the PyTorch module first")
        with atomic_path(path, force) as tmp:
            model.save(tmp)
        return path
    if framework != "torch":
        raise ModelFileError(f"{path}: a Keras model is saved as .keras; got suffix {suffix!r}")
    import torch

    if suffix == ".pt2":
        if input_shape is None:
            raise ModelFileError(f"{path}: saving a .pt2 program needs the input shape (--input-shape)")
        was_training = model.training
        model.eval()
        try:
            example = torch.zeros((2, *input_shape))
            # the batch size stays free: a program fixed to the example's batch runs on no other
            program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
        except Exception as e:
            raise ModelFileError(f"{path}: torch.export failed ({_one_line(e)})") from e
        finally:
            model.train(was_training)
        from bnkit.torch.rebuild import layer_metadata

        meta = json.dumps({"layers": layer_metadata(model), "model": type(model).__name__})
        with atomic_path(path, force) as tmp:
            torch.export.save(program, str(tmp), extra_files={_BNKIT_META: meta})
        return path
    if suffix in (".pt", ".pth"):
        with atomic_path(path, force) as tmp:
            torch.save(model.state_dict(), tmp)
        return path
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        with atomic_path(path, force) as tmp:
            save_file(state, str(tmp))
        return path
    raise ModelFileError(f"{path}: unknown output format {suffix!r}; expected .keras, .pt2, .pt or .safetensors")
