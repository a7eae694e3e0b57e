"""bnkit.formats.limits: sizes, the memory budget, bounded JSON and the reading deadline."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from bnkit.formats.limits import (
    MAX_JSON_DEPTH,
    TENSOR_OVERHEAD,
    Budget,
    LimitExceeded,
    ReadLimits,
    ReadTimeout,
    deadline,
    parse_bytes,
    parse_json,
)
from conftest import SRC


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8G", 8 * 2**30), ("8GiB", 8 * 2**30), ("8GB", 8 * 10**9), ("512m", 512 * 2**20), ("1e9", 10**9), ("42", 42)],
)
def test_sizes_read_as_ls_and_si_write_them(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "8X", "-1", "0", "1e99", "G"])
def test_bad_sizes_are_refused_with_the_text(text):
    with pytest.raises(ValueError, match="expected a size"):
        parse_bytes(text)


def test_the_budget_refuses_what_would_pass_it_and_names_the_part_and_limit():
    budget = Budget(10 * 2**20)
    assert budget.charge_tensor([1024, 1024], 4, "weight 'a'") == 4 * 2**20
    assert budget.left == 6 * 2**20 - TENSOR_OVERHEAD
    with pytest.raises(LimitExceeded, match=r"weight 'b' would take 8.02 MiB more than the 4.02 MiB already read, over "
                       r"the limit of 10 MiB for a model \(raise it with --max-model-bytes\)"):  # fmt: skip
        budget.charge_tensor([2048, 1024], 4, "weight 'b'")


def test_a_tensor_of_2_to_the_40_elements_is_refused_however_its_strides_share_memory():
    with pytest.raises(LimitExceeded, match="4 TiB|4.1e\\+03 GiB|4.1e3|4.1e\\+03"):
        Budget(2**32).charge_tensor([2**40], 4, "bias")


def test_an_empty_tensor_is_free_of_data_whatever_its_other_sizes():
    budget = Budget(2**20)
    assert budget.charge_tensor([2**62, 0, 2**62], 4, "empty") == 0


def test_sizes_must_be_non_negative_integers():
    with pytest.raises(LimitExceeded, match="not a non-negative integer"):
        Budget(2**20).charge_tensor([3, -1], 4, "w")


def test_json_is_charged_and_its_depth_bounded():
    budget = Budget(2**20)
    assert parse_json(b'{"a": [1, 2]}', "config.json", budget) == {"a": [1, 2]}
    assert budget.left == 2**20 - 13 * 16
    with pytest.raises(LimitExceeded, match=f"nested deeper than {MAX_JSON_DEPTH} levels"):
        parse_json("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "config.json")
    with pytest.raises(LimitExceeded, match=f"config.json is nested deeper than {MAX_JSON_DEPTH}"):
        parse_json("[" * 100_000 + "]" * 100_000, "config.json")  # Python's own parser: RecursionError
    with pytest.raises(LimitExceeded, match="config.json"):
        parse_json(b" " * (2**20), "config.json", Budget(2**20))  # 1 MiB of spaces costs 16 MiB


@pytest.mark.parametrize("data", [b"{", b"\xff\xfe", b"1" * 5000])
def test_json_that_is_not_json_names_the_document(data):
    with pytest.raises(ValueError, match="model.json is not valid JSON"):
        parse_json(data, "model.json")


def test_the_deadline_stops_python_code_and_restores_sigalrm():
    import signal

    before = signal.getsignal(signal.SIGALRM)
    start = time.monotonic()
    with pytest.raises(ReadTimeout, match=r"x.pt2: reading took longer than 0.2 s \(raise the limit with "):
        with deadline(ReadLimits(max_seconds=0.2), "x.pt2"):
            while True:
                time.sleep(0.01)
    assert time.monotonic() - start < 2
    assert signal.getsignal(signal.SIGALRM) is before
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0


def test_a_timeout_the_reader_swallows_still_ends_reading():
    with pytest.raises(ReadTimeout):
        with deadline(ReadLimits(max_seconds=0.2), "x.keras"):
            try:
                time.sleep(1)
            except BaseException:  # noqa: S110 - what Keras' saving code does with a bare except
                pass


def test_a_reader_stuck_in_c_code_ends_the_command_line_process_with_one_line():
    """PBKDF2 runs in C without returning to Python (as sympy's Float('1e999999999') did, ignoring
    SIGTERM), but lets other threads run: no signal handler runs; the watchdog thread of an
    unsupervised command line (main(argv) in a program) ends the process after a short grace."""
    code = textwrap.dedent(
        """
        import hashlib
        from bnkit.cli.watchers import ThreadWatchdog
        from bnkit.formats.limits import ReadLimits, deadline
        with deadline(ReadLimits(max_seconds=0.5, watcher=ThreadWatchdog("bnkit summary")), "stuck.pt2"):
            hashlib.pbkdf2_hmac("sha256", b"password", b"salt", 10**8)  # about 30 s of C
        print("finished")
        """
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(SRC)}
    )
    assert proc.returncode == 2, proc
    assert proc.stderr.splitlines() == [
        "bnkit summary: error: stuck.pt2: reading took longer than 0.5 s (raise the limit with --max-read-seconds)"
    ]
    assert proc.stdout == ""
    assert time.monotonic() - start < 30


def test_read_limits_refuse_nonsense():
    with pytest.raises(ValueError, match="max_model_bytes must be a positive integer, got 0"):
        ReadLimits(max_model_bytes=0)
    with pytest.raises(ValueError, match="max_seconds must be a positive finite number, got inf"):
        ReadLimits(max_seconds=float("inf"))


def test_limits_are_json_serialisable_settings():
    assert json.dumps(ReadLimits().max_model_bytes) == str(4 * 2**30)
