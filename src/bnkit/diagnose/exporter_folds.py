"""Conv+BN pairs that an ONNX exporter folded into one convolution: paired and checked, not a disagreement.

``torch.onnx.export`` (both exporters of torch 2.13) writes a batch norm that follows a convolution in
eval as that convolution with ``W' = W · s``, ``b' = (b - mean) · s + beta``, ``s = gamma / sqrt(var + eps)``
per output channel. The ONNX trace then has one Conv where the source has a conv and a batch norm.

:func:`folded_chains` finds them after a first alignment: a conv (or dense) layer of the source,
paired with an ONNX conv, whose output only an unpaired batch norm reads (and the activation that alone
reads the batch norm's output, which the ONNX trace folds into its Conv as well). :func:`merge`
makes each chain one entry of the source trace: the chain's output, the folded weights above (the
source's own conv weights and batch-norm state kept beside them, for the causes), the batch norm's
state, and the note :data:`NOTE`. Compare aligns again with the merged trace.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from bnkit.diagnose.trace import INPUT, Entry, Trace

__all__ = ["NOTE", "folded_chains", "merge", "fold_weights"]

NOTE = "folded by the exporter"


def _consumers(trace: Trace) -> list[list[int]]:
    found: list[list[int]] = [[] for _ in trace.entries]
    for c, e in enumerate(trace.entries):
        for p in e.producers:
            if p != INPUT:
                found[p].append(c)
    return found


def folded_chains(trace: Trace, other: Trace, pairs: list[tuple[int, int]], side: int) -> list[tuple[int, ...]]:
    """Chains ``(conv, bn[, act])`` of ``trace`` (``side`` 0: the pairs' first index, 1: second) that
    ``other``, an ONNX trace, holds as one convolution."""
    if other.framework != "onnx":
        return []
    partner = {p[side]: p[1 - side] for p in pairs}
    consumers = _consumers(trace)
    outputs = set(trace.output_producers)
    entries = trace.entries
    chains = []
    for b, e in enumerate(entries):
        if e.kind != "bn" or len(e.inputs) != 1 or len(e.inputs[0]) != 1:
            continue
        c = e.inputs[0][0]
        if c == INPUT or entries[c].kind not in ("conv", "dense") or c not in partner:
            continue
        if b in partner and not _paired_past_activation(entries, consumers, c, b, other.entries[partner[c]], partner):
            continue
        if consumers[c] != [b] or c in outputs or "weight" not in entries[c].weights:
            continue
        if not {"mean", "var", "eps"} <= e.weights.keys():
            continue
        q = other.entries[partner[c]]
        if q.kind not in ("conv", "dense"):
            continue
        chain = [c, b]
        # an activation that alone reads the batch norm's output: the ONNX trace folds it into its Conv
        # (the Conv's output is read by it alone there too)
        if len(consumers[b]) == 1 and b not in outputs:
            a = consumers[b][0]
            if entries[a].kind == "act" and entries[a].inputs == [(b,)]:
                chain.append(a)
        chains.append(tuple(chain))
    return chains


def _paired_past_activation(entries, consumers, c: int, b: int, q: Entry, partner: dict) -> bool:
    """Whether batch norm ``b`` (after conv ``c``) was paired with a batch norm that the ONNX graph applies
    after the activation: ``conv → BN → act → BN`` exported as ``Conv(+BN folded)+act → BatchNormalization``.
    The ONNX Conv ``q`` paired with ``c`` carries an activation that ``c`` does not, and the activation that
    alone reads ``b``'s output has no partner: then ``b`` belongs to the fold and the kept node to the BN
    after the activation."""
    if len(q.callables) <= len(entries[c].callables) or len(consumers[b]) != 1:
        return False
    a = consumers[b][0]
    return entries[a].kind == "act" and entries[a].inputs == [(b,)] and a not in partner


def fold_weights(conv: dict, bn: dict) -> dict[str, np.ndarray]:
    """``weight · s`` and ``(bias - mean) · s + beta`` (``s = gamma / sqrt(var + eps)``, per output channel:
    axis 0 of the canonical weight), in float64 rounded to the weight's dtype."""
    var = bn["var"].astype(np.float64)
    gamma = bn["gamma"].astype(np.float64) if "gamma" in bn else np.ones_like(var)
    beta = bn["beta"].astype(np.float64) if "beta" in bn else np.zeros_like(var)
    s = gamma / np.sqrt(var + float(bn["eps"]))
    w = conv["weight"]
    folded = dict(conv)
    folded["weight"] = (w.astype(np.float64) * s.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)
    bias = conv["bias"].astype(np.float64) if "bias" in conv else np.zeros_like(var)
    folded["bias"] = ((bias - bn["mean"].astype(np.float64)) * s + beta).astype(w.dtype)
    folded["unfolded_weight"] = w
    if "bias" in conv:
        folded["unfolded_bias"] = conv["bias"]
    for key in ("gamma", "beta", "mean", "var", "eps"):
        if key in bn:
            folded[f"bn_{key}"] = bn[key]
    return folded


def merge(trace: Trace, chains: list[tuple[int, ...]]) -> Trace:
    """A new trace where each chain is one entry (the first's place, the last's output)."""
    if not chains:
        return trace
    head = {chain[0]: chain for chain in chains}
    absorbed = {i: chain[0] for chain in chains for i in chain[1:]}
    new_index: dict[int, int] = {INPUT: INPUT}
    kept = [i for i in range(len(trace.entries)) if i not in absorbed]
    for n, i in enumerate(kept):
        new_index[i] = n
    for i, h in absorbed.items():
        new_index[i] = new_index[h]

    def remap(operand: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted({new_index[p] for p in operand}))

    entries: list[Entry] = []
    for i in kept:
        e = trace.entries[i]
        note = {"note": e.cache["note"]} if "note" in e.cache else {}  # merged in an earlier round
        merged = replace(e, index=new_index[i], inputs=[remap(o) for o in e.inputs], cache=note)
        if i in head:
            parts = [trace.entries[k] for k in head[i]]
            last, bn = parts[-1], parts[1]
            merged.name = f"{e.name}+{bn.name}"
            merged.type = "+".join(p.type for p in parts)
            merged.raw, merged.canonical = last.raw, last.canonical
            merged.callables = [c for p in parts for c in p.callables]
            merged.weights = fold_weights(e.weights, bn.weights)
            merged.bn = bn.bn
            merged.cache["note"] = NOTE
        entries.append(merged)
    return replace(trace, entries=entries, output_producers=remap(trace.output_producers))
