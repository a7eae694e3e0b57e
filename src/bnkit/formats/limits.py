"""What reading one model file may cost: memory, JSON size and depth, time.

A model file declares how big its parts are (a tensor's sizes, strides and dtype; a zip member's
size); a hostile one declares more than any model needs, or compresses gigabytes of zeros into a
few megabytes. Every reader charges what a part will take to one :class:`Budget` *before* it
allocates or decompresses it, and a part over what is left is refused by name:

* a tensor costs its bytes (``numel × itemsize``, whatever its strides share) plus
  :data:`TENSOR_OVERHEAD` for the objects that hold it;
* a JSON document costs :data:`JSON_EXPANSION` times its size (what Python's objects for it take),
  and is nested at most :data:`MAX_JSON_DEPTH` deep;
* the whole model gets ``max_model_bytes`` (``--max-model-bytes``, :data:`DEFAULT_MAX_MODEL_BYTES`
  by default: more than the largest torchvision and keras.applications networks need).

:func:`deadline` bounds the time: past ``max_seconds`` (``--max-read-seconds``) reading stops
with :class:`ReadTimeout`. A reader stuck in C code, which no Python signal handler reaches, is
stopped only from outside: a :class:`ReadWatcher` on the limits is told when reading starts and
ends. The library has none (it never exits a caller's process); the command line brings its own
(:mod:`bnkit.cli.watchers`: a supervising parent process, or a watchdog thread).
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import threading
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "DEFAULT_MAX_MODEL_BYTES",
    "DEFAULT_MAX_SECONDS",
    "Budget",
    "LimitExceeded",
    "ReadLimits",
    "ReadTimeout",
    "ReadWatcher",
    "deadline",
    "format_bytes",
    "parse_bytes",
    "parse_json",
    "timeout_message",
]

GiB = 2**30
DEFAULT_MAX_MODEL_BYTES = 4 * GiB  # vit_h_14 and regnet_y_128gf (torchvision's largest) take 2.6 GB
DEFAULT_MAX_SECONDS = 600.0
TENSOR_OVERHEAD = 16 * 2**10  # measured: ~9 KiB of Python and torch objects per tensor of a program
JSON_EXPANSION = 16  # bytes of Python objects per byte of JSON, and more once a program is built from it
MAX_JSON_DEPTH = 256  # a Keras config of nested functional models is ~10 deep per level


class LimitExceeded(ValueError):
    """A part of a model file that would take more than the limits allow; the message names both."""


class ReadTimeout(LimitExceeded):
    """Reading took longer than ``max_seconds``."""


class ReadWatcher(Protocol):
    """What stops a reader stuck where :func:`deadline`'s timer cannot reach it (a loop in C code).

    ``reading(what, limits)`` returns a context manager that :func:`deadline` holds for as long as
    ``what`` (the file, as printed) is read under ``limits``. The command line's watchers
    (:mod:`bnkit.cli.watchers`) end the process from outside when reading outlives the limits.
    """

    def reading(self, what: str, limits: ReadLimits) -> contextlib.AbstractContextManager: ...


@dataclass(frozen=True)
class ReadLimits:
    """Limits for reading one model (see the module doc).

    ``watcher``: set by the command line only (see :class:`ReadWatcher`); it ends the process
    with one line and exit status 2 when a reader is stuck past the limits.
    """

    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES
    max_seconds: float = DEFAULT_MAX_SECONDS
    watcher: ReadWatcher | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.max_model_bytes, int) and self.max_model_bytes > 0):
            raise ValueError(f"max_model_bytes must be a positive integer, got {self.max_model_bytes!r}")
        if not (isinstance(self.max_seconds, (int, float)) and 0 < self.max_seconds < float("inf")):
            raise ValueError(f"max_seconds must be a positive finite number, got {self.max_seconds!r}")

    def budget(self) -> Budget:
        return Budget(self.max_model_bytes)


# ---------------------------------------------------------------------------------------- sizes

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}  # fmt: skip


def parse_bytes(text: str) -> int:
    """``"8G"``, ``"8 GiB"``, ``"500MB"``, ``"1e9"`` → bytes (K/M/G/T alone are binary, as ``ls -h``)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match and _UNITS.get(match.group(2).lower())
    if unit is None:
        raise ValueError(f"expected a size such as 8G, 512M or 2000000000 bytes, got {text!r}")
    value = float(match.group(1)) * unit
    if not 1 <= value < 2**63:
        raise ValueError(f"expected a size of at least 1 byte, got {text!r}")
    return int(value)


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


