"""The HTML rendering of a :class:`~bnkit.diagnose.report.CompareReport`: a self-contained page.

The page has no external assets, links or scripts: the styles are inline and the per-layer
divergence is an inline SVG chart, one row per paired layer with the maximum absolute difference
on a log scale and a tick at the tolerance that layer was held to, so that a network with dozens
of batch norms reads at a glance (hover a bar for the exact figures). For hundreds of layers the
chart's rows get thinner (the whole network stays on about one screen, labels on the rows that
matter) and the layer table folds the runs of agreeing rows into ``<details>`` blocks. The file
is written atomically and an existing file is replaced only with ``force=True``.
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path

from bnkit.diagnose.render import fmt as _fmt
from bnkit.diagnose.render import visible_rows
from bnkit.io import atomic_path

__all__ = ["write_html", "html_page", "divergence_svg"]

_OK = "#2e7d32"
_BAD = "#c62828"
_STATS = "#ef6c00"
_MUTED = "#757575"
_FULL_ROWS = 80  # up to this many rows, every row is 18 px tall and labelled
_CHART_HEIGHT = 1400  # beyond, rows shrink so that the chart stays about this tall


def divergence_svg(report) -> str:
    """An inline SVG chart: one row per paired layer, max |a − b| on a log10 axis."""
    rows = report.rows
    n = max(len(rows), 1)
    row_h = 18.0 if n <= _FULL_ROWS else max(3.0, _CHART_HEIGHT / n)
    label_every = 1 if row_h >= 12 else math.ceil(12 / row_h)  # labels at least 12 px apart
    label_w, bar_w, top, bottom = 300, 520, 34, 28
    height = int(top + n * row_h + bottom)
    width = label_w + bar_w + 90
    values = [r.max_abs_diff for r in rows] + [r.atol for r in rows]
    values += [r.running_mean_abs_diff or 0 for r in rows] + [r.running_var_abs_diff or 0 for r in rows]
    values = [v for v in values if v > 0 and math.isfinite(v)] + [report.atol or 1e-12]
    lo = math.floor(math.log10(min(values))) - 1
    hi = max(math.ceil(math.log10(max(values))), lo + 2)
    lo = max(lo, hi - 16)

    def x_of(v: float) -> float:
        if not (v > 0):
            return label_w
        if not math.isfinite(v):
            return label_w + bar_w
        frac = (min(max(math.log10(v), lo), hi) - lo) / (hi - lo)
        return label_w + frac * bar_w

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="per-layer divergence" '
        'font-family="ui-monospace, Menlo, Consolas, monospace" font-size="11">'
    ]
    for d in range(lo, hi + 1):  # decade grid and axis labels, top and bottom
        x = label_w + (d - lo) / (hi - lo) * bar_w
        parts.append(f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{height - bottom + 4}" stroke="#e0e0e0"/>')
        for y in (top - 10, height - bottom + 16):
            parts.append(f'<text x="{x:.1f}" y="{y}" text-anchor="middle" fill="{_MUTED}">1e{d}</text>')
    parts.append(
        f'<text x="{label_w}" y="{top - 22}" fill="{_BAD}">| each layer\'s tolerance: atol {report.atol:g} + '
        f"its measured rounding (+ rtol {report.rtol:g}·|value|)</text>"
    )
    first = report.first_divergence
    named = {layer for cause in report.causes for layer in cause.layers}
    for i, r in enumerate(rows):
        y = top + i * row_h
        if i % 2:
            parts.append(f'<rect x="0" y="{y:.1f}" width="{width}" height="{row_h:.1f}" fill="#fafafa"/>')
        labelled = row_h >= 12 or i % label_every == 0 or r.differs or r.name in named
        if labelled:
            weight = ' font-weight="bold"' if r.kind == "bn" else ""
            label = r.name if len(r.name) <= 30 else r.name[:29] + "…"
            marker = "▶ " if r is first else ""
            parts.append(
                f'<text x="{label_w - 8}" y="{y + min(row_h, 18) / 2 + 4:.1f}" text-anchor="end"{weight}>'
                f"{escape(marker + label)} <tspan fill='{_MUTED}'>{escape(r.kind)}</tspan></text>"
            )
        color = _BAD if r.differs else _OK
        x_end = x_of(r.max_abs_diff)
        tip = (
            f"{r.name_a} ({r.type_a}) / {r.name_b} ({r.type_b}), shape {tuple(r.shape)}: "
            f"max abs diff {_fmt(r.max_abs_diff)}, tolerance atol {_fmt(r.atol)} "
            f"(rounding {_fmt(r.rounding)}) + rtol {r.rtol:g}·|value|, ratio {_fmt(r.tolerance_ratio)}"
        )
        if r.running_mean_abs_diff is not None:
            tip += (
                f"; after the step: running mean diff {_fmt(r.running_mean_abs_diff)}, "
                f"running var diff {_fmt(r.running_var_abs_diff)}"
            )
        pad = min(4.0, row_h / 4)
        parts.append(
            f'<rect x="{label_w}" y="{y + pad:.1f}" width="{max(x_end - label_w, 1.5):.1f}" '
            f'height="{max(row_h - 2 * pad, 1):.1f}" fill="{color}"><title>{escape(tip)}</title></rect>'
        )
        tol_x = x_of(r.atol)
        parts.append(
            f'<line x1="{tol_x:.1f}" y1="{y + 1:.1f}" x2="{tol_x:.1f}" y2="{y + row_h - 1:.1f}" stroke="{_BAD}" '
            f'stroke-width="1.5"><title>{escape(f"tolerance of {r.name}: atol {_fmt(r.atol)}")}</title></line>'
        )
        if labelled and row_h >= 12:
            value_x = max(x_end, tol_x) + 4
            parts.append(f'<text x="{value_x:.1f}" y="{y + 13:.1f}">{escape(_fmt(r.max_abs_diff))}</text>')
        if r.running_var_abs_diff is not None:
            stats = max(r.running_mean_abs_diff or 0, r.running_var_abs_diff or 0)
            sx, h = x_of(stats), min(row_h, 18)
            stats_color = _STATS if r.running_stats_diverge else _OK
            parts.append(
                f'<path d="M{sx:.1f},{y + 3 * h / 18:.1f} l{h / 4.5:.1f},{h / 3:.1f} l{-h / 4.5:.1f},{h / 3:.1f} '
                f'l{-h / 4.5:.1f},{-h / 3:.1f} z" fill="{stats_color}" stroke="white">'
                f"<title>{escape(f'running statistics after the step: max abs diff {_fmt(stats)}')}</title>"
                "</path>"
            )
    if not rows:
        parts.append(f'<text x="{label_w}" y="{top + 13}" fill="{_MUTED}">no paired layers</text>')
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2em; color: #212121; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
.verdict { display: inline-block; padding: .15em .6em; border-radius: .3em; color: white; font-weight: bold; }
.agree { background: #2e7d32; } .disagree { background: #c62828; }
code, .code { font-family: ui-monospace, Menlo, Consolas, monospace; }
.cause { border-left: 4px solid #c62828; padding: .3em .8em; margin: .6em 0; background: #fff5f5; }
.cause .code { font-weight: bold; color: #c62828; }
.evidence { color: #616161; font-size: .9em; }
table { border-collapse: collapse; font-size: .9em; }
th, td { border-bottom: 1px solid #e0e0e0; padding: .25em .6em; text-align: left; }
td.num { text-align: right; font-family: ui-monospace, Menlo, Consolas, monospace; }
tr.bad td { color: #c62828; } tr.bn td:nth-child(2) { font-weight: bold; }
details { margin: .2em 0; } summary { color: #616161; cursor: pointer; }
.chart { overflow-x: auto; }
.legend { color: #616161; font-size: .9em; }
"""

