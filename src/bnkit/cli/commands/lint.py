"""``bnkit lint FILE``: batch normalization pitfalls in one model; exit status 1 when an error is found."""

from __future__ import annotations

import argparse
import json
import sys

NAME = "lint"
HELP = "Find batch normalization pitfalls in a model (exit status 1 when errors are found)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bnkit.cli.options import add_model, parse_shapes

    add_model(parser)
    parser.add_argument(
        "--for-inference",
        action="store_true",
        help="the model is about to serve predictions: any batch norm in training mode is an error",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="the training batch size (the serving one with --for-inference): checks batch-of-one",
    )
    parser.add_argument(
        "--input-shape",
        metavar="SHAPE",
        type=parse_shapes,
        help="input shape without the batch dimension (e.g. 1,64,64): lets batch-of-one count values per channel",
    )
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")


def run(args: argparse.Namespace) -> int:
    from bnkit.cli import CLIError
    from bnkit.cli.options import reading
    from bnkit.cli.progress import Steps
    from bnkit.diagnose.lint import lint
    from bnkit.io import load_model

    if args.batch_size is not None and args.batch_size < 1:
        raise CLIError(f"--batch-size must be a positive int, got {args.batch_size}")
    with Steps(2, enabled=not args.json) as steps:
        steps.step(f"loading {args.model}")
        model = load_model(args.model, args.weights, **reading(args))
        if args.input_shape:
            from bnkit.io import framework_of

            if framework_of(model) == "torch":  # lint runs it once on zeros to count values per channel
                from bnkit.inputs import check_model_input

                check_model_input(model, args.input_shape, 1, what="linting the model")
        steps.step("looking for batch normalization pitfalls")
        try:
            findings = lint(
                model, for_inference=args.for_inference, batch_size=args.batch_size, input_shape=args.input_shape
            )
        except (ValueError, TypeError) as e:
            raise CLIError(" ".join(str(e).split())) from e
    errors = sum(f.severity == "error" for f in findings)
    if args.json:
        json.dump({"model": args.model, "findings": [f.to_dict() for f in findings]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print(args.model, findings)
    return 1 if errors else 0


def _print(model: str, findings, repeat: int = 3) -> None:
    """One line per finding; past ``repeat`` findings of one code, the rest as one line naming their
    layers (``--json`` lists every finding in full)."""
    from rich.console import Console
    from rich.markup import escape

    console = Console(highlight=False)
    style = {"error": "bold red", "warning": "yellow", "info": "cyan"}
    by_code: dict[str, list] = {}
    for f in findings:
        by_code.setdefault(f.code, []).append(f)
    for f in findings:
        same = by_code[f.code]
        position = same.index(f)
        if position < repeat:
            console.print(
                f"{escape(model)}: [{style[f.severity]}]{f.severity}[/] [bold]{f.code}[/] "
                f"[dim]{escape(f.layer)}[/]: {escape(f.message)}"
            )
        elif position == repeat:
            rest = same[repeat:]
            layers = ", ".join(r.layer for r in rest[:8]) + (f" and {len(rest) - 8} more" if len(rest) > 8 else "")
            console.print(
                f"{escape(model)}: [{style[f.severity]}]{f.severity}[/] [bold]{f.code}[/] the same at "
                f"{len(rest)} more layer{'s' if len(rest) != 1 else ''}: [dim]{escape(layers)}[/] "
                "(--json lists every finding)"
            )
    counts = {s: sum(f.severity == s for f in findings) for s in ("error", "warning", "info")}
    if findings:
        console.print(", ".join(f"{n} {s}{'' if n == 1 else 's'}" for s, n in counts.items() if n))
    else:
        console.print(f"{escape(model)}: no batch normalization pitfalls found")
