"""Write the crafted-file corpus (see ``crafted.py``) into a folder.

    python tests/fuzz/make_corpus.py OUT      # OUT/valid/... and OUT/<format>/...; prints one line a case

The valid files every crafted one starts from are made here too, by the real tools: a small
conv → BN → ReLU → linear network saved by ``bnkit.io.save_model`` (``.pt2``) and by Keras 3
(``.keras``, legacy ``.h5``), and its state dict (``.pt``, ``.safetensors``) for the
``fuzz_models:small`` factory. They are the same bytes on every run (Keras' time stamps are
fixed: see :func:`_reproducible`), so a seed gives the same mutants.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FACTORY = "fuzz_models:small"  # importable from HERE (the harness runs with HERE as the working folder)
TORCH_INPUT_SHAPE = (3, 8, 8)
KERAS_INPUT_SHAPE = (8, 8, 3)


def valid_sources(folder: Path) -> dict[str, Path]:
    """The valid files: ``pt2``, ``keras``, ``h5``, ``pt``, ``safetensors``."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    sys.path.insert(0, str(HERE))
    import torch
    from fuzz_models import small, small_keras

    from bnkit.io import save_model

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    module = small()
    sources = {"pt2": folder / "small.pt2", "pt": folder / "small.pt", "safetensors": folder / "small.safetensors"}
    for path in sources.values():
        if not path.exists():
            save_model(module, path, input_shape=TORCH_INPUT_SHAPE)
    keras_model = small_keras()
    for key, name in (("keras", "small.keras"), ("h5", "small.h5")):
        path = folder / name
        if not path.exists():
            keras_model.save(path)
            if key == "keras":
                _reproducible(path)
        sources[key] = path
    return sources


def _reproducible(path: Path) -> None:
    """Keras writes into a ``.keras`` archive the time it was saved (``metadata.json``'s
    ``date_saved``, the weights member's zip date) and the memory addresses of shared objects
    (``shared_object_id`` in ``config.json``): rewritten with fixed dates and ids numbered in order
    (the same sharing), as Keras writes the archive (Python's zipfile, the same entries), so that
    the file is the same bytes on every run."""
    with zipfile.ZipFile(path) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in members:
            if info.filename == "metadata.json":
                data = json.dumps({**json.loads(data), "date_saved": "2000-01-01@00:00:00"}).encode()
            elif info.filename == "config.json":
                data = json.dumps(_renumbered(json.loads(data), {})).encode()
            info.date_time = (1980, 1, 1, 0, 0, 0)
            archive.writestr(info, data)


def _renumbered(value, ids: dict):
    if isinstance(value, dict):
        return {
            k: ids.setdefault(v, len(ids) + 1) if k == "shared_object_id" else _renumbered(v, ids)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_renumbered(v, ids) for v in value]
    return value
