"""Text from a model file, made safe to print on one line.

A model file names its layers, classes and members; a framework's error quotes them. Printed raw,
an escape sequence among them sets the terminal's title, clears the screen or fakes an "OK".
:func:`printable` shows every control character as a visible escape (``\\x1b``), and
:func:`one_line` also folds whitespace and cuts a long message.
"""

from __future__ import annotations

import re

__all__ = ["printable", "one_line", "has_control_characters"]

# C0 and C1 controls, DEL, and the Unicode line/paragraph separators and bidirectional overrides,
# which reorder what a terminal shows (a name that reads as another)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def has_control_characters(text: str) -> bool:
    return _CONTROL.search(text) is not None


def printable(text: str) -> str:
    """``text`` with each control character written as its Python escape (``\\x1b``, ``\\u202e``)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def one_line(text: object, limit: int = 300) -> str:
    """``str(text)`` on one printable line: whitespace folded, controls escaped, at most ``limit`` characters."""
    text = str(text)
    # only a prefix is folded and escaped: a message can quote megabytes from a file (torch's
    # "Unknown endianness type" quotes a whole record), and escaping each of 16 M control characters
    # took 20 s and 1 GB; folding and escaping never shorten a prefix of 4 × limit below the limit
    # but for runs of whitespace, which fold to one space
    head = text[: 4 * limit]
    folded = printable(" ".join(head.split()))
    if len(folded) <= limit and len(head) == len(text):
        return folded
    return folded[: limit - 3] + "..."
