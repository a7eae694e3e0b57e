"""``bnkit convert IN OUT``: a Keras model to PyTorch or back, verified before it is written.

The direction follows IN: a Keras model (``.keras``, ``.h5``, or a factory returning one)
becomes a PyTorch file (``.pt2`` torch.export program, or ``.pt``/``.safetensors`` weights);
a PyTorch model (``.pt2``, or ``package.module:factory`` with ``--weights``) becomes ``.keras``
or ``.h5`` (a Keras 2 file that tf-keras 2 loads too), or, for an OUT without a suffix, a tf-keras 2
SavedModel folder (as tf-keras 2's ``model.save("dir")`` writes it; saved by tf-keras 2 in a
subprocess, see :mod:`bnkit.formats.saved_model_write`). A Keras model may also be written as
``.h5`` or a SavedModel folder as it is (Keras 3 to Keras 2). Both models are run on the same random
batch in inference before OUT is written; an ``.h5`` or a SavedModel folder is also read back and
run against the model before it is renamed into place. OUT is written atomically and an existing
OUT is never replaced without ``--force`` (a folder only when it is a SavedModel folder).
"""

from __future__ import annotations

import json
import re

from bnkit.cli import CLIError
from bnkit.cli.options import add_reading_options, parse_shape, reading
from bnkit.cli.progress import Steps
from bnkit.streams import own_stderr

NAME = "convert"
HELP = "Convert a model between Keras and PyTorch (batch-norm semantics included) and verify it."

_TORCH_SUFFIXES = (".pt2", ".pt", ".pth", ".safetensors")
_KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
_KERAS2_SUFFIXES = (".h5", ".hdf5")  # written as tf-keras 2 writes them, read back before the rename
# Relative to the largest output (max |difference| / max |source output|): float32 inference of the
# same weights in two frameworks sums in another order, a few ulp per layer; exact conversions of
# real networks stay within 4e-6 (docs/conversion.md), deep ones accumulate more. Relative, as an
# absolute bar would pass anything on a network whose outputs are tiny and fail large logits.
_PARITY_TOLERANCE = 1e-4


def add_arguments(parser) -> None:
    parser.add_argument(
        "input", metavar="IN", help="model to convert: .keras, .h5, .pt2, .onnx, SavedModel folder or module:factory"
    )
    parser.add_argument(
        "output", metavar="OUT",
        help="where to write: .pt2/.pt/.safetensors (from Keras) or .keras/.h5 or a SavedModel folder "
        "(no suffix; to Keras)",
    )
    parser.add_argument("--weights", metavar="FILE", help="weights (.pt or .safetensors) for a factory spec")
    parser.add_argument(
        "--semantics",
        choices=("source", "target"),
        default="source",
        help="batch norms keep the source framework's training semantics (default) or become the "
        "target framework's native layer with translated momentum",
    )
    parser.add_argument(
        "--input-shape",
        metavar="SHAPE",
        type=parse_shape,
        help="input shape without the batch, in PyTorch's layout (C,H,W), e.g. 1,64,64; "
        "needed for a PyTorch factory, read from the file otherwise",
    )
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--json", action="store_true", help="print a machine-readable report")
    parser.add_argument(
        "--opset", type=int, default=None, help="ONNX opset of an OUT.onnx (9 to the newest onnx defines; default 17)"
    )
    parser.add_argument(
        "--training", action="store_true",
        help="OUT.onnx: batch norms in training mode (training_mode=1, updated running statistics as outputs)",
    )  # fmt: skip
    add_reading_options(parser)


def _direction(output: str) -> str:
    suffix = _suffix(output)
    if suffix in _TORCH_SUFFIXES:
        return "torch"
    if suffix in _KERAS_SUFFIXES or not suffix:  # no suffix: a tf-keras 2 SavedModel folder
        return "keras"
    raise CLIError(
        f"{output}: unknown output format {suffix or '(no suffix)'!r}; "
        "expected .pt2, .pt or .safetensors (Keras to PyTorch) or .keras or .h5 (to Keras)"
    )


