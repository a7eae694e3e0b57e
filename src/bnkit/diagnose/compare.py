"""Run two models on the same input, layer by layer, and explain why they disagree.

:func:`compare` takes two models of either framework (``torch.nn.Module`` or ``keras.Model``)
and one input in the first model's layout (NCHW for PyTorch, NHWC for Keras; the channel axis of
rank-3/4/5 inputs is moved for the other side). It

1. traces each model (:mod:`~bnkit.diagnose.trace_torch`, :mod:`~bnkit.diagnose.trace_keras`): the
   output of every layer of a known kind (:mod:`~bnkit.diagnose.kinds`) and which traced layers
   its inputs came from;
2. pairs the two graphs by structure (:mod:`~bnkit.diagnose.align`), so parallel branches pair
   with their counterparts whatever order they were defined in; layers without a partner are
   listed as such;
3. compares each pair in PyTorch's layout, each held to a tolerance that grows with the values'
   magnitude and the float rounding the layers behind it may have accumulated
   (:mod:`~bnkit.diagnose.tolerance`);
4. names the causes (:mod:`~bnkit.diagnose.causes`, codes in :data:`CAUSES`).

The data comes first (:class:`CompareReport` rows), rendering second
(:meth:`CompareReport.to_dict`, :meth:`CompareReport.to_html`, :meth:`CompareReport.render`).
"""

from __future__ import annotations

import numpy as np

from bnkit.diagnose.align import align
from bnkit.diagnose.causes import Context, find_causes
from bnkit.diagnose.causes.batchnorm import compare_running_stats
from bnkit.diagnose.exporter_folds import folded_chains, merge
from bnkit.diagnose.report import CAUSES, BatchNormPair, BatchNormState, Cause, CompareReport, LayerDiff
from bnkit.diagnose.tolerance import SAFETY, Rounding, diff, local_terms, measure_rounding, own_rounding
from bnkit.diagnose.trace import Trace, to_layout, to_numpy
from bnkit.frameworks import accepts_tf_keras, is_keras_model, is_onnx_model, is_torch_module

__all__ = ["compare", "CompareReport", "LayerDiff", "Cause", "BatchNormPair", "BatchNormState", "CAUSES"]


