"""GPU benchmark: bnkit's Triton batch norm against torch.nn.BatchNorm2d and torch.compile.

For ResNet-50's batch-norm shapes (N=256 and N=32 of C=64/56x56, 256/56x56, 512/28x28,
2048/7x7), float32, bfloat16 and float16, NCHW and channels_last, it times

* training forward + backward (dx, dgamma, dbeta),
* inference forward,
* BN + ReLU in training forward + backward: bnkit's fused ``BatchNormAct2d`` against
  ``BatchNorm2d`` then ``relu`` (bnkit's and torch.nn's),

for bnkit (Triton), ``torch.nn.BatchNorm2d`` (cuDNN / PyTorch's native CUDA kernels) and
``torch.compile`` of the same torch.nn module. It reports the median time, the achieved
bandwidth over the *minimum* bytes each operation must move, and that bandwidth's fraction of
the device's copy bandwidth (measured here with a large ``copy_``). The table is printed and
written to ``docs/performance.md`` with the device name and the date.

With ``--write-table`` it also writes the device family's dispatch table
(``src/bnkit/kernels/tables/sm<major><minor>.json`` by default, see
:mod:`bnkit.kernels.dispatch`): per configuration (mode, dtype, layout, shape class) the
smallest measured ratio torch.nn time / bnkit time, and Triton turned on only where that ratio
is at least ``--margin`` (default 1.05) and every output matched torch.nn's. bnkit's column is
always measured on the Triton kernels (forced, as with ``BNKIT_TRITON=1``), whatever the table.

    python benchmarks/bn_gpu.py [--force] [--quick] [--skip-compile] [--output PATH]
                                [--write-table [PATH]] [--margin 1.05]

Needs a CUDA device and Triton; without CUDA it exits with status 1 and says so.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "docs" / "performance.md"
TABLES = ROOT / "src" / "bnkit" / "kernels" / "tables"
DEFAULT_MARGIN = 1.05  # Triton must beat PyTorch by 5%: timing noise must not flip a decision

SHAPES = [(n, c, hw) for n in (256, 32) for c, hw in ((64, 56), (256, 56), (512, 28), (2048, 7))]
DTYPES = ("float32", "bfloat16", "float16")
LAYOUTS = ("nchw", "channels_last")
MODES = {
    "train": "training forward + backward",
    "infer": "inference forward",
    "bn_relu": "BN + ReLU, training forward + backward",
}
# Minimum bytes each mode must move, in units of one tensor of the input's size:
# inference reads x and writes y; training forward + backward reads x, writes y, reads dy,
# reads x again and writes dx (the statistics need x before y can be written). The fused ReLU
# adds nothing: its mask is recomputed from x. Per-channel vectors are negligible.
TENSOR_PASSES = {"train": 5, "infer": 2, "bn_relu": 5}

METHOD = """\
## Method

`benchmarks/bn_gpu.py` times, on one CUDA device, for ResNet-50's batch-norm shapes
(N = 256 and N = 32 of C = 64 at 56×56, 256 at 56×56, 512 at 28×28, 2048 at 7×7), each of
float32, bfloat16 and float16 and each of NCHW and channels_last:

- **train**: training forward + backward (`dx`, `dgamma`, `dbeta` through `torch.autograd.grad`);
- **infer**: inference forward (`eval()`);
- **bn_relu**: BN + ReLU, training forward + backward: bnkit's fused `BatchNormAct2d` against
  `BatchNorm2d` followed by `relu` (bnkit's unfused layer and `torch.nn`'s).

Contenders: **bnkit** (`bnkit.torch.BatchNorm2d` / `BatchNormAct2d`, Triton kernels),
**torch** (`torch.nn.BatchNorm2d`: cuDNN or PyTorch's native CUDA kernels, as PyTorch picks)
and **compile** (`torch.compile` of the same `torch.nn` module, `dynamic=False`, recompiled per
configuration). Parameters and running statistics are float32 for every input dtype, as
under mixed precision.

Timing: CUDA events around each call, after warm-up calls; the L2 cache is flushed before
each timed call (a 256 MiB write); the figure is the median of the timed calls.

Bandwidth: the *minimum* bytes each operation has to move divided by its time: inference
reads x and writes y (2 tensors); training forward + backward reads x, writes y, reads dy,
reads x and writes dx (5 tensors); the fused ReLU adds nothing (its mask is recomputed from
x). bnkit's own kernels move more than this minimum (its training forward reads x twice, its
backward reads x and dy twice), so the figure is an *effective* bandwidth. "% copy" is that
figure over the device's copy bandwidth, measured in the same run as the median of
`b.copy_(a)` over a 1 GiB tensor (2 GiB moved).

