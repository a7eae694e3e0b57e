"""Model file formats: one module per format, each a reader and/or a writer, registered by suffix
(or, for a format that is a folder, by the file that marks its folders).

A reader takes ``(path, budget)`` and returns a model; it treats the file as data (nothing in it
is unpickled, evaluated or run), charges what it allocates to the :class:`~bnkit.formats.limits.Budget`
before allocating it, and raises :class:`ModelFileError` (or :class:`~bnkit.formats.limits.LimitExceeded`)
naming the part of the file that is wrong. A writer takes ``(model, tmp_path, input_shape)`` and
writes the file a :func:`~bnkit.formats.atomic.atomic_path` renames into place.

A new format is a new module here and a line in :data:`_FORMATS`; :mod:`bnkit.io` dispatches
(:func:`format_for` by suffix, :func:`folder_format_for` for folders).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from bnkit.text import printable

__all__ = ["ModelFileError", "Format", "folder_format_for", "format_for", "formats"]


class ModelFileError(ValueError):
    """A model file or spec that cannot be read or written; the message is one printable line.

    ``framework_warnings``: what the frameworks warned while the file was read (the command line
    shows them with ``--verbose``).
    """

    def __init__(self, message: str, framework_warnings: list[str] | None = None) -> None:
        super().__init__(printable(" ".join(str(message).split())))
        self.framework_warnings = list(framework_warnings or [])


@dataclass(frozen=True)
class Format:
    """A file format: which suffixes, which framework's models, and the module that reads/writes it."""

    name: str
    suffixes: tuple[str, ...]
    framework: str  # "torch", "keras" or "onnx": the models it holds
    module: str  # defines read(path, budget) and/or write(model, path, input_shape)
    model_file: bool = True  # False: weights only, for a package.module:factory spec
    # a folder format: the name of the file that marks its folders (a SavedModel's saved_model.pb);
    # the reader gets the folder, whether the folder or that file was named
    folder: str | None = None

    def reader(self):
        return getattr(importlib.import_module(self.module), "read", None)

    def writer(self):
        return getattr(importlib.import_module(self.module), "write", None)


_FORMATS = (
    Format("Keras 3 archive", (".keras",), "keras", "bnkit.formats.keras_archive"),
    Format("legacy Keras HDF5", (".h5", ".hdf5"), "keras", "bnkit.formats.keras_h5"),
    Format("tf-keras 2 SavedModel", (), "keras", "bnkit.formats.saved_model", folder="saved_model.pb"),
    Format("torch.export program", (".pt2",), "torch", "bnkit.formats.pt2"),
    Format("ONNX model", (".onnx",), "onnx", "bnkit.formats.onnx"),
    Format("PyTorch state dict", (".pt", ".pth", ".bin"), "torch", "bnkit.formats.state_dict", model_file=False),
    Format("safetensors", (".safetensors",), "torch", "bnkit.formats.safetensors_file", model_file=False),
)


def formats() -> tuple[Format, ...]:
    return _FORMATS


def format_for(suffix: str) -> Format | None:
    """The format of files ending in ``suffix`` (case-insensitive), or None."""
    suffix = suffix.lower()
    return next((f for f in _FORMATS if suffix in f.suffixes), None)


def folder_format_for(path: Path) -> tuple[Format, Path] | None:
    """The folder format of ``path`` and the folder it names (``path``, or the folder of its marker
    file when ``path`` is that file), or None."""
    for fmt in _FORMATS:
        if fmt.folder is None:
            continue
        if path.is_dir() and (path / fmt.folder).is_file():
            return fmt, path
        if path.name == fmt.folder and path.is_file():
            return fmt, path.parent
    return None
