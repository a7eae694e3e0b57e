"""Run a module once to look at its layers, leaving it exactly as it was."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

__all__ = ["probing"]


@contextlib.contextmanager
def probing(
    model: nn.Module,
    layers: Iterable[tuple[str, nn.Module]],
    on_output: Callable[[str, nn.Module, tuple, object], None],
) -> Iterator[None]:
    """Inside the block, ``model`` is in eval mode without gradients and every named layer
    reports ``on_output(name, module, args, output)`` after its forward pass. On exit the
    hooks are removed and every module's own ``training`` flag is restored (not just the
    root's: a model may hold a sub-module in another mode)."""
    modes = {module: module.training for module in model.modules()}
    handles = [
        module.register_forward_hook(lambda m, args, out, name=name: on_output(name, m, args, out))
        for name, module in layers
    ]
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
