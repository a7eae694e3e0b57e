"""Measured dispatch: which CUDA batch norms run on bnkit's Triton kernels by default.

A *configuration* is (mode, dtype, memory format, channel class, per-channel class) on one
device family (CUDA compute capability). For each family, a table shipped with the package
(``bnkit/kernels/tables/sm<major><minor>.json``, written by ``benchmarks/bn_gpu.py
--write-table``) records, per configuration, the measured ratio PyTorch time / Triton time and
the decision. Triton runs only for configurations the table turns on; an unmeasured
configuration, a device without a table, or a table that cannot be read takes PyTorch's path.

Modes (what the benchmark times, and which layer calls use each row):

* ``train``: batch statistics, forward + backward (``BatchNorm1d/2d/3d`` in training, or
  without running statistics);
* ``infer``: running statistics, forward (every layer in ``eval()``, fused ones included);
* ``bn_relu``: the fused layers (``BatchNormAct2d``, ``BatchNormAddAct2d``) with batch
  statistics, against PyTorch's batch norm followed by the separate ReLU (and add).

Memory format, as the kernels walk the input: ``nchw`` for a contiguous ``(N, C, *)`` input
(other strides are copied to it), ``channels_last`` for a ``channels_last`` /
``channels_last_3d`` one, and for inputs with one value per channel and sample (``(N, C)``,
``(N, C, 1, 1)``), which are read as rows of ``C`` channels either way.

Shape classes, on the channel count ``C`` and the values per channel ``M = numel / C``
(``N`` times the spatial size), with edges that separate ResNet-50's batch-norm shapes:

* channels: ``<=64``, ``<=256``, ``<=1024``, ``>1024``;
* per channel: ``<=4Ki``, ``<=32Ki``, ``<=256Ki``, ``<=2Mi``, ``>2Mi`` (Ki = 1024, Mi = 1024²).

A table is read once per device family and each decision is cached per (device, configuration):
a call costs a few attribute reads and a dictionary lookup, no file access and no device sync.
"""

from __future__ import annotations

import bisect
import json
import warnings
from dataclasses import dataclass, field
from importlib import resources

__all__ = [
    "FORMAT",
    "MODES",
    "DTYPES",
    "MEMORY_FORMATS",
    "CHANNEL_CLASSES",
    "PER_CHANNEL_CLASSES",
    "Config",
    "Table",
    "TableError",
    "channel_class",
    "per_channel_class",
    "memory_format_of",
    "config_of",
    "family_of",
    "parse_table",
    "read_table",
    "Dispatch",
]

FORMAT = 1  # the table file's format version
MODES = ("train", "infer", "bn_relu")
DTYPES = ("float32", "bfloat16", "float16")
MEMORY_FORMATS = ("nchw", "channels_last")
_CHANNEL_EDGES = (64, 256, 1024)
CHANNEL_CLASSES = ("<=64", "<=256", "<=1024", ">1024")
_PER_CHANNEL_EDGES = (2**12, 2**15, 2**18, 2**21)
PER_CHANNEL_CLASSES = ("<=4Ki", "<=32Ki", "<=256Ki", "<=2Mi", ">2Mi")


def channel_class(channels: int) -> str:
    """The class of a channel count: ``"<=64"``, ``"<=256"``, ``"<=1024"`` or ``">1024"``."""
    return CHANNEL_CLASSES[bisect.bisect_left(_CHANNEL_EDGES, channels)]


def per_channel_class(values: int) -> str:
    """The class of the values per channel (``N`` × spatial size): ``"<=4Ki"`` … ``">2Mi"``."""
    return PER_CHANNEL_CLASSES[bisect.bisect_left(_PER_CHANNEL_EDGES, values)]


def memory_format_of(x) -> str:
    """``"channels_last"`` when the kernels walk ``x`` as rows of ``C`` channels, else ``"nchw"``.

    One value per channel and sample (``(N, C)``, ``(N, C, 1, 1)``) is rows whatever its
    strides; a tensor that is neither contiguous nor channels_last(_3d) is copied to
    contiguous first, so it counts as ``nchw``.
    """
    import torch

    if x.numel() // max(x.shape[0] * x.shape[1], 1) == 1:
        return "channels_last"
    if x.is_contiguous():
        return "nchw"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last"
    return "nchw"