Every configuration is checked before it is timed: bnkit's output against `torch.nn`'s
(float32: 1e-4, half precision: 2 units in the last place); a mismatch is reported and the
script exits non-zero.
"""

UNMEASURED = """\
## Results

**No GPU figures have been measured yet.** The kernels are verified for correctness on the
CPU under Triton's interpreter (`tests/kernels/`), which says nothing about speed. No dispatch
table ships either, so on every CUDA device `bnkit.torch` runs PyTorch's own kernels unless
`BNKIT_TRITON=1` forces Triton. Run `python benchmarks/bn_gpu.py --force --write-table` on a
CUDA machine to replace this file with measured figures (device, date and versions are recorded
with them) and to write the device family's dispatch table.
"""


@dataclass(frozen=True)
class Row:
    """One configuration's measurement: times in milliseconds, None where not run."""

    mode: str
    n: int
    c: int
    hw: int
    dtype: str
    layout: str
    bnkit_ms: float
    torch_ms: float
    compile_ms: float | None
    unfused_bnkit_ms: float | None  # bn_relu only: bnkit BatchNorm2d then relu
    bytes_moved: int
    matches: bool

    @property
    def shape(self) -> str:
        return f"{self.n}×{self.c}×{self.hw}×{self.hw}"

    def gbps(self, ms: float) -> float:
        return self.bytes_moved / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------- measuring


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown file to write")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    p.add_argument("--quick", action="store_true", help="N=256 only, bfloat16 and float32 only")
    p.add_argument(
        "--skip-compile", action="store_true", help="leave torch.compile out (it recompiles per case)"
    )
    p.add_argument(
        "--write-table", nargs="?", const="default", default=None, metavar="PATH",
        help=f"also write the dispatch table (default {TABLES.relative_to(ROOT)}/sm<major><minor>.json)",
    )
    p.add_argument(
        "--margin", type=float, default=DEFAULT_MARGIN,
        help="Triton is turned on where torch time / bnkit time >= MARGIN (default %(default)s)",
    )
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    if not args.margin > 0:
        p.error(f"--margin must be a positive ratio, got {args.margin}")
    return args


def cuda_timer(torch, warmup: int, reps: int):
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")

    def time_ms(fn) -> float:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends, strict=True):
            flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))

    return time_ms


