"""Every crafted hostile or broken file (``crafted.all_cases``) ends as its case says, and clean.

The corpus is written afresh from the valid files the real tools make (``make_corpus.py``); each
case's command line runs through the harness's worker (``_harness.py``), which checks the exit
status and the one line, the time and memory limits, the payload marker and the forbidden text.
On top, a case says what a correct bnkit does: ``refused`` (exit 2, a line holding
``expect_text``) or ``read`` (exit 0). All failures are reported at once, by case name.
"""

from __future__ import annotations

import pytest
from _harness import Case, Harness
from crafted import Crafted, all_cases
from make_corpus import valid_sources

# a crafted case runs with bnkit's default limits (its own command line): a hang is what bnkit's
# 600 s default would let through, so the harness stops it much earlier
CASE_SECONDS = 60.0


def expectation_problems(crafted: Crafted, status: int | None, stderr: str) -> list[str]:
    """How an outcome misses what the case says a correct bnkit does (cleanliness apart)."""
    if crafted.expect == "read":
        return [] if status == 0 else [f"expected to be read (exit 0), got exit {status}"]
    if crafted.expect != "refused":
        return [f"unknown expectation {crafted.expect!r}"]
    found = [] if status == 2 else [f"expected to be refused (exit 2), got exit {status}"]
    if status == 2 and crafted.expect_text not in stderr:
        found.append(f"the error does not name {crafted.expect_text!r}")
    return found


@pytest.mark.slow
def test_every_crafted_file_ends_as_its_case_says(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    crafted = all_cases(folder, valid_sources(folder / "valid"))
    if not crafted:
        pytest.skip("no crafted cases written yet")
    cases = [Case(c.argv, c.name, c.marker, c.forbidden) for c in crafted]
    with Harness(seconds=CASE_SECONDS) as harness:
        outcomes = harness.run(cases)
    failures = []
    for case, outcome in zip(crafted, outcomes, strict=True):
        outcome.problems += expectation_problems(case, outcome.status, outcome.stderr)
        if outcome.problems:
            failures.append(f"{outcome.describe()}\n    ({case.finding})")
    assert not failures, f"{len(failures)} of {len(cases)} crafted cases did not end as they should:\n" + "\n".join(
        failures
    )


@pytest.mark.parametrize(
    "expect, text, status, stderr, problem",
    [
        ("read", "", 2, "bnkit summary: error: x\n", "expected to be read (exit 0), got exit 2"),
        ("refused", "weight", 0, "", "expected to be refused (exit 2), got exit 0"),
        ("refused", "weight", 2, "bnkit summary: error: bias\n", "the error does not name 'weight'"),
    ],
)
def test_a_case_that_ends_otherwise_is_named(expect, text, status, stderr, problem):
    case = Crafted("x", "a finding", ("summary", "x.pt2"), expect, text)
    assert expectation_problems(case, status, stderr) == [problem]
    assert expectation_problems(Crafted("x", "", ("summary",), expect, text), 0 if expect == "read" else 2,
                                f"bnkit summary: error: {text}\n") == []  # fmt: skip
