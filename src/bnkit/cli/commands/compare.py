"""``bnkit compare A B``: run two models on the same random batch and explain the differences.

Exit status, like ``diff``: 0 when the models agree, 1 when they disagree, 2 on an error.
"""

from __future__ import annotations

import json

from bnkit.cli import CLIError
from bnkit.cli.options import add_reading_options, parse_seed, parse_shape, parse_tolerance, reading
from bnkit.cli.progress import Steps
from bnkit.streams import own_stderr

NAME = "compare"
HELP = "Run two models (Keras or PyTorch) on the same input, layer by layer, and name why they disagree."


def add_arguments(parser) -> None:
    parser.add_argument(
        "model_a", metavar="A", help="model file (.keras, .h5, .pt2, .onnx), SavedModel folder or module:factory"
    )
    parser.add_argument("model_b", metavar="B", help="the model to compare with A, same forms")
    parser.add_argument("--weights-a", metavar="FILE", help="weights (.pt or .safetensors) for a factory A")
    parser.add_argument("--weights-b", metavar="FILE", help="weights (.pt or .safetensors) for a factory B")
    parser.add_argument(
        "--input-shape",
        metavar="SHAPE",
        type=parse_shape,
        help="input shape without the batch dimension, in A's layout (H,W,C for Keras, C,H,W for PyTorch and ONNX), "
        "e.g. 64,64,1; default: the Keras model's input shape",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=2,
        metavar="N",
        help="batch size (default 2: the smallest with batch statistics, quick on large networks)",
    )
    parser.add_argument("--seed", type=parse_seed, default=0, help="seed of the random normal input (default 0)")
    parser.add_argument(
        "--training",
        action="store_true",
        help="compare one training step (batch statistics, running-statistics updates) instead of inference",
    )
    parser.add_argument(
        "--atol",
        type=parse_tolerance,
        default=1e-5,
        help="absolute tolerance (default 1e-5), on top of the float rounding measured for each layer",
    )
    parser.add_argument("--rtol", type=parse_tolerance, default=1e-4, help="relative tolerance (default 1e-4)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--all",
        action="store_true",
        help="show every paired layer (a large network shows the rows around each divergence by default)",
    )
    parser.add_argument("--report", metavar="HTML", help="also write a self-contained HTML report here")
    parser.add_argument("--force", action="store_true", help="replace an existing --report file")
    add_reading_options(parser)


def _input_shape(args, model_a, model_b, framework_a: str, framework_b: str) -> tuple[int, ...]:
    if args.input_shape:
        return args.input_shape
    for model, framework in ((model_a, framework_a), (model_b, framework_b)):
        if framework == "keras":
            shape = getattr(model, "input_shape", None)
            if isinstance(shape, list):
                shape = shape[0] if len(shape) == 1 else None
            shape = tuple(shape[1:]) if shape and all(isinstance(d, int) for d in shape[1:]) else None
        elif framework == "onnx":  # the graph input's declared dimensions, where all but the batch are fixed
            shape = _onnx_input_dims(model)
            shape = shape[1:] if shape and all(isinstance(d, int) for d in shape[1:]) else None
        else:  # a .pt2 program records its example input's shape
            from bnkit.summarize._torch import _recorded_shapes

            shapes = _recorded_shapes(model)
            shape = shapes[0] if shapes and len(shapes) == 1 else None
        if shape is None:
            continue
        if _layout(framework) != _layout(framework_a) and len(shape) in (2, 3, 4):  # to A's layout
            shape = (shape[-1], *shape[:-1]) if framework == "keras" else (*shape[1:], shape[0])
        return tuple(shape)
    raise CLIError(
        "cannot tell the input shape of a PyTorch or ONNX model: give --input-shape in A's layout, e.g. 1,64,64"
    )


def _layout(framework: str) -> str:
    """Channels last (Keras) or first (PyTorch, ONNX)."""
    return "keras" if framework == "keras" else "torch"


