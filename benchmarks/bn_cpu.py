"""Forward + backward time of batch norm on the CPU: bnkit against torch.nn and Keras 3.

Contenders, all in training mode on the same float32 input, each timed for one forward pass
(which also updates the running statistics) and one backward pass to the input, gamma and beta:

* ``torch.nn``    ``torch.nn.BatchNorm2d(C)``
* ``bnkit-torch`` ``bnkit.torch.BatchNorm2d(C, convention="torch")``
* ``bnkit-keras`` ``bnkit.torch.BatchNorm2d(C, convention="keras")`` (momentum 0.99, eps 1e-3)
* ``keras``       Keras 3 ``keras.layers.BatchNormalization(axis=1)`` on the torch backend, called
                  with ``training=True``; gradients through torch autograd.

Shapes are the batch-norm layers of ResNet-50 (C@HxW) with the batch size of ``--batch``. In
each repeat the contenders run one after the other in a rotated order, so that a slow spell of
a shared machine hits them all. The table shows each contender's median time, and the ratios
the goals are stated in: bnkit-torch / torch.nn <= 1.05, bnkit-keras / torch.nn <= 1.15,
keras / bnkit-keras >= 2. A ratio is the median over repeats of the ratio within a repeat (the
two runs were moments apart), which cancels most of the drift of a busy machine; ``--best``
uses minimum times and their ratios instead.
Before timing, every shape checks that the results agree: bnkit-torch with torch.nn to float32
rounding, bnkit-keras with Keras within 1e-4 (Keras' E[x^2] - E[x]^2 moments round differently).

    python benchmarks/bn_cpu.py              # full run, batch 8
    python benchmarks/bn_cpu.py --quick      # a few seconds: tiny batch, three shapes
    python benchmarks/bn_cpu.py --channels-last --batch 4 --repeats 30
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime

os.environ.setdefault("KERAS_BACKEND", "torch")

# (channels, height = width) of ResNet-50's batch-norm layers, one per distinct shape
RESNET50_SHAPES = [(64, 56), (256, 56), (128, 28), (512, 28), (256, 14), (1024, 14), (512, 7), (2048, 7)]
QUICK_SHAPES = [(64, 56), (256, 14), (2048, 7)]
GOALS = {"bnkit-torch / torch.nn": ("<=", 1.05), "bnkit-keras / torch.nn": ("<=", 1.15),
         "keras / bnkit-keras": (">=", 2.0)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8, help="batch size N (default 8; --quick: 2)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per shape (default 25; --quick: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repeats per shape first (default 2)")
    p.add_argument("--quick", action="store_true", help="a smoke run: batch 2, three shapes, 5 repeats")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format input")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--best", action="store_true",
                   help="report the best (minimum) time of the repeats instead of the median: steadier on a "
                        "machine shared with other work")
    args = p.parse_args(argv)
    if args.quick:
        args.batch = 2 if args.batch == 8 else args.batch
        args.repeats = args.repeats or 5
    args.repeats = args.repeats or 25
    for name in ("batch", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def make_contenders(channels: int):
    """name -> (module, call, parameters whose gradients count)."""
    import torch

    import bnkit.torch as bt
    from bnkit.keras import keras

    nn_bn = torch.nn.BatchNorm2d(channels)
    bnkit_torch = bt.BatchNorm2d(channels, convention="torch")
    bnkit_keras = bt.BatchNorm2d(channels, convention="keras")
    keras_bn = keras.layers.BatchNormalization(axis=1)  # on the same NCHW tensor
    keras_bn.build((None, channels, 1, 1))
    return {
        "torch.nn": (nn_bn, nn_bn, (nn_bn.weight, nn_bn.bias)),
        "bnkit-torch": (bnkit_torch, bnkit_torch, (bnkit_torch.weight, bnkit_torch.bias)),
        "bnkit-keras": (bnkit_keras, bnkit_keras, (bnkit_keras.weight, bnkit_keras.bias)),
        "keras": (keras_bn, lambda x: keras_bn(x, training=True),
                  (keras_bn.gamma.value, keras_bn.beta.value)),
    }


def step(call, params, x, grad_out):
    """One forward + backward; returns (output, dx, dgamma, dbeta)."""
    x.grad = None
    for p in params:
        p.grad = None
    y = call(x)
    y.backward(grad_out)
    return y, x.grad, params[0].grad, params[1].grad


def running_stats(name, module):
    if name == "keras":
        return module.moving_mean.value, module.moving_variance.value
    return module.running_mean, module.running_var


def check_equal(contenders, x, grad_out) -> list[str]:
    """Run each contender once on fresh state and compare; returns the problems found."""
    import torch

    results = {name: [t.detach().clone() for t in step(call, params, x, grad_out)]
               + [s.detach().clone() for s in running_stats(name, module)]
               for name, (module, call, params) in contenders.items()}
    labels = ("output", "dx", "dgamma", "dbeta", "running mean", "running var")
    problems = []
    # float32 rounding between two native-kernel paths; 1e-4 for Keras' float32 E[x^2] - E[x]^2
    for a, b, rtol, atol in (("bnkit-torch", "torch.nn", 1e-5, 1e-5), ("bnkit-keras", "keras", 1e-4, 1e-4)):
        for label, ta, tb in zip(labels, results[a], results[b], strict=True):
            # gradient sums over N*H*W values: scale the tolerance with the largest entry
            scale = max(1.0, float(tb.abs().max()))
            if not torch.allclose(ta, tb, rtol=rtol, atol=atol * scale):
                diff = float((ta - tb).abs().max())
                problems.append(f"{a} vs {b}: {label} differs by {diff:.3g}")
    return problems


def time_shape(channels: int, size: int, args) -> dict[str, float]:
    import torch

    contenders = make_contenders(channels)
    gen = torch.Generator().manual_seed(channels * 1000 + size)
    shape = (args.batch, channels, size, size)
    x = torch.randn(shape, generator=gen) * 2.0 + 0.5
    grad_out = torch.randn(shape, generator=gen)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)

    problems = check_equal(contenders, x, grad_out)
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.warmup + args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who runs first
        for name in order:
            _, call, params = contenders[name]
            start = time.perf_counter()
            step(call, params, x, grad_out)
            elapsed = time.perf_counter() - start
            if r >= args.warmup:
                times[name].append(elapsed)
    return times, problems


RATIOS = {"bnkit-torch / torch.nn": ("bnkit-torch", "torch.nn"),
          "bnkit-keras / torch.nn": ("bnkit-keras", "torch.nn"),
          "keras / bnkit-keras": ("keras", "bnkit-keras")}


def summarize(times: dict[str, list[float]], best: bool) -> tuple[dict[str, float], dict[str, float]]:
    """(time per contender, ratio per goal): medians and paired ratios, or minima with --best."""
    if best:
        picked = {name: min(t) for name, t in times.items()}
        return picked, {goal: picked[a] / picked[b] for goal, (a, b) in RATIOS.items()}
    picked = {name: statistics.median(t) for name, t in times.items()}
    paired = {goal: statistics.median(ta / tb for ta, tb in zip(times[a], times[b], strict=True))
              for goal, (a, b) in RATIOS.items()}
    return picked, paired


def meets(goal: str, value: float) -> bool:
    op, bound = GOALS[goal]
    return value <= bound if op == "<=" else value >= bound


def main(argv=None) -> int:
    args = parse_args(argv)
    import keras
    import torch
    from rich.console import Console
    from rich.table import Table

    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=None if sys.stdout.isatty() else 150)  # keep the table whole in logs
    shapes = QUICK_SHAPES if args.quick else RESNET50_SHAPES
    layout = "channels_last" if args.channels_last else "contiguous NCHW"
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    table = Table(
        title=f"batch norm forward+backward on CPU, float32 {layout}, batch {args.batch}, "
              f"{'best' if args.best else 'median'} of {args.repeats} (ms)",
        caption=f"{now}; torch {torch.__version__}, keras {keras.__version__}, python "
                f"{platform.python_version()}, {torch.get_num_threads()} threads, {platform.machine()}",
    )
    for col in ("shape", "torch.nn", "bnkit-torch", "bnkit-keras", "keras", *GOALS):
        table.add_column(col, justify="right")
    all_ratios = []
    failures = []
    with console.status("timing...") as status:
        for channels, size in shapes:
            status.update(f"timing {args.batch}x{channels}x{size}x{size}")
            times, problems = time_shape(channels, size, args)
            failures += [f"{channels}@{size}x{size}: {p}" for p in problems]
            m, r = summarize(times, args.best)
            all_ratios.append(r)
            cells = [f"{m[n] * 1e3:.3f}" for n in ("torch.nn", "bnkit-torch", "bnkit-keras", "keras")]
            cells += [f"[{'green' if meets(g, v) else 'red'}]{v:.3f}[/]" for g, v in r.items()]
            table.add_row(f"{channels}@{size}x{size}", *cells)
    geo = {g: math.exp(statistics.fmean(math.log(r[g]) for r in all_ratios)) for g in GOALS}
    table.add_section()
    table.add_row("geometric mean", "", "", "", "",
                  *(f"[bold {'green' if meets(g, v) else 'red'}]{v:.3f}[/]" for g, v in geo.items()))
    table.add_row("goal", "", "", "", "", *(f"{op} {bound:g}" for op, bound in GOALS.values()))
    console.print(table)
    if failures:
        console.print("[red]results differ:[/]")
        for f in failures:
            console.print(f"  {f}")
        return 1
    console.print("results equal (outputs, input/gamma/beta gradients, running statistics) for every shape")
    return 0


if __name__ == "__main__":
    sys.exit(main())
