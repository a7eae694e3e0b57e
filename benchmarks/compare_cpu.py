"""Wall time of ``bnkit compare resnet50.keras resnet50.pt2`` on the CPU, as a user runs it.

    KERAS_BACKEND=torch python benchmarks/compare_cpu.py [--networks ResNet50,MobileNetV2] [--size 224]
        [--batch 2] [--repeats 3] [--threads N]

Each network (keras.applications ResNet50, and MobileNetV2 for the layer kinds the conversion
issue added: depthwise convolutions, ReLU6, explicit zero padding; random weights, randomised
batch-norm statistics) is saved as
``.keras`` and its ``bnkit.convert.keras_to_torch`` conversion as ``.pt2`` (not timed); then the
real console script compares the two files, ``--repeats`` times (median reported). Beside it, in
one process: the time to load the two files, the comparison itself, and the floor — each model run
once on the same batch — so that the ratio of the comparison to plain inference shows what the
tracing, the rounding measurement (one extra run of the PyTorch model) and the causes cost. Goal:
under 10 s on the 2-core development machine, at bnkit compare's defaults (the Keras model's input
shape, batch 2). The machine's load average is printed: other processes on the two cores slow
everything down (and PyTorch's OpenMP threads, were they spinning, ten times: the bnkit command makes
them wait passively, and so does this script).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
# as the bnkit command sets it (bnkit.cli._passive_openmp_threads), so that the figures measured in
# this process are comparable with the command's
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _build(folder: Path, name: str, size: int) -> tuple[Path, Path]:
    import numpy as np

    from bnkit.convert import keras_to_torch
    from bnkit.io import save_model
    from bnkit.keras import keras

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.uniform(-0.5, 0.5, c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype("float32"))
    keras_path = save_model(model, folder / f"{name.lower()}.keras")
    torch_path = save_model(keras_to_torch(model), folder / f"{name.lower()}.pt2", input_shape=(3, size, size))
    return keras_path, torch_path


def _cli(folder: Path, name: str, batch: int, threads: int | None) -> tuple[float, int]:
    script = Path(sys.executable).parent / "bnkit"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "bnkit"]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    proc = subprocess.run(
        [*command, "compare", f"{name.lower()}.keras", f"{name.lower()}.pt2", "--batch-size", str(batch)],
        cwd=folder,
        capture_output=True,
        text=True,
        env=env,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stderr)
    return elapsed, proc.returncode


def _in_process(keras_path: Path, torch_path: Path, size: int, batch: int) -> dict[str, float]:
    import numpy as np
    import torch

    from bnkit.diagnose.compare import compare
    from bnkit.io import load_model

    times = {}
    start = time.perf_counter()
    keras_model = load_model(keras_path)
    times["load .keras"] = time.perf_counter() - start
    start = time.perf_counter()
    torch_model = load_model(torch_path)
    times["load .pt2"] = time.perf_counter() - start
    x = np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype("float32")
    start = time.perf_counter()
    keras_model(x, training=False)
    with torch.no_grad():
        torch_model(torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))))
    times["both models once"] = time.perf_counter() - start
    start = time.perf_counter()
    report = compare(keras_model, torch_model, x)
    times["compare()"] = time.perf_counter() - start
    times["agree"] = float(report.agree)
    # a faulty conversion: the rounding is measured (one more run) and the causes are looked for
    bns = [m for m in torch_model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    bn = bns[len(bns) // 2]
    bn.eps = 1e-5 if bn.eps >= 1e-4 else 1e-3  # ResNet50's BNs have 1.001e-5, MobileNetV2's 1e-3
    start = time.perf_counter()
    faulty = compare(keras_model, torch_model, x)
    times["compare(), one eps changed"] = time.perf_counter() - start
    times["named"] = float(faulty.cause_codes == ["eps"])
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--networks",
        default="ResNet50,MobileNetV2",
        help="keras.applications networks with batch norms, comma-separated (default ResNet50,MobileNetV2)",
    )
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224, ImageNet's)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2, bnkit compare's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS / torch threads (default: torch's; on a machine others load, 1 avoids the "
        "oversubscription that slows PyTorch's thread pool many times over)",
    )
    args = parser.parse_args(argv)
    import keras
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"compare_cpu: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
        f"keras {keras.__version__}, {os.cpu_count()} CPUs ({platform.machine()}), {torch.get_num_threads()} "
        f"torch threads, load average {load:.1f}"
    )
    all_statuses: set[int] = set()
    for name in args.networks.split(","):
        all_statuses |= _network(name.strip(), args)
    return 0 if all_statuses == {0} else 1


def _network(name: str, args) -> set[int]:
    print(f"{name} (keras.applications, random weights) at {args.size}x{args.size}x3, batch {args.batch}")
    with tempfile.TemporaryDirectory(prefix="bnkit-compare-bench-") as tmp:
        folder = Path(tmp)
        keras_path, torch_path = _build(folder, name, args.size)
        runs = [_cli(folder, name, args.batch, args.threads) for _ in range(args.repeats)]
        walls = [t for t, _ in runs]
        statuses = {rc for _, rc in runs}
        inside = _in_process(keras_path, torch_path, args.size, args.batch)
    wall = statistics.median(walls)
    print(
        f"  bnkit compare {name.lower()}.keras {name.lower()}.pt2: {wall:.1f} s wall (median of {len(walls)}; "
        f"min {min(walls):.1f} s), exit status {sorted(statuses)}"
    )
    print("  in one process:")
    for key in ("load .keras", "load .pt2", "compare()", "both models once", "compare(), one eps changed"):
        print(f"    {key:<27} {inside[key]:6.2f} s")
    print(
        f"  compare() / both models once: {inside['compare()'] / inside['both models once']:.1f}x "
        f"(models {'agree' if inside['agree'] else 'DISAGREE'}); with one eps changed: "
        f"{inside['compare(), one eps changed'] / inside['both models once']:.1f}x "
        f"(cause {'eps named' if inside['named'] else 'NOT named'})"
    )
    goal = "met" if wall < 10 else "NOT met"
    print(f"  goal: under 10 s — {goal}")
    return statuses


if __name__ == "__main__":
    sys.exit(main())
