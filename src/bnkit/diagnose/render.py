"""The terminal rendering of a :class:`~bnkit.diagnose.report.CompareReport` (rich)."""

from __future__ import annotations

from bnkit.diagnose.report_html import _fmt

__all__ = ["render_rich"]


def render_rich(report, console=None, *, all_rows: bool = False) -> None:
    """Print the per-layer table, the final outputs and the causes with ``rich``."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    table = Table(
        title=f"{report.name_a} ({report.framework_a}) vs {report.name_b} ({report.framework_b}) — "
        f"{'one training step' if report.training else 'inference'}",
        title_justify="left",
    )
    # one "layer (types)" column that folds, so that the table fits 80 columns (pipes, CI logs)
    table.add_column("#", justify="right", style="dim")
    table.add_column("layer A / B (types)", overflow="fold", min_width=16, ratio=1)
    table.add_column("shape", overflow="fold")
    table.add_column("abs diff", justify="right", no_wrap=True)
    table.add_column("rel diff", justify="right", no_wrap=True)
    if report.training:
        table.add_column("stats diff", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    first = report.first_divergence
    for r in report.rows:
        status = "[red]✗ first[/]" if r is first else ("[red]✗[/]" if r.differs else "[green]✓[/]")
        types = r.type_a if r.type_a == r.type_b else f"{r.type_a} / {r.type_b}"
        label = Text(r.name)
        label.append(f" ({types})", style="dim")
        cells = [str(r.index), label, "×".join(map(str, r.shape)), _fmt(r.max_abs_diff), _fmt(r.max_rel_diff)]
        if report.training:
            stats = None if r.running_mean_abs_diff is None else max(r.running_mean_abs_diff, r.running_var_abs_diff)
            cells.append(("missing" if r.running_stats_diverge else "") if stats is None else _fmt(stats))
        cells.append(status)
        table.add_row(*cells, style="bold" if r.kind == "bn" else None)
    console.print(table)
    console.print(
        f"outputs: max abs diff {_fmt(report.output_max_abs_diff)}, max rel diff "
        f"{_fmt(report.output_max_rel_diff)} (tolerance atol {report.atol:g}, rtol {report.rtol:g})"
    )
    if report.unmatched_a or report.unmatched_b:
        console.print(f"[dim]without a counterpart: A {report.unmatched_a or '–'}, B {report.unmatched_b or '–'}[/]")
    if report.agree:
        console.print("[bold green]The models agree.[/]")
        return
    console.print("[bold red]The models disagree.[/]" + (f" First divergence: {first.name}." if first else ""))
    for c in report.causes:
        console.print(f"  [bold red]{c.code}[/] {c.explanation}", highlight=False)
