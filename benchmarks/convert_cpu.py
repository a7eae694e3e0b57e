"""Conversion time and peak memory per real network, both directions, on the CPU.

    KERAS_BACKEND=torch python benchmarks/convert_cpu.py [--networks resnet18,ResNet50] [--repeats 3]

The networks are tests/convert/real_networks.py's (every network issue 8 names: keras.applications
and torchvision, random weights, 96x96 inputs) and tests/convert/real_networks_beyond.py's (issue 19:
video, segmentation, recurrent, attention, a FrozenBatchNorm2d backbone, a channels_first Keras CNN).
Each is converted from its own framework to the other ("there"), and the result converted back
("back"); a network bnkit refuses is listed with the reason ("refused (expected)" for those
real_networks_beyond.EXPECTED_REFUSALS names). Each network and leg runs in a fresh Python process, so
that one network's freed memory does not hide the next one's and import costs are paid before the clock
starts (a tiny model is converted first). Memory, in the first conversion: the growth of the process's peak
resident set over the resident set after building the model (Linux VmHWM, reset through
/proc/self/clear_refs; it counts PyTorch's tensors and Keras' variables) and the peak of Python
allocations (tracemalloc: Python objects and NumPy arrays). Time: the median of ``--repeats``
further conversions. Error: max |converted - source| / max |source| of the inference outputs on
a batch of 2, in PyTorch's layout for a model that takes it (a channels_first Keras model does), the worst
output of a dict. After "there": one training forward of both (dropout off), its outputs' error and the worst
updated running statistic's ("training", "statistics"), and bnkit.compare's verdict, source against
converted, in inference and in a training forward ("agree" / "DISAGREE"). Goal: every network converts in
under 5 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
# as the bnkit command sets it (bnkit.cli._passive_openmp_threads): PyTorch's OpenMP threads spinning
# while another process holds a core make everything several times slower on a shared machine
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "convert")]

import torch  # noqa: E402
from real_networks import (  # noqa: E402
    NETWORKS,
    Network,
    _without_dropout,
    convert,
    format_error,
    relative_error,
    run_in_torch_layout,
    torch_layout_input,
    training_check,
)
from real_networks_beyond import BENCHMARK_ONLY, BEYOND, EXPECTED_REFUSALS  # noqa: E402

from bnkit.convert import UnsupportedLayerError, keras_to_torch, torch_to_keras  # noqa: E402

GOAL_SECONDS = 5.0
assert not set(NETWORKS) & set(BEYOND), set(NETWORKS) & set(BEYOND)
ALL_NETWORKS: dict[str, Network] = NETWORKS | BEYOND


@dataclass
class Row:
    network: str
    direction: str  # "keras_to_torch" or "torch_to_keras"
    leg: str  # "there" (from the network's own framework) or "back" (the converted model, converted back)
    seconds: float | None = None
    peak_rss_mib: float | None = None
    python_peak_mib: float | None = None
    error: float | None = None
    refused: str | None = None
    # "there" only: a training forward of both sides, and bnkit.compare's verdicts
    batch_norms: int | None = None
    training_error: float | None = None
    statistics_error: float | None = None
    compare_inference: str | None = None
    compare_training: str | None = None


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


def _memory(convert) -> tuple[float | None, float]:
    """(peak resident-set growth, peak Python allocations) of one ``convert()``, in MiB."""
    start = _status_kib("VmRSS") if _reset_peak_rss() else None
    tracemalloc.start()
    try:
        convert()
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    peak = _status_kib("VmHWM")
    rss = (peak - start) / 1024 if start is not None and peak is not None else None
    return rss, python_peak / 2**20


def _is_keras(model) -> bool:
    from bnkit.keras import keras

    return isinstance(model, keras.layers.Layer)  # on Keras' torch backend, also an nn.Module


def _leg(network: str, source, torch_shape, x_torch, expected, leg: str, repeats: int) -> tuple[Row, object]:
    is_keras = _is_keras(source)
    direction = "keras_to_torch" if is_keras else "torch_to_keras"

    def convert():
        return keras_to_torch(source) if is_keras else torch_to_keras(source, torch_shape)

    row = Row(network, direction, leg)
    try:
        row.peak_rss_mib, row.python_peak_mib = _memory(convert)
    except UnsupportedLayerError as e:
        row.refused = str(e)
        return row, None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        converted = convert()
        times.append(time.perf_counter() - start)
    row.seconds = statistics.median(times)
    row.error = relative_error(run_in_torch_layout(converted, x_torch, False), expected)
    return row, converted


def _verdict(source, converted, x, training: bool) -> str:
    import bnkit

    return "agree" if bnkit.compare(source, converted, x, training=training).agree else "DISAGREE"


def measure(net: Network, leg: str, repeats: int) -> Row:
    """One leg of one network in this process: "there", or "back" (after an untimed "there"). After
    "there", compare's verdicts, then a training forward (which updates both sides' statistics)."""
    source = net.build()
    x_torch = torch_layout_input(net, source)
    torch_shape = x_torch.shape[1:]
    expected = run_in_torch_layout(source, x_torch, False)
    if leg == "back":
        source = convert(source, net, x_torch)[0]
        gc.collect()
    row, converted = _leg(net.name, source, torch_shape, x_torch, expected, leg, repeats)
    if leg == "there" and converted is not None:
        x = net.example_input(2)  # compare takes the first model's own layout
        # compare turns off dropout layers, not the dropout inside attention layers (nn.MultiheadAttention's
        # dropout, Keras MultiHeadAttention's inner Dropout): off here, as in the tests
        _without_dropout(source), _without_dropout(converted)
        row.compare_inference = _verdict(source, converted, x, False)
        row.compare_training = _verdict(source, converted, x, True)
        row.batch_norms, row.training_error, row.statistics_error = training_check(source, converted, x_torch)
    return row


def run(networks: list[Network], repeats: int = 3, isolate: bool = True, threads: int | None = None):
    """Convert each network there and back, yielding one :class:`Row` per conversion (or refusal).
    With ``isolate``, each network and leg runs in a fresh process (networks of :data:`ALL_NETWORKS` only)."""
    for net in networks:
        for leg in ("there", "back"):
            row = _in_child(net.name, leg, repeats, threads) if isolate else measure(net, leg, repeats)
            yield row
            if row.refused:
                break


def _in_child(name: str, leg: str, repeats: int, threads: int | None) -> Row:
    command = [sys.executable, __file__, "--child", name, leg, "--repeats", str(repeats)]
    command += ["--threads", str(threads)] if threads else []
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"{name} ({leg}) failed:\n{proc.stderr[-3000:]}")
    return Row(**json.loads(proc.stdout.strip().splitlines()[-1]))


def _warm_up() -> None:
    from bnkit.examples import torch_seed_model

    keras_to_torch(torch_to_keras(torch_seed_model(), (1, 64, 64)))


HEADER = (
    f"{'network':<30} {'direction':<15} {'leg':<6} {'time (s)':>9} {'peak RSS (MiB)':>15} "
    f"{'Python peak (MiB)':>18} {'max rel. error':>15} {'BNs':>4} {'training':>9} {'statistics':>10} "
    f"{'compare inference / training':>29}"
)


def format_row(r: Row) -> str:
    name = r.network + (" †" if r.network in BENCHMARK_ONLY else "")
    head = f"{name:<30} {r.direction:<15} {r.leg:<6}"
    if r.refused:
        expected = " (expected)" if r.network in EXPECTED_REFUSALS else ""
        return f"{head} refused{expected}: {r.refused}"
    rss = f"{r.peak_rss_mib:.0f}" if r.peak_rss_mib is not None else "n/a"
    slow = "  (over the 5 s goal)" if r.seconds > GOAL_SECONDS else ""
    line = f"{head} {r.seconds:>9.2f} {rss:>15} {r.python_peak_mib:>18.0f} {format_error(r.error):>15}"
    if r.compare_inference is not None:
        verdicts = f"{r.compare_inference} / {r.compare_training}"
        line += (
            f" {r.batch_norms:>4} {format_error(r.training_error):>9} {format_error(r.statistics_error):>10}"
            f" {verdicts:>29}"
        )
    return line + slow


def print_table(rows) -> list[Row]:
    """Print the rows as they come (a header first, a summary last); returns them."""
    print(HEADER, flush=True)
    done = []
    for row in rows:
        print(format_row(row), flush=True)
        done.append(row)
    converted = [r.network for r in done if not r.refused and r.leg == "there"]
    refused = [r.network for r in done if r.refused]
    total = len(converted) + len(refused)
    print(f"converted {len(converted)} of {total} networks; refused: {', '.join(refused) or 'none'}")
    if any(r.network in BENCHMARK_ONLY for r in done):
        print("† benchmark only: too slow for the test suite (tests/convert/real_networks_beyond.BENCHMARK_ONLY)")
    return done


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default=",".join(ALL_NETWORKS), help="comma-separated names (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--child", nargs=2, metavar=("NETWORK", "LEG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        _warm_up()
        print(json.dumps(asdict(measure(ALL_NETWORKS[args.child[0]], args.child[1], args.repeats))))
        return 0
    unknown = [n for n in args.networks.split(",") if n not in ALL_NETWORKS]
    if unknown:
        parser.error(f"unknown networks {unknown}; known: {', '.join(ALL_NETWORKS)}")
    print(
        f"convert_cpu: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} conversions, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    print_table(run([ALL_NETWORKS[n] for n in args.networks.split(",")], args.repeats, threads=args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
