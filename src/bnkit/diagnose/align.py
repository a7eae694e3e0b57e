"""Pair the layers of two traced graphs by structure, not by definition order.

Each traced layer has a *token*: its kind, its output shape (PyTorch's layout, batch axis left
out) and the size of its weights (a convolution's kernel elements, a batch norm's channels:
numbers that do not depend on the framework's weight layout). Two layers may pair when their
tokens agree and their inputs come from paired layers: walking up from each, through layers
that have no partner, the nearest paired ancestors (or the model input) must correspond. So a
residual block's shortcut convolution pairs with the other shortcut, whichever branch was
defined first, and a concatenation's branches pair in the order they are concatenated.

Among the layers that may pair, the choice goes to the one whose surroundings look the same —
a hash of its token and of everything upstream (``down``) and downstream (``up``, with the
position at which an ordered layer such as a concatenation consumes it) — then to the same name
(names are hints only: normalised, so ``layer1.0.conv1`` and ``layer1_0_conv1`` agree), then to
the nearest position in execution order. Layers left without a partner are reported as such.
Kinds marked ``optional`` in :mod:`bnkit.diagnose.kinds` (zero padding a converter makes
explicit) are looked through when the surroundings are hashed.
"""

from __future__ import annotations

import difflib
import re

from bnkit.diagnose.kinds import kind_of
from bnkit.diagnose.trace import INPUT, Entry

__all__ = ["align", "token", "loose_token", "raw_token"]

_ORDERED = {"concat"}  # kinds whose operands' order matters


def _shape_key(entry: Entry) -> tuple:
    shape = tuple(int(d) for d in entry.canonical.shape[1:])
    key = kind_of(entry.kind).shape_key
    if key == "squeeze":
        return tuple(d for d in shape if d != 1) or (1,)
    if key == "numel":
        n = 1
        for d in shape:
            n *= d
        return (n,)
    return shape


def _param_key(entry: Entry):
    w = entry.weights
    if entry.kind == "scale":  # Keras may hold a variance where PyTorch holds a standard deviation
        return None
    if entry.kind in ("bn", "ln"):
        for key in ("mean", "gamma", "beta"):
            if key in w:
                return int(w[key].size)
        return None
    sizes = [int(w[k].size) for k in ("weight", "depthwise") if k in w]
    return sum(sizes) if sizes else None


def loose_token(entry: Entry) -> tuple:
    """Kind and output shape."""
    return (entry.kind, _shape_key(entry))


def raw_token(entry: Entry) -> tuple:
    """Kind and output shape in the framework's own layout: a layer that works on channels-last data
    in both frameworks (a Dense after a permute, as ConvNeXt's) has the same raw shape on both sides."""
    return (entry.kind, tuple(int(d) for d in entry.raw.shape[1:]))


def token(entry: Entry) -> tuple:
    """Kind, output shape (its sizes in increasing order: the same whether a layer works on
    channels-first or channels-last data, as ConvNeXt's Linear and layer scale do in PyTorch) and
    the size of the weights."""
    kind, shape = loose_token(entry)
    return (kind, tuple(sorted(shape)), _param_key(entry))