_LAYER_HEADERS = ("#", "layer A", "layer B", "type A", "type B", "shape", "max |a−b|", "atol", "÷tol", "stats diff")


def _layer_table(report, indices: list[int]) -> str:
    out = ["<table><thead><tr>", *(f"<th>{h}</th>" for h in _LAYER_HEADERS), "</tr></thead><tbody>"]
    for k in indices:
        r = report.rows[k]
        classes = " ".join(c for c in ("bad" if r.differs else "", "bn" if r.kind == "bn" else "") if c)
        stats = (
            "–"
            if r.running_mean_abs_diff is None
            else f"{_fmt(r.running_mean_abs_diff)} / {_fmt(r.running_var_abs_diff)}"
        )
        out.append(
            f'<tr class="{classes}"><td class="num">{r.index}</td><td>{escape(r.name_a)}</td>'
            f"<td>{escape(r.name_b)}</td><td>{escape(r.type_a)}</td><td>{escape(r.type_b)}"
            + (f" <i>[{escape(r.note)}]</i>" if r.note else "")
            + "</td>"
            f"<td>{escape(str(tuple(r.shape)))}</td><td class='num'>{_fmt(r.max_abs_diff)}</td>"
            f"<td class='num'>{_fmt(r.atol)}</td><td class='num'>{_fmt(r.tolerance_ratio)}</td>"
            f"<td class='num'>{stats}</td></tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)


def _folded_layers(report) -> str:
    """The layer table; for a large network, runs of rows away from any divergence are folded."""
    shown = set(visible_rows(report))
    out, run, folded = [], [], []

    def flush_run():
        if run:
            out.append(_layer_table(report, list(run)))
            run.clear()

    def flush_folded():
        if folded:
            bad = sum(report.rows[k].differs for k in folded)
            what = f"{bad} differ" if bad else "all agree"
            out.append(
                f"<details><summary>rows {folded[0]}–{folded[-1]} ({len(folded)} layers, {what})</summary>"
                f"{_layer_table(report, list(folded))}</details>"
            )
            folded.clear()

    for k in range(len(report.rows)):
        if k in shown:
            flush_folded()
            run.append(k)
        else:
            flush_run()
            folded.append(k)
    flush_folded()
    flush_run()
    return "".join(out)


def html_page(report) -> str:
    """The whole HTML document for ``report`` as a string."""
    verdict = "agree" if report.agree else "disagree"
    first = report.first_divergence
    out_atol = report.output_atol if report.output_atol is not None else report.atol
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>bnkit compare: {escape(report.name_a)} vs {escape(report.name_b)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>bnkit compare: <code>{escape(report.name_a)}</code> ({escape(report.framework_a)}) vs "
        f"<code>{escape(report.name_b)}</code> ({escape(report.framework_b)}) "
        f'<span class="verdict {verdict}">{verdict}</span></h1>',
        f"<p>Input {escape(str(tuple(report.input_shape)))} in model A's layout; "
        f"{'one training step' if report.training else 'inference'}; a layer diverges where "
        f"|a − b| &gt; atol + {report.rtol:g}·max(|a|, |b|), atol being {report.atol:g} "
        + (
            "plus the float rounding measured for that layer (column atol). "
            if report.rounding_measured
            else "for every layer (all are within it, so the rounding allowance was not measured). "
        )
        + f"Final outputs: max |a − b| {_fmt(report.output_max_abs_diff)}, allowed {_fmt(out_atol)} "
        f"+ {report.rtol:g}·|value|.",
    ]
    if report.output_nonfinite:
        out.append(" The outputs hold NaN/Inf.")
    if report.atol_note:
        out.append(f" <b>Note:</b> {escape(report.atol_note)}")
    if first is not None:
        out.append(f" First divergence: <b>{escape(first.name)}</b> ({escape(first.type_a)} / {escape(first.type_b)}).")
    out.append("</p>")
    out.append("<h2>Causes</h2>")
    if not report.causes:
        out.append("<p>None: the models agree.</p>" if report.agree else "<p>None found.</p>")
    for c in report.causes:
        out.append(
            f'<div class="cause"><span class="code">{escape(c.code)}</span> — {escape(c.explanation)}'
            f'<div class="evidence">layers: {escape(", ".join(c.layers))}'
            f"{'; ' + escape(c.evidence) if c.evidence else ''}</div></div>"
        )
    out.append("<h2>Divergence per layer</h2>")
    out.append(
        '<p class="legend">Bars: maximum absolute difference of the paired layers\' outputs (log scale; '
        "red beyond tolerance, ▶ the first divergence, bold labels are batch norms); red ticks: the "
        "tolerance each layer was held to. Diamonds: running statistics after the training step. "
        "Hover for exact figures.</p>"
    )
    out.append(f'<div class="chart">{divergence_svg(report)}</div>')
    out.append(f"<h2>Layers ({len(report.rows)} paired)</h2>")
    out.append(_folded_layers(report))
    if report.batch_norms:
        out.append("<h2>Batch norm settings</h2><table><thead><tr>")
        for h in ("layer", "side", "eps", "momentum", "new-batch weight", "running var", "mode", "trainable"):
            out.append(f"<th>{h}</th>")
        out.append("</tr></thead><tbody>")
        for p in report.batch_norms:
            for label, s, name in (("A", p.a, p.row.name_a), ("B", p.b, p.row.name_b)):
                mode = "batch statistics" if s.uses_batch_stats else "running statistics"
                weight = "1/count" if s.new_weight is None else f"{s.new_weight:g}"
                momentum = "None" if s.momentum is None else f"{s.momentum:g}"
                out.append(
                    f"<tr><td>{escape(name)}</td><td>{label} ({escape(s.framework)})</td>"
                    f"<td class='num'>{s.eps:g}</td><td class='num'>{momentum}</td>"
                    f"<td class='num'>{weight}</td><td>{escape(s.running_var_estimator)}"
                    f"{'' if s.tracks_running_stats else ' (none kept)'}</td><td>{mode}</td>"
                    f"<td>{s.trainable}</td></tr>"
                )
        out.append("</tbody></table>")
    if report.unmatched_a or report.unmatched_b:
        out.append("<h2>Layers without a counterpart</h2><ul>")
        if report.unmatched_a:
            out.append(f"<li>model A: {escape(', '.join(report.unmatched_a))}</li>")
        if report.unmatched_b:
            out.append(f"<li>model B: {escape(', '.join(report.unmatched_b))}</li>")
        out.append("</ul>")
    out.append("</body></html>\n")
    return "".join(out)


def write_html(report, path, *, force: bool = False) -> str:
    """Write :func:`html_page` to ``path`` atomically; refuse to replace a file unless ``force``.

    A failed write (a full disk) raises :class:`bnkit.io.ModelFileError`, one line, leaving nothing.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory; give a file name such as {target / 'report.html'}")
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists; pass force=True (--force) to replace it")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {target}: the folder {folder} does not exist")
    text = html_page(report)
    # existence was checked above, in this module's words; a file appearing meanwhile is still not replaced
    with atomic_path(target, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return str(target)
