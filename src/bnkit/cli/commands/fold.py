"""``bnkit fold IN OUT``: fold every batch norm of a model into the layer before it, for inference."""

from __future__ import annotations

from bnkit.cli import CLIError
from bnkit.cli.options import parse_shape

NAME = "fold"
HELP = "Fold batch norms into the preceding Conv/ConvTranspose/Linear (Dense) layers for inference."


def add_arguments(parser) -> None:
    parser.add_argument("input", metavar="IN", help="model: .keras, .h5, .pt2 or package.module:factory")
    parser.add_argument("output", metavar="OUT", help="folded model: .keras (Keras), .pt2, .pt or .safetensors")
    parser.add_argument("--weights", metavar="FILE", help="state dict (.pt or .safetensors) for a factory spec")
    parser.add_argument(
        "--input-shape", metavar="C,H,W", type=parse_shape,
        help="input shape without the batch axis, for a .pt2 output (read from a .pt2 input when omitted)",
    )
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--json", action="store_true", help="print what was folded as JSON")


def _recorded_input_shape(model):
    """The example input shape (batch axis dropped) recorded in a rebuilt .pt2 graph, if any."""
    graph = getattr(model, "graph", None)
    for node in getattr(graph, "nodes", []):
        if node.op == "placeholder":
            value = node.meta.get("val", node.meta.get("tensor_meta"))
            shape = getattr(value, "shape", None)
            return tuple(int(d) for d in shape[1:]) if shape is not None else None
    return None


def _count_batchnorms(model, framework: str) -> int:
    if framework == "keras":
        from bnkit.lifecycle._fold_keras import batchnorms as keras_batchnorms

        return len(keras_batchnorms(model))
    from bnkit.lifecycle._torch_bn import batchnorms

    return len(batchnorms(model))


def _count_affines(model, framework: str) -> int:
    if framework == "keras":
        from bnkit.lifecycle.keras_layers import ChannelAffine

        return sum(isinstance(m, ChannelAffine) for m in model._flatten_layers(include_self=True, recursive=True))
    from bnkit.torch.affine import ChannelAffine

    return sum(isinstance(m, ChannelAffine) for m in model.modules())


def run(args) -> int:
    from pathlib import Path

    from bnkit.cli.progress import Steps
    from bnkit.io import ModelFileError, check_writable, framework_of, load_model, save_model
    from bnkit.lifecycle.fold import fold_bn

    shape = args.input_shape
    with Steps(3, enabled=not args.json) as steps:
        steps.step(f"loading {args.input}")
        try:
            check_writable(args.output, args.force)  # fail before the (slow) load and fold
            model = load_model(args.input, weights=args.weights)
        except ModelFileError as e:
            raise CLIError(str(e)) from e
        framework = framework_of(model)
        if shape is None and Path(args.output).suffix.lower() == ".pt2":
            shape = _recorded_input_shape(model)
        total = _count_batchnorms(model, framework)
        steps.step("folding the batch norms")
        try:
            folded = fold_bn(model)
        except ValueError as e:
            raise CLIError(str(e)) from e
        affines = _count_affines(folded, framework)
        kept = _count_batchnorms(folded, framework)  # read as tensors by forward: left, with a warning
        steps.step(f"writing {args.output}")
        try:
            save_model(folded, args.output, force=args.force, input_shape=shape)
        except ModelFileError as e:
            raise CLIError(str(e)) from e
    if args.json:
        import json

        print(
            json.dumps(
                {
                    "input": args.input,
                    "output": args.output,
                    "framework": framework,
                    "batch_norms": total,
                    "folded": total - affines - kept,
                    "channel_affine": affines,
                    "kept": kept,
                },
                indent=2,
            )
        )
        return 0
    print(
        f"folded {total - affines - kept} of {total} batch norm{'s' if total != 1 else ''} into the preceding layer"
        + (f", {affines} replaced by ChannelAffine" if affines else "")
        + (f", {kept} left as {'they are' if kept != 1 else 'it is'}" if kept else "")
        + f"; wrote {args.output}"
    )
    return 0
