"""Which converter translates which layer: one registered function per layer type and direction.

A converter is a plain function registered with a decorator, in the family file
(``bnkit/convert/families/*.py``) that also holds the opposite direction:

* ``@from_keras(L.Conv2D, ...)`` — Keras layer classes → PyTorch. Called as
  ``convert(b, layer, node, inputs)`` with ``b`` the :class:`~bnkit.convert.keras_walker.KerasToTorch`
  builder, the Keras layer, its graph node and its inputs as :class:`~bnkit.convert.values.TorchValue`;
  returns the output's ``TorchValue``.
* ``@from_torch(nn.Conv2d, F.relu, "torchvision.ops.misc.Foo", methods=("relu",))`` — PyTorch module
  classes (a dotted string names a class of a package bnkit does not import), functions and
  operators (anything else callable: ``torch.cat``, ``operator.add``) and tensor-method names →
  Keras. Called as ``convert(b, node, target)`` with ``b`` the
  :class:`~bnkit.convert.torch_walker.TorchToKeras` builder, the ``torch.fx`` node and the module
  instance, the function, or the method name; returns a :class:`~bnkit.convert.values.KerasValue`
  (or a plain Python value such as a shape, for nodes that only feed other nodes' arguments).

A class's converter also serves its subclasses that do not override ``forward`` (PyTorch) or
``call`` (Keras): a subclass that computes something else is not silently translated as its base.
``subclasses=True`` lets a converter take every subclass (it then checks what it needs itself).
The modules with a PyTorch converter are exactly the leaves the ``torch.fx`` tracer keeps whole.

Flags, read by the graph walkers:

* ``elementwise``: a one-input layer that applies the same function at every position
  (activations, Dropout), so it commutes with any reordering of the features: a Flatten whose
  order is fixed in the next Dense's weights, and a tensor in any layout, pass through it. Its
  converter must carry the input's layout over (``x.like(...)``) and read axes through the
  value (``TorchValue.torch_dim``, ``KerasValue.keras_axis``).
* ``permuted_input``: the converter takes its inputs in any layout (``x.layout``, see
  :mod:`bnkit.convert.layouts`) and handles it itself (reshapes, permutes, arithmetic, layer
  norm, Dense). Other converters get their inputs in the mapped layout: the walker permutes a
  value left in another layout (by ``x.permute(0, 2, 3, 1)``, a Keras ``Permute``) first.
* ``non_negative``: the output is ``>= 0`` (ReLU, sigmoid, ...), so zero padding cannot win a max
  pooling of it. ``True``, or a predicate on the layer / module / function / method name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "Converter",
    "from_keras",
    "from_torch",
    "keras_converter",
    "torch_module_converter",
    "torch_function_converter",
    "torch_method_converter",
    "keras_unsupported_reason",
    "torch_unsupported_reason",
    "registered",
]


@dataclass(frozen=True)
class Converter:
    """A registered conversion function and what the graph walkers need to know about it."""

    convert: Callable
    elementwise: bool = False
    permuted_input: bool = False
    non_negative: bool | Callable[[object], bool] = False
    subclasses: bool = False

    def output_non_negative(self, target) -> bool:
        """Whether the output of ``target`` (a layer, module, function or method name) is ``>= 0``."""
        return bool(self.non_negative(target)) if callable(self.non_negative) else self.non_negative

    @property
    def where(self) -> str:
        return f"{self.convert.__module__}.{self.convert.__qualname__}"


@dataclass
class _ByClass:
    """Converters keyed by class, or by a class's dotted ``module.QualName``; see the module docstring."""

    method: str  # the method a subclass must not override to inherit its base's converter
    by_class: dict[type, Converter] = field(default_factory=dict)
    by_name: dict[str, Converter] = field(default_factory=dict)

    def add(self, key, converter: Converter) -> None:
        table = self.by_name if isinstance(key, str) else self.by_class
        _add(table, key, converter)

    def lookup(self, cls: type) -> tuple[type | None, Converter | None]:
        """The nearest registered class in ``cls``'s MRO and its converter, if ``cls`` may use it."""
        for base in cls.__mro__:
            converter = self.by_class.get(base) or self.by_name.get(f"{base.__module__}.{base.__qualname__}")
            if converter is None:
                continue
            inherits = getattr(cls, self.method, None) is getattr(base, self.method, None)
            return base, converter if base is cls or converter.subclasses or inherits else None
        return None, None


_KERAS_LAYERS = _ByClass("call")
_TORCH_MODULES = _ByClass("forward")
_TORCH_FUNCTIONS: dict[object, Converter] = {}
_TORCH_METHODS: dict[str, Converter] = {}


