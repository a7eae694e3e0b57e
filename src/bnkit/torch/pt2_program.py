"""The program of a ``.pt2`` archive (``models/model.json``), checked as data before torch reads it.

torch's deserialiser turns this JSON into a ``torch.fx`` graph: it resolves every call target by
name under ``torch``, hands the shape expressions to ``sympy.sympify``, writes node names into
Python code it compiles and keeps the program's guards (Python source) to run on every call.
:func:`check_program` walks the whole JSON first (iteratively: no recursion on a deep document)
and refuses, by name:

* a call target that is not one of the operators bnkit can bound (see :func:`check_target`): a
  registered operator of a namespace that computes on tensors (``aten``, ``prims``,
  ``torchvision``...) with no side effect (printing, warnings, files, the global random seed,
  TorchScript's string and list helpers), a higher-order operator of :data:`HIGHER_ORDER`
  (``print``, ``while_loop``, ``with_effects``, ``auto_functionalized``... are refused), or one of
  the arithmetic functions torch's serialiser writes for symbolic sizes;
* a shape expression that is not bounded integer arithmetic (:mod:`bnkit.torch.shape_expressions`);
  the checked expression, written again, replaces the file's text;
* an integer outside int64, a range constraint that is not an int64 or null, a string argument
  that is long or holds control characters, a name that is not a Python identifier.

It drops what bnkit never needs and torch would turn into code: the guards, node stack traces and
annotations (written into the generated forward as comments).
"""

from __future__ import annotations

import contextlib
import keyword
import logging
import re

from bnkit.text import has_control_characters, one_line
from bnkit.torch.pt2_errors import ArchiveError, UnsafeArchiveError
from bnkit.torch.shape_expressions import ExpressionError, check_expression

__all__ = ["check_program", "check_target", "deserialize", "HIGHER_ORDER", "TENSOR_NAMESPACES", "PROGRAM"]

PROGRAM = "models/model.json"  # the one program torch.export.save writes (its model is named "model")

# higher-order operators whose work bnkit can bound: each runs its sub-programs (themselves checked
# here) once, or once per slice of a tensor; the rest loop without bound (while_loop), print, carry
# effects or arbitrary callables (with_effects, flat_apply, invoke_leaf_function, call_torchbind,
# inline_asm_elementwise, auto_functionalized...)
HIGHER_ORDER = frozenset(
    {"cond", "map_impl", "scan", "invoke_subgraph", "wrap_with_set_grad_enabled", "wrap_with_autocast"}
)
# operator namespaces that compute on tensors; others are TorchScript's primitives (prim::Print,
# prim::RaiseException), profiling, collectives that wait for a peer (c10d, _c10d_functional,
# symm_mem), debugging (debugprims::load_tensor), compiler internals...
TENSOR_NAMESPACES = frozenset({"aten", "prims", "torchvision", "quantized_decomposed"})
# operators of those namespaces with an effect outside the tensors they return
_SIDE_EFFECTS = frozenset({
    "aten::_print", "aten::warn", "aten::format", "aten::percentFormat", "aten::str", "aten::save",
    "aten::from_file", "aten::manual_seed", "aten::set_grad_enabled", "aten::record_stream",
    "aten::_cufft_set_plan_cache_max_size", "aten::_cufft_clear_plan_cache", "prims::_sink_tokens",
})  # fmt: skip
# operators without a tensor among their arguments or results that exported programs use: checks
# of symbolic sizes; every other such aten operator is a TorchScript helper on strings, lists,
# dicts or the runtime (aten::ljust, aten::mul.left_t, aten::wait...), which bnkit does not run
_SIZE_CHECKS = frozenset({"aten::_assert_scalar", "aten::sym_constrain_range", "aten::sym_constrain_range_for_size"})
# the non-operator call targets torch's serialiser writes, by the name it writes them under
_ARITHMETIC = {f"_operator.{n}" for n in (
    "eq", "ne", "le", "ge", "lt", "gt", "neg", "pos", "mul", "add", "sub", "floordiv", "mod", "pow", "truediv",
    "and_", "or_", "lshift", "rshift", "getitem",
)} | {"math.trunc", "math.ceil", "math.floor", "math.sqrt"} | {f"torch.{n}" for n in (
    "sym_not", "sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_sqrt", "sym_sum", "_sym_sqrt",
    "_C._set_grad_enabled", "autograd.grad_mode.set_grad_enabled", "amp.autocast_mode._enter_autocast",
    "amp.autocast_mode._exit_autocast",
)}  # fmt: skip
_OPERATOR = re.compile(r"torch\.ops\.(?P<ns>[A-Za-z_]\w*)\.(?P<op>[A-Za-z_]\w*)(?:\.(?P<overload>[A-Za-z_]\w*))?")
_INT64 = (-(2**63), 2**63 - 1)
MAX_STRING = 4_096  # an operator's string argument: a reduction mode, an assertion's message


