"""Static shape checks, PyTorch → Keras: comparisons of sizes read from ``x.shape`` / ``x.size()`` /
``x.dim()`` (``operator.eq``, ``ne``, ``lt``, ``le``, ``gt``, ``ge``) and ``torch._assert`` on them.

The walker knows every size but the batch from ``input_shape``, so such a check is decided while
converting: a comparison of Python numbers gives a Python ``bool``; ``torch._assert(True, ...)``
emits nothing, ``torch._assert(False, msg)`` refuses, naming the check (``h == 224`` with ``h``'s
value) and the model's message. torchvision's ViT checks ``h == self.image_size`` this way. A
comparison with the batch size (unknown when converting) or of tensors (element-wise, a tensor
of booleans) is refused: the converted model would have to branch on it.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
from torch import fx

from bnkit.convert.registry import from_torch
from bnkit.convert.values import BATCH, Constant, KerasValue

if TYPE_CHECKING:
    from bnkit.convert.torch_walker import TorchToKeras

_SYMBOLS = {operator.eq: "==", operator.ne: "!=", operator.lt: "<", operator.le: "<=", operator.gt: ">",
            operator.ge: ">="}  # fmt: skip


@from_torch(*_SYMBOLS, permuted_input=True)
def comparison_to_keras(b: TorchToKeras, node, fn) -> bool:
    """``h == 224`` on sizes: decided now (a Python ``bool``)."""
    operands = [b.operand(a, node) for a in node.args]
    if any(isinstance(o, (KerasValue, Constant)) for o in operands):
        raise b.unsupported(node, "an element-wise comparison of tensors (a tensor of booleans) is not supported")
    if any(o is BATCH for o in operands):
        raise b.unsupported(node, "a comparison with the batch size, which is not known when converting")
    if not all(isinstance(o, (int, float, bool, tuple, list, torch.Size)) for o in operands):
        kinds = ", ".join(type(o).__name__ for o in operands)
        raise b.unsupported(node, f"a comparison of ({kinds})")
    return fn(*operands)


def describe_check(b: TorchToKeras, condition) -> str:
    """``condition`` as written, with the values the walker read: ``getitem_2 (= 24) == 32``."""
    if not isinstance(condition, fx.Node) or condition.target not in _SYMBOLS:
        return repr(b.operand(condition, None)) if isinstance(condition, fx.Node) else repr(condition)

    def side(arg) -> str:
        if isinstance(arg, fx.Node):
            return f"{arg.name} (= {b.operand(arg, condition)!r})"
        return repr(arg)

    return " ".join([side(condition.args[0]), _SYMBOLS[condition.target], side(condition.args[1])])


@from_torch(torch._assert, permuted_input=True)
def assert_to_keras(b: TorchToKeras, node, fn) -> None:
    """``torch._assert(cond, msg)`` on a condition decided while converting: true, nothing; false, refused."""
    condition, message = b.arg(node, 0, "condition"), b.arg(node, 1, "message", "")
    value = b.operand(condition, node)
    if value is True or (isinstance(value, (int, float)) and not isinstance(value, bool) and value):
        return None
    if value is False or (isinstance(value, (int, float)) and not value):
        raise b.unsupported(
            node, f"the shape check {describe_check(b, condition)} fails for this input_shape ({message!r})"
        )
    raise b.unsupported(node, f"a check on {type(value).__name__}, which is not decided when converting")
