"""Reading and writing models: the public entry points; each format lives in :mod:`bnkit.formats`.

A model spec is one of:

* ``model.keras`` (Keras 3) or ``model.h5`` (legacy Keras/TF 2) — loaded with Keras' safe mode
  (and written: an ``.h5`` as tf-keras 2 writes it, which tf-keras 2 and Keras 3 both load);
  a ``BatchNormalization`` with ``synchronized=True`` (which Keras refuses on any backend but
  TensorFlow) loads as :class:`bnkit.keras.BatchNormalization`, synchronised over ``torch.distributed``;
* a SavedModel folder written by tf.keras / tf-keras 2 (``model.save("dir")``), or its
  ``saved_model.pb`` — rebuilt from the Keras config in its ``keras_metadata.pb``, its variables read
  as data (:mod:`bnkit.formats.saved_model`); no function of its graph is run;
* ``model.pt2`` — a ``torch.export`` program. It is rebuilt into a ``torch.fx.GraphModule``
  whose leaves are real ``torch.nn`` (and bnkit) layers again, read from the exported
  parameters and operator arguments, so that summaries, conversion and diagnosis see
  ``BatchNorm2d(eps=…, momentum=…)`` rather than anonymous operators. Layers bnkit does not
  know stay as the exported sub-programs: they still run;
* ``model.onnx`` — an ONNX model, returned as an ``onnx.ModelProto`` (``pip install 'bnkit[onnx]'``):
  its external data is read only from inside the model's folder, and operators outside ONNX's standard
  domains are refused by node (:mod:`bnkit.formats.onnx`);
* ``package.module:factory`` — a Python callable returning a ``torch.nn.Module`` or a
  ``keras.Model``, with optional weights: a ``.pt`` state dict (read with
  ``torch.load(weights_only=True)``: a pickle of arbitrary objects is refused) or a
  ``.safetensors`` file.

A model file is data: nothing in it is unpickled, evaluated or run, and reading it stays within
:class:`~bnkit.formats.limits.ReadLimits` (memory budget, time). Every failure to read is a
:class:`ModelFileError` with a one-line, printable message (see ``docs/security.md``).

Writing never replaces an existing file unless ``force=True``, and always goes through a
temporary file in the same folder renamed into place, so a failed write loses nothing.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from bnkit.formats import ModelFileError, folder_format_for, format_for, formats
from bnkit.formats.atomic import atomic_path, check_writable
from bnkit.formats.limits import LimitExceeded, ReadLimits, ReadTimeout, deadline
from bnkit.formats.quiet import captured
from bnkit.frameworks import framework_of
from bnkit.text import one_line, printable

__all__ = [
    "ModelFileError",
    "ReadLimits",
    "load_model",
    "save_model",
    "framework_of",
    "atomic_path",
    "check_writable",
    "check_model_output",
]


# ---------------------------------------------------------------------------- reading


def _suffixes(model_files: bool) -> str:
    found = [s for f in formats() if f.model_file == model_files for s in f.suffixes]
    return ", ".join(found[:-1]) + " or " + found[-1]


def load_model(
    spec: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    *,
    limits: ReadLimits | None = None,
    on_warning: Callable[[str], None] | None = None,
):
    """Load a model from a file or a ``package.module:factory`` spec (see the module doc).

    ``limits`` bound what reading a file may take (default :class:`ReadLimits`). What the
    frameworks warn while reading is passed, a line each, to ``on_warning`` (dropped without
    it); when reading fails it travels on the error (``ModelFileError.framework_warnings``).
    """
    spec = str(spec)
    limits = limits or ReadLimits()
    path = Path(spec)
    fmt = format_for(path.suffix)
    shown = printable(spec)
    folder = folder_format_for(path)  # a SavedModel folder, or its saved_model.pb
    if folder is not None:
        fmt, path = folder
        if weights is not None:
            raise ModelFileError(f"{shown}: weights are only taken with a package.module:factory spec")
        return _read_file(path, lambda budget: fmt.reader()(path, budget), limits, on_warning, "folder")
    if path.is_dir():
        raise ModelFileError(
            f"{shown}: is a folder, not a model file (bnkit reads {_suffixes(True)} files, "
            f"{_folders()}, or a package.module:factory spec)"
        )
    if fmt is not None and fmt.model_file:
        if weights is not None:
            raise ModelFileError(f"{shown}: weights are only taken with a package.module:factory spec")
        return _read_file(path, lambda budget: fmt.reader()(path, budget), limits, on_warning)
    if ":" in spec and not path.exists():
        model = _load_factory(spec)
        if weights is not None:
            _load_weights(model, Path(weights), limits, on_warning)
        return model
    if path.exists():
        raise ModelFileError(
            f"{shown}: unknown model format {path.suffix or '(no suffix)'!r}; expected {_suffixes(True)} "
            f"or a package.module:factory spec (with --weights for {_suffixes(False)})"
        )
    raise ModelFileError(f"{shown}: no such file, and not a package.module:factory spec")


def _folders() -> str:
    return " or ".join(f"{f.name} folders (with a {f.folder})" for f in formats() if f.folder)


def _read_file(path: Path, read, limits: ReadLimits, on_warning, what: str = "file"):
    """``read(budget)`` within ``limits``, its warnings kept, every failure one ModelFileError.
    ``what``: "folder" for a folder format (its reader checks the files in it)."""
    if what != "folder":
        _check_readable(path, what)
    shown = printable(str(path))
    with captured() as kept:
        try:
            with deadline(limits, shown):
                result = read(limits.budget())
        except ModelFileError as e:
            e.framework_warnings = kept[:] + e.framework_warnings
            raise
        except ReadTimeout as e:  # its message names the file already, as the supervisor's line does
            raise ModelFileError(str(e), kept[:]) from e
        except LimitExceeded as e:
            raise ModelFileError(f"{shown}: refused: {e}", kept[:]) from e
        except Exception as e:  # a reader's own error that no check named: still one line
            raise ModelFileError(f"{shown}: cannot be read ({type(e).__name__}: {one_line(e)})", kept[:]) from e
    if on_warning is not None:
        for line in kept:
            on_warning(line)
    return result


def _check_readable(path: Path, what: str = "file") -> None:
    """A file that exists, can be opened and is not empty: each named, not a library's later error."""
    shown = printable(str(path))
    if not path.exists():
        raise ModelFileError(f"{shown}: no such {what}")
    if path.is_dir():
        raise ModelFileError(f"{shown}: is a folder, not a {what}")
    try:
        with open(path, "rb") as f:
            empty = not f.read(1)
    except OSError as e:
        raise ModelFileError(f"{shown}: cannot read the {what} ({e.strerror or e})") from e
    if empty:
        raise ModelFileError(f"{shown}: the {what} is empty (0 bytes: an interrupted copy or download?)")


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
        raise ModelFileError(f"{spec}: cannot import {module_name!r} ({one_line(e)})") from e
    except Exception as e:  # the user's module raised while importing: one line, not a traceback
        raise ModelFileError(f"{spec}: importing {module_name!r} raised {type(e).__name__}: {one_line(e)}") from e
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelFileError(f"{spec}: {module_name!r} has no callable {attr!r}")
    try:
        model = factory()
    except Exception as e:  # the user's code: one line, not a traceback
        raise ModelFileError(f"{spec}: the factory raised {type(e).__name__}: {one_line(e)}") from e
    try:
        framework_of(model)
    except TypeError as e:
        raise ModelFileError(f"{spec}: the factory returned {type(model).__name__}, not a model") from e
    return model