def copy_bandwidth_gbps(torch, time_ms) -> float:
    src = torch.empty(2**30 // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * 2**30 / (ms * 1e-3) / 1e9


def training_step(torch, module, x, dy, params):
    def step():
        y = module(x)
        torch.autograd.grad(y, (x, *params), dy)

    return step


def measure(args) -> tuple[list[Row], dict]:
    import torch
    import torch.nn.functional as F

    import bnkit
    import bnkit.torch as bt
    from bnkit import kernels

    kernels.set_enabled(True)  # bnkit's column times the Triton kernels, whatever the dispatch table says
    if not kernels.forced():
        raise SystemExit("bnkit's Triton kernels are off (BNKIT_TRITON=0 or triton not importable)")
    time_ms = cuda_timer(torch, args.warmup, args.reps)
    env = {
        "device": torch.cuda.get_device_name(),
        "capability": tuple(torch.cuda.get_device_capability()),
        "bnkit": bnkit.__version__,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "cuda": torch.version.cuda,
        "copy_gbps": copy_bandwidth_gbps(torch, time_ms),
    }
    shapes = [s for s in SHAPES if s[0] == 256] if args.quick else SHAPES
    dtypes = ("float32", "bfloat16") if args.quick else DTYPES
    rows = []
    for n, c, hw in shapes:
        for dtype_name in dtypes:
            for layout in LAYOUTS:
                rows += measure_case(torch, F, bt, time_ms, args, n, c, hw, dtype_name, layout)
                torch.cuda.empty_cache()  # the case's tensors are gone: keep memory for the next
                print(f"  measured {n}x{c}x{hw}x{hw} {dtype_name} {layout}", file=sys.stderr)
    return rows, env


def measure_case(torch, F, bt, time_ms, args, n, c, hw, dtype_name, layout) -> list[Row]:
    dtype = getattr(torch, dtype_name)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(n, c, hw, hw, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
    dy = torch.randn_like(x)
    nbytes = x.numel() * x.element_size()

    def fresh(cls, **kw):
        torch.manual_seed(0)
        module = cls(c, **kw).cuda()
        with torch.no_grad():
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.5, 0.5)
        return module

    ours, theirs = fresh(bt.BatchNorm2d), fresh(torch.nn.BatchNorm2d)
    fused = fresh(bt.BatchNormAct2d)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1.6e-2}
    with torch.no_grad():
        matches = torch.allclose(ours(x).float(), theirs(x).float(), **tol)
        matches &= torch.allclose(fused(x).float(), F.relu(theirs(x)).float(), **tol)
    x.requires_grad_(True)

    def compiled(module):
        if args.skip_compile:
            return None
        torch._dynamo.reset()  # a fresh cache: no fallback to eager after the recompile limit
        return torch.compile(module, dynamic=False)

    def timed(module, make_step) -> float | None:
        # "module is None", not "not module": a compiled Sequential would be asked its len()
        return None if module is None else time_ms(make_step(module))

    rows = []
    # training forward + backward
    ours.train()
    theirs.train()
    reference = compiled(theirs)
    rows.append(
        Row(
            "train", n, c, hw, dtype_name, layout,
            time_ms(training_step(torch, ours, x, dy, (ours.weight, ours.bias))),
            time_ms(training_step(torch, theirs, x, dy, (theirs.weight, theirs.bias))),
            timed(reference, lambda m: training_step(torch, m, x, dy, (theirs.weight, theirs.bias))),
            None, TENSOR_PASSES["train"] * nbytes, matches,
        )
    )  # fmt: skip
    # inference forward
    ours.eval()
    theirs.eval()
    reference = compiled(theirs)
    with torch.no_grad():
        rows.append(
            Row(
                "infer", n, c, hw, dtype_name, layout,
                time_ms(lambda: ours(x)), time_ms(lambda: theirs(x)),
                timed(reference, lambda m: lambda: m(x)),
                None, TENSOR_PASSES["infer"] * nbytes, matches,
            )
        )  # fmt: skip
    # BN + ReLU, training forward + backward
    ours.train()
    theirs.train()
    fused.train()
    theirs_relu = torch.nn.Sequential(theirs, torch.nn.ReLU(inplace=True))
    ours_relu = torch.nn.Sequential(ours, torch.nn.ReLU(inplace=True))
    reference = compiled(theirs_relu)
    rows.append(
        Row(
            "bn_relu", n, c, hw, dtype_name, layout,
            time_ms(training_step(torch, fused, x, dy, (fused.weight, fused.bias))),
            time_ms(training_step(torch, theirs_relu, x, dy, (theirs.weight, theirs.bias))),
            timed(reference, lambda m: training_step(torch, m, x, dy, (theirs.weight, theirs.bias))),
            time_ms(training_step(torch, ours_relu, x, dy, (ours.weight, ours.bias))),
            TENSOR_PASSES["bn_relu"] * nbytes, matches,
        )
    )  # fmt: skip
    return rows


# --------------------------------------------------------------------------- rendering


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def summary_lines(rows: list[Row], copy_gbps: float) -> list[str]:
    """The issue's acceptance figures, computed from the rows."""

    def speedups(mode, dtype, layout, baseline="torch"):
        out = []
        for r in rows:
            if r.mode == mode and r.dtype == dtype and r.layout == layout:
                base = r.torch_ms if baseline == "torch" else r.unfused_bnkit_ms
                out.append(base / r.bnkit_ms)
        return out

    lines = []
    for dtype, layout in (("bfloat16", "channels_last"), ("float32", "nchw")):
        s = speedups("train", dtype, layout)
        if s:
            lines.append(
                f"training fwd+bwd, {layout} {dtype}: bnkit vs torch.nn speed-up geomean {geomean(s):.2f}×, "
                f"min {min(s):.2f}×, max {max(s):.2f}× over {len(s)} shapes"
            )
    large = [r for r in rows if r.n == 256 and r.mode in ("train", "infer")]
    if large:
        fractions = [r.gbps(r.bnkit_ms) / copy_gbps for r in large]
        lines.append(
            f"bnkit effective bandwidth on the N=256 shapes (train and infer): median "
            f"{statistics.median(fractions):.0%}, min {min(fractions):.0%} of copy bandwidth"
        )
    fused = [r for r in rows if r.mode == "bn_relu"]
    if fused:
        vs_torch = [r.torch_ms / r.bnkit_ms for r in fused]
        vs_ours = [r.unfused_bnkit_ms / r.bnkit_ms for r in fused]
        lines.append(
            f"fused BN+ReLU vs torch.nn BN then ReLU: geomean {geomean(vs_torch):.2f}× "
            f"(min {min(vs_torch):.2f}×); vs bnkit BN then ReLU: geomean {geomean(vs_ours):.2f}× "
            f"(min {min(vs_ours):.2f}×)"
        )
    bad = [r for r in rows if not r.matches]
    lines.append(f"correctness check: {len(rows) - len(bad)}/{len(rows)} configurations match torch.nn")
    return lines


