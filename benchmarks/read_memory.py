"""How much memory reading a model file takes, for real networks in every format bnkit reads.

    KERAS_BACKEND=torch python benchmarks/read_memory.py [--networks resnet50,ResNet50] [--cli] [--folder DIR]

Why: the ``bnkit`` command's supervisor (:mod:`bnkit.cli.watchers`) kills a reader whose memory grows
past ``MEMORY_FACTOR × --max-model-bytes + MEMORY_MARGIN``; the factor is what reading really holds
per byte of weights, so it is measured here, not guessed.

Each network is written once (torchvision ones as ``.pt2`` by ``bnkit.io.save_model(model.eval(),
path, input_shape=(3, 224, 224))``; keras.applications ones, ``weights=None``, as ``.keras`` and legacy
``.h5``), then every measurement runs in a fresh Python process:

* ``read``: torch, Keras and the readers' modules imported first, the peak RSS reset
  (``/proc/self/clear_refs``), ``bnkit.io.load_model(path)``; printed: the weights' bytes, the growth
  of the peak (``VmHWM``) over the RSS before reading, its ratio to the weights, and what is still held
  after reading (``kept``).
* ``--cli`` adds, per file, the real console script, ``bnkit summary FILE --max-model-bytes N``, at the
  lowest ``N`` from just above the weights that the budget accepts (the budget charges what a file
  declares: a little more than the weights, about twice them for ``.keras``, whose weights file Keras
  reads into memory); printed: ``N``, the exit status, and the reading child's largest anonymous RSS
  (what the supervisor watches, polled every 10 ms) over its first sample, in MB and as a ratio to
  ``N`` (the factor the supervisor would need without a margin; torch's and Keras' imports included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the bnkit command sets it
ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20

TORCHVISION = ("resnet50", "vgg16", "efficientnet_b0", "convnext_tiny")
KERAS = ("ResNet50", "VGG16")
FORMATS = {"torch": (".pt2",), "keras": (".keras", ".h5")}
DEFAULT = ",".join(TORCHVISION + KERAS)


def _framework(name: str) -> str:
    return "keras" if name[0].isupper() else "torch"


# ----------------------------------------------------------------------------- in the children


def _write(name: str, folder: Path) -> dict:
    """Write network ``name`` in every format of its framework; its weights' bytes and the paths."""
    if _framework(name) == "torch":
        import torch

        from bnkit.io import save_model

        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import import_torchvision

        torch.manual_seed(0)
        model = getattr(import_torchvision().models, name)(weights=None).eval()
        seen, nbytes = set(), 0
        for tensor in model.state_dict().values():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if key not in seen:
                seen.add(key)
                nbytes += tensor.numel() * tensor.element_size()
        path = folder / f"{name}.pt2"
        save_model(model, path, input_shape=(3, 224, 224), force=True)
        return {"weights": nbytes, "paths": [str(path)]}
    import keras

    model = getattr(keras.applications, name)(weights=None)
    nbytes = sum(int(v.numpy().nbytes) for v in model.weights)
    paths = []
    for suffix in FORMATS["keras"]:
        path = folder / f"{name}{suffix}"
        model.save(path)
        paths.append(str(path))
    return {"weights": nbytes, "paths": paths}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _read(path: str) -> dict:
    """Peak growth of this process while ``bnkit.io.load_model(path)`` reads, frameworks imported first."""
    import keras  # noqa: F401 - imported before, so that its import is not counted as reading
    import torch
    import torch._export.serde.serialize  # noqa: F401
    import torch.export  # noqa: F401

    import bnkit.formats.keras_archive  # noqa: F401
    import bnkit.formats.keras_h5  # noqa: F401
    import bnkit.formats.pt2  # noqa: F401
    import bnkit.torch.pt2_archive  # noqa: F401
    import bnkit.torch.rebuild  # noqa: F401
    from bnkit.io import load_model

    torch.set_num_threads(1)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS")
    model = load_model(path)
    peak = _status("VmHWM")
    kept = _status("VmRSS") - before
    del model
    return {"growth": peak - before, "kept": kept}