def _add(table: dict, key, converter: Converter) -> None:
    existing = table.get(key)
    if existing is not None and existing.convert is not converter.convert:
        raise ValueError(f"{key!r} already has a converter ({existing.where}); cannot add {converter.where}")
    table[key] = converter


def _decorator(register, **flags):
    def decorate(fn: Callable) -> Callable:
        register(Converter(fn, **flags))
        return fn

    return decorate


def from_keras(
    *layer_classes, elementwise=False, permuted_input=False, non_negative=False, subclasses=False
) -> Callable:
    """Register ``convert(b, layer, node, inputs) -> TorchValue`` for these Keras layer classes
    (classes, or dotted ``"module.QualName"`` strings)."""
    if not layer_classes:
        raise TypeError("from_keras needs at least one Keras layer class")

    def register(converter: Converter) -> None:
        for cls in layer_classes:
            if not isinstance(cls, (type, str)):
                raise TypeError(f"from_keras takes layer classes, got {cls!r}")
            _KERAS_LAYERS.add(cls, converter)

    flags = dict(elementwise=elementwise, permuted_input=permuted_input, non_negative=non_negative)
    return _decorator(register, subclasses=subclasses, **flags)


def from_torch(
    *targets, methods=(), elementwise=False, permuted_input=False, non_negative=False, subclasses=False
) -> Callable:
    """Register ``convert(b, node, target) -> KerasValue`` for these PyTorch module classes
    (classes, or dotted ``"module.QualName"`` strings), functions, and tensor methods (by name)."""
    if isinstance(methods, str):
        methods = (methods,)
    if not targets and not methods:
        raise TypeError("from_torch needs a module class, a function or a method name")

    def register(converter: Converter) -> None:
        for target in targets:
            if isinstance(target, (type, str)):
                _TORCH_MODULES.add(target, converter)
            elif callable(target):
                _add(_TORCH_FUNCTIONS, target, converter)
            else:
                raise TypeError(f"from_torch takes module classes, functions and methods=, got {target!r}")
        for name in methods:
            _add(_TORCH_METHODS, name, converter)

    flags = dict(elementwise=elementwise, permuted_input=permuted_input, non_negative=non_negative)
    return _decorator(register, subclasses=subclasses, **flags)


def keras_converter(layer) -> Converter | None:
    """The converter of a Keras layer (an instance), or ``None``."""
    return _KERAS_LAYERS.lookup(type(layer))[1]


def torch_module_converter(module) -> Converter | None:
    """The converter of a PyTorch module (an instance), or ``None``: ``None`` means not a traced leaf."""
    return _TORCH_MODULES.lookup(type(module))[1]


def keras_unsupported_reason(layer) -> str:
    """Why a Keras layer (an instance) has no converter, in words."""
    return _unsupported_reason(_KERAS_LAYERS, type(layer), "layer", "call()")


def torch_unsupported_reason(module) -> str:
    """Why a PyTorch module (an instance) has no converter, in words."""
    return _unsupported_reason(_TORCH_MODULES, type(module), "module", "forward()")


def _unsupported_reason(table: _ByClass, cls: type, kind: str, method: str) -> str:
    base, _ = table.lookup(cls)
    if base is not None and base is not cls:
        return f"a subclass of {base.__name__} with its own {method}, which bnkit.convert does not translate"
    return f"this {kind} type is not supported by bnkit.convert"


def torch_function_converter(fn) -> Converter | None:
    try:
        return _TORCH_FUNCTIONS.get(fn)
    except TypeError:  # an unhashable target
        return None


def torch_method_converter(name: str) -> Converter | None:
    return _TORCH_METHODS.get(name)


def registered() -> dict[str, list[str]]:
    """What is registered, by kind, as readable names (for docs and debugging)."""

    def name(key) -> str:
        if isinstance(key, str):
            return key
        module = getattr(key, "__module__", None) or ""
        if isinstance(key, type):
            return f"{module}.{key.__qualname__}"
        return f"{module}.{getattr(key, '__name__', str(key))}".lstrip(".")

    return {
        "keras layers": sorted(map(name, [*_KERAS_LAYERS.by_class, *_KERAS_LAYERS.by_name])),
        "torch modules": sorted(map(name, [*_TORCH_MODULES.by_class, *_TORCH_MODULES.by_name])),
        "torch functions": sorted(map(name, _TORCH_FUNCTIONS)),
        "torch methods": sorted(_TORCH_METHODS),
    }
