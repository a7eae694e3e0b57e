"""The walkthrough gives one answer on every Keras backend: torch, TensorFlow and JAX.

Where the mathematics is the same, what bnkit reports must not depend on which backend runs Keras:
the seed model's weights are drawn with NumPy (Keras' seeded initializers draw other numbers on each
backend), the input too. Each backend runs the real console script in its own process (a process has
one Keras backend), the three at once; the torch one in a fresh home, where Keras writes its
``keras.json`` (naming TensorFlow) during the run.

Tolerances: the differences the walkthrough reports come from batch-norm conventions (eps, training
mode, momentum, variance estimator) and are 1e-5 to 6 in size; the backends' own float32 rounding
(another convolution algorithm, another summation order) moves them by ~1e-7 absolute, so they are
compared to 1e-3 relative (the first diverging layer) and 2e-2 relative (the outputs, where the eps
difference alone is ~1e-5). Whether the models agree, and the causes found, must be the same.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import SRC, _console_script

BACKENDS = ("torch", "tensorflow", "jax")


def _run_all(tmp_path) -> dict[str, dict]:
    procs = {}
    for backend in BACKENDS:
        env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "KERAS_HOME")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
        env["KERAS_HOME"] = str(tmp_path / f"home-{backend}")
        if backend != "torch":  # torch: nothing chosen, in a fresh home, as a new user runs it
            env["KERAS_BACKEND"] = backend
        procs[backend] = subprocess.Popen(
            [_console_script(), "walkthrough", "--json", "--batch", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
        )  # fmt: skip
    results = {}
    for backend, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{backend}: {err[-3000:]}"
        results[backend] = json.loads(out)
    return results


@pytest.fixture(scope="module")
def walkthroughs(tmp_path_factory):
    return _run_all(tmp_path_factory.mktemp("walkthroughs"))


def test_the_torch_walkthrough_finds_the_causes_and_the_fix_agrees(walkthroughs):
    data = walkthroughs["torch"]
    assert data["agree"] is True and len(data["steps"]) == 6
    assert data["steps"][0]["summary"]["keras"]["total"] == 13_108_758
    assert data["steps"][0]["summary"]["keras_backend"] == "torch"
    assert data["steps"][2]["report"]["agree"] is False
    assert {c["code"] for c in data["steps"][2]["report"]["causes"]} == {"training-mode", "eps"}
    assert data["steps"][5]["report"]["agree"] is True


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_every_backend_reports_the_same_numbers(walkthroughs, backend):
    torch_run, other = walkthroughs["torch"], walkthroughs[backend]
    assert other["agree"] is True
    assert other["steps"][0]["summary"]["keras_backend"] == backend
    assert other["steps"][0]["summary"]["keras"] == torch_run["steps"][0]["summary"]["keras"]
    assert other["steps"][1]["summary"]["torch"] == torch_run["steps"][1]["summary"]["torch"]
    for step in (2, 3, 4, 5):
        a, b = torch_run["steps"][step]["report"], other["steps"][step]["report"]
        assert b["keras_backend"] == backend
        assert a["agree"] == b["agree"], step
        assert [c["code"] for c in a["causes"]] == [c["code"] for c in b["causes"]], step
        if a["first_divergence"] is None:
            assert b["first_divergence"] is None, step
            continue
        assert b["first_divergence"]["name_a"] == a["first_divergence"]["name_a"], step
        assert b["first_divergence"]["max_abs_diff"] == pytest.approx(a["first_divergence"]["max_abs_diff"], rel=1e-3)
        assert b["output"]["max_abs_diff"] == pytest.approx(a["output"]["max_abs_diff"], rel=2e-2), step
