"""Trace a ``torch.nn.Module``: every layer of a known kind, its output and where its inputs came from.

The module (a deep copy: the caller's is never changed) runs once, eagerly, under

* forward hooks on the modules whose class is in :data:`~bnkit.diagnose.kinds.TORCH_MODULES`, which
  record their outputs (the operations inside such a module are not looked at);
* a ``TorchFunctionMode`` that sees every other torch call — ``F.relu(x)``, ``x + y``,
  ``torch.cat``, ``x.view(n, -1)``, and the ``aten`` operators a ``torch.export`` program calls —
  records those in :data:`~bnkit.diagnose.kinds.TORCH_FUNCTIONS` and passes every other call's
  provenance on, so that data flow is followed through reshapes, slices and layers of no kind.

No ``torch.fx`` trace is needed, so models with data-dependent control flow, ``.pt2`` programs
and fx ``GraphModule`` s are traced the same way. Provenance is kept per tensor object (the
tensors stay referenced for the run, so ids are not reused); an in-place operation gives its
tensor the provenance of the operation.
"""

from __future__ import annotations

import contextlib
import functools
import importlib

import numpy as np

from bnkit.conventions import TORCH, Convention
from bnkit.diagnose.kinds import TORCH_FUNCTIONS, TORCH_MODULES, TORCH_RANDOM_MODULES, kind_of
from bnkit.diagnose.report import BatchNormState
from bnkit.diagnose.trace import (
    INPUT,
    Entry,
    Recorder,
    Trace,
    describe_operands,
    folds_into,
    magnitude,
    renorm_state,
    to_numpy,
)

__all__ = ["trace_torch", "torch_bn_state"]


def _resolve(path: str):
    """The object a dotted name stands for: ``torch.relu``, ``Tensor.add_``, ``aten.add.Tensor``."""
    import torch

    head, *rest = path.split(".")
    if head == "Tensor":
        obj = torch.Tensor
    elif head == "aten":
        obj = torch.ops.aten
    else:
        module_path = head
        obj = importlib.import_module(head)
        while rest:
            try:
                obj = importlib.import_module(f"{module_path}.{rest[0]}")
                module_path = f"{module_path}.{rest.pop(0)}"
            except ImportError:
                break
    for part in rest:
        obj = getattr(obj, part)
    return obj


@functools.cache
def _tables():
    """(module classes and kinds, {function: [(kind, check), ...]}), resolved once."""
    modules = []
    for path, kind in TORCH_MODULES:
        if path in _FOREIGN:
            continue
        try:
            modules.append((_resolve(path), kind))
        except (AttributeError, ImportError):  # not in this torch version
            continue
    functions = {}
    for path, kind, check in TORCH_FUNCTIONS:
        try:
            specs = functions.setdefault(_resolve(path), [])
            if (kind, check) not in specs:
                specs.append((kind, check))
        except (AttributeError, ImportError, RuntimeError):
            continue
    return tuple(modules), functions


@functools.cache
def _composite_kinds() -> dict[str, str]:
    """Class name -> kind of the known modules that hold other known modules (a separable
    convolution's two convolutions)."""
    from torch import nn

    return {cls.__name__: kind for cls, kind in _tables()[0] if issubclass(cls, nn.Sequential)}


# classes of other packages (torchvision's frozen batch norm): matched by name, so that tracing imports nothing
_FOREIGN = {path: kind for path, kind in TORCH_MODULES if not path.startswith(("torch.", "bnkit."))}


def module_kind(module) -> str | None:
    for cls, kind in _tables()[0]:
        if isinstance(module, cls):
            return kind
    for cls in type(module).__mro__:
        kind = _FOREIGN.get(f"{cls.__module__}.{cls.__qualname__}")
        if kind is not None:
            return kind
    return None


