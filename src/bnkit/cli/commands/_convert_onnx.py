"""``bnkit convert IN OUT.onnx``: a PyTorch (``.pt2``, factory) or Keras model written as ONNX with every
batch norm a ``BatchNormalization`` node (:mod:`bnkit.formats.onnx_write`): run by onnxruntime against
the model on a random batch before the file is renamed into place (max |difference| within 1e-5 of the
largest output). ``--opset`` (9 to the newest onnx defines; default 17) and ``--training``
(``training_mode=1``, the updated running statistics as extra outputs; opset 14 on; a batch norm whose
running variance is unbiased, PyTorch's, is refused by name: ONNX's is biased).

Called by :mod:`bnkit.cli.commands.convert` for an OUT ending in ``.onnx`` (the leading underscore keeps
this module from being a command of its own).
"""

from __future__ import annotations

import json

from bnkit.cli import CLIError
from bnkit.cli.options import reading
from bnkit.cli.progress import Steps

__all__ = ["run"]


def run(args) -> int:
    from bnkit.formats.atomic import check_writable
    from bnkit.formats.onnx_write import DEFAULT_OPSET, write
    from bnkit.io import ModelFileError, framework_of, load_model

    opset = getattr(args, "opset", None) or DEFAULT_OPSET
    training = bool(getattr(args, "training", False))
    with Steps(3, enabled=not args.json) as steps:
        steps.step(f"loading {args.input}")
        try:
            check_writable(args.output, args.force)  # refuse before the slow part
        except ModelFileError as e:
            raise CLIError(str(e)) from None
        model = load_model(args.input, args.weights, **reading(args))
        framework = framework_of(model)
        if framework not in ("torch", "keras"):
            raise CLIError(f"{args.input} is already an ONNX model; {args.output} asks for ONNX")
        shape = args.input_shape
        if shape is None and framework == "torch":
            from bnkit.cli.commands.convert import _torch_input_shape

            shape = _torch_input_shape(model, framework, None)
        steps.step(f"exporting to ONNX (opset {opset}) and checking it with onnxruntime")
        try:
            written = write(model, args.output, input_shape=shape, opset=opset, training=training, force=args.force)
        except ModelFileError as e:
            raise CLIError(str(e)) from None
        steps.step(f"written {args.output}")
    report = {
        "input": str(args.input),
        "output": str(args.output),
        "from": framework,
        "to": "onnx",
        "opset": written.opset,
        "training": training,
        "batch_norms": _nodes(args.output),
        "max_abs_difference": written.round_trip.difference,
        "max_abs_output": written.round_trip.largest,
        "relative_difference": written.round_trip.relative,
        "tolerance": _tolerance(),
        "training_relative_difference": written.training_error,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    _render(report)
    return 0


def _tolerance() -> float:
    from bnkit.formats.keras_h5 import ROUND_TRIP_TOLERANCE

    return ROUND_TRIP_TOLERANCE


def _nodes(path) -> list[dict]:
    """The written file's BatchNormalization nodes: name, epsilon, momentum, training_mode (onnx reads it)."""
    import onnx

    from bnkit.cli.commands._convert_from_onnx import batch_norm_nodes

    return batch_norm_nodes(onnx.load(str(path)))


def _render(report: dict) -> None:
    from rich.console import Console
    from rich.markup import escape

    names = {"keras": "Keras", "torch": "PyTorch"}
    console = Console()
    bns = report["batch_norms"]
    mode = "training mode" if report["training"] else "inference"
    console.print(
        f"[bold]{escape(report['input'])}[/] ({names[report['from']]}) → [bold]{escape(report['output'])}[/] "
        f"(ONNX opset {report['opset']}, {mode}): {len(bns)} BatchNormalization node{'s' if len(bns) != 1 else ''} "
        "with the layers' epsilon and momentum in ONNX's meaning (weight of the old running value)"
    )
    console.print(
        f"run by onnxruntime on a random batch in inference: max |difference| {report['max_abs_difference']:.2g}, "
        f"{report['relative_difference']:.2g} of the largest output {report['max_abs_output']:.2g} "
        f"(tolerance {report['tolerance']:g})"
    )
    if report["training_relative_difference"] is not None:
        console.print(
            f"in training mode (output and updated statistics): {report['training_relative_difference']:.2g} relative"
        )
