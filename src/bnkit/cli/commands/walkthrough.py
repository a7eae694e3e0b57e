"""``bnkit walkthrough``: the seed network ported from Keras to PyTorch, what breaks, why, and the fix."""

from __future__ import annotations

import argparse

from bnkit.cli.options import parse_seed

NAME = "walkthrough"
HELP = (
    "Walk through the bundled seed network: both summaries, a hand port that disagrees with Keras, "
    "the causes bnkit finds, and the fix (a conversion that agrees)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="keep the files it writes (seed.keras, seed.pt2) in DIR (default: a temporary folder, removed)",
    )
    parser.add_argument("--force", action="store_true", help="replace existing files in --out")
    parser.add_argument("--batch", type=int, default=8, metavar="N", help="batch size of the random input (default 8)")
    parser.add_argument("--seed", type=parse_seed, default=0, help="random seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print the steps (summaries, reports) as JSON")


def run(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from rich.console import Console
    from rich.panel import Panel
    from rich.rule import Rule

    from bnkit.cli import CLIError
    from bnkit.io import check_writable
    from bnkit.summarize import render
    from bnkit.walkthrough import run_walkthrough

    if args.batch < 2:
        raise CLIError(f"--batch must be at least 2 (batch statistics need 2 values per channel), got {args.batch}")
    console = Console()
    if args.out:
        _check_out(Path(args.out), args.force)
    with tempfile.TemporaryDirectory(prefix="bnkit-walkthrough-") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        if args.out:
            for name in ("seed.keras", "seed.pt2"):
                check_writable(out / name, args.force)
                if args.force:
                    (out / name).unlink(missing_ok=True)
        from bnkit.cli.progress import Steps

        with Steps(1, enabled=not args.json) as progress:
            progress.step("building the seed network and running the comparisons")
            steps = run_walkthrough(out, batch=args.batch, seed=args.seed)
        final = steps[-1].report
        agree = final is not None and final.agree
        if args.json:
            import json

            print(json.dumps({"agree": agree, "steps": [_step_dict(step, bool(args.out)) for step in steps]}, indent=2))
            return 0 if agree else 1
        for step in steps:
            console.print(Rule(f"[bold]{step.title}"))
            console.print(step.text)
            if step.code:
                console.print(f"[dim]$[/dim] [cyan]{step.code}[/cyan]")
            if step.summary is not None:
                render(step.summary, console)
            if step.report is not None:
                step.report.render(console)
            if step.files and args.out:
                console.print("wrote " + ", ".join(step.files))
        verdict = "[green]agree[/green]" if agree else "[red]still disagree[/red]"
        console.print(
            Panel(
                f"After bnkit.convert the Keras model and the PyTorch model {verdict}. "
                "Try it on your own files: bnkit summary, bnkit compare, bnkit convert, bnkit lint.",
                title="Done",
            )
        )
    return 0 if agree else 1


def _step_dict(step, kept_files: bool) -> dict:
    return {
        "title": step.title,
        "text": step.text,
        "code": step.code,
        "summary": step.summary.to_dict() if step.summary is not None else None,
        "report": step.report.to_dict() if step.report is not None else None,
        "files": list(step.files) if kept_files else [],
    }


def _check_out(out, force: bool) -> None:
    """--out is a folder (made if missing) that takes both files; checked before the slow part."""
    from bnkit.cli import CLIError
    from bnkit.io import ModelFileError, check_writable

    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: is a file, not a folder; give the folder to write seed.keras and seed.pt2 in")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"--out {out}: cannot make this folder ({e.strerror or e})") from None
    try:
        for name in ("seed.keras", "seed.pt2"):
            check_writable(out / name, force)
    except ModelFileError as e:
        raise CLIError(str(e)) from None
