"""Every real network through a ``.pt2`` file: written by bnkit.io, read back without unpickling, converted.

    KERAS_BACKEND=torch python benchmarks/convert_pt2_files.py [--networks resnet18,ResNet50]

The networks are tests/convert/real_networks.py's. A torchvision network is saved as ``.pt2``
(``bnkit.io.save_model``: ``torch.export`` with a free batch size), loaded (``bnkit.io.load_model``:
pickle-free, layers rebuilt) and converted to Keras from the loaded program; a keras.applications
network is converted to PyTorch first and that module goes through the file. Printed: the largest
relative error, max |got - source| / max |source|, of the loaded program and of the Keras model
converted from it, on a batch of 3 (the program was exported with a batch of 2), and the times.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the bnkit command sets it
TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "convert")]

import torch  # noqa: E402
from real_networks import (  # noqa: E402
    NETWORKS,
    _run,
    _to_keras_layout,
    _to_torch_layout,
    format_error,
    relative_error,
)

from bnkit.convert import keras_to_torch, torch_to_keras  # noqa: E402
from bnkit.io import load_model, save_model  # noqa: E402


def measure(name: str, folder: str) -> str:
    net = NETWORKS[name]
    source = net.build()
    x = net.example_input(batch=3, seed=2)
    expected = _run(source, x, False)
    path = os.path.join(folder, f"{name}.pt2")
    if net.framework == "torch":
        module, shape, x_torch = source, net.input_shape, x
    else:
        shape = (net.input_shape[-1], *net.input_shape[:-1])
        module, x_torch = keras_to_torch(source), _to_torch_layout(x)
    start = time.perf_counter()
    save_model(module, path, input_shape=shape)
    saved = time.perf_counter()
    program = load_model(path)
    loaded = time.perf_counter()
    keras_model = torch_to_keras(program, shape)
    converted = time.perf_counter()
    os.unlink(path)
    program_out = _run(program, x_torch, False)
    keras_out = _run(keras_model, _to_keras_layout(x_torch), False)
    if net.framework == "torch":
        program_error = relative_error(program_out, expected)
        keras_error = relative_error(_to_torch_layout(keras_out), expected)
    else:
        program_error = relative_error(_to_keras_layout(program_out), expected)
        keras_error = relative_error(keras_out, expected)
    return (
        f"{name:<20} {saved - start:>8.2f} {loaded - saved:>8.2f} {converted - loaded:>11.2f} "
        f"{format_error(program_error):>14} {format_error(keras_error):>14}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default=",".join(NETWORKS), help="comma-separated names (default: all)")
    args = parser.parse_args(argv)
    names = args.networks.split(",")
    unknown = [n for n in names if n not in NETWORKS]
    if unknown:
        parser.error(f"unknown networks {unknown}; known: {', '.join(NETWORKS)}")
    print(f"convert_pt2_files: torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}", flush=True)
    header = ("network", "save (s)", "load (s)", "to Keras (s)", ".pt2 error", "Keras error")
    print(f"{header[0]:<20} {header[1]:>8} {header[2]:>8} {header[3]:>11} {header[4]:>14} {header[5]:>14}")
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            print(measure(name, folder), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