def _normalized(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


class _Graph:
    """One side's traced layers with the hashes of their surroundings."""

    def __init__(self, entries: list[Entry], output_producers: tuple[int, ...]) -> None:
        self.entries = entries
        self.tokens = [token(e) for e in entries]
        self.loose = [loose_token(e) for e in entries]
        self.raw = [raw_token(e) for e in entries]
        self.names = [_normalized(e.name) for e in entries]
        self.optional = [kind_of(e.kind).optional for e in entries]
        self.down = self._down()
        self.up = self._up(set(output_producers))

    def _through(self, p: int, table: list) -> object:
        return "input" if p == INPUT else table[p]

    def _operand_hashes(self, e: Entry, table: list) -> tuple:
        hashes = [tuple(sorted(hash(self._through(p, table)) for p in operand)) for operand in e.inputs]
        return tuple(hashes) if e.kind in _ORDERED else tuple(sorted(hashes))

    def _down(self) -> list:
        down: list = []
        for i, e in enumerate(self.entries):
            operands = self._operand_hashes(e, down)
            down.append(hash(operands) if self.optional[i] else hash((self.tokens[i], operands)))
        return down

    def _up(self, outputs: set[int]) -> list:
        consumers: list[list] = [[] for _ in self.entries]
        for c, e in enumerate(self.entries):
            for position, operand in enumerate(e.inputs):
                for p in operand:
                    if p != INPUT:
                        consumers[p].append((c, position if e.kind in _ORDERED else None))
        up: list = [None] * len(self.entries)
        for i in range(len(self.entries) - 1, -1, -1):
            seen = []
            for c, position in consumers[i]:
                if self.optional[c]:  # look through: its consumers consume this
                    seen.append(up[c])
                else:
                    seen.append(hash((up[c], position)))
            below = (tuple(sorted(hash(s) for s in seen)), i in outputs)
            up[i] = hash(below) if self.optional[i] else hash((self.tokens[i], below))
        return up


class _Ancestors:
    """The nearest paired ancestors of each layer, looking through layers without a partner."""

    def __init__(self, entries: list[Entry], partner: dict[int, int]) -> None:
        self.entries = entries
        self.partner = partner
        self.memo: dict[int, frozenset] = {}

    def invalidate(self) -> None:
        self.memo.clear()

    def of(self, i: int) -> frozenset:
        if i in self.memo:
            return self.memo[i]
        found: set = set()
        for p in self.entries[i].producers:
            if p == INPUT or p in self.partner:
                found.add(p)
            else:
                found |= self.of(p)
        result = frozenset(found)
        self.memo[i] = result
        return result


def align(
    entries_a: list[Entry],
    entries_b: list[Entry],
    outputs_a: tuple[int, ...] = (),
    outputs_b: tuple[int, ...] = (),
) -> list[tuple[int, int]]:
    """Pairs ``(index in A, index in B)`` of corresponding layers, in A's execution order."""
    ga, gb = _Graph(entries_a, outputs_a), _Graph(entries_b, outputs_b)
    a_to_b: dict[int, int] = {}
    b_to_a: dict[int, int] = {}
    anc_a, anc_b = _Ancestors(entries_a, a_to_b), _Ancestors(entries_b, b_to_a)
    by_kind: dict[str, list[int]] = {}
    for j, e in enumerate(entries_b):
        by_kind.setdefault(e.kind, []).append(j)
    na, nb = max(len(entries_a), 1), max(len(entries_b), 1)

    for i, ea in enumerate(entries_a):
        wanted = frozenset(p if p == INPUT else a_to_b[p] for p in anc_a.of(i))
        best, best_score = None, None
        for j in by_kind.get(ea.kind, ()):
            if j in b_to_a or (ga.loose[i] != gb.loose[j] and ga.raw[i] != gb.raw[j]) or anc_b.of(j) != wanted:
                continue
            score = (
                (ga.tokens[i] == gb.tokens[j]) * 16
                + (ga.down[i] == gb.down[j]) * 8
                + (ga.up[i] == gb.up[j]) * 8
                + _name_score(ga.names[i], gb.names[j])
                - abs(i / na - j / nb)
            )
            if best_score is None or score > best_score:
                best, best_score = j, score
        if best is not None:
            a_to_b[i], b_to_a[best] = best, i
            anc_b.invalidate()  # A's layers are decided in order: their ancestors' partners are final
    return sorted(a_to_b.items())


def _name_score(a: str, b: str) -> float:
    if not a or not b:
        return 0.0
    if a == b:
        return 4.0
    if a.endswith(b) or b.endswith(a):
        return 3.0
    return 2.0 * difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() ** 4