COLUMNS = (
    "shape", "dtype", "layout", "bnkit ms", "torch ms", "compile ms", "bnkit BN→ReLU ms",
    "× vs torch", "bnkit GB/s", "% copy", "check",
)  # fmt: skip


def table_cells(r: Row, copy_gbps: float) -> list[str]:
    def ms(v):
        return "—" if v is None else f"{v:.3f}"

    gbps = r.gbps(r.bnkit_ms)
    return [
        r.shape, r.dtype, r.layout, ms(r.bnkit_ms), ms(r.torch_ms), ms(r.compile_ms), ms(r.unfused_bnkit_ms),
        f"{r.torch_ms / r.bnkit_ms:.2f}", f"{gbps:.0f}", f"{gbps / copy_gbps:.0%}",
        "ok" if r.matches else "MISMATCH",
    ]  # fmt: skip


def render_markdown(rows: list[Row] | None, env: dict | None, table=None, table_name: str = "") -> str:
    parts = [
        "# Performance: bnkit's Triton batch norm on a GPU\n",
        "bnkit's `bnkit.torch` layers can run fused Triton kernels on CUDA tensors; by default "
        "only where the device family's measured dispatch table says they beat PyTorch's kernels "
        "([kernels.md](kernels.md)). This page records what they measure against "
        "`torch.nn.BatchNorm2d` and `torch.compile`.\n",
        METHOD,
    ]
    if not rows:
        parts.append(UNMEASURED)
        return "\n".join(parts)
    copy = env["copy_gbps"]
    parts.append(
        f"## Results\n\nMeasured by `benchmarks/bn_gpu.py` on **{env['device']}**, {env['date']} "
        f"(PyTorch {env['torch']}, Triton {env['triton']}, CUDA {env['cuda']}). "
        f"Measured copy bandwidth: **{copy:.0f} GB/s**.\n"
    )
    parts.append("\n".join(f"- {line}" for line in summary_lines(rows, copy)) + "\n")
    for mode, title in MODES.items():
        mode_rows = [r for r in rows if r.mode == mode]
        parts.append(f"### {title}\n")
        parts.append("| " + " | ".join(COLUMNS) + " |")
        parts.append("|" + "---|" * len(COLUMNS))
        parts += ["| " + " | ".join(table_cells(r, copy)) + " |" for r in mode_rows]
        parts.append("")
    if table is not None:
        parts.append(render_dispatch(table, table_name))
    return "\n".join(parts)


# --------------------------------------------------------------------------- dispatch table


def speedup(r: Row) -> float:
    """torch.nn's time over bnkit's: above 1 the Triton kernels win (bn_relu: fused against BN then ReLU)."""
    return r.torch_ms / r.bnkit_ms


