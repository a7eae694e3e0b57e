"""``resize``: a resize layer whose interpolation differs between the two sides.

A port of ``F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)`` as Keras
``UpSampling2D(2, interpolation="bilinear")`` gives a layer whose inputs agree and whose outputs do
not: Keras resizes with half-pixel centres (source coordinate ``(i + 0.5)·in/out - 0.5``, PyTorch's
``align_corners=False``), and its ``'nearest'`` is PyTorch's ``'nearest-exact'`` (index
``floor((i + 0.5)·in/out)``, not ``floor(i·in/out)``) except in ``UpSampling2D``, which repeats.
The rule: a diverging resize row whose inputs agree, the two sides' settings read from the layers,
described in one framework-neutral form, different.
"""

from __future__ import annotations

from bnkit.diagnose.report import CompareReport

__all__ = ["find", "describe"]

# a function's call: F.interpolate(input, size, scale_factor, mode, align_corners, recompute_scale_factor, antialias)
_ARGS = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")


def _torch_settings(callable_) -> dict | None:
    """``mode``, ``align_corners``, ``antialias`` of an ``nn.Upsample`` or an ``F.interpolate`` call."""
    if hasattr(callable_, "mode"):  # nn.Upsample and its subclasses
        return {"mode": callable_.mode, "align_corners": callable_.align_corners, "antialias": False}
    defaults = getattr(callable_, "__defaults__", None) or ()  # the tracer's re-run of a call: (func, rest, kw)
    if len(defaults) != 3 or not isinstance(defaults[2], dict):
        return None
    func, rest, kwargs = defaults
    named = dict(zip(_ARGS, rest, strict=False)) | kwargs
    mode = named.get("mode", "nearest")
    if getattr(func, "__name__", "") == "upsample_bilinear":
        mode, named["align_corners"] = "bilinear", True
    return {"mode": mode, "align_corners": named.get("align_corners"), "antialias": bool(named.get("antialias"))}


def _keras_settings(layer) -> dict:
    """What a Keras resize computes, in PyTorch's terms: ``UpSampling*D('nearest')`` repeats
    (PyTorch's 'nearest' and 'nearest-exact' alike for its integer factors); other resizes use
    half-pixel centres, 'nearest' being PyTorch's 'nearest-exact'."""
    interpolation = str(getattr(layer, "interpolation", "nearest")).lower()
    if type(layer).__name__.startswith("UpSampling") and interpolation == "nearest":
        mode = "repeat"
    else:
        mode = {"nearest": "nearest-exact", "bilinear": "bilinear", "bicubic": "bicubic"}.get(
            interpolation, interpolation
        )
    return {"mode": mode, "align_corners": False, "antialias": bool(getattr(layer, "antialias", False))}


def _canonical(settings: dict) -> tuple:
    """The function a resize computes, as far as its settings say (sizes aside)."""
    mode = {"linear": "bilinear", "trilinear": "bilinear"}.get(settings["mode"], settings["mode"])
    align = bool(settings["align_corners"]) if mode in ("bilinear", "bicubic") else False
    return mode, align, bool(settings["antialias"]) and mode in ("bilinear", "bicubic")


def describe(settings: dict, framework: str, type_name: str) -> str:
    """``bilinear align_corners=True`` in PyTorch's terms; a Keras layer by its own name and interpolation."""
    if framework == "keras":
        mode = "nearest (a repeat)" if settings["mode"] == "repeat" else settings["mode"]
        mode = {"nearest-exact": "nearest (PyTorch's 'nearest-exact')"}.get(mode, mode)
        extra = ", antialias" if settings["antialias"] else ""
        return f"Keras {type_name} {mode} (align_corners=False{extra})"
    text = settings["mode"]
    if settings["mode"] in ("linear", "bilinear", "bicubic", "trilinear"):
        text += f" align_corners={bool(settings['align_corners'])}"
    if settings["antialias"]:
        text += " antialias=True"
    return text


def _settings(entry, framework: str) -> dict | None:
    if not entry.callables:
        return None
    if framework == "keras":
        return _keras_settings(entry.callables[0])
    return _torch_settings(entry.callables[0])


def find(report: CompareReport, ctx, add) -> None:
    """Resize rows that diverge where their inputs agree, with different interpolation settings."""
    for k, row in enumerate(report.rows):
        if row.kind != "resize" or not row.diverges or not ctx.is_source(report, k):
            continue
        ea, eb = ctx.entries(k)
        sa, sb = _settings(ea, ctx.framework_a), _settings(eb, ctx.framework_b)
        if sa is None or sb is None or _canonical(sa) == _canonical(sb):
            continue
        if "repeat" in (sa["mode"], sb["mode"]) and {sa["mode"], sb["mode"]} <= {"repeat", "nearest", "nearest-exact"}:
            continue  # a repeat is either nearest at an integer factor: something else differs
        side = {"torch": "the PyTorch model", "keras": "the Keras model"}
        where_a, where_b = side[ctx.framework_a], side[ctx.framework_b]
        if where_a == where_b:
            where_a, where_b = "model A", "model B"
        add(
            "resize",
            f"{row.name}: upsample: {describe(sa, ctx.framework_a, row.type_a)} in {where_a}, "
            f"{describe(sb, ctx.framework_b, row.type_b)} in {where_b}. The inputs agree; the interpolation "
            "differs (Keras resizes with half-pixel centres, i.e. align_corners=False, and its 'nearest' is "
            "PyTorch's 'nearest-exact'): use the same mode on both sides",
            row.name,
            "the layer's inputs agree and its outputs do not; its settings differ",
        )