@dataclass(frozen=True)
class Config:
    """One row of a dispatch table's key: what decides whether Triton runs."""

    mode: str
    dtype: str
    memory_format: str
    channels: str
    per_channel: str

    def __post_init__(self):
        for name, allowed in (
            ("mode", MODES),
            ("dtype", DTYPES),
            ("memory_format", MEMORY_FORMATS),
            ("channels", CHANNEL_CLASSES),
            ("per_channel", PER_CHANNEL_CLASSES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")

    @classmethod
    def of_shape(cls, mode: str, dtype: str, memory_format: str, shape) -> Config:
        """The configuration of an input of ``shape`` ``(N, C, *)``."""
        channels = shape[1]
        values = 1
        for size in shape:
            values *= size
        return cls(mode, dtype, memory_format, channel_class(channels), per_channel_class(values // channels))


def config_of(x, mode: str) -> Config:
    """The configuration of input ``x`` (a float32, float16 or bfloat16 ``(N, C, *)`` tensor)."""
    return Config.of_shape(mode, str(x.dtype).removeprefix("torch."), memory_format_of(x), x.shape)


def family_of(capability: tuple[int, int]) -> str:
    """The device family of a CUDA compute capability, e.g. ``(9, 0)`` → ``"sm90"``."""
    major, minor = capability
    return f"sm{major}{minor}"


class TableError(ValueError):
    """A dispatch table that cannot be used: bad JSON, a missing field or an unknown value."""


@dataclass(frozen=True)
class Entry:
    """One measured configuration: the decision and what it rests on."""

    triton: bool
    ratio: float  # PyTorch's time / Triton's time; the smallest over the measured shapes
    shapes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Table:
    """A device family's dispatch table, as read from (or written to) its JSON file."""

    family: str
    device: str
    capability: tuple[int, int]
    date: str
    versions: dict
    margin: float
    entries: dict[Config, Entry] = field(default_factory=dict)

    def triton_wins(self, config: Config) -> bool:
        """True only when ``config`` was measured and Triton was turned on for it."""
        entry = self.entries.get(config)
        return entry is not None and entry.triton

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "family": self.family,
            "device": self.device,
            "capability": list(self.capability),
            "date": self.date,
            "versions": dict(self.versions),
            "margin": self.margin,
            "configurations": [
                {
                    "mode": c.mode,
                    "dtype": c.dtype,
                    "memory_format": c.memory_format,
                    "channels": c.channels,
                    "per_channel": c.per_channel,
                    "triton": e.triton,
                    "ratio": e.ratio,
                    "shapes": list(e.shapes),
                }
                for c, e in self.entries.items()
            ],
        }


def _field(data: dict, name: str, kind, where: str):
    if name not in data:
        raise TableError(f"{where}: missing field {name!r}")
    value = data[name]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise TableError(f"{where}: field {name!r} must be {expected}, got {value!r}")
    return value


def parse_table(data, source: str = "dispatch table") -> Table:
    """A :class:`Table` from a decoded JSON document; :class:`TableError` says what is wrong."""
    if not isinstance(data, dict):
        raise TableError(f"{source}: expected a JSON object, got {type(data).__name__}")
    version = _field(data, "format", int, source)
    if version != FORMAT:
        raise TableError(f"{source}: format {version} is not the one this bnkit reads ({FORMAT})")
    capability = _field(data, "capability", list, source)
    if len(capability) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in capability):
        raise TableError(f"{source}: capability must be [major, minor], got {capability!r}")
    family = _field(data, "family", str, source)
    if family != family_of(tuple(capability)):
        raise TableError(f"{source}: family {family!r} does not match capability {capability}")
    entries = {}
    for i, row in enumerate(_field(data, "configurations", list, source)):
        where = f"{source}: configurations[{i}]"
        if not isinstance(row, dict):
            raise TableError(f"{where}: expected an object, got {row!r}")
        try:
            config = Config(*(_field(row, k, str, where) for k in Config.__dataclass_fields__))
        except ValueError as e:
            if isinstance(e, TableError):
                raise
            raise TableError(f"{where}: {e}") from None
        if config in entries:
            raise TableError(f"{where}: {config} appears twice")
        shapes = row.get("shapes", [])
        if not isinstance(shapes, list) or not all(isinstance(s, str) for s in shapes):
            raise TableError(f"{where}: field 'shapes' must be a list of strings, got {shapes!r}")
        entries[config] = Entry(
            _field(row, "triton", bool, where), float(_field(row, "ratio", (int, float), where)), tuple(shapes)
        )
    return Table(
        family=family,
        device=_field(data, "device", str, source),
        capability=(capability[0], capability[1]),
        date=_field(data, "date", str, source),
        versions=_field(data, "versions", dict, source),
        margin=float(_field(data, "margin", (int, float), source)),
        entries=entries,
    )


def read_table(path) -> Table:
    """Read and check a table file (a ``pathlib.Path`` or an ``importlib.resources`` file)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TableError(f"{path}: not valid JSON ({e})") from None
    return parse_table(data, str(path))


def _shipped_tables():
    return resources.files("bnkit.kernels").joinpath("tables")


def _cuda_capability(device_index: int | None) -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability(device_index)


class Dispatch:
    """Decides, per CUDA device and configuration, whether the measured table turns Triton on.

    ``tables`` is the directory of ``<family>.json`` files (the package's own by default) and
    ``capability_of`` maps a device index to its compute capability; both are parameters so
    that the lookup can be exercised without a GPU. Tables are read once per family and
    decisions cached per (device index, configuration). A table that cannot be read is
    reported once with a ``RuntimeWarning`` and treated as absent: PyTorch's path.
    """

    def __init__(self, tables=None, capability_of=_cuda_capability):
        self._tables_dir = tables
        self._capability_of = capability_of
        self._capabilities: dict = {}
        self._tables: dict[str, Table | None] = {}
        self._decisions: dict = {}

    def table_for(self, capability: tuple[int, int]) -> Table | None:
        """The table of ``capability``'s family, or None when there is none or it is unusable."""
        family = family_of(capability)
        if family not in self._tables:
            directory = self._tables_dir if self._tables_dir is not None else _shipped_tables()
            path = directory.joinpath(f"{family}.json")
            table = None
            if path.is_file():
                try:
                    table = read_table(path)
                except (TableError, OSError, UnicodeDecodeError) as e:
                    warnings.warn(
                        f"bnkit: ignoring the kernel dispatch table for {family}: {e}. "
                        "CUDA batch norms on this device take PyTorch's path.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                else:
                    if table.family != family:
                        warnings.warn(
                            f"bnkit: ignoring {path}: it is the table of {table.family}, not {family}. "
                            "CUDA batch norms on this device take PyTorch's path.",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                        table = None
            self._tables[family] = table
        return self._tables[family]

    def decide(self, device_index, config: Config) -> bool:
        """Whether the table of device ``device_index`` turns Triton on for ``config``."""
        capability = self._capabilities.get(device_index)
        if capability is None:
            capability = self._capabilities[device_index] = tuple(self._capability_of(device_index))
        table = self.table_for(capability)
        return table is not None and table.triton_wins(config)

    def triton_wins(self, x, mode: str) -> bool:
        """Whether the table turns Triton on for input ``x`` in ``mode`` on its device (cached)."""
        channels = x.shape[1]
        per_channel = x.numel() // channels
        key = (
            x.device.index,
            mode,
            x.dtype,
            memory_format_of(x),
            bisect.bisect_left(_CHANNEL_EDGES, channels),
            bisect.bisect_left(_PER_CHANNEL_EDGES, per_channel),
        )
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._decisions[key] = self.decide(x.device.index, config_of(x, mode))
        return decision