def _load_weights(model, path: Path, limits: ReadLimits, on_warning) -> None:
    fmt = format_for(path.suffix)
    if fmt is None or fmt.model_file:
        _check_readable(path, "weights file")
        raise ModelFileError(
            f"{printable(str(path))}: unknown weights format {path.suffix!r}; expected {_suffixes(False)}"
        )
    if framework_of(model) != "torch":
        raise ModelFileError(f"{path}: weights files are for PyTorch factories; a Keras model carries its own")
    reader = importlib.import_module(fmt.module).read_state_dict
    state = _read_file(path, lambda budget: reader(path, budget), limits, on_warning, "weights file")
    with captured() as kept:  # torch warns here too (a complex tensor cast to real)
        try:
            model.load_state_dict(state)
        except Exception as e:  # RuntimeError from torch; a module's own loading code raises what it likes
            shown = printable(str(path))
            raise ModelFileError(f"{shown}: weights do not fit the model ({one_line(e)})", kept[:]) from e
    for line in kept if on_warning is not None else ():
        on_warning(line)


# ---------------------------------------------------------------------------- writing


def _folder_writer():
    """The folder format a path without a suffix is written as (a SavedModel folder), or None."""
    return next((f for f in formats() if f.folder is not None and f.writer() is not None), None)


