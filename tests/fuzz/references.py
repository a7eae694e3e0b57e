"""Independent readers of a file bnkit read: what the model in it is, by the frameworks' own loaders.

Called in the harness worker (``Case.reference``), only for a file ``bnkit summary`` read with exit
status 0, so only after bnkit's own checks passed; each returns plain JSON for the test to compare
with bnkit's summary. None of them is bnkit code:

* :func:`keras_view`: ``keras.saving.load_model(safe_mode=True, compile=False)``;
* :func:`pt2_view`: ``torch.export.load``. It unpickles the program's sample inputs (with
  ``weights_only=False`` when ``weights_only=True`` fails), which bnkit never loads, and refuses
  an archive whose bookkeeping (``archive_format``, ``.data/version``...) is damaged, which bnkit
  does not read either: the archive it gets has the valid source's of those
  (:data:`BOOKKEEPING`), and of the rest only the members Python's zipfile reads (bnkit, which
  read the file, did not need the others). The program, its weights and their descriptions are
  the mutant's;
* :func:`weights_view`: ``torch.load(weights_only=True)`` or ``safetensors.torch.load_file``, then
  ``load_state_dict(strict=True)`` into the factory's model.
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile

SAMPLE_INPUTS = "data/sample_inputs/model.pt"
# what tells torch's reader about the archive, not about the model: bnkit does not read these (the
# sample inputs are a pickle), so torch gets the valid source's, and a mutant is judged on the rest
BOOKKEEPING = (SAMPLE_INPUTS, "archive_format", ".data/version", ".data/serialization_id")


def keras_view(path: str) -> dict:
    import keras

    model = keras.saving.load_model(path, safe_mode=True, compile=False)
    return {
        "total": int(model.count_params()),
        "trainable": sum(math.prod(w.shape) for w in model.trainable_weights),
        "non_trainable": sum(math.prod(w.shape) for w in model.non_trainable_weights),
        "layers": [[layer.name, type(layer).__name__] for layer in model.layers],
    }


def pt2_view(path: str, source: str) -> dict:
    import torch

    with zipfile.ZipFile(source) as valid:
        kept = {n.partition("/")[2]: valid.read(n) for n in valid.namelist() if n.partition("/")[2] in BOOKKEEPING}
    fd, copy = tempfile.mkstemp(suffix=".pt2")
    os.close(fd)
    try:
        with zipfile.ZipFile(path) as mutant, zipfile.ZipFile(copy, "w") as clean:
            root = ""
            for info in mutant.infolist():
                root = root or info.filename.partition("/")[0]
                if info.filename.partition("/")[2] in BOOKKEEPING:
                    continue
                try:
                    data = mutant.read(info)
                except Exception:  # noqa: BLE001 - a damaged member bnkit did not need: leave it out
                    continue
                clean.writestr(info.filename, data)
            for name, data in kept.items():  # replaced, or put back
                clean.writestr(f"{root}/{name}", data)
        program = torch.export.load(copy)
    finally:
        os.unlink(copy)
    return {
        "params": sum(p.numel() for p in program.parameters()),
        "buffers": sum(b.numel() for b in program.buffers()),
    }


def weights_view(path: str) -> dict:
    import torch
    from fuzz_models import small

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    small().load_state_dict(state, strict=True)
    return {"tensors": len(state)}