# --------------------------------------------------------------------------------- the parent


def _child(*args: str, timeout: float = 900) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _anon(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def limit_for(weights: int) -> int:
    """A ``--max-model-bytes`` just above ``weights``: 1 % more, rounded up to a MiB."""
    return -(-int(weights * 1.01) // MiB) * MiB


def cli(path: str, weights: int, timeout: float = 900) -> dict:
    """``bnkit summary`` at the lowest limit (to 2 %) from just above ``weights`` that the budget accepts
    (it charges what a file declares: more than the weights, twice them for ``.keras``), its exit
    status and the reading child's growth."""

    def refused(seen: dict) -> bool:
        return seen["status"] == 2 and "refused:" in seen["stderr"]

    low = limit_for(weights)
    seen = _summary(path, low, timeout)
    if not refused(seen):
        return seen
    high = low
    while refused(seen):
        low, high = high, 2 * high
        if high > 64 * weights + 64 * MiB:
            return seen
        seen = _summary(path, high, timeout)
    accepted = seen
    while high - low > max(MiB, high // 50):
        middle = -(-(low + high) // 2 // MiB) * MiB
        seen = _summary(path, middle, timeout)
        if refused(seen):
            low = middle
        else:
            high, accepted = middle, seen
    return accepted


def _summary(path: str, limit: int, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    script = Path(sys.executable).parent / "bnkit"
    proc = subprocess.Popen(
        [str(script), "summary", path, "--max-model-bytes", str(limit)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    first = peak = None
    start = time.monotonic()
    while proc.poll() is None and time.monotonic() - start < timeout:
        for child in _children(proc.pid):
            anon = _anon(child)
            if anon is not None:
                first = anon if first is None else first
                peak = anon if peak is None else max(peak, anon)
        time.sleep(0.01)
    if proc.poll() is None:
        proc.kill()
    stderr = proc.communicate()[1]
    growth = None if peak is None else peak - first
    return {"limit": limit, "status": proc.returncode, "growth": growth, "stderr": stderr.strip()[-300:]}


def _cli_columns(path: str, weights: int) -> str:
    seen = cli(path, weights)
    grown = factor = "-"
    if seen["growth"] is not None:
        grown = f"{seen['growth'] / 1e6:.1f}"
        factor = f"{seen['growth'] / seen['limit']:.2f}"
    row = f" {seen['limit'] / MiB:>8.0f}Mi {seen['status']:>4} {grown:>8} {factor:>9}"
    return row + (f"  ({seen['stderr']})" if seen["status"] != 0 else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default=DEFAULT, help=f"comma-separated (default {DEFAULT})")
    parser.add_argument("--folder", help="where the files are written (and kept); default a temporary folder")
    parser.add_argument("--cli", action="store_true", help="also read each file through the bnkit console script")
    parser.add_argument("--write", nargs=2, metavar=("NETWORK", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--read", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write:
        print(json.dumps(_write(args.write[0], Path(args.write[1]))))
        return 0
    if args.read:
        print(json.dumps(_read(args.read)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        header = f"{'network':<16} {'format':<7} {'weights MB':>10} {'growth MB':>10} {'ratio':>6} {'kept MB':>8}"
        if args.cli:
            header += f" {'cli limit':>10} {'exit':>4} {'cli MB':>8} {'cli ratio':>9}"
        print(header, flush=True)
        for name in args.networks.split(","):
            written = _child("--write", name, str(folder))
            weights = written["weights"]
            for path in written["paths"]:
                read = _child("--read", path)
                row = (
                    f"{name:<16} {Path(path).suffix:<7} {weights / 1e6:>10.1f} {read['growth'] / 1e6:>10.1f} "
                    f"{read['growth'] / weights:>6.2f} {read['kept'] / 1e6:>8.1f}"
                )
                if args.cli:
                    row += _cli_columns(path, weights)
                print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
