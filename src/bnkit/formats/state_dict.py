"""``.pt``/``.pth``/``.bin``: a PyTorch state dict, weights for a ``package.module:factory`` spec.

Read with ``torch.load(weights_only=True)``, PyTorch's restricted unpickler: a file that pickles
anything but tensors and plain containers is refused. Its archive is checked and what torch will
allocate charged first, and what it returns checked (:mod:`bnkit.formats.state_checks`).
"""

from __future__ import annotations

from pathlib import Path

from bnkit.formats import ModelFileError
from bnkit.formats.atomic import atomic_path
from bnkit.formats.limits import Budget
from bnkit.formats.state_checks import check_pt_archive, checked_state_dict
from bnkit.text import one_line, printable

__all__ = ["read_state_dict", "write"]


def read_state_dict(path: Path, budget: Budget) -> dict:
    """The state dict in ``path``: its archive checked and charged first (:mod:`bnkit.formats.state_checks`)."""
    import torch

    check_pt_archive(path, budget)
    shown = printable(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise ModelFileError(
                f"{shown}: refused by torch.load(weights_only=True): the file pickles objects other "
                "than tensors and could run code; save model.state_dict() instead"
            ) from e
        raise ModelFileError(f"{shown}: not a readable PyTorch file ({one_line(e)})") from e
    return checked_state_dict(state, shown)


def write(model, path: Path, *, force: bool = False, input_shape=None) -> None:
    import torch

    # through a Python file: a failed write then says why (No space left on device) behind torch's
    # RuntimeError; given a path, torch's C++ stream says only "iostream error"
    with atomic_path(path, force) as tmp, open(tmp, "wb") as f:
        torch.save(model.state_dict(), f)
