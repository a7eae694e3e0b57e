"""The terminal rendering of a :class:`~bnkit.diagnose.report.CompareReport` (rich).

One row per paired layer: the largest difference, the absolute tolerance that layer was held to
(``atol`` plus the rounding measured for it) and their ratio at the worst element, the figure the
verdict is made from (✗ over 1). A network with more than :data:`MAX_ROWS` rows shows the rows
around each divergence (or, when the models agree, the rows closest to their tolerance), with a
line for each run of rows left out; ``all_rows=True`` (``bnkit compare --all``) shows every row.
The table folds, not truncates, at 80 columns (pipes, CI logs).
"""

from __future__ import annotations

import math

__all__ = ["render_rich", "visible_rows", "fmt", "MAX_ROWS"]

#: Rows shown without ``all_rows`` before the table is cut to the interesting ones.
MAX_ROWS = 40
_AROUND = 4  # rows shown on each side of a divergence
_CLOSEST = 8  # rows shown when the models agree: the ones nearest their tolerance


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return "shape differs" if x == math.inf else str(x)
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def _short(x: float | None) -> str:
    """Two significant digits, in as few characters as the table's narrow columns allow."""
    text = fmt(x, 2)
    return text.replace("e-0", "e-").replace("e+0", "e+")


def _ratio(x: float) -> str:
    if math.isfinite(x) and x >= 100:
        return f"{x:,.0f}"
    return _short(x)


def visible_rows(report, all_rows: bool = False) -> list[int]:
    """The indices of the rows to show (all of them for a small network or ``all_rows``)."""
    n = len(report.rows)
    if all_rows or n <= MAX_ROWS:
        return list(range(n))
    keep: set[int] = set()
    named = {layer for cause in report.causes for layer in cause.layers}
    differing = [k for k, r in enumerate(report.rows) if r.differs]
    anchors = differing[:1] + [k for k, r in enumerate(report.rows) if r.name in named]
    if not anchors:  # every row differs downstream of a cause named elsewhere, or none differs
        anchors = differing[:1]
    for k in anchors:
        keep.update(range(max(0, k - _AROUND), min(n, k + _AROUND + 1)))
    if not differing:
        closest = sorted(range(n), key=lambda k: report.rows[k].tolerance_ratio, reverse=True)[:_CLOSEST]
        keep.update(closest)
    return sorted(keep)


def render_rich(report, console=None, *, all_rows: bool = False) -> None:
    """Print the per-layer table, the final outputs and the causes with ``rich``."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    table = Table(
        title=Text(  # a Text: the models' names are not markup
            f"{report.name_a} ({report.framework_a}) vs {report.name_b} ({report.framework_b}) — "
            f"{'one training step' if report.training else 'inference'}"
            + (f" (Keras on the {report.keras_backend} backend)" if report.keras_backend else "")
        ),
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1, 0, 0),
        pad_edge=False,
    )
    # one "layer (types)" column that folds, so that the table fits 80 columns (pipes, CI logs)
    table.add_column("#", justify="right", style="dim")
    table.add_column("layer A / B (types)", overflow="fold", min_width=20)
    table.add_column("shape", overflow="fold")
    table.add_column("|a−b|", justify="right", no_wrap=True)
    table.add_column("atol", justify="right", no_wrap=True)
    table.add_column("÷tol", justify="right", no_wrap=True)
    if report.training:
        table.add_column("stats", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    first = report.first_divergence
    shown = visible_rows(report, all_rows)
    previous = -1
    columns = 7 if report.training else 6
    for k in shown:
        if k > previous + 1:
            table.add_row("", Text(_gap(report, previous + 1, k), style="dim italic"), *[""] * (columns - 1))
        previous = k
        r = report.rows[k]
        if r.nonfinite:
            status = "[red]✗ NaN[/]"
        else:
            status = "[red]✗ first[/]" if r is first else ("[red]✗[/]" if r.differs else "[green]✓[/]")
        types = r.type_a if r.type_a == r.type_b else f"{r.type_a} / {r.type_b}"
        label = Text(r.name)
        label.append(f" ({types})", style="dim")
        if r.note:
            label.append(f" [{r.note}]", style="dim italic")
        cells = [str(r.index), label, "×".join(map(str, r.shape)), _short(r.max_abs_diff), _short(r.atol)]
        cells.append(_ratio(r.tolerance_ratio))
        if report.training:
            stats = None if r.running_mean_abs_diff is None else max(r.running_mean_abs_diff, r.running_var_abs_diff)
            cells.append(("missing" if r.running_stats_diverge else "") if stats is None else _short(stats))
        cells.append(status)
        table.add_row(*cells, style="bold" if r.kind == "bn" else None)
    if previous < len(report.rows) - 1:
        table.add_row("", Text(_gap(report, previous + 1, len(report.rows)), style="dim italic"), *[""] * (columns - 1))
    console.print(table)
    if len(shown) < len(report.rows):
        console.print(
            f"[dim]{len(shown)} of {len(report.rows)} paired layers shown; --all (render(all_rows=True)) "
            "shows every one.[/]"
        )
    measured = (
        "plus the float rounding measured for each layer"
        if report.rounding_measured
        else "for every layer (all are within it, so the rounding allowance was not measured)"
    )
    console.print(
        f"atol: {report.atol:g} {measured}; ÷tol: the largest |a−b| / (atol + rtol·|value|), rtol "
        f"{report.rtol:g}; over 1 is a divergence.",
        highlight=False,
    )
    out_atol = report.output_atol if report.output_atol is not None else report.atol
    console.print(
        f"outputs: max |a−b| {fmt(report.output_max_abs_diff)}, allowed {fmt(out_atol)} + {report.rtol:g}·|value|"
        + (" — not finite" if report.output_nonfinite else ""),
        highlight=False,
    )
    if report.unmatched_a or report.unmatched_b:
        console.print(
            f"[dim]without a counterpart: A {escape(_names(report.unmatched_a))}; "
            f"B {escape(_names(report.unmatched_b))}[/]"
        )
    if report.agree:
        console.print("[bold green]The models agree.[/]")
        if report.atol_note:
            console.print(f"[yellow]Note: {escape(report.atol_note)}[/]", highlight=False)
        return
    console.print("[bold red]The models disagree.[/]" + (f" First divergence: {escape(first.name)}." if first else ""))
    for c in report.causes:
        console.print(f"  [bold red]{c.code}[/] {escape(c.explanation)}", highlight=False)


def _gap(report, start: int, stop: int) -> str:
    count = stop - start
    bad = sum(report.rows[k].differs for k in range(start, stop))
    rows = f"{count} row{'s' if count != 1 else ''}"
    if bad:
        return f"… {rows} ({bad} differ{'s' if bad == 1 else ''})"
    return f"… {rows} agree{'s' if count == 1 else ''}"


def _names(names: list[str], limit: int = 8) -> str:
    if not names:
        return "–"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
