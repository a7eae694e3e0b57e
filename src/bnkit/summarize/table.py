"""Rendering of a :class:`~bnkit.summarize.rows.ModelSummary` with rich.

The layout follows Keras' ``model.summary()`` (layer table, then totals) and torchinfo
(memory estimate), with the two parameter accountings side by side.
"""

from __future__ import annotations

from rich import box
from rich.columns import Columns
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bnkit.summarize.rows import ModelSummary

ACCOUNTING_NOTE = "Keras counts running statistics as non-trainable params; PyTorch keeps them as buffers."
_FRAMEWORKS = {"keras": "Keras", "torch": "PyTorch", "onnx": "ONNX"}


def format_shape(shapes) -> str:
    if shapes is None:
        return "?"
    return ", ".join("(" + ", ".join("None" if d is None else str(d) for d in s) + ")" for s in shapes)


def why_counts_differ(s: ModelSummary) -> str:
    """One sentence on why PyTorch tools print a smaller count than Keras for this model."""
    keras_counted_counters = s.total - s.torch_params - s.torch_buffers  # counter weights of a Keras model
    if s.torch_buffers == 0 and keras_counted_counters == 0:
        return f"Both accountings agree on {s.total:,} params: this model has no running statistics."
    counters = "integer counter (num_batches_tracked)" if s.torch_counters == 1 else "integer counters"
    if s.other_buffers == 0:
        what = (
            f"the {s.torch_buffers:,} running statistics (running_mean, running_var{_renorm_names(s)}) "
            "are buffers there"
        )
    elif s.running_stats == 0:
        what = f"the {s.torch_buffers:,} buffer values (a folded batch norm's scale and shift) are buffers there"
    else:
        what = (
            f"the {s.torch_buffers:,} buffer values ({s.running_stats:,} running statistics, {s.other_buffers:,} "
            "folded scale and shift) are buffers there"
        )
    text = (
        f"PyTorch tools (sum(p.numel() for p in model.parameters()), torchinfo) print {s.torch_params:,}: "
        f"{what}, while Keras counts them as non-trainable weights"
    )
    if keras_counted_counters:
        text += (
            f", and the {keras_counted_counters:,} {counters} too: "
            f"{s.torch_params:,} + {s.torch_buffers:,} + {keras_counted_counters:,} = {s.total:,}."
        )
    else:
        text += f": {s.torch_params:,} + {s.torch_buffers:,} = {s.total:,}."
        if s.torch_counters:
            text += f" The {s.torch_counters:,} {counters} count{'s' if s.torch_counters == 1 else ''} in neither."
    return text


def _renorm_names(s: ModelSummary) -> str:
    if not s.renorm_layers:
        return ""
    return ", and batch renormalization's running_stddev, renorm_mean, renorm_stddev"


def _origin(s: ModelSummary) -> str:
    """"tf-keras 2 model, read as " where the model was read from another framework's (the title says so)."""
    return f"{s.source} model, read as " if s.source else ""


def _backend(s: ModelSummary) -> str:
    return f", {s.keras_backend} backend)" if s.keras_backend else ")"


def layer_table(s: ModelSummary) -> Table:
    """One row per layer: its own framework's parameter count first, then the other framework's.

    A PyTorch model's ``Param #`` is what torchinfo and ``parameters()`` count (running statistics
    are buffers, not params); a Keras model's is what ``model.summary()`` shows (running
    statistics are non-trainable params). The second count is the same layer as the other
    framework would count it. Names are kept whole (the type goes to the next line when the
    column is narrow), so that an 80-column terminal loses no column.
    """
    # an ONNX model's own count is Keras' (every initializer a node reads): the other one is PyTorch's
    own, other = (_FRAMEWORKS[s.framework], _FRAMEWORKS["keras" if s.framework == "torch" else "torch"])
    table = Table(
        # a Text: a model's name is not markup
        title=Text(f'Model: "{s.name}" ({_origin(s)}{own}' + _backend(s)),
        box=box.SIMPLE_HEAD,
        title_justify="left",
        caption=f"Param #: {own}'s own count; {other} #: as {other} counts the same layer "
        + ("(running statistics are buffers there)." if other == "PyTorch" else "(running statistics included)."),
        caption_justify="left",
        padding=(0, 1, 0, 0),
        pad_edge=False,
    )
    name_width = min(max((len(r.name) for r in s.rows), default=10), 40)
    table.add_column("Layer (type)", overflow="fold", min_width=min(name_width, 24))
    table.add_column("Output Shape", overflow="fold")
    table.add_column("Param #", justify="right", no_wrap=True)
    table.add_column(f"{other} #", justify="right", no_wrap=True)
    for row in s.rows:
        label = Text(row.name)
        label.append(f" ({row.type})", style="dim")
        mine, theirs = (row.torch_params, row.params) if s.framework == "torch" else (row.params, row.torch_params)
        table.add_row(label, format_shape(row.output_shapes), f"{mine:,}", f"{theirs:,}")
    return table


def _block(title: str, items: list[tuple[str, str]]) -> Table:
    table = Table(title=title, box=box.ROUNDED, show_header=False, title_justify="left")
    table.add_column(no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    for key, value in items:
        table.add_row(key, value)
    return table


def totals_blocks(s: ModelSummary) -> Columns:
    keras_block = _block(
        "Keras accounting",
        [
            ("Total params", f"{s.total:,}"),
            ("Trainable params", f"{s.trainable:,}"),
            ("Non-trainable params", f"{s.non_trainable:,}"),
        ],
    )
    torch_items = [
        ("Params", f"{s.torch_params:,}"),
        ("Trainable params", f"{s.torch_trainable:,}"),
    ]
    if s.other_buffers:
        torch_items.append(("Buffers: running statistics", f"{s.running_stats:,}"))
        torch_items.append(("Buffers: folded scale/shift etc.", f"{s.other_buffers:,}"))
    else:
        torch_items.append(("Buffers (running statistics)", f"{s.torch_buffers:,}"))
    if s.torch_frozen:
        torch_items.insert(2, ("Frozen params (requires_grad=False)", f"{s.torch_frozen:,}"))
    if s.torch_counters:
        torch_items.append(("Integer counters", f"{s.torch_counters:,}"))
    blocks = [keras_block, _block("PyTorch accounting", torch_items)]
    if s.onnx_stored is not None:
        blocks.insert(0, _block("ONNX storage", [("Initializer values", f"{s.onnx_stored:,}")]))
    if s.memory is not None:
        mb = s.memory.megabytes()
        blocks.append(
            _block(
                "Memory, batch 1 (MB, as torchinfo)",
                [
                    ("Input size", f"{mb['input']:.2f}"),
                    ("Forward/backward pass size", f"{mb['forward_backward']:.2f}"),
                    ("Params size", f"{mb['params']:.2f}"),
                    ("Estimated total size", f"{mb['total']:.2f}"),
                    ("Buffers (not in the total)", f"{mb['buffers']:.2f}"),
                ],
            )
        )
    return Columns(blocks, padding=(0, 2))


def render(s: ModelSummary, console: Console | None = None) -> None:
    console = console or Console()
    console.print(layer_table(s))
    console.print(totals_blocks(s))
    console.print(ACCOUNTING_NOTE)
    console.print(why_counts_differ(s), highlight=False)
    for note in s.notes:
        console.print(Text(note, style="dim"))