def torch_bn_state(module) -> BatchNormState:
    """A PyTorch batch norm's settings and mode, and its running statistics before the run."""
    if module_kind(module) == "bn" and not hasattr(module, "momentum"):
        # torchvision's FrozenBatchNorm2d: fixed statistics and affine, in train() as in eval()
        return BatchNormState(
            framework="torch",
            eps=float(module.eps),
            momentum=None,
            momentum_weighs=TORCH.momentum_weighs,
            new_weight=None,
            running_var_estimator=TORCH.running_var_estimator,
            tracks_running_stats=True,
            uses_batch_stats=False,
            in_training_mode=bool(module.training),
            trainable=False,
            running_mean_before=module.running_mean.detach().cpu().numpy().copy(),
            running_var_before=module.running_var.detach().cpu().numpy().copy(),
        )
    conv = getattr(module, "convention", None)
    conv = conv if isinstance(conv, Convention) else TORCH
    momentum = module.momentum
    tracks = module.running_mean is not None
    new_weight = None if momentum is None else conv.weights(momentum)[1]
    return BatchNormState(
        framework="torch",
        eps=float(module.eps),
        momentum=None if momentum is None else float(momentum),
        momentum_weighs=conv.momentum_weighs,
        new_weight=new_weight,
        running_var_estimator=conv.running_var_estimator,
        tracks_running_stats=tracks,
        uses_batch_stats=bool(module.training or not tracks),
        in_training_mode=bool(module.training),
        trainable=bool(module.weight is None or module.weight.requires_grad),
        running_mean_before=module.running_mean.detach().cpu().numpy().copy() if tracks else None,
        running_var_before=module.running_var.detach().cpu().numpy().copy() if tracks else None,
        **renorm_state(module, conv),
    )


def _module_weights(module, kind: str) -> dict[str, np.ndarray]:
    """Canonical parameters: ``weight`` as (out, in per group, *kernel) (a separable convolution's
    ``depthwise`` kernel and its pointwise ``weight`` as (out, in), as Keras holds them); batch-norm
    statistics; a layer norm's ``gamma``, ``beta`` and ``eps``."""
    from torch import nn

    weights: dict[str, np.ndarray] = {}
    depthwise, pointwise = getattr(module, "depthwise", None), getattr(module, "pointwise", None)
    if kind == "conv" and getattr(depthwise, "weight", None) is not None and hasattr(pointwise, "weight"):
        weights["depthwise"] = to_numpy(depthwise.weight)
        w = to_numpy(pointwise.weight)
        weights["weight"] = w.reshape(w.shape[0], -1)
        if pointwise.bias is not None:
            weights["bias"] = to_numpy(pointwise.bias)
    elif kind in ("conv", "dense") and getattr(module, "weight", None) is not None:
        w = to_numpy(module.weight)
        if isinstance(module, nn.modules.conv._ConvTransposeNd):  # (in, out per group, *k)
            w = np.swapaxes(w, 0, 1)
        weights["weight"] = w
        if getattr(module, "bias", None) is not None:
            weights["bias"] = to_numpy(module.bias)
    elif kind == "bn":
        for key, attr in (("gamma", "weight"), ("beta", "bias"), ("mean", "running_mean"), ("var", "running_var")):
            value = getattr(module, attr, None)
            if value is not None:
                weights[key] = to_numpy(value).copy()
        weights["eps"] = np.asarray(float(module.eps))
    elif kind == "ln":
        for key, attr in (("gamma", "weight"), ("beta", "bias")):
            if getattr(module, attr, None) is not None:
                weights[key] = to_numpy(getattr(module, attr)).copy()
        weights["eps"] = np.asarray(float(module.eps))
    elif kind == "rnn":  # the last layer's kernels, which make the module's output: one Keras layer's
        last, directions = f"_l{module.num_layers - 1}", ("", "_reverse")[: 1 + bool(module.bidirectional)]
        parts = [getattr(module, f"weight_{w}{last}{d}") for d in directions for w in ("ih", "hh")]
        weights["weight"] = np.concatenate([to_numpy(p).ravel() for p in parts])
    return weights


def _function_weights(kind: str, args: tuple, kwargs: dict, torch) -> dict[str, np.ndarray]:
    """The parameters a functional call was given: a convolution's or linear's ``weight``;
    ``F.layer_norm(x, shape, weight, bias, eps)``'s (``aten.native_layer_norm`` takes the same)."""
    weights: dict[str, np.ndarray] = {}
    if kind in ("conv", "dense"):
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        if isinstance(w, torch.Tensor):
            weights["weight"] = to_numpy(w)
    elif kind == "ln":
        named = dict(zip(("input", "shape", "weight", "bias", "eps"), args, strict=False)) | kwargs
        for key, name in (("gamma", "weight"), ("beta", "bias")):
            if isinstance(named.get(name), torch.Tensor):
                weights[key] = to_numpy(named[name]).copy()
        if isinstance(named.get("eps"), float):
            weights["eps"] = np.asarray(named["eps"])
    return weights