def _onnx_input_dims(model) -> tuple | None:
    """The dimensions an ONNX graph declares for its one data input (None for a named or unknown one)."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or not inputs[0].type.tensor_type.HasField("shape"):
        return None
    dims = inputs[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)


def _check_onnx_input(model, shape, batch: int, what: str) -> int:
    """An ONNX model's declared input takes the batch (fixed dimensions must match); the bytes of a run
    whose every node output is kept, estimated as the input's size per node."""
    declared = _onnx_input_dims(model)
    wanted = (batch, *shape)
    if declared is not None:
        shown = tuple("?" if d in (None, 0) else d for d in declared)
        if len(declared) != len(wanted) or any(
            d not in (None, 0) and d != w for d, w in zip(declared[1:], wanted[1:], strict=True)
        ):
            raise CLIError(f"{what}: the ONNX graph's input is declared {shown}, not {wanted}: give --input-shape")
        if declared[0] not in (None, 0) and declared[0] != batch:  # a TorchScript export fixes the batch
            raise CLIError(f"{what}: the ONNX graph's input is declared {shown}: give --batch-size {declared[0]}")
    size = 4 * batch
    for d in shape:
        size *= int(d)
    return size * (len(model.graph.node) + 1)


def _check_input(model_a, model_b, framework_a: str, framework_b: str, shape, batch: int) -> None:
    """Both models take the batch, and running both (their outputs kept layer by layer) fits in memory."""
    from bnkit.inputs import check_fits, check_model_input

    shape_b = shape
    if _layout(framework_a) != _layout(framework_b) and len(shape) in (2, 3, 4):  # A's layout to B's, as compare does
        shape_b = (*shape[1:], shape[0]) if framework_a != "keras" else (shape[-1], *shape[:-1])
    what = "comparing the models"
    nbytes = 0
    for model, framework, model_shape, label in (
        (model_a, framework_a, shape, "A"),
        (model_b, framework_b, shape_b, "B"),
    ):
        if framework == "onnx":
            nbytes += _check_onnx_input(model, model_shape, batch, f"{what} (model {label})")
        else:
            nbytes += check_model_input(model, model_shape, batch, what=f"{what} (model {label})")
    check_fits(nbytes, f"{what} on a batch of {batch} of shape {shape}")


def run(args) -> int:
    import numpy as np
    from rich.console import Console

    from bnkit.io import ModelFileError, framework_of, load_model

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.report:
        from bnkit.io import check_writable

        try:
            check_writable(args.report, args.force)
        except ModelFileError as e:
            raise CLIError(str(e)) from None
    with Steps(2, enabled=not args.json) as steps:
        steps.step("loading the models")
        model_a = load_model(args.model_a, args.weights_a, **reading(args))
        model_b = load_model(args.model_b, args.weights_b, **reading(args))
        framework_a, framework_b = framework_of(model_a), framework_of(model_b)
        shape = _input_shape(args, model_a, model_b, framework_a, framework_b)
        _check_input(model_a, model_b, framework_a, framework_b, shape, args.batch_size)
        x = np.random.default_rng(args.seed).normal(0.0, 1.0, (args.batch_size, *shape)).astype(np.float32)

        from bnkit.diagnose.compare import compare

        steps.step("running both models layer by layer")
        try:
            report = compare(model_a, model_b, x, training=args.training, atol=args.atol, rtol=args.rtol)
        except (ValueError, TypeError, RuntimeError) as e:
            message = " ".join(str(e).split())
            raise CLIError(f"cannot run the models on input {tuple(x.shape)}: {message[:300]}") from None
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        report.render(Console(), all_rows=args.all)
    if args.report:
        try:
            path = report.to_html(args.report, force=args.force)
        except (FileExistsError, FileNotFoundError, IsADirectoryError) as e:
            raise CLIError(str(e)) from None
        if not args.json:
            print(f"HTML report written to {path}", file=own_stderr())
    return 0 if report.agree else 1
