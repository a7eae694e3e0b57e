"""``.pt``/``.pth``/``.bin``: a PyTorch state dict, weights for a ``package.module:factory`` spec.

Read with ``torch.load(weights_only=True)``, PyTorch's restricted unpickler: a file that pickles
anything but tensors and plain containers is refused.
"""

from __future__ import annotations

from pathlib import Path

from bnkit.formats import ModelFileError
from bnkit.formats.atomic import atomic_path
from bnkit.formats.limits import Budget
from bnkit.text import one_line

__all__ = ["read_state_dict", "write"]


def read_state_dict(path: Path, budget: Budget) -> dict:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise ModelFileError(
                f"{path}: refused by torch.load(weights_only=True): the file pickles objects other "
                "than tensors and could run code; save model.state_dict() instead"
            ) from e
        raise ModelFileError(f"{path}: not a readable PyTorch file ({one_line(e)})") from e
    if not isinstance(state, dict):
        raise ModelFileError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def write(model, path: Path, *, force: bool = False, input_shape=None) -> None:
    import torch

    with atomic_path(path, force) as tmp:
        torch.save(model.state_dict(), tmp)
