"""Run a module once to look at its layers, leaving it exactly as it was."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

__all__ = ["probing", "fake_run", "tensors_in"]


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


def fake_run(model: nn.Module, input_shapes, batch: int) -> int | None:
    """Run ``model`` in eval mode on fake inputs of ``(batch, *shape)``: shapes only, no memory.

    Returns the bytes the inputs and every leaf layer's outputs would take, or ``None`` when an
    operator cannot run on fake tensors (a size that depends on the values). Raises
    ``ValueError`` naming the layer for an input the model does not take.
    """
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
        FakeTensorMode,
        UnsupportedOperatorException,
    )

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    leaves = [(name, m) for name, m in model.named_modules() if not any(True for _ in m.children())]
    total = 0
    running: list[str] = []

    def record(name, module, args, output):
        nonlocal total
        if running and running[-1] == name:
            running.pop()
        total += sum(t.numel() * t.element_size() for t in tensors_in(output))

    handles = [m.register_forward_pre_hook(lambda m, args, name=name: running.append(name)) for name, m in leaves]
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")  # logs a traceback before it raises
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), probing(model, leaves, record):
            inputs = [torch.empty((batch, *shape), dtype=dtype, device=device) for shape in input_shapes]
            total += sum(t.numel() * t.element_size() for t in inputs)
            model(*inputs)
    except (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException):
        return None
    except Exception as e:  # the operator's own message: the shape it expected
        where = ""
        if running:
            layer = model.get_submodule(running[-1])
            where = f"layer {running[-1]!r} ({type(layer).__name__}): "
        message = " ".join(str(e).split())
        raise ValueError(where + (message if len(message) <= 300 else message[:297] + "...")) from e
    finally:
        fake_log.setLevel(level)
        for handle in handles:
            handle.remove()
    return int(total)


def tensors_in(value) -> list[torch.Tensor]:
    """The tensors in a module's output: a tensor, or nested lists, tuples and dicts of them."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors_in(item)]
    return []