# --------------------------------------------------------------------------------------- budget


class Budget:
    """What is left of ``max_model_bytes`` while one model is read."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.left = total

    def charge(self, nbytes: int, what: str) -> None:
        """Take ``nbytes`` for ``what``, or raise :class:`LimitExceeded` naming it and the limit."""
        if nbytes > self.left:
            used = self.total - self.left
            raise LimitExceeded(
                f"{what} would take {format_bytes(nbytes)}"
                + (f" more than the {format_bytes(used)} already read" if used else "")
                + f", over the limit of {format_bytes(self.total)} for a model (raise it with --max-model-bytes)"
            )
        self.left -= nbytes

    def release(self, nbytes: int) -> None:
        """Give back ``nbytes`` of a charge for a part the reader has freed (a transient copy of a
        tensor, once its values are in the model), so that the budget bounds what is held at once."""
        self.left = min(self.total, self.left + nbytes)

    def charge_tensor(self, shape, itemsize: int, what: str) -> int:
        """Charge a tensor of ``shape`` (checked for overflow) and return its bytes."""
        shape = list(shape)
        for size in shape:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise LimitExceeded(f"{what} has a size that is not a non-negative integer: {size!r}")
        nbytes = 0 if 0 in shape else itemsize
        for size in shape if nbytes else ():
            nbytes *= size
            if nbytes > self.total:  # over the limit already: stop before the product grows without bound
                break
        self.charge(nbytes + TENSOR_OVERHEAD, what)
        return nbytes

    def json_limit(self) -> int:
        """The most bytes of JSON the budget can still take."""
        return self.left // JSON_EXPANSION


# ----------------------------------------------------------------------------------------- JSON


def parse_json(data: bytes | str, what: str, budget: Budget | None = None):
    """``data`` parsed as JSON, charged to ``budget`` and nested at most :data:`MAX_JSON_DEPTH` deep.

    Raises :class:`LimitExceeded` for a document over the limits and ``ValueError`` (naming
    ``what``) for one that is not JSON.
    """
    if budget is not None:
        budget.charge(len(data) * JSON_EXPANSION, f"{what} ({format_bytes(len(data))} of JSON)")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text)
    except RecursionError as e:
        raise LimitExceeded(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels") from e
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, and ints of over 4300 digits
        raise ValueError(f"{what} is not valid JSON ({e})") from e
    _check_depth(value, what)
    return value


def _check_depth(value, what: str) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            raise LimitExceeded(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)


# ----------------------------------------------------------------------------------------- time


def timeout_message(what: str, seconds: float) -> str:
    """What reading ``what`` past ``seconds`` says (the same words whoever stops it)."""
    return f"{what}: reading took longer than {seconds:g} s (raise the limit with --max-read-seconds)"


@contextlib.contextmanager
def deadline(limits: ReadLimits, what: str):
    """Raise :class:`ReadTimeout` in the block once ``limits.max_seconds`` have passed.

    A ``SIGALRM`` timer interrupts Python code (main thread only; a timer already set by the
    caller is kept and restored). A reader that swallows the exception is stopped at the end of
    the block. ``limits.watcher`` (the command line) is told for the length of the block: a loop
    in C code never returns to Python, where a signal handler could run, and is ended from outside.
    """
    seconds = limits.max_seconds
    message = timeout_message(what, seconds)
    fired = threading.Event()

    def on_alarm(signum, frame):
        fired.set()
        raise ReadTimeout(message)

    use_alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if use_alarm:
        previous_timer = signal.getitimer(signal.ITIMER_REAL)
        use_alarm = previous_timer[0] == 0  # the caller's own timer runs: leave SIGALRM alone
    watching = limits.watcher.reading(what, limits) if limits.watcher is not None else contextlib.nullcontext()
    with watching:
        if use_alarm:
            previous_handler = signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
            if fired.is_set():  # raised, and swallowed by the reader's own "except:"
                raise ReadTimeout(message)
        finally:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous_handler)
