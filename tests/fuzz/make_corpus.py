"""Write the crafted-file corpus (see ``crafted.py``) into a folder.

    python tests/fuzz/make_corpus.py OUT      # OUT/valid/... and OUT/<format>/...; prints one line a case

The valid files every crafted one starts from are made here too, by the real tools: a small
conv → BN → ReLU → linear network saved by ``bnkit.io.save_model`` (``.pt2``) and by Keras 3
(``.keras``, legacy ``.h5``), and its state dict (``.pt``, ``.safetensors``) for the
``fuzz_models:small`` factory.
"""

from __future__ import annotations

import os
import sys
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
        sources[key] = path
    return sources


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out = Path(argv[0])
    sys.path.insert(0, str(HERE))
    from crafted import all_cases

    cases = all_cases(out, valid_sources(out / "valid"))
    for case in cases:
        print(f"{case.name}: bnkit {' '.join(case.argv)}  [{case.expect}] {case.finding}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
