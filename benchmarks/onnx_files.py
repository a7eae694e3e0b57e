"""ONNX → PyTorch → Keras on real exports: the coverage table's torchvision networks, each exported by
torch's two exporters, converted by bnkit and checked against onnxruntime running the ``.onnx``.

    KERAS_BACKEND=torch python benchmarks/onnx_files.py [--networks resnet18,densenet121] [--size 64]

Each network (random weights, every normalization randomised by tests/convert/real_networks.py's
randomize_normalization, 10 classes, batch 1) is exported with ``torch.onnx.export(..., dynamo=True,
opset 18)`` and with the TorchScript exporter (``dynamo=False``) at opsets 17, 13 and 9, into a temporary
folder. Each file is converted with ``bnkit.convert.onnx_to_torch`` and on with ``torch_to_keras``;
error: max |converted - onnxruntime| / max |onnxruntime| on one standard normal batch (goal: 1e-5);
time: the ONNX → PyTorch conversion, then PyTorch → Keras. "BN" counts the BatchNormalization nodes the
exporter kept (it folds those after a Conv). "read": the file read by bnkit's safe reader
(``bnkit.io.load_model``), in seconds. "compare": ``bnkit.compare(module, model, x)`` of the PyTorch module
(what ``.pt2`` holds) against the read ``.onnx`` in inference: ``agree`` or the verdict with its cause codes,
then "paired": the layers bnkit paired with an exporter-folded Conv (folded conv+BN pairs). A refusal is
printed with its one-line reason.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "convert")]

NETWORKS = [
    "resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "regnet_y_400mf",
    "shufflenet_v2_x0_5", "squeezenet1_0", "convnext_tiny",
]  # fmt: skip
EXPORTS = [(True, 18), (False, 17), (False, 13), (False, 9)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from real_networks import randomize_normalization

    import bnkit
    from bnkit.convert import onnx_to_torch, torch_to_keras
    from bnkit.io import load_model
    from conftest import import_torchvision

    tv = import_torchvision()
    print(f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}, "
          f"input 1x3x{args.size}x{args.size}")  # fmt: skip
    header = f"{'network':<20} {'exporter':<12} {'opset':>5} {'BN':>3} {'to torch':>9} {'to keras':>9} "
    print(header + f"{'onnx->torch':>11} {'torch->keras':>12} {'read':>6}  compare")
    x = np.random.default_rng(0).standard_normal((1, 3, args.size, args.size)).astype("float32")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.networks.split(","):
            model = getattr(tv.models, name)(weights=None, num_classes=10).eval()
            randomize_normalization(model)
            for dynamo, opset in EXPORTS:
                path = Path(folder) / f"{name}_{opset}_{dynamo}.onnx"
                exporter = "dynamo" if dynamo else "torchscript"
                row = f"{name:<20} {exporter:<12} {opset:>5}"
                try:
                    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                        torch.onnx.export(model, (torch.zeros_like(torch.from_numpy(x)),), str(path),
                                          dynamo=dynamo, opset_version=opset)  # fmt: skip
                except Exception as e:
                    print(f"{row} export failed: {' '.join(str(e).split())[:100]}")
                    continue
                start = time.perf_counter()
                try:
                    proto = load_model(path)
                except Exception as e:
                    print(f"{row} read refused: {' '.join(str(e).split())[:160]}")
                    continue
                t_read = time.perf_counter() - start
                try:
                    report = bnkit.compare(model, proto, x)
                    paired = sum(bool(getattr(r, "note", "")) for r in report.rows)
                    verdict = "agree" if report.agree else "DISAGREE " + ",".join(report.cause_codes)
                    verdict += f" ({paired} folded pairs)" if paired else ""
                except Exception as e:
                    verdict = f"compare failed: {' '.join(str(e).split())[:100]}"
                bns = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                (ref,) = session.run(None, {session.get_inputs()[0].name: x})
                scale = float(np.max(np.abs(ref)))
                row += f" {bns:>3}"
                try:
                    start = time.perf_counter()
                    gm = onnx_to_torch(proto)
                    t_torch = time.perf_counter() - start
                    with torch.no_grad():
                        e_torch = float(np.max(np.abs(gm(torch.from_numpy(x)).numpy() - ref))) / scale
                except Exception as e:
                    print(f"{row} refused: {' '.join(str(e).split())[:160]}")
                    continue
                try:
                    start = time.perf_counter()
                    km = torch_to_keras(gm, x.shape[1:])
                    t_keras = time.perf_counter() - start
                    out = km.predict(np.moveaxis(x, 1, -1), verbose=0)
                    e_keras = f"{float(np.max(np.abs(out - ref))) / scale:>9.1e}"
                    t_keras = f"{t_keras:>11.2f}s"
                except Exception as e:
                    e_keras, t_keras = "refused", f"  ({' '.join(str(e).split())[:120]})"
                print(f"{row} {e_torch:>9.1e} {e_keras:>9} {t_torch:>10.2f}s {t_keras} {t_read:>5.2f}s  {verdict}",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
