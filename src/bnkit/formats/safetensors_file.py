"""``.safetensors``: weights for a ``package.module:factory`` spec (a JSON header and raw bytes)."""

from __future__ import annotations

from pathlib import Path

from bnkit.formats import ModelFileError
from bnkit.formats.atomic import atomic_path
from bnkit.formats.limits import Budget
from bnkit.text import one_line

__all__ = ["read_state_dict", "write"]


def read_state_dict(path: Path, budget: Budget) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise ModelFileError(f"{path}: not a readable safetensors file ({one_line(e)})") from e


def write(model, path: Path, *, force: bool = False, input_shape=None) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path, force) as tmp:
        save_file(state, str(tmp))