def _tensors(value, torch) -> list:
    """The tensors in a call's arguments, in order (one level into lists and tuples)."""
    found = []
    for item in value:
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            found.extend(t for t in item if isinstance(t, torch.Tensor))
    return found


def _first_tensor(value, torch):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if isinstance(value, dict):
        return next((v for v in value.values() if isinstance(v, torch.Tensor)), None)
    return None


def _check(check: str | None, operands: list, result, constants: list) -> bool:
    if check is None:
        return True
    if check == "operands":
        return len(operands) >= 2
    if check == "constant":
        return len(operands) == 1 and len(constants) >= 1
    first = operands[0] if operands else None
    if first is None or first.ndim < 3:
        return False
    if check == "to_2d":
        return result.ndim == 2 and result.shape[0] == first.shape[0]
    if check == "spatial":
        n, c = first.shape[:2]
        return tuple(result.shape[:2]) == (n, c) and result.numel() == n * c
    if check == "crop":
        shrinks = result.ndim == first.ndim and all(r <= f for r, f in zip(result.shape, first.shape, strict=True))
        return shrinks and result.numel() < first.numel()
    raise ValueError(f"unknown check {check!r} in bnkit.diagnose.kinds.TORCH_FUNCTIONS")


def _op_name(func) -> str:
    name = getattr(func, "__name__", None) or str(func)
    if "." in name:  # aten.add.Tensor -> add
        parts = name.split(".")
        name = parts[-2] if len(parts) > 1 else parts[-1]
    return name.strip("_") or name


