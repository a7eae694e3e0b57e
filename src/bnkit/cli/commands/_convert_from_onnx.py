"""``bnkit convert IN.onnx OUT``: an ONNX model as PyTorch (``.pt2``, ``.pt``, ``.safetensors``) or Keras
(``.keras``, ``.h5``), verified against onnxruntime before it is written.

:func:`bnkit.convert.onnx_to_torch` gives a ``torch.fx.GraphModule`` of ``torch.nn`` layers (batch norms
``bnkit.torch.BatchNorm*d(convention="onnx")``: ONNX's training semantics, exact epsilon and momentum);
for Keras it goes on through :func:`bnkit.convert.torch_to_keras`. onnxruntime runs the ``.onnx`` on a
random batch (the declared batch size, 2 where it is symbolic) and the converted model must agree within
1e-4 of the largest output, as every conversion ``bnkit convert`` writes. Called by
:mod:`bnkit.cli.commands.convert` for an IN ending in ``.onnx``.
"""

from __future__ import annotations

import json

from bnkit.cli import CLIError
from bnkit.cli.progress import Steps

__all__ = ["run"]


def _load(path: str):
    """The ONNX model, read by bnkit's safe reader (:mod:`bnkit.formats.onnx`)."""
    from bnkit.formats import ModelFileError
    from bnkit.formats.onnx import load

    try:
        return load(path)
    except ModelFileError as e:
        raise CLIError(str(e)) from None


def _input_shape(model, given) -> tuple[int, tuple[int, ...]]:
    """``(batch, shape without the batch)`` of the graph's one input; ``--input-shape`` for symbolic dims."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise CLIError(f"the ONNX model has {len(inputs)} inputs; bnkit convert takes models with one input")
    dims = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
        for d in inputs[0].type.tensor_type.shape.dim
    ]
    batch = dims[0] if dims and dims[0] is not None else 2
    shape = tuple(given) if given is not None else tuple(dims[1:])
    if any(d is None for d in shape):
        raise CLIError(f"input {inputs[0].name!r} has symbolic dimensions {dims}; give --input-shape (C,H,W)")
    return batch, shape


def _difference(model, converted, target: str, batch: int, shape) -> tuple[float, float]:
    """max |converted - onnxruntime| over the outputs on a random batch, and max |onnxruntime|."""
    import numpy as np
    import onnxruntime as ort
    import torch

    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).numpy()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = session.run(None, {session.get_inputs()[0].name: x})
    if target == "torch":
        with torch.no_grad():
            out = converted(torch.from_numpy(x))
        outs = [t.numpy() for t in (out if isinstance(out, (tuple, list)) else [out])]
    else:
        from bnkit.keras import keras

        out = converted(np.moveaxis(x, 1, -1) if x.ndim > 2 else x, training=False)
        outs = [np.asarray(keras.ops.convert_to_numpy(o)) for o in (out if isinstance(out, (tuple, list)) else [out])]
        outs = [np.moveaxis(o, -1, 1) if o.ndim > 2 else o for o in outs]
    worst = largest = 0.0
    for got, ref in zip(outs, reference, strict=True):
        if ref.size:
            worst = max(worst, float(np.max(np.abs(got - ref))))
            largest = max(largest, float(np.max(np.abs(ref))))
    return worst, largest


def run(args) -> int:
    from bnkit.cli.commands.convert import _PARITY_TOLERANCE, _direction, _relative, _write
    from bnkit.convert import UnsupportedLayerError, onnx_to_torch, torch_to_keras
    from bnkit.io import check_model_output

    target = _direction(args.output)
    if args.semantics != "source":
        raise CLIError("--semantics target is not available from ONNX: batch norms keep ONNX's semantics")
    with Steps(4, enabled=not args.json) as steps:
        steps.step(f"loading {args.input}")
        check_model_output(args.output, args.force)  # refuse before the slow part
        model = _load(args.input)
        batch, shape = _input_shape(model, args.input_shape)
        steps.step(f"converting to {'PyTorch' if target == 'torch' else 'Keras'}")
        try:
            converted = onnx_to_torch(model)
            if target == "keras":
                converted = torch_to_keras(converted, shape)
        except UnsupportedLayerError as e:
            raise CLIError(str(e)) from None
        steps.step("verifying against onnxruntime on a random batch")
        try:
            difference, largest = _difference(model, converted, target, batch, shape)
        except Exception as e:  # a shape the model does not take, typically
            raise CLIError(f"could not run the models on a batch of shape {(batch, *shape)}: {e}") from None
        relative = _relative(difference, largest)
        if not relative <= _PARITY_TOLERANCE:
            raise CLIError(
                f"the converted model disagrees with onnxruntime running {args.input}: max |difference| "
                f"{difference:.3g} is {relative:.3g} of the largest output {largest:.3g} (tolerance "
                f"{_PARITY_TOLERANCE:g}); nothing was written",
                status=1,
            )
        steps.step(f"writing {args.output}")
        keras2 = target == "keras" and args.output.lower().endswith((".h5", ".hdf5"))
        _write(converted, args, shape, keras2)
    report = {
        "input": str(args.input),
        "output": str(args.output),
        "from": "onnx",
        "to": target,
        "opset": next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "input_shape_torch": list(shape),
        "batch_norms": batch_norm_nodes(model),
        "max_abs_difference": difference,
        "max_abs_output": largest,
        "relative_difference": relative,
        "tolerance": _PARITY_TOLERANCE,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from rich.console import Console
    from rich.markup import escape

    names = {"keras": "Keras", "torch": "PyTorch"}
    console = Console()
    bns = report["batch_norms"]
    console.print(
        f"[bold]{escape(report['input'])}[/] (ONNX opset {report['opset']}) → [bold]{escape(report['output'])}[/] "
        f"({names[target]}): {len(bns)} BatchNormalization node{'s' if len(bns) != 1 else ''} kept as batch norms "
        "with ONNX's semantics (momentum weighs the old value, biased running variance)"
    )
    console.print(
        f"against onnxruntime on a random batch: max |difference| {difference:.2g}, {relative:.2g} of the "
        f"largest output {largest:.2g} (tolerance {_PARITY_TOLERANCE:g})"
    )
    return 0


def batch_norm_nodes(model) -> list[dict]:
    """An ONNX model's BatchNormalization nodes as report rows: name, epsilon, momentum, training_mode (ONNX's
    defaults where an attribute is absent); also what the writer's report lists."""
    from onnx import helper

    rows = []
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            rows.append(
                {
                    "name": node.name,
                    "epsilon": float(attributes.get("epsilon", 1e-5)),
                    "momentum": float(attributes.get("momentum", 0.9)),
                    "training_mode": int(attributes.get("training_mode", 0)),
                }
            )
    return rows
