"""Inference speed of a folded vs an unfolded ResNet-style network on the CPU.

    KERAS_BACKEND=torch python benchmarks/fold_cpu.py [--repeats 15] [--threads N]

The two models run side by side: each repeat times the unfolded and the folded model one after
the other (alternating which goes first), so that load on the machine hits both alike; the
figures are medians over repeats. Goal: a speed-up of at least 1.3x at batch 1 and 32.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch
from torch import nn

import bnkit


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet_style(widths=(32, 64, 128, 256), blocks=2, classes=10) -> nn.Module:
    """A CIFAR-sized ResNet-18 layout (2 basic blocks per stage), 21 batch norms."""
    layers = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
    cin = widths[0]
    for i, width in enumerate(widths):
        for j in range(blocks):
            layers.append(BasicBlock(cin, width, 2 if i > 0 and j == 0 else 1))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def _time(model, x, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        model(x)
    return (time.perf_counter() - start) / inner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = resnet_style().eval()
    with torch.no_grad():  # give the batch norms non-trivial statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    folded = bnkit.fold_bn(model)
    print(f"fold_cpu: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"input 3x{args.size}x{args.size}, {args.repeats} interleaved repeats, medians")
    with torch.inference_mode():
        for batch in (1, 32):
            x = torch.randn(batch, 3, args.size, args.size)
            torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
            inner = 20 if batch == 1 else 2
            for _ in range(3):  # warm-up
                _time(model, x, inner), _time(folded, x, inner)
            plain, fast = [], []
            for r in range(args.repeats):
                pair = [(model, plain), (folded, fast)]
                for m, times in pair if r % 2 == 0 else pair[::-1]:
                    times.append(_time(m, x, inner))
            p, f = statistics.median(plain), statistics.median(fast)
            share = _batchnorm_share(model, x)
            print(
                f"batch {batch:>2}: unfolded {p * 1e3:8.3f} ms  folded {f * 1e3:8.3f} ms  speed-up {p / f:.2f}x"
                f"  (batch-norm operators: {share:.1%} of the unfolded run's operator time)"
            )


def _batchnorm_share(model: nn.Module, x: torch.Tensor) -> float:
    """The batch-norm operators' share of self CPU time in a profiled unfolded forward pass."""
    with torch.profiler.profile() as prof:
        for _ in range(3):
            model(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    bn = sum(e.self_cpu_time_total for e in events if "batch_norm" in e.key)
    return bn / total if total else 0.0


if __name__ == "__main__":
    main()