def _show(value) -> str:
    text = repr(value)  # control characters escaped
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(e: BaseException) -> str:
    return one_line(e, 200)


# ------------------------------------------------------------------------------- call targets


def check_target(target) -> None:
    """Refuse ``target`` unless it is an operator bnkit can bound (see the module doc)."""
    if not isinstance(target, str):
        raise UnsafeArchiveError(f"a graph node calls {_show(target)}, which is not an operator name")
    if target in _ARITHMETIC:
        return
    match = _OPERATOR.fullmatch(target)
    if match is None:
        raise UnsafeArchiveError(
            f"a graph node calls {_show(target)[1:-1]}, which is not a PyTorch operator: "
            "it could run any code when the model runs"
        )
    namespace, name, overload = match.group("ns", "op", "overload")
    if namespace == "higher_order":
        if name not in HIGHER_ORDER or overload is not None:
            raise UnsafeArchiveError(
                f"a graph node calls the higher-order operator {target}, which bnkit does not run (it reads "
                f"only {', '.join(sorted(HIGHER_ORDER))}: the others print, loop without bound or carry effects)"
            )
        return  # torch reports one this version lacks as an unreadable program
    if namespace not in TENSOR_NAMESPACES:
        raise UnsafeArchiveError(
            f"a graph node calls {target}: operators of {namespace!r} are not computations on tensors "
            f"bnkit runs (it reads {', '.join(sorted(TENSOR_NAMESPACES))})"
        )
    if overload is None:  # torch writes an operator with its overload; a packet dispatches on its own
        raise UnsafeArchiveError(f"a graph node calls {target}, an operator without its overload")
    operator = _registered(namespace, name, overload)
    if operator is None:
        raise ArchiveError(f"a graph node calls {target}, which is not a registered operator of this torch")
    schema = operator._schema
    if schema.name in _SIDE_EFFECTS:
        raise UnsafeArchiveError(f"a graph node calls {target}, which acts outside the model (prints, files...)")
    if schema.name not in _SIZE_CHECKS and not _on_tensors(schema):
        raise UnsafeArchiveError(
            f"a graph node calls {target}, which takes and returns no tensor: a TorchScript helper bnkit does not run"
        )


def _registered(namespace: str, name: str, overload: str):
    """The ``OpOverload`` ``torch.ops.<namespace>.<name>.<overload>``, or None; looked up in the registry only."""
    import torch

    try:
        found = getattr(getattr(getattr(torch.ops, namespace), name), overload)
    except (AttributeError, RuntimeError):
        return None
    return found if isinstance(found, torch._ops.OpOverload) else None


def _on_tensors(schema) -> bool:
    return any("Tensor" in str(a.type) for a in (*schema.arguments, *schema.returns))


# ---------------------------------------------------------------------------------- the walk

_IDENTIFIER_KEYS = {"name", "as_name", "user_input_name"}  # become Python names in generated code
_PATH_KEYS = {"parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name", "fqn"}
_NODE_METADATA = ("nn_module_stack", "source_fn_stack", "torch_fn")  # the rest (stack traces...) is dropped
# a character that could end a string or a comment in the Python code torch.fx generates from these names
_UNSAFE_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f\"\\\u2028\u2029]")


def check_identifier(value, what: str) -> None:
    if not (isinstance(value, str) and value.isidentifier() and not keyword.iskeyword(value)):
        raise UnsafeArchiveError(
            f"{what} {_show(value)} is not a Python name: torch.fx would write it into code it runs"
        )


def check_text(value, what: str) -> None:
    if not isinstance(value, str) or _UNSAFE_CHARACTER.search(value):
        raise UnsafeArchiveError(f"{what} {_show(value)} holds a quote, backslash or control character")


