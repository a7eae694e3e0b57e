"""``bnkit summary FILE``: layers, output shapes and parameter counts in Keras' and PyTorch's accountings."""

from __future__ import annotations

import argparse
import json
import sys

from bnkit.cli.options import add_model, parse_shapes, reading

NAME = "summary"
HELP = "Show a model's layers and parameter counts, counted both as Keras and as PyTorch do."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model(parser)
    parser.add_argument(
        "--input-shape",
        metavar="SHAPE",
        type=parse_shapes,
        help="input shape without the batch dimension, in the model's layout, e.g. 64,64,1 (Keras) or 1,64,64 "
        "(PyTorch); several inputs separated by ';'. Needed for a PyTorch factory's output shapes",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from bnkit.cli import CLIError
    from bnkit.cli.progress import Steps
    from bnkit.io import framework_of, load_model
    from bnkit.summarize import render, summary

    with Steps(2, enabled=not args.json) as steps:
        steps.step(f"loading {args.model}")
        model = load_model(args.model, args.weights, **reading(args))
        if args.input_shape and framework_of(model) == "torch":  # summary runs it once on zeros
            from bnkit.inputs import check_model_input

            check_model_input(model, args.input_shape, 1, what="summarising the model")
        steps.step("counting parameters and measuring output shapes")
        try:
            result = summary(model, args.input_shape)
        except (ValueError, TypeError) as e:
            raise CLIError(" ".join(str(e).split())) from e
    if framework_of(model) in ("torch", "onnx") and ":" not in args.model:
        result = replace(result, name=Path(args.model).stem)  # an exported program has no class name of its own
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        from rich.console import Console

        render(result, Console())
    return 0