@accepts_tf_keras("model_a", "model_b")
def compare(
    model_a,
    model_b,
    inputs,
    training: bool = False,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> CompareReport:
    """Run ``model_a`` and ``model_b`` on ``inputs`` and report where and why they disagree.

    Args:
        model_a, model_b: a ``torch.nn.Module``, a ``keras.Model`` or an ``onnx.ModelProto`` each, any
            pairing; a live tf-keras 2 model is run as the Keras 3 model bnkit reads it as
            (:mod:`bnkit.keras.from_tf_keras`); an ONNX model is run by onnxruntime
            (:mod:`~bnkit.diagnose.trace_onnx`), a conv+BN pair its exporter folded into one Conv paired
            with that Conv (:mod:`~bnkit.diagnose.exporter_folds`).
        inputs: one batch in ``model_a``'s layout (NCHW for PyTorch and ONNX, NHWC for Keras); the
            channel axis of a rank-3/4/5 input is moved for a model of the other framework.
        training: ``False`` compares inference: Keras models are called with
            ``training=False`` and PyTorch modules run in the mode they are in (a module left
            in ``train()`` is reported as ``training-mode``). ``True`` compares one training
            forward pass: Keras with ``training=True``, PyTorch after ``.train()``; the running
            statistics after the step are compared too. Dropout is disabled in both.
        atol, rtol: a pair of outputs diverges where ``|a - b| > atol' + rtol * max(|a|, |b|)``,
            ``atol'`` being ``atol`` plus the float rounding the layer and those before it may
            have accumulated (see :mod:`bnkit.diagnose.tolerance`); each row says what it was held to.

    Neither model is changed: PyTorch runs on a deep copy, Keras weights are restored.
    Raises ``TypeError`` for models of neither framework and non-float inputs, ``ValueError``
    for an empty batch or negative tolerances.
    """
    framework_a, framework_b = _framework(model_a), _framework(model_b)
    if not (atol >= 0 and rtol >= 0):
        raise ValueError(f"atol and rtol must be non-negative, got atol={atol!r}, rtol={rtol!r}")
    x_a = np.asarray(to_numpy(inputs))
    if not np.issubdtype(x_a.dtype, np.floating):
        raise TypeError(f"inputs must be floating point, got dtype {x_a.dtype}")
    if x_a.ndim < 2:
        raise ValueError(f"inputs must have a batch dimension and at least one more, got shape {x_a.shape}")
    if x_a.size == 0:
        raise ValueError(f"inputs are empty (shape {tuple(x_a.shape)}): compare needs at least one sample")
    x_a = np.ascontiguousarray(x_a.astype(np.float32) if x_a.dtype == np.float64 else x_a)
    x_b = to_layout(x_a, _data_layout(model_a, framework_a), _data_layout(model_b, framework_b))

    trace_a = _trace(model_a, framework_a, x_a, training)
    trace_b = _trace(model_b, framework_b, x_b, training)
    bad_input = int(x_a.size - np.count_nonzero(np.isfinite(x_a)))
    trace_a.input_nonfinite = trace_b.input_nonfinite = bad_input

    pairs = align(trace_a.entries, trace_b.entries, trace_a.output_producers, trace_b.output_producers)
    # conv+BN pairs an ONNX exporter folded into one Conv: one entry on the source side too, aligned again
    # (until no more are found: a pair made wrongly before a merge may be right after it)
    chains_a: list = []
    chains_b: list = []
    for _ in range(4):
        found_a, found_b = folded_chains(trace_a, trace_b, pairs, 0), folded_chains(trace_b, trace_a, pairs, 1)
        if not (found_a or found_b):
            break
        chains_a.append(found_a)
        chains_b.append(found_b)
        trace_a, trace_b = merge(trace_a, found_a), merge(trace_b, found_b)
        pairs = align(trace_a.entries, trace_b.entries, trace_a.output_producers, trace_b.output_producers)
    # Within atol alone everywhere: they agree whatever rounding allows on top, which is then not
    # measured. Otherwise the rounding each layer may carry is measured on one side (PyTorch's where
    # there is one: it runs faster) and the rows are held to atol plus it.
    rows, bn_pairs, output = _rows(trace_a, trace_b, pairs, atol, rtol, training, None)
    measured = None
    if any(r.differs for r in rows) or output[2]:
        # measured on PyTorch's side where there is one (it runs faster), never on ONNX's (onnxruntime
        # cannot add noise between its nodes: its layers' own rounding is added up instead)
        noisy_is_b = (framework_b == "torch" and framework_a != "torch") or (
            framework_a == "onnx" and framework_b != "onnx"
        )
        side = (model_b, trace_b, x_b, chains_b) if noisy_is_b else (model_a, trace_a, x_a, chains_a)
        measured = _rounding(side, training)
        rows, bn_pairs, output = _rows(trace_a, trace_b, pairs, atol, rtol, training, (measured, noisy_is_b))
    out_abs, out_rel, out_div, output_atol = output
    output_nonfinite = not (np.isfinite(trace_a.output).all() and np.isfinite(trace_b.output).all())
    finite_a = np.abs(trace_a.output[np.isfinite(trace_a.output)])
    matched_a = {ia for ia, _ in pairs}
    matched_b = {ib for _, ib in pairs}
    keras_backend = None
    if "keras" in (framework_a, framework_b):
        from bnkit.keras import backend_name

        keras_backend = backend_name()
    report = CompareReport(
        framework_a=framework_a,
        framework_b=framework_b,
        name_a=_model_name(model_a, framework_a),
        name_b=_model_name(model_b, framework_b),
        input_shape=tuple(x_a.shape),
        training=bool(training),
        atol=float(atol),
        rtol=float(rtol),
        rows=rows,
        output_max_abs_diff=out_abs,
        output_max_rel_diff=out_rel,
        output_diverges=out_div,
        causes=[],
        unmatched_a=[e.name for k, e in enumerate(trace_a.entries) if k not in matched_a],
        unmatched_b=[e.name for k, e in enumerate(trace_b.entries) if k not in matched_b],
        batch_norms=bn_pairs,
        output_atol=output_atol,
        output_max_abs=float(finite_a.max()) if finite_a.size else None,
        output_nonfinite=bool(output_nonfinite or bad_input),
        rounding_measured=measured is not None,
        keras_backend=keras_backend,
    )
    if not report.agree:
        context = Context(trace_a, trace_b, pairs, atol, rtol, bool(training))
        report.causes = find_causes(report, context)
    return report


def _rows(trace_a: Trace, trace_b: Trace, pairs, atol: float, rtol: float, training: bool, measured):
    """The rows and batch-norm pairs, and (max abs, max rel, diverges, atol) of the final outputs.

    ``measured``: ``(Rounding, measured on B)``, or None to hold every layer to ``atol`` alone."""
    framework_a, framework_b = trace_a.framework, trace_b.framework
    eps = max(trace_a.dtype_eps, trace_b.dtype_eps)
    rows: list[LayerDiff] = []
    bn_pairs: list[BatchNormPair] = []
    for k, (ia, ib) in enumerate(pairs):
        ea, eb = trace_a.entries[ia], trace_b.entries[ib]
        rounding, stats_rounding = 0.0, (0.0, 0.0)
        if measured is not None:
            rounding_of, on_b = measured
            side = ib if on_b else ia
            floor = max(own_rounding(ea, framework_a, eps), own_rounding(eb, framework_b, eps))
            rounding = SAFETY * max(rounding_of.layers[side], floor)
            stats_rounding = tuple(SAFETY * r for r in rounding_of.running_stats[side])
        layer_atol = atol + rounding
        same_layout = ea.canonical.shape == eb.canonical.shape or ea.raw.shape != eb.raw.shape
        if same_layout:
            max_abs, max_rel, ratio, diverges = diff(ea.canonical, eb.canonical, layer_atol, rtol)
        else:  # both work on channels-last data (paired by their raw shapes): compared as they are
            max_abs, max_rel, ratio, diverges = diff(ea.raw, eb.raw, layer_atol, rtol)
            ea.compared_as_is = eb.compared_as_is = True
        if diverges and same_layout and ea.raw.shape == eb.raw.shape and framework_a != framework_b:
            # Both may work on the same arrangement of the data, which the shapes cannot tell when they
            # read the same either way (a Dense over the length axis of an (N, C, L) tensor with C == L,
            # kept in PyTorch's layout on both sides): then they are compared as they are, the arrangement
            # that differs less. A PyTorch port may also permute to channels-last before flattening, as
            # Keras does: both flatten H·W·C, and its Linear takes Keras' order unchanged.
            raw = diff(ea.raw, eb.raw, layer_atol, rtol)
            if not raw[3] or (ea.kind != "flatten" and raw[0] < max_abs):
                max_abs, max_rel, ratio, diverges = raw
                if ea.kind == "flatten":
                    for e in (ea, eb):
                        e.flat_order = "hwc"
                else:
                    ea.compared_as_is = eb.compared_as_is = True
        _, n, _ = local_terms(ea, framework_a, max(ea.input_scales or [0.0]))
        row = LayerDiff(
            k,
            ea.name,
            eb.name,
            ea.type,
            eb.type,
            ea.kind,
            tuple(ea.canonical.shape),
            max_abs,
            max_rel,
            diverges,
            atol=layer_atol,
            rtol=float(rtol),
            rounding=rounding,
            reduction_length=n,
            tolerance_ratio=ratio,
            nonfinite=ea.nonfinite or eb.nonfinite,
        )
        if ea.bn is not None and eb.bn is not None:
            compare_running_stats(row, ea.bn, eb.bn, atol, rtol, training, stats_rounding)
            bn_pairs.append(BatchNormPair(row, ea.bn, eb.bn))
        row.note = ea.cache.get("note") or eb.cache.get("note") or ""
        rows.append(row)
    output_atol = atol
    if measured is not None:
        scale = max(_scale(trace_a.output), _scale(trace_b.output))
        output_atol += SAFETY * max(measured[0].output, eps * scale)
    out_abs, out_rel, _, out_div = diff(trace_a.output, trace_b.output, output_atol, rtol)  # both PyTorch layout
    return rows, bn_pairs, (out_abs, out_rel, out_div, output_atol)


def _framework(model) -> str:
    if is_onnx_model(model):
        return "onnx"
    # Keras first: on its torch backend a keras.Model is also a torch.nn.Module
    if is_keras_model(model):
        from bnkit.keras import keras

        if isinstance(model, keras.Model):
            return "keras"
        raise TypeError(
            f"compare needs a keras.Model, got the Keras layer {type(model).__name__}; "
            "wrap it in keras.Sequential([...]) or a functional model"
        )
    if is_torch_module(model):
        return "torch"
    raise TypeError(
        "compare needs a torch.nn.Module or a keras.Model (or an onnx.ModelProto), got "
        f"{type(model).__module__}.{type(model).__name__}"
    )


def _data_layout(model, framework: str) -> str:
    """``"torch"`` or ``"keras"``: the layout of the model's tensors (a channels_first Keras model's is PyTorch's)."""
    if framework in ("torch", "onnx"):  # ONNX tensors are NCHW
        return "torch"
    from bnkit.diagnose.trace_keras import data_layout

    return data_layout(model)


def _trace(model, framework: str, x: np.ndarray, training: bool, perturb=None) -> Trace:
    if framework == "torch":
        from bnkit.diagnose.trace_torch import trace_torch

        return trace_torch(model, x, training, perturb)
    if framework == "onnx":
        from bnkit.diagnose.trace_onnx import trace_onnx

        return trace_onnx(model, x, training, perturb)
    from bnkit.diagnose.trace_keras import trace_keras

    return trace_keras(model, x, training, perturb)


def _rounding(side, training: bool) -> Rounding:
    """The rounding each traced layer of one side may carry, and the final output's: measured
    (:func:`bnkit.diagnose.tolerance.measure_rounding`), or, where the noisy run traced other
    layers, the layers' own rounding accumulated along the graph (root of the sum of squares)."""
    model, trace, x, chains = side
    measured = None
    if trace.framework != "onnx":
        measured = measure_rounding(
            lambda perturb: _merged(_trace(model, trace.framework, x, training, perturb), chains), trace
        )
    if measured is not None:
        return measured
    accumulated: list[float] = []
    for e in trace.entries:
        behind = max((accumulated[p] for p in e.producers if p >= 0), default=0.0)
        accumulated.append(float(np.hypot(behind, own_rounding(e, trace.framework, trace.dtype_eps))))
    out = max((accumulated[p] for p in trace.output_producers if p >= 0), default=0.0)
    return Rounding(accumulated, out, [(0.0, 0.0)] * len(accumulated))


def _merged(trace: Trace, rounds: list) -> Trace:
    """``trace`` with the exporter-folded chains of each round merged, as compare merged them."""
    for chains in rounds:
        trace = merge(trace, chains)
    return trace


def _scale(x: np.ndarray) -> float:
    finite = x[np.isfinite(x)]
    return float(np.abs(finite).max()) if finite.size else 0.0


def _model_name(model, framework: str) -> str:
    if framework == "keras":
        return str(model.name)
    if framework == "onnx":
        return model.graph.name or "onnx"
    return type(model).__name__
