"""The crafted-file corpus: hostile and broken model files, made here by code, never downloaded.

Each format has a module (``crafted_pt2``, ``crafted_keras``, ``crafted_h5``, ``crafted_weights``, ``crafted_onnx``)
with a ``cases(folder, sources)`` function that writes its files into ``folder`` and returns
:class:`Crafted` cases. :func:`all_cases` gathers them; ``python tests/fuzz/make_corpus.py OUT``
writes the whole corpus to a folder (for trying bnkit, or another tool, on it by hand).

A case says what a correct bnkit does with the file: ``"refused"`` (exit status 2, one printable
line naming the problem, containing ``expect_text``) or ``"read"`` (exit status 0). Every case must
also end within the harness's time and memory limits (see ``_harness.py``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

FORMAT_MODULES = ("crafted_pt2", "crafted_keras", "crafted_h5", "crafted_weights", "crafted_onnx")


@dataclass(frozen=True)
class Crafted:
    name: str  # unique, e.g. "pt2-print-environ"
    finding: str  # what an attacker does with it (issue 17's words where it names one)
    argv: tuple[str, ...]  # the bnkit command line without "bnkit", e.g. ("summary", "/tmp/x.pt2")
    expect: str = "refused"  # "refused" (exit 2, one line) or "read" (exit 0)
    expect_text: str = ""  # a fragment the error line must hold (refused cases)
    forbidden: tuple[str, ...] = field(default=())  # text that must appear nowhere in stdout or stderr
    marker: Path | None = None  # a file the payload would create: it must not exist afterwards


def all_cases(folder: Path, sources: dict[str, Path]) -> list[Crafted]:
    """Every format's cases, written into ``folder``; ``sources`` holds the valid files they start from
    (``"pt2"``, ``"keras"``, ``"h5"``, ``"pt"``, ``"safetensors"``: see ``make_corpus.valid_sources``)."""
    cases: list[Crafted] = []
    for name in FORMAT_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # a format whose cases are not written yet
        sub = folder / name.removeprefix("crafted_")
        sub.mkdir(parents=True, exist_ok=True)
        cases.extend(module.cases(sub, sources))
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "crafted case names must be unique"
    return cases
