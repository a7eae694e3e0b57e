"""``bnkit explain``: one batch-norm layer in PyTorch's and Keras' terms, and what differs.

The data comes from :func:`bnkit.explain.explain`; this module only parses options and renders
it with ``rich`` (or prints it as JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import math

from bnkit.cli import CLIError
from bnkit.cli.options import parse_seed

NAME = "explain"
HELP = (
    "Explain a batch norm in PyTorch's and Keras' terms: equivalent settings, the parameter counts each "
    "reports, and how one training and one inference step differ (default: Keras "
    "BatchNormalization(momentum=0.15) on 32 channels)."
)

SEED_KERAS_MOMENTUM = 0.15  # the seed example's BatchNormalization(momentum=0.15)
_BYTES_PER_VALUE = 64  # peak memory of explain per value of the batch (measured: ~58 at 64 and 128 channels)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", choices=("keras", "torch", "onnx", "flax"), default="keras",
                        help="the framework whose terms the layer is given in (default: keras); onnx "
                             "(BatchNormalization) and flax (BatchNorm) are explained against torch")
    parser.add_argument("--channels", type=int, default=32, help="number of channels C (default: 32)")
    parser.add_argument("--momentum", type=float, default=None,
                        help="momentum in the --from framework's meaning (default: 0.15, the seed example, "
                             "for keras; 0.1 for torch, 0.9 for onnx, 0.99 for flax)")
    parser.add_argument("--eps", type=float, default=None,
                        help="epsilon (default: the --from framework's, 1e-3 keras, 1e-5 torch)")
    parser.add_argument("--no-center", action="store_true",
                        help="keras: no learnable beta (center=False); flax: use_bias=False")
    parser.add_argument("--no-scale", action="store_true",
                        help="keras: no learnable gamma (scale=False); flax: use_scale=False")
    parser.add_argument("--no-affine", action="store_true", help="torch: affine=False")
    parser.add_argument("--no-track-running-stats", action="store_true",
                        help="torch: track_running_stats=False")
    parser.add_argument("--renorm", action="store_true",
                        help="keras: batch renormalization (renorm=True); torch.nn has none, bnkit.torch does")
    parser.add_argument("--batch", type=int, default=8, help="batch size N of the random batch (default: 8)")
    parser.add_argument("--size", type=int, default=8, help="height = width of the random batch (default: 8)")
    parser.add_argument("--seed", type=parse_seed, default=0, help="seed of the random batch (default: 0)")
    parser.add_argument("--json", action="store_true", help="print the data as JSON instead of tables")


def _check_args(args) -> None:
    if args.channels < 1:
        raise CLIError(f"--channels must be a positive integer, got {args.channels}")
    if args.batch < 1:
        raise CLIError(f"--batch must be a positive integer, got {args.batch}")
    if args.size < 1:
        raise CLIError(f"--size must be a positive integer, got {args.size}")
    if args.momentum is not None and not 0.0 <= args.momentum <= 1.0:
        raise CLIError(f"--momentum must be in [0, 1], got {args.momentum:g}")
    if args.eps is not None and not 0 < args.eps < math.inf:
        raise CLIError(f"--eps must be positive and finite, got {args.eps:g}")
    if args.batch * args.size * args.size < 2:
        raise CLIError("a training step needs at least 2 values per channel: raise --batch or --size")
    from bnkit.inputs import check_fits

    # each layout and convention keeps its copies, some in float64: about 60 bytes a value, measured
    values = args.batch * args.channels * args.size * args.size
    check_fits(values * _BYTES_PER_VALUE, f"a batch of {args.batch}x{args.channels}x{args.size}x{args.size}")
    if args.source == "keras" and (args.no_affine or args.no_track_running_stats):
        flag = "--no-affine" if args.no_affine else "--no-track-running-stats"
        raise CLIError(f"{flag} is a torch option; with --from keras use --no-center / --no-scale")
    if args.source in ("onnx", "flax") and (args.no_affine or args.no_track_running_stats or args.renorm):
        flag = "--no-affine" if args.no_affine else "--no-track-running-stats" if not args.renorm else "--renorm"
        raise CLIError(f"{flag} is not an option of {args.source}'s batch norm")
    if args.source == "onnx" and (args.no_center or args.no_scale):
        raise CLIError("ONNX's BatchNormalization always has scale and B (required inputs): "
                       "--no-center / --no-scale are keras and flax options")
    if args.source == "torch" and (args.no_center or args.no_scale or args.renorm):
        flag = "--no-center" if args.no_center else "--no-scale" if args.no_scale else "--renorm"
        if flag == "--renorm":
            raise CLIError("--renorm is Keras' batch renormalization (torch.nn has none): use --from keras")
        raise CLIError(f"{flag} is a keras option; with --from torch use --no-affine")


def run(args) -> int:
    _check_args(args)
    from bnkit.explain import explain

    if args.source == "keras":
        momentum = SEED_KERAS_MOMENTUM if args.momentum is None else args.momentum
        center, scale = not args.no_center, not args.no_scale
    elif args.source in ("onnx", "flax"):
        from bnkit.conventions import get_convention

        momentum = get_convention(args.source).momentum if args.momentum is None else args.momentum
        center, scale = not args.no_center, not args.no_scale
    else:
        from bnkit.conventions import TORCH

        momentum = TORCH.momentum if args.momentum is None else args.momentum
        center = scale = not args.no_affine
    from bnkit.cli.progress import Steps

    try:
        with Steps(1, enabled=not args.json) as steps:
            steps.step("running one training and one inference step in both frameworks")
            result = explain(
                source=args.source,
                channels=args.channels,
                momentum=momentum,
                eps=args.eps,
                center=center,
                scale=scale,
                track_running_stats=not args.no_track_running_stats,
                input_shape=(args.batch, args.channels, args.size, args.size),
                seed=args.seed,
                renorm=args.renorm,
            )
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        render(result)
    return 0


# --------------------------------------------------------------------------- rendering

_FRAMEWORK = {"keras": "Keras", "torch": "PyTorch", "onnx": "ONNX", "flax": "Flax"}


def _num(value: float) -> str:
    return repr(float(value))


def _diff(max_abs: float, relative: float) -> str:
    if max_abs == 0:
        return "[green]0 (bit-equal)[/]"
    colour = "green" if relative < 1e-5 else "yellow" if relative < 1e-2 else "red"
    return f"[{colour}]{max_abs:.3g}[/] ({relative:.2%} of the largest value)"


def render(result, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.padding import Padding
    from rich.table import Table

    console = console or Console()

    def say(text: str) -> None:  # plain text (it holds brackets), wrapped under an indent
        console.print(Padding(escape(text), (0, 0, 0, 2), expand=False))

    given = result.given
    n = result.values_per_channel
    console.print(f"[bold]bnkit explain[/]: {escape(given.code)} on {result.channels} channels, "
                  f"in {_FRAMEWORK[given.framework]}' terms".replace("PyTorch'", "PyTorch's")
                  .replace("ONNX'", "ONNX's").replace("Flax'", "Flax's"))

    # settings, side by side
    table = Table(title="Settings in both conventions", title_justify="left")
    table.add_column("")
    for s in result.settings:
        table.add_column(f"{s.role}: {_FRAMEWORK[s.framework]}", overflow="fold")
    rows = [
        ("layer", lambda s: s.code),
        ("eps", lambda s: _num(s.eps)),
        ("momentum", lambda s: _num(s.momentum)),
        ("weighs", lambda s: "new batch" if s.framework == "torch" else "old running value"),
        ("batch weight in update", lambda s: f"{s.new_weight:.4g}"),
        ("learnable", lambda s: ", ".join([p for p, on in (("gamma", s.scale), ("beta", s.center)) if on])
         or "none"),
        ("running variance", lambda s: "not kept" if not s.track_running_stats
         else "biased" if s.running_var_estimator == "biased" else f"unbiased (x {n}/{n - 1})"),
        ("layout", lambda s: s.layout),
        ("bnkit layer", lambda s: s.bnkit_code),
        ("same as given", lambda s: "[green]yes[/]" if s.same_as_given else "[red]no[/]"),
    ]
    for label, cell in rows:
        table.add_row(label, *(escape(cell(s)) if label != "same as given" else cell(s)
                               for s in result.settings))
    console.print(table)
    for note in result.notes[:2]:
        say(f"why: {note}")
    console.print()

    # parameter counts
    # one column per framework, as the settings above: it keeps every figure whole at 80 columns
    table = Table(title="Parameter count each framework reports", title_justify="left")
    table.add_column("")
    for c in result.counts:
        table.add_column(_FRAMEWORK[c.framework], overflow="fold")
    rows = [
        ("reported by", lambda c: escape(c.reported_by)),
        ("total", lambda c: f"{c.total:,}"),
        ("trainable", lambda c: f"{c.trainable:,}"),
        ("non-trainable", lambda c: f"{c.non_trainable:,}"),
        ("not counted", lambda c: f"{c.not_counted:,} ({'batch_stats' if c.framework == 'flax' else 'buffers'})"
         if c.not_counted else "0"),
        ("weights", lambda c: escape("\n".join(f"{name}: {size} {kind}" for name, size, kind in c.weights))),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(c) for c in result.counts))
    console.print(table)
    for c in result.counts:
        say(f"why ({_FRAMEWORK[c.framework]}): {c.why}")
    console.print()

    # differences
    shape = "x".join(map(str, result.input_shape))
    others = [s for s in result.settings if s.role != "given"]
    table = Table(
        title=f"One training step, then one inference step, on the same batch {shape} (NCHW, seed "
              f"{result.seed}): max |difference| from the given layer",
        title_justify="left",
    )
    table.add_column("quantity")
    for s in others:
        table.add_column(f"vs {s.role} ({_FRAMEWORK[s.framework]})", justify="right")
    quantities = list(dict.fromkeys(d.quantity for d in result.differences))
    for q in quantities:
        cells = []
        for s in others:
            d = next((d for d in result.differences if d.quantity == q and d.against == s.role), None)
            cells.append("-" if d is None else _diff(d.max_abs, d.relative))
        table.add_row(q, *cells)
    console.print(table)
    say(f"batch: {result.batch}")
    for s in others:
        for d in (d for d in result.differences if d.against == s.role):
            say(f"why ({d.quantity}, vs {s.role}): {d.why}")
    console.print()
    for note in result.notes[2:]:
        say(note)
