"""``.safetensors``: weights for a ``package.module:factory`` spec (a JSON header and raw bytes)."""

from __future__ import annotations

from pathlib import Path

from bnkit.formats import ModelFileError
from bnkit.formats.atomic import atomic_path
from bnkit.formats.limits import Budget
from bnkit.formats.state_checks import check_safetensors_header, checked_state_dict
from bnkit.text import one_line, printable

__all__ = ["read_state_dict", "write"]


def read_state_dict(path: Path, budget: Budget) -> dict:
    """The tensors in ``path``: its header bounded and its tensors charged first (:mod:`bnkit.formats.state_checks`)."""
    from safetensors.torch import load_file

    check_safetensors_header(path, budget)
    try:
        state = load_file(str(path))
    except Exception as e:
        raise ModelFileError(f"{printable(str(path))}: not a readable safetensors file ({one_line(e)})") from e
    return checked_state_dict(state, printable(str(path)))


def write(model, path: Path, *, force: bool = False, input_shape=None) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path, force) as tmp:
        save_file(state, str(tmp))
