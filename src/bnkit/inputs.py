"""Will a model take this input, and will running it fit in memory? Answered before any real work.

The command line asks these questions before it traces, converts or runs a model, so a wrong
``--input-shape`` or an input far too big for the machine is one clear line, not a traceback
after a long wait or the system's out-of-memory killer:

* a PyTorch model is run once on *fake* tensors (``torch``'s ``FakeTensorMode``: shapes and
  dtypes flow through every operator, no memory is allocated), which finds a shape the model
  does not take, names the layer, and adds up the size of every layer's output;
* a Keras model's declared input shape is compared with the given one, and its layers'
  recorded output shapes are added up;
* the total is compared with the memory the operating system says is available.
"""

from __future__ import annotations

import math
import os

from bnkit.frameworks import framework_of

__all__ = ["InputError", "available_memory", "format_bytes", "check_fits", "check_model_input"]


class InputError(ValueError):
    """An input a model does not take, or one too big to run here; the message is one line."""


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or ``None`` if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def check_fits(nbytes: int, what: str, *, available: int | None = None) -> None:
    """Refuse ``what`` when its ``nbytes`` exceed the memory available (``None``: ask the system)."""
    available = available_memory() if available is None else available
    if available is not None and nbytes > available:
        raise InputError(
            f"{what} needs about {format_bytes(nbytes)} of memory, more than the {format_bytes(available)} "
            "available here; use a smaller input shape or batch"
        )


def check_model_input(model, input_shapes, batch: int, *, copies: int = 1, what: str = "running the model") -> int:
    """Check that ``model`` takes ``batch`` inputs of ``input_shapes`` (without the batch axis,
    in the model's own layout) and that ``copies`` runs' activations fit in memory.

    Returns the estimated bytes of one run (input plus every layer's output). Raises
    :class:`InputError` naming the shape and, for a PyTorch model, the layer that refused it.
    """
    from bnkit.summarize.rows import normalize_input_shape

    shapes = normalize_input_shape(input_shapes)
    input_bytes = batch * sum(math.prod(s) for s in shapes) * 4
    label = ", ".join(str(s) for s in shapes)
    # the input alone first: a fake run of an absurd shape is cheap, but not free
    check_fits(copies * input_bytes, f"{what} on a batch of {batch} of shape {label}")
    if framework_of(model) == "torch":
        from bnkit.torch.probe import fake_run

        try:
            nbytes = fake_run(model, shapes, batch)
        except ValueError as e:
            raise InputError(f"the model does not take input of shape {label} (batch {batch}): {e}") from e
    else:
        nbytes = _keras_run_bytes(model, shapes, batch)
    nbytes = input_bytes if nbytes is None else max(nbytes, input_bytes)
    check_fits(copies * nbytes, f"{what} on a batch of {batch} of shape {label}")
    return nbytes


def _keras_run_bytes(model, shapes, batch: int) -> int | None:
    from bnkit.summarize._keras import _check_matches, _model_input_shapes, _output_shapes

    declared = _model_input_shapes(model) if getattr(model, "built", False) else None
    if declared is not None:
        try:
            _check_matches(model, shapes, declared)
        except ValueError as e:
            raise InputError(str(e)) from e
    total = 0
    for layer in getattr(model, "layers", []):
        layer_shapes, itemsize = _output_shapes(layer)
        if layer_shapes is None or any(d is None for s in layer_shapes for d in s[1:]):
            return None  # a layer's size depends on the input: only the input's size is known
        total += sum(batch * math.prod(s[1:]) * itemsize for s in layer_shapes)
    return total