def check_model_output(path: str | os.PathLike, force: bool = False) -> Path:
    """:func:`check_writable` for what :func:`save_model` writes at ``path``: for a path without a
    suffix, a folder (an existing one replaced only with ``force`` and only when it is of that format)."""
    path = Path(path)
    fmt = None if path.suffix else _folder_writer()
    if fmt is None:
        return check_writable(path, force)
    from bnkit.formats.atomic import check_folder_writable

    return check_folder_writable(path, fmt.folder, f"{fmt.name} folder", force)



def save_model(model, path: str | os.PathLike, *, force: bool = False, input_shape=None) -> Path:
    """Write ``model`` to ``path``, choosing the format from its suffix (a path without one: a folder).

    For Keras models ``.keras`` (Keras 3) or ``.h5`` (a Keras 2 file that tf-keras 2 and Keras 3
    both load; a layer tf-keras 2 could not load exactly is refused by name, and the file is read
    back and checked against the model before it is renamed into place; see
    :mod:`bnkit.formats.keras_h5`); for PyTorch modules ``.pt2`` (a ``torch.export`` program of the
    model in eval mode, with bnkit's layer conventions stored beside it; needs ``input_shape``
    without the batch dimension), ``.pt`` (state dict) or ``.safetensors``. A Keras model written to a
    path without a suffix becomes a tf-keras 2 SavedModel folder, as tf-keras 2's ``model.save("dir")``
    writes it: translated as for ``.h5``, saved by tf-keras 2 in a subprocess, read back and checked
    before the folder is renamed into place (:mod:`bnkit.formats.saved_model_write`; needs
    ``pip install 'bnkit[tensorflow]'``). An existing SavedModel folder is replaced only with ``force``;
    any other existing folder never. Either framework's model is written to ``.onnx`` with every batch norm
    a ``BatchNormalization`` node, checked with onnxruntime before the rename (:mod:`bnkit.formats.onnx_write`).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    framework = framework_of(model)
    fmt = format_for(suffix) if suffix else _folder_writer()
    if fmt is not None and fmt.folder is not None and fmt.framework != framework:
        raise ModelFileError(
            f"{path}: a path without a suffix is written as a {fmt.name} folder, which holds a Keras model; "
            "convert the PyTorch module first (bnkit.convert.torch_to_keras), or give a suffix "
            "(.pt2, .pt, .safetensors)"
        )
    if suffix == ".onnx" and framework in ("torch", "keras"):  # either framework's model (bnkit.formats.onnx_write)
        from bnkit.formats.onnx_write import write as write_onnx

        write_onnx(model, path, input_shape=input_shape, force=force)
        return path
    writer = fmt.writer() if fmt is not None else None
    if writer is None:
        writable = ", ".join(s for f in formats() if f.writer() for s in f.suffixes[:1])
        raise ModelFileError(f"{path}: unknown output format {suffix!r}; expected {writable}")
    if fmt.framework != framework:
        keras_suffixes = " or ".join(
            f.suffixes[0] for f in formats() if f.framework == "keras" and f.suffixes and f.writer()
        )
        if framework == "torch":
            raise ModelFileError(
                f"{path}: {keras_suffixes} files hold Keras models; convert the PyTorch module first "
                "(bnkit.convert.torch_to_keras)"
            )
        raise ModelFileError(f"{path}: a Keras model is saved as {keras_suffixes}; got suffix {suffix!r}")
    writer(model, path, force=force, input_shape=input_shape)
    return path