def _check_string_argument(value, what: str) -> None:
    if not isinstance(value, str):
        raise ArchiveError(f"{what} {_show(value)} is not a string")
    if len(value) > MAX_STRING:
        raise UnsafeArchiveError(f"{what} of {len(value):,} characters (at most {MAX_STRING:,})")
    if has_control_characters(value):
        raise UnsafeArchiveError(f"{what} {_show(value)} holds a control character")


def _positional_argument(item: dict) -> bool:
    """A node's positional argument (kind 1): torch writes a higher-order operator's with no name, and
    the generated code does not name it; a keyword argument's name is written into the code."""
    return "arg" in item and item.get("kind") == 1


def _check_node_metadata(node: dict) -> None:
    metadata = node.get("metadata")
    if not isinstance(metadata, dict):
        return
    node["metadata"] = kept = {key: metadata[key] for key in _NODE_METADATA if key in metadata}
    for key, value in kept.items():
        check_text(value, f"node metadata {key}")


def _check_range_constraints(constraints) -> None:
    if not isinstance(constraints, dict):
        return  # torch reports a malformed program
    for symbol, bounds in constraints.items():
        for key in ("min_val", "max_val"):
            value = bounds.get(key) if isinstance(bounds, dict) else None
            if value is not None and (type(value) is not int or not _INT64[0] <= value <= _INT64[1]):
                raise ArchiveError(f"the range of size {_show(symbol)} has {key} {_show(value)}, not an int64 or null")


def check_program(program: dict) -> None:
    """Walk the program's JSON (see the module doc); refuse what would run code or cannot be bounded."""
    try:
        _check_program(program)
    except ArchiveError as e:
        raise type(e)(f"{PROGRAM}: {e}") from e


def _check_program(program: dict) -> None:
    program["guards_code"] = []
    if isinstance(program.get("graph_module"), dict):
        program["graph_module"]["metadata"] = {}
    _check_range_constraints(program.get("range_constraints"))
    stack: list = [(program, "")]  # (a value, the key it is under: named in a refusal)
    while stack:
        item, under = stack.pop()
        if isinstance(item, dict):
            if "target" in item:  # a graph node (the only object with a target), complete or not
                check_target(item["target"])
                _check_node_metadata(item)
            for key, value in item.items():
                if key == "as_operator":
                    check_target(value)
                elif key == "expr_str":
                    try:
                        item[key] = check_expression(value)
                    except ExpressionError as e:
                        raise UnsafeArchiveError(
                            f"{e}: torch would evaluate it as Python (sympy.sympify), without bound"
                        ) from e
                elif key in _IDENTIFIER_KEYS and isinstance(value, str):
                    if not (value == "" and _positional_argument(item)):
                        check_identifier(value, key.replace("_", " "))
                elif key in _PATH_KEYS:
                    check_text(value, key.replace("_", " "))
                elif key == "forward_arg_names" and isinstance(value, list):
                    for name in value:
                        check_identifier(name, "forward argument")
                elif key == "as_string":
                    _check_string_argument(value, "a string argument")
                elif key == "as_strings" and isinstance(value, list):
                    for text in value:
                        _check_string_argument(text, "a string argument")
                else:
                    stack.append((value, key))
        elif isinstance(item, list):
            stack.extend((value, under) for value in item)
        elif type(item) is int and not _INT64[0] <= item <= _INT64[1]:
            raise ArchiveError(f"the integer {_show(item)} (in {_show(under)}) is outside int64: no size or index is")


# ------------------------------------------------------------------------------ deserialising


def deserialize(program_json: dict, state_dict: dict, constants: dict):
    """The checked program as a ``torch.export.ExportedProgram`` with these tensors (no sample inputs)."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    export_log = logging.getLogger("torch._export.serde.serialize")
    with _quiet(export_log):
        try:
            serialized = _dict_to_dataclass(schema.ExportedProgram, program_json)
            # no sample inputs: they are a pickle, and a program runs without them
            return ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, None)
        except Exception as e:  # torch raises assertion, key, serialize and spec errors on a bad program
            raise ArchiveError(f"{PROGRAM} is not a program this torch reads ({_one_line(e)})") from e


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
