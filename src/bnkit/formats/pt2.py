"""``.pt2``: a ``torch.export`` program, read without unpickling or evaluating anything in it.

Reading is :func:`bnkit.torch.pt2_archive.read_exported_program` (the archive as data), then
:func:`bnkit.torch.rebuild.rebuild_exported`, which turns the program's leaves back into
``torch.nn`` and bnkit layers. Writing exports the module in eval mode with a free batch size and
stores bnkit's layer conventions beside the program (``extra/bnkit.json``).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from bnkit.formats import ModelFileError
from bnkit.formats.atomic import atomic_path
from bnkit.formats.limits import Budget, parse_json
from bnkit.formats.zipfiles import is_zip
from bnkit.text import one_line

__all__ = ["read", "write", "BNKIT_META"]

BNKIT_META = "bnkit.json"


def read(path: Path, budget: Budget):
    from bnkit.torch.pt2_archive import ArchiveError, UnsafeArchiveError, read_exported_program

    if not is_zip(path):
        raise ModelFileError(f"{path}: not a torch.export program (not a zip archive: truncated, or another format?)")
    try:
        program, extra = read_exported_program(path, budget)
    except UnsafeArchiveError as e:
        raise ModelFileError(f"{path}: refused, bnkit runs nothing from a model file: {e}") from e
    except ArchiveError as e:
        raise ModelFileError(f"{path}: not a readable torch.export program ({e})") from e
    try:
        meta = parse_json(extra.get(BNKIT_META) or "{}", f"extra/{BNKIT_META}", budget)
    except ValueError as e:
        raise ModelFileError(f"{path}: its {BNKIT_META} is not valid JSON ({one_line(e)})") from e
    from bnkit.torch.rebuild import rebuild_exported

    meta = meta if isinstance(meta, dict) else {}
    layers = meta.get("layers", {})
    try:
        return rebuild_exported(program, layers if isinstance(layers, dict) else {}, meta)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:  # a damaged bnkit.json or graph
        raise ModelFileError(f"{path}: its layers cannot be rebuilt ({type(e).__name__}: {one_line(e)})") from e


def write(model, path: Path, *, force: bool = False, input_shape=None) -> None:
    import torch

    if input_shape is None:
        raise ModelFileError(f"{path}: saving a .pt2 program needs the input shape (--input-shape)")
    was_training = model.training
    model.eval()
    try:
        example = torch.zeros((2, *input_shape))
        # the batch size stays free: a program fixed to the example's batch runs on no other
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    except Exception as e:
        raise ModelFileError(f"{path}: torch.export failed ({one_line(e)})") from e
    finally:
        model.train(was_training)
    from bnkit.torch.rebuild import layer_metadata

    meta = json.dumps({"layers": layer_metadata(model), "model": type(model).__name__})
    with atomic_path(path, force) as tmp:
        # in memory first: torch's C++ zip writer aborts the whole process (exit 134) when the disk
        # fills up under it, and names the archive's root folder after the temporary file
        archive = io.BytesIO()
        torch.export.save(program, archive, extra_files={BNKIT_META: meta})
        with open(tmp, "wb") as f:
            f.write(archive.getbuffer())