def _torch_input_shape(model, framework: str, given):
    """The source model's input shape in PyTorch's layout, without the batch."""
    if given is not None:
        return given
    if framework == "keras":
        shape = tuple(model.inputs[0].shape[1:])
        if any(d is None for d in shape):
            raise CLIError(f"the Keras model's input shape {shape} is not fully known; give --input-shape")
        return shape if len(shape) <= 1 or _channels_first(model, framework) else (shape[-1], *shape[:-1])
    for node in getattr(getattr(model, "graph", None), "nodes", ()):
        if node.op == "placeholder" and hasattr(node.meta.get("val"), "shape"):
            return tuple(int(d) for d in node.meta["val"].shape[1:])
    raise CLIError("the PyTorch model's input shape is unknown: give --input-shape in (C,H,W) order")


def _check_input(model, framework: str, torch_shape) -> None:
    """The source model takes the verification batch (2 samples), and both models' runs fit in memory."""
    from bnkit.inputs import check_model_input

    shape = torch_shape
    if framework == "keras" and len(shape) > 1 and not _channels_first(model, framework):  # PyTorch's layout
        shape = (*shape[1:], shape[0])
    check_model_input(model, shape, 2, copies=2, what="verifying the conversion")


def _channels_first(model, framework: str) -> bool:
    """A channels_first Keras model: its input is in PyTorch's layout already, as its conversion's."""
    from bnkit.keras.data_format import is_channels_first

    return framework == "keras" and is_channels_first(model)


def _batch_norms(model, framework: str) -> list[dict]:
    rows = []
    if framework == "keras":
        from bnkit.keras import keras

        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                convention = getattr(layer, "convention", None)
                rows.append(
                    {
                        "name": layer.name,
                        "type": type(layer).__name__,
                        "convention": convention.name if convention is not None else "keras",
                        "momentum": layer.momentum,
                        "eps": layer.epsilon,
                    }
                )
        return rows
    from torch import nn

    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            convention = getattr(module, "convention", None)
            rows.append(
                {
                    "name": name,
                    "type": type(module).__name__,
                    "convention": convention.name if convention is not None else "torch",
                    "momentum": module.momentum,
                    "eps": module.eps,
                }
            )
    return rows


def _key(name: str) -> str:
    """A layer's name as the converter spells it on the other side (``block.bn1`` -> ``block_bn1``)."""
    key = re.sub(r"\W", "_", name)
    return f"_{key}" if key[:1].isdigit() else key


def _max_difference(source, target, source_framework: str, torch_shape) -> tuple[float, float]:
    """max |target - source| over the outputs on a random batch in inference, and max |source|."""
    import numpy as np
    import torch

    from bnkit.keras import keras

    x = torch.randn(2, *torch_shape, generator=torch.Generator().manual_seed(0))
    keras_model, torch_model = (source, target) if source_framework == "keras" else (target, source)
    same_layout = _channels_first(source, source_framework)  # a channels_first Keras model and its conversion
    x_keras = np.moveaxis(x.numpy(), 1, -1) if x.dim() > 2 and not same_layout else x.numpy()
    was_training = torch_model.training
    torch_model.eval()
    try:
        with torch.no_grad():
            t_out = torch_model(x)
    finally:
        torch_model.train(was_training)
    k_out = keras_model(x_keras, training=False)
    t_list = list(t_out) if isinstance(t_out, (tuple, list)) else [t_out]
    k_list = list(k_out) if isinstance(k_out, (tuple, list)) else [k_out]
    worst = largest = 0.0
    for t, k in zip(t_list, k_list, strict=True):
        t_np = t.detach().numpy()
        k_np = np.asarray(keras.ops.convert_to_numpy(k))
        if t_np.ndim > 2 and not same_layout:
            t_np = np.moveaxis(t_np, 1, -1)
        if t_np.size:
            worst = max(worst, float(np.max(np.abs(t_np - k_np))))
            largest = max(largest, float(np.max(np.abs(t_np if source_framework == "torch" else k_np))))
    return worst, largest


