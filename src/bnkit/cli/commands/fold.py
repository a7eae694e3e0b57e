"""``bnkit fold IN OUT``: fold every batch norm of a model into the layer before it, for inference."""

from __future__ import annotations

from bnkit.cli import CLIError
from bnkit.cli.options import add_reading_options, parse_shape, reading

NAME = "fold"
HELP = "Fold batch norms into the preceding Conv/ConvTranspose/Linear (Dense, Gemm) layers for inference."


def add_arguments(parser) -> None:
    parser.add_argument(
        "input", metavar="IN", help="model: .keras, .h5, .pt2, .onnx, SavedModel folder or package.module:factory"
    )
    parser.add_argument(
        "output", metavar="OUT",
        help="folded model: .keras, .h5 or a SavedModel folder (no suffix) (Keras), .pt2, .pt or "
        ".safetensors (PyTorch), .onnx (ONNX, checked with onnxruntime before it is written)",
    )
    parser.add_argument("--weights", metavar="FILE", help="state dict (.pt or .safetensors) for a factory spec")
    parser.add_argument(
        "--input-shape", metavar="C,H,W", type=parse_shape,
        help="input shape without the batch axis, for a .pt2 output (read from a .pt2 input when omitted)",
    )
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--json", action="store_true", help="print what became of each batch norm, and why, as JSON")
    add_reading_options(parser)


def _recorded_input_shape(model):
    """The example input shape (batch axis dropped) recorded in a rebuilt .pt2 graph, if any."""
    graph = getattr(model, "graph", None)
    for node in getattr(graph, "nodes", []):
        if node.op == "placeholder":
            value = node.meta.get("val", node.meta.get("tensor_meta"))
            shape = getattr(value, "shape", None)
            return tuple(int(d) for d in shape[1:]) if shape is not None else None
    return None


def run(args) -> int:
    import json
    from pathlib import Path

    from bnkit.cli.progress import Steps
    from bnkit.io import ModelFileError, check_model_output, framework_of, load_model, save_model
    from bnkit.lifecycle.fold import fold_bn

    shape = args.input_shape
    with Steps(3, enabled=not args.json) as steps:
        steps.step(f"loading {args.input}")
        check_model_output(args.output, args.force)  # fail before the (slow) load and fold
        model = load_model(args.input, weights=args.weights, **reading(args))
        framework = framework_of(model)
        if shape is not None and framework == "torch":  # a .pt2 output is exported on a batch of 2
            from bnkit.inputs import check_model_input

            check_model_input(model, shape, 2, what="exporting the folded model")
        if shape is None and Path(args.output).suffix.lower() == ".pt2":
            shape = _recorded_input_shape(model)
        steps.step("folding the batch norms")
        measured = None  # ONNX: the largest relative difference onnxruntime found, folded vs original
        try:
            if framework == "onnx":
                from bnkit.lifecycle._fold_onnx import fold_onnx

                folded, decisions, measured = fold_onnx(model)
            else:
                folded, decisions = fold_bn(model, report=True)
        except ValueError as e:
            raise CLIError(str(e)) from e
        steps.step(f"writing {args.output}")
        try:
            if framework == "onnx":
                from bnkit.lifecycle._fold_onnx import save_onnx

                save_onnx(folded, args.output, force=args.force)
            else:
                save_model(folded, args.output, force=args.force, input_shape=shape)
        except ModelFileError as e:
            raise CLIError(str(e)) from e
    total = len(decisions)
    done = sum(d.folded for d in decisions)
    affines = sum(d.outcome == "affine" for d in decisions)
    kept = sum(d.outcome == "kept" for d in decisions)
    if args.json:
        report = {
            "input": str(args.input),
            "output": str(args.output),
            "total": total,
            "folded": done,
            "replaced_by_channel_affine": affines,
            "left_as_they_are": kept,
            "batch_norms": [d.to_dict() for d in decisions],
        }
        if measured is not None:
            report["onnxruntime_max_relative_difference"] = measured
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"folded {done} of {total} batch norm{'s' if total != 1 else ''} into the preceding layer"
        + (f", {affines} replaced by ChannelAffine" if affines else "")
        + (f", {kept} left as {'they are' if kept != 1 else 'it is'}" if kept else "")
        + f"; wrote {args.output}"
    )
    if measured is not None and done:
        from bnkit.lifecycle._fold_onnx import TOLERANCE

        print(f"  checked with onnxruntime on a random input: max relative difference {measured:.2g} "
              f"(tolerance {TOLERANCE['float32']:g} for float32 outputs)")
    for d in decisions:
        if not d.folded:
            what = "replaced by ChannelAffine" if d.outcome == "affine" else "left as it is"
            print(f"  {d.type} {d.name!r} not folded ({what}): {d.reason}")
    return 0
