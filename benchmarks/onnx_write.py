"""Real networks written to ``.onnx`` by bnkit (every batch norm kept as a BatchNormalization node), on the CPU.

    KERAS_BACKEND=torch python benchmarks/onnx_write.py [--networks resnet18,ResNet50] [--opset 17] [--json]

The networks are tests/convert/real_networks.py's (random weights, randomised batch-norm statistics and affine
parameters, 96x96 inputs): by default the keras.applications ResNet50, MobileNetV2, EfficientNetB0,
DenseNet121, ConvNeXtTiny and torchvision's resnet18, mobilenet_v3_small, efficientnet_b0. Each is written
with :func:`bnkit.formats.onnx_write.write` into a temporary folder (Keras models through
``keras_to_torch``; the file takes PyTorch's N, C, H, W layout) and then, independently of the writer's own
check, run by onnxruntime (CPU) on a fresh random batch of 2 against the source model itself in inference
(Keras models on the same batch in their N, H, W, C layout). Printed per network: error (max |onnx - source|
/ max |source|), the source's batch norms, the file's BatchNormalization nodes and whether each has the
source's epsilon (as ONNX's float attribute: float32), the time of the write (export, onnx.checker,
onnxruntime check, atomic write) and, for a torchvision network, how many BatchNormalization nodes
``torch.onnx.export(dynamo=False)`` itself keeps in eval (it folds every batch norm that follows a conv).
``--training``: training-mode files; the error is then the writer's own checks (the file's inference twin
against the source; "training": output and updated statistics against the PyTorch module's training forward).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "convert")]

DEFAULT = "ResNet50,MobileNetV2,EfficientNetB0,DenseNet121,ConvNeXtTiny,resnet18,mobilenet_v3_small,efficientnet_b0"


def source_eps(model, framework: str) -> list[float]:
    if framework == "keras":
        from bnkit.keras import keras

        return [
            float(layer.epsilon)
            for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, keras.layers.BatchNormalization)
        ]
    from torch import nn

    return [float(m.eps) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def exporter_batch_norms(module, shape) -> int:
    """BatchNormalization nodes torch.onnx.export (TorchScript, opset 17) writes for ``module`` in eval."""
    import onnx
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(2, *shape),), buffer, dynamo=False, opset_version=17)
    return sum(n.op_type == "BatchNormalization" for n in onnx.load_from_string(buffer.getvalue()).graph.node)


def measure(name: str, opset: int, folder: Path, training: bool = False) -> dict:
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from real_networks import NETWORKS

    from bnkit.formats.onnx_write import write
    from bnkit.keras import keras

    net = NETWORKS[name]
    model = net.build()
    path = folder / f"{name}.onnx"
    start = time.perf_counter()
    shape = None if net.framework == "keras" else net.input_shape
    written = write(model, path, input_shape=shape, opset=opset, training=training)
    seconds = time.perf_counter() - start
    x = net.example_input(2, seed=7)  # the source's layout
    if net.framework == "keras":
        expected = np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))
        x_onnx = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    else:
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        x_onnx = x
    if training:  # the writer's own checks: its inference twin against the source, training mode against PyTorch
        error = written.round_trip.relative
    else:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {session.get_inputs()[0].name: x_onnx})
        error = float(np.max(np.abs(expected - got)) / np.max(np.abs(expected)))
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "BatchNormalization"]
    file_eps = sorted(
        float(onnx.helper.get_attribute_value(a)) for n in nodes for a in n.attribute if a.name == "epsilon"
    )
    eps = source_eps(model, net.framework)
    row = {
        "network": name,
        "framework": net.framework,
        "input": list(net.input_shape),
        "opset": written.opset,
        "error": error,
        "source_batch_norms": len(eps),
        "onnx_batch_norms": len(nodes),
        "eps_exact": file_eps == sorted(float(np.float32(e)) for e in eps),
        "write_seconds": seconds,
        "training_error": written.training_error,
        "exporter_batch_norms": exporter_batch_norms(model, net.input_shape) if net.framework == "torch" else None,
    }
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", default=DEFAULT)
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--training", action="store_true", help="training-mode files (Keras' convention only: PyTorch's is refused)"
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bnkit-onnx-write-") as folder:
        for name in args.networks.split(","):
            try:
                row = measure(name, args.opset, Path(folder), args.training)
            except Exception as e:  # one network's failure is a row, not the end of the table
                row = {"network": name, "failed": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
            rows.append(row)
            if not args.json:
                if "failed" in row:
                    print(f"{name:20s} FAILED {row['failed']}", flush=True)
                    continue
                exported = "" if row["exporter_batch_norms"] is None else f"{row['exporter_batch_norms']:4d}"
                print(
                    f"{name:20s} error {row['error']:.2e}  BN source {row['source_batch_norms']:4d}  onnx "
                    f"{row['onnx_batch_norms']:4d}  eps exact {row['eps_exact']!s:5s}  "
                    f"write {row['write_seconds']:6.1f} s"
                    + (f"  torch.onnx.export keeps {exported}" if exported else "")
                    + (f"  training {row['training_error']:.2e}" if row["training_error"] is not None else ""),
                    flush=True,
                )
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0 if all("failed" not in r and r["error"] <= 1e-5 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
