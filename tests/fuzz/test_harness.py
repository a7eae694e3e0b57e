"""The fuzz harness tells each way of not ending clean, on a stand-in command line that misbehaves
on request (``_misbehave.py``): a harness that missed one would pass every fuzz case.

No torch here: the worker imports nothing but the stand-in, so these take a second or two.
"""

from __future__ import annotations

import sys

import pytest
from _harness import HERE, Case, Harness, MiB

SECONDS = 1.0  # a case past it hangs; the slowest one that must not (a console run) takes under 0.1 s


@pytest.fixture(scope="module")
def harness():
    console = (sys.executable, str(HERE / "_misbehave.py"))
    with Harness(seconds=SECONDS, max_rss_growth=64 * MiB, address_space=1024 * MiB, warm=(),
                 entry="_misbehave:main", console=console) as h:  # fmt: skip
        yield h


def run(harness: Harness, *argv: str, **case):
    return harness.run_one(Case(("summary", *argv), **case))


@pytest.mark.parametrize("behaviour", ["ok", "refuse"])
def test_a_clean_end_has_no_problem(harness, behaviour):
    outcome = run(harness, behaviour)
    assert outcome.problems == [], outcome.describe()
    assert outcome.status == (0 if behaviour == "ok" else 2)


@pytest.mark.parametrize(
    "behaviour, arg, problem",
    [
        ("two lines", "", "exit 2 with 2 line(s) on stderr, not one"),
        ("c output", "", "exit 2 with 2 line(s) on stderr, not one"),
        ("stderr on success", "", "exit 0 with 1 line(s) on stderr"),
        ("escape", "", "control characters in the error: '\\x1b\\x07'"),
        ("traceback", "key", "exit status 1, not 0 or 2"),
        ("exit 1", "", "exit status 1, not 0 or 2"),
        ("grow", "200", "memory: peak RSS grew by"),
        ("allocate", "2048", "memory: an allocation failed"),
        ("environment", "", "printed forbidden text: the environment canary"),
        ("temporary", "", "left temporary files: unpacked-"),
        ("crash", "", "the console script died of signal 11"),
        ("sigterm", "", "the console script died of signal 15"),
        ("hang", "60", f"hang: still running after {SECONDS:g} s (the console script was killed)"),
    ],
)
def test_each_way_of_not_ending_clean_is_named(harness, behaviour, arg, problem):
    outcome = run(harness, behaviour, arg)
    assert any(p.startswith(problem) for p in outcome.problems), outcome.describe()
    assert run(harness, "ok").problems == []  # and the next case runs (in a new worker if that one died)


def test_a_case_stuck_in_the_worker_is_judged_as_the_console_script(harness):
    """bnkit stops a reader stuck in C code from a supervising process, which only the console script has."""
    outcome = run(harness, "stuck in the worker")
    assert (outcome.status, outcome.problems) == (2, []), outcome.describe()
    assert outcome.worker.startswith(f"hang: still running after {SECONDS:g} s")


def test_a_traceback_is_what_the_console_script_would_print(harness):
    outcome = run(harness, "traceback", "the key")
    assert outcome.stderr.startswith("Traceback (most recent call last):")
    assert "KeyError: 'the key'" in outcome.stderr


def test_a_payload_marker_and_forbidden_text_are_caught(harness, tmp_path):
    marker = tmp_path / "ran"
    outcome = run(harness, "marker", str(marker), marker=marker)
    assert outcome.problems == [f"the payload ran: {marker} exists"]
    outcome = run(harness, "ok", forbidden=('"read"',))
    assert outcome.problems == ["printed forbidden text: '\"read\"'"]


def test_a_stuck_reader_s_one_line_exit_is_clean(harness):
    """bnkit's watchdog ends the process with one line and status 2: clean, the worker replaced."""
    started = harness.workers_started
    outcome = run(harness, "watchdog")
    assert (outcome.status, outcome.problems) == (2, []), outcome.describe()
    assert run(harness, "ok").problems == []
    assert harness.workers_started == started + 1


def test_a_reference_reader_runs_after_exit_0_only(harness):
    assert run(harness, "ok", reference=("_misbehave:view", ("yes",))).reference == {"answer": "yes"}
    assert run(harness, "refuse", reference=("_misbehave:view", ("yes",))).reference is None
    failed = run(harness, "ok", reference=("_misbehave:view", ("fail",)))
    assert failed.reference == {"error": "OSError: cannot read it"} and failed.problems == []
    hung = run(harness, "ok", reference=("_misbehave:view", ("hang",)))
    assert "hung or died" in hung.reference["error"] and hung.problems == []