def dispatch_table(rows: list[Row], env: dict, margin: float):
    """The device family's :class:`bnkit.kernels.dispatch.Table` from the measured rows.

    Rows are grouped by configuration (several shapes may share a class); a configuration's
    ratio is the smallest of its shapes', and Triton is on only when that ratio is at least
    ``margin`` and every one of its outputs matched torch.nn's.
    """
    from bnkit.kernels import dispatch

    groups: dict = {}
    for r in rows:
        layout = "channels_last" if r.hw == 1 else r.layout  # one value per channel: rows either way
        config = dispatch.Config.of_shape(r.mode, r.dtype, layout, (r.n, r.c, r.hw, r.hw))
        groups.setdefault(config, []).append(r)

    def order(config):
        return (
            dispatch.MODES.index(config.mode), dispatch.DTYPES.index(config.dtype),
            dispatch.MEMORY_FORMATS.index(config.memory_format), dispatch.CHANNEL_CLASSES.index(config.channels),
            dispatch.PER_CHANNEL_CLASSES.index(config.per_channel),
        )  # fmt: skip

    entries = {}
    for config in sorted(groups, key=order):
        group = groups[config]
        ratio = min(speedup(r) for r in group)
        entries[config] = dispatch.Entry(
            triton=ratio >= margin and all(r.matches for r in group),
            ratio=round(ratio, 4),
            shapes=tuple(f"{r.n}x{r.c}x{r.hw}x{r.hw}" for r in group),
        )
    capability = tuple(env["capability"])
    return dispatch.Table(
        family=dispatch.family_of(capability),
        device=env["device"],
        capability=capability,
        date=env["date"],
        versions={k: env[k] for k in ("bnkit", "torch", "triton", "cuda")},
        margin=margin,
        entries=entries,
    )


def table_json(table) -> str:
    """The table's file contents, checked by bnkit's own reader before anything is written."""
    from bnkit.kernels import dispatch

    data = table.to_json()
    if dispatch.parse_table(json.loads(json.dumps(data))) != table:
        raise AssertionError("the dispatch table does not read back as written")
    return json.dumps(data, indent=2) + "\n"


def render_dispatch(table, name: str) -> str:
    on = sum(e.triton for e in table.entries.values())
    lines = [
        "## Dispatch table\n",
        f"Written to `{name}` for {table.family} (capability {table.capability[0]}.{table.capability[1]}): "
        f"Triton on for **{on} of {len(table.entries)}** measured configurations, those where torch.nn's "
        f"time over bnkit's is at least {table.margin:g} and every output matched. Every other "
        "configuration on this family takes PyTorch's path.\n",
        "| mode | dtype | layout | channels | per channel | shapes | × vs torch (min) | Triton |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, e in table.entries.items():
        lines.append(
            f"| {c.mode} | {c.dtype} | {c.memory_format} | {c.channels} | {c.per_channel} | "
            f"{', '.join(e.shapes)} | {e.ratio:.2f} | {'on' if e.triton else 'off'} |"
        )
    return "\n".join(lines) + "\n"


def print_tables(rows: list[Row], env: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    copy = env["copy_gbps"]
    console.print(f"[bold]{env['device']}[/], {env['date']}; copy bandwidth {copy:.0f} GB/s")
    for mode, title in MODES.items():
        table = Table(title=title)
        for i, name in enumerate(COLUMNS):
            table.add_column(name, justify="left" if i < 3 else "right")
        for r in rows:
            if r.mode == mode:
                cells = table_cells(r, copy)
                table.add_row(*cells, style=None if r.matches else "red")
        console.print(table)
    for line in summary_lines(rows, copy):
        console.print(f"• {line}")


def write_atomically(path: Path, text: str) -> None:
    from bnkit.io import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, force=True) as tmp:  # --force was checked before the run
        tmp.write_text(text, encoding="utf-8")


def default_table_path(capability) -> Path:
    from bnkit.kernels.dispatch import family_of

    return TABLES / f"{family_of(tuple(capability))}.json"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            "bn_gpu.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
            f"(PyTorch {torch.__version__}). Nothing was measured and nothing was written.",
            file=sys.stderr,
        )
        return 1
    table_path = None
    if args.write_table is not None:
        default = args.write_table == "default"
        table_path = default_table_path(torch.cuda.get_device_capability()) if default else Path(args.write_table)
    for path in (args.output, table_path):
        if path is not None and path.exists() and not args.force:
            print(f"{path} exists; pass --force to overwrite it", file=sys.stderr)
            return 2
    rows, env = measure(args)
    print_tables(rows, env)
    table = dispatch_table(rows, env, args.margin) if table_path is not None else None
    name = ""
    if table is not None:
        name = str(table_path.relative_to(ROOT) if table_path.is_relative_to(ROOT) else table_path)
        write_atomically(table_path, table_json(table))
        on = sum(e.triton for e in table.entries.values())
        print(f"wrote {table_path}: Triton on for {on} of {len(table.entries)} configurations", file=sys.stderr)
    write_atomically(args.output, render_markdown(rows, env, table, name))
    print(f"wrote {args.output}", file=sys.stderr)
    return 0 if all(r.matches for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