def _relative(difference: float, largest: float) -> float:
    """``difference / largest``; an all-zero source output compares absolutely (nan stays nan)."""
    return difference / largest if largest > 0 else difference


def _suffix(path: str) -> str:
    from pathlib import Path

    return Path(path).suffix.lower()


def _write(model, args, torch_shape, keras2: bool):
    """Write OUT; for a Keras 2 ``.h5`` or a SavedModel folder, what reading it back gave
    (:class:`bnkit.formats.keras_h5.RoundTrip`)."""
    from pathlib import Path

    from bnkit.io import ModelFileError, save_model

    try:
        if keras2:  # save_model's own writer, called for its read-back figures
            if _suffix(args.output):
                from bnkit.formats.keras_h5 import write
            else:
                from bnkit.formats.saved_model_write import write

            return write(model, Path(args.output), force=args.force, input_shape=torch_shape)
        save_model(model, args.output, force=args.force, input_shape=torch_shape)
    except ModelFileError as e:
        raise CLIError(str(e)) from None
    return None


def run(args) -> int:
    import warnings

    from bnkit.io import check_model_output, framework_of, load_model

    # torch.export's own deprecation noise, not the user's concern
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    if _suffix(args.output) == ".onnx":  # either framework to ONNX, batch norms kept as nodes
        from bnkit.cli.commands._convert_onnx import run as to_onnx

        return to_onnx(args)
    if _suffix(args.input) == ".onnx":  # ONNX to either framework, verified against onnxruntime
        from bnkit.cli.commands._convert_from_onnx import run as from_onnx

        return from_onnx(args)
    target_framework = _direction(args.output)
    keras2 = _suffix(args.output) in _KERAS2_SUFFIXES or not _suffix(args.output)  # read back before the rename
    what = "a Keras 2 .h5" if _suffix(args.output) else "a tf-keras 2 SavedModel folder"
    given_shape = args.input_shape
    with Steps(4, enabled=not args.json) as steps:
        steps.step(f"loading {args.input}")
        check_model_output(args.output, args.force)  # refuse before the slow part
        model = load_model(args.input, args.weights, **reading(args))
        source_framework = framework_of(model)
        resave = source_framework == target_framework == "keras" and keras2  # Keras 3 -> a Keras 2 .h5
        if source_framework == target_framework and not resave:
            raise CLIError(
                f"{args.input} is already a {'Keras' if source_framework == 'keras' else 'PyTorch'} model; "
                f"{args.output} asks for the same framework"
                + (
                    " (a Keras model is written as a Keras 2 .h5, or a SavedModel folder, as it is)"
                    if source_framework == "keras"
                    else ""
                )
            )
        torch_shape = _torch_input_shape(model, source_framework, given_shape)
        _check_input(model, source_framework, torch_shape)

        from bnkit.convert import UnsupportedLayerError, keras_to_torch, torch_to_keras

        steps.step(f"converting to {'PyTorch' if target_framework == 'torch' else 'Keras'}")
        try:
            with warnings.catch_warnings(record=True) as caught:  # shown as one line each, below
                warnings.simplefilter("always", UserWarning)
                if resave:
                    converted = model
                elif source_framework == "keras":
                    converted = keras_to_torch(model, semantics=args.semantics)
                else:
                    converted = torch_to_keras(model, torch_shape, semantics=args.semantics)
        except UnsupportedLayerError as e:
            raise CLIError(str(e)) from None
        steps.step("verifying on a random batch")
        if resave:  # the same model: the check is the file read back (below)
            difference = largest = 0.0
        else:
            try:
                difference, largest = _max_difference(model, converted, source_framework, torch_shape)
            except Exception as e:  # a shape the model does not take, typically
                raise CLIError(f"could not run the models on a batch of shape {(2, *torch_shape)}: {e}") from None
        relative = _relative(difference, largest)
        if not relative <= _PARITY_TOLERANCE:
            raise CLIError(
                f"the converted model disagrees with {args.input}: max |difference| {difference:.3g} is "
                f"{relative:.3g} of the largest output {largest:.3g} (tolerance {_PARITY_TOLERANCE:g}) on a random "
                "batch; nothing was written",
                status=1,
            )
        steps.step(f"writing {args.output}" + (" and reading it back" if keras2 else ""))
        read_back = _write(converted, args, torch_shape, keras2)
        if resave:
            difference, largest, relative = read_back.difference, read_back.largest, read_back.relative

    for warning in caught:
        if issubclass(warning.category, UserWarning):
            print(f"bnkit convert: warning: {' '.join(str(warning.message).split())}", file=own_stderr())
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    converted_bns = {_key(row["name"]): row for row in _batch_norms(converted, target_framework)}
    sources = [] if resave else _batch_norms(model, source_framework)  # the same layers: no table
    pairs = [(row, converted_bns.get(_key(row["name"]))) for row in sources]
    from bnkit.keras import backend_name

    report = {
        "input": str(args.input),
        "output": str(args.output),
        "from": source_framework,
        "to": target_framework,
        "semantics": args.semantics,
        "keras_backend": backend_name(),
        "input_shape_torch": list(torch_shape),
        "max_abs_difference": difference,
        "max_abs_output": largest,
        "relative_difference": relative,
        "tolerance": _PARITY_TOLERANCE,  # on relative_difference
        "batch_norms": [{"source": a, "target": b} for a, b in pairs],
    }
    if read_back is not None:  # the written .h5 or SavedModel, read back by bnkit, against the model written
        from bnkit.formats.keras_h5 import ROUND_TRIP_TOLERANCE

        report["read_back"] = {
            "written_as": what,
            "max_abs_difference": read_back.difference,
            "max_abs_output": read_back.largest,
            "relative_difference": read_back.relative,
            "tolerance": ROUND_TRIP_TOLERANCE,
        }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    _render(report)
    return 0