class _Recorder(Recorder):
    def __init__(self, work, torch, perturb=None) -> None:
        super().__init__(perturb)
        self.torch = torch
        self.names = {m: n for n, m in work.named_modules()}
        self.type_names = getattr(work, "_bnkit_layer_types", {}) or {}
        # leaves of a .pt2 program left as sub-programs: their operators are the layer they came from
        self.leaf_types = {
            path: self.type_names[path]
            for m, path in self.names.items()
            if path in self.type_names and next(m.children(), None) is None and module_kind(m) is None
        }
        self.active = None  # the recognised module now running (its insides are not looked at)
        self.busy = False
        self.stack: list[str] = []  # the module paths now running, for naming functional entries
        self.bn_states: dict[int, BatchNormState] = {}
        # the model's parameters and buffers: the constants of "constant" checks
        self.constants = {id(t) for t in (*work.parameters(), *work.buffers())}

    def module_kind(self, module) -> str | None:
        """The kind of a module; in a loaded ``.pt2`` program, also of a sub-program that stands
        for a composite layer of a known class (bnkit's SeparableConv2d: one layer, as in Keras)."""
        kind = module_kind(module)
        if kind is None and next(module.children(), None) is not None:
            kind = _composite_kinds().get(self.type_names.get(self.names.get(module, ""), ""))
        return kind

    def results(self, operands, result) -> list:
        outputs = result if isinstance(result, (list, tuple)) else (result,)
        return [out for out in outputs if isinstance(out, self.torch.Tensor)]

    def perturbed(self, entry: Entry, kind: str, output):
        """``output``, with simulated rounding noise when this run measures its propagation."""
        if self.perturb is None or not isinstance(output, self.torch.Tensor):
            return output
        noisy = self.perturb(entry, kind, output)
        return output if noisy is None else noisy

    def record(self, name, type_name, kind, operands, output, callable_, weights=None, bn=None):
        """Record a layer's output; return the tensor the model goes on with (``output``, or it
        with simulated rounding noise)."""
        operands = [t for t in operands if self.of(t)]  # constants and parameters carry no data flow
        inputs = [self.of(t) for t in operands]
        if (
            kind in ("pool", "gpool")
            and len(operands) == 1
            and operands[0].shape == output.shape
            and self.torch.equal(operands[0], output)
        ):  # an identity pooling (adaptive to its input's size)
            self.pass_on(operands, output)
            return output
        p = folds_into(self.entries, kind, inputs)
        if p is not None and self.output_ids.get(p) == id(operands[0]) and p not in self.consumed:
            # an activation applied to a convolution's or dense layer's output alone, or a chain of
            # arithmetic with constants: folded in
            prev = self.entries[p]
            output = self.perturbed(prev, kind, output)
            prev.type = f"{prev.type}+{type_name}"
            raw = to_numpy(output).copy()
            prev.set_output(raw, raw)
            prev.callables.append(callable_)
            for key, value in (weights or {}).items():
                prev.weights[f"{key}_{len(prev.callables) - 1}"] = value
            self.consumed.add(p)
            self.output_ids[p] = id(output)
            self.source(output, (p,))
            return output
        for operand in inputs:
            self.consumed.update(operand)
        index = len(self.entries)
        out = to_numpy(output) if self.perturb is not None else to_numpy(output).copy()  # noisy: copied below
        entry = Entry(index, name, type_name, kind, out, out, inputs=inputs)
        keep = kind_of(kind).parametric and len(operands) == 1
        entry.input_scales, entry.input_shapes, entry.inputs_finite, kept = describe_operands(self, operands, keep)
        if keep:
            entry.input_raw = kept
        entry.callables.append(callable_)
        entry.weights = weights or {}
        entry.bn = bn
        if kind == "flatten" and operands:
            entry.pre_flatten_shape = tuple(operands[0].shape)
        self.entries.append(entry)
        if self.perturb is not None:
            output = self.perturbed(entry, kind, output)
            raw = to_numpy(output).copy()
            entry.set_output(raw, raw)
        self.output_ids[index] = id(output)
        self.source(output, (index,))
        return output

    # ---- hooks ------------------------------------------------------------------------
    def pre_hook(self, module, args):
        if self.busy:
            return
        self.stack.append(self.names.get(module, ""))
        if self.active is not None:
            return
        kind = self.module_kind(module)
        if kind is not None:
            self.active = module
            if kind == "bn":
                self.busy = True
                try:
                    self.bn_states[id(module)] = torch_bn_state(module)
                finally:
                    self.busy = False

    def hook(self, module, args, output):
        if self.busy:
            return
        if self.stack:
            self.stack.pop()
        if self.active is not module:
            return
        self.active = None
        out = _first_tensor(output, self.torch)
        if out is None:
            return
        kind = self.module_kind(module)
        self.busy = True
        try:
            path = self.names.get(module, type(module).__name__)
            type_name = self.type_names.get(path, type(module).__name__)
            bn = self.bn_states.pop(id(module), None) if kind == "bn" else None
            operands = _tensors(args, self.torch)
            weights = _module_weights(module, kind)
            went_on = self.record(self.unique(path), type_name, kind, operands, out, module, weights, bn)
            if out is not output:  # the other outputs (a pooling's indices) come from the same layer
                self.pass_on([out], output)
            elif went_on is not out:
                return went_on
        finally:
            self.busy = False

    def function(self, func, args, kwargs, result):
        torch = self.torch
        operands = _tensors(args, torch) + _tensors(tuple(kwargs.values()), torch)
        specs = _tables()[1].get(func, ())
        out = _first_tensor(result, torch)
        data = [t for t in operands if self.of(t)]
        constants = [t for t in operands if id(t) in self.constants and not self.of(t)]
        spec = next((s for s in specs if _check(s[1], data, out, constants)), None) if out is not None else None
        if spec is not None and data:
            kind, _ = spec
            op = _op_name(func)
            where = self.stack[-1] if self.stack else ""
            if where in self.leaf_types:  # a .pt2 sub-program standing for one layer: named as it
                name, op = self.unique(where), self.leaf_types[where]
            else:
                name = self.unique(f"{where}.{op}" if where else op)
            weights = _function_weights(kind, args, kwargs, torch)
            if kind == "scale":
                weights["constant"] = to_numpy(constants[0]).copy()
            rest, kw = tuple(args[1:]), dict(kwargs)
            if kind == "concat":  # torch.cat([a, b], dim): re-run on new operands

                def rerun(*ts, func=func, rest=rest, kw=kw):
                    return func(list(ts), *rest, **kw)

            elif kind in ("add", "mul"):

                def rerun(*ts, func=func, kw=kw):
                    return func(*ts, **kw)

            elif kind == "scale":  # the data operand may come second (layer_scale * x)
                slot = next(i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and self.of(a))

                def rerun(t, func=func, args=args, slot=slot, kw=kw):
                    return func(*args[:slot], t, *args[slot + 1 :], **kw)

            else:

                def rerun(t, func=func, rest=rest, kw=kw):
                    r = func(t, *rest, **kw)
                    return r[0] if isinstance(r, (tuple, list)) else r

            went_on = self.record(name, op, kind, data, out, rerun, weights)
            if out is not result:
                self.pass_on([out], result)
                return result
            return went_on
        self.pass_on(operands, result)
        return result