def _render(report: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    names = {"keras": "Keras", "torch": "PyTorch"}
    console = Console()
    console.print(
        f"[bold]{escape(report['input'])}[/] ({names[report['from']]}) → [bold]{escape(report['output'])}[/] "
        f"({names[report['to']]}), batch-norm semantics: {report['semantics']}, Keras on the "
        f"{report['keras_backend']} backend"
    )
    if report["batch_norms"]:
        table = Table(title="Batch normalization", title_justify="left")
        for column in ("layer", "source", "converted", "momentum", "eps"):
            table.add_column(column)
        for row in report["batch_norms"]:
            a, b = row["source"], row["target"]
            if b is None:
                continue
            table.add_row(  # Text: names and types come from the model, they are not markup
                Text(a["name"]),
                Text(f"{a['type']} ({a['convention']})"),
                Text(f"{b['type']} ({b['convention']})"),
                f"{a['momentum']} → {b['momentum']}",
                f"{a['eps']:g} → {b['eps']:g}",
            )
        console.print(table)
    if report["from"] != report["to"]:
        console.print(
            f"verified on a random batch in inference: max |difference| {report['max_abs_difference']:.2g}, "
            f"{report['relative_difference']:.2g} of the largest output {report['max_abs_output']:.2g} "
            f"(tolerance {report['tolerance']:g})"
        )
    back = report.get("read_back")
    if back is not None:
        console.print(
            f"read back from {escape(report['output'])} ({back['written_as']}) and run on a random batch in inference: "
            f"max |difference| {back['max_abs_difference']:.2g}, {back['relative_difference']:.2g} of the "
            f"largest output {back['max_abs_output']:.2g} (tolerance {back['tolerance']:g})"
        )