def trace_torch(model, x: np.ndarray, training: bool, perturb=None) -> Trace:
    """Run a copy of ``model`` on ``x`` (NCHW) and record every layer of a known kind.

    ``perturb(entry, kind, output) -> output or None``, when given, replaces each traced layer's
    output as the model goes on (:func:`bnkit.diagnose.tolerance.measure_rounding` adds simulated
    rounding noise this way)."""
    import torch

    with _restored(model, torch):
        if training:
            model.train()
        for m in model.modules():  # random masks cannot agree across frameworks
            if {c.__name__ for c in type(m).__mro__} & set(TORCH_RANDOM_MODULES):
                m.eval()
        return _run(model, x, perturb, torch)


@contextlib.contextmanager
def _restored(model, torch):
    """Every module's mode and every buffer (running statistics, counters) as they were, afterwards:
    the caller's model is run in place (a copy of a large model costs more than the run)."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(m, name, b.detach().clone()) for m in model.modules() for name, b in m.named_buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, name, value in buffers:
                current = getattr(m, name, None)
                if isinstance(current, torch.Tensor) and current.shape == value.shape:
                    current.copy_(value)
                else:
                    setattr(m, name, value)
        for m, training in modes:
            m.training = training


def _run(work, x: np.ndarray, perturb, torch) -> Trace:
    from torch.overrides import TorchFunctionMode

    recorder = _Recorder(work, torch, perturb)

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if recorder.busy or recorder.active is not None:
                return func(*args, **kwargs)
            result = func(*args, **kwargs)
            recorder.busy = True
            try:
                return recorder.function(func, args, kwargs, result)
            finally:
                recorder.busy = False

    handles = []
    for m in work.modules():
        handles.append(m.register_forward_pre_hook(recorder.pre_hook))
        handles.append(m.register_forward_hook(recorder.hook))
    inp = torch.from_numpy(np.ascontiguousarray(x))
    recorder.source(inp, (INPUT,))
    try:
        with torch.no_grad(), Mode():
            out = work(inp)
    finally:
        for h in handles:
            h.remove()
    for e in recorder.entries:
        if e.bn is not None and e.bn.tracks_running_stats:
            module = e.callables[0]
            e.bn.running_mean_after = module.running_mean.detach().cpu().numpy().copy()
            e.bn.running_var_after = module.running_var.detach().cpu().numpy().copy()
            if e.bn.renorm:
                e.bn.renorm_after = (to_numpy(module.renorm_mean).copy(), to_numpy(module.renorm_stddev).copy())
    # a dict of outputs in key order, as Keras orders a model's (keras.tree sorts them): the same output on
    # both sides of a conversion (torchvision's {"out", "aux"} is aux first in Keras)
    final = _first_tensor(dict(sorted(out.items(), key=lambda kv: str(kv[0]))) if isinstance(out, dict) else out, torch)
    if final is None and hasattr(out, "_fields"):  # a namedtuple of outputs
        final = _first_tensor(tuple(out), torch)
    if final is None:
        raise TypeError(f"the PyTorch model returned {type(out).__name__}, not a tensor")
    eps = float(torch.finfo(final.dtype).eps) if final.is_floating_point() else float(np.finfo(np.float32).eps)
    return Trace(
        framework="torch",
        entries=recorder.entries,
        output=to_numpy(final).copy(),
        output_producers=recorder.of(final),
        input_scale=magnitude(x),
        dtype_eps=eps,
        model=work,
    )
