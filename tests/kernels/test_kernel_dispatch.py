"""When bnkit.torch layers take the Triton path, and when they do not (no Triton needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnkit import kernels

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(autouse=True)
def restore_switch():
    yield
    kernels.set_enabled(True)


def test_environment_variable_and_switch_turn_the_kernels_off(monkeypatch):
    monkeypatch.setattr(kernels, "_triton_found", True)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert kernels.enabled()
    monkeypatch.setenv("BNKIT_TRITON", "0")
    assert not kernels.enabled()
    monkeypatch.setenv("BNKIT_TRITON", "1")
    kernels.set_enabled(False)
    assert not kernels.enabled()
    kernels.set_enabled(True)
    assert kernels.enabled()
    with pytest.raises(TypeError, match="set_enabled expects True or False, got 'no'"):
        kernels.set_enabled("no")


def test_no_triton_means_no_triton_path(monkeypatch):
    monkeypatch.setattr(kernels, "_triton_found", False)
    assert not kernels.enabled()


def test_cpu_tensors_and_fx_proxies_take_the_native_path(monkeypatch):
    monkeypatch.setattr(kernels, "_triton_found", True)
    assert not kernels.use_triton(torch.randn(2, 3))
    assert not kernels.use_triton(torch.randn(2, 3, dtype=torch.float64))
    proxy = torch.fx.Proxy(torch.fx.Graph().placeholder("x"))
    assert not kernels.use_triton(proxy)  # no bool() of a Proxy: symbolic tracing goes on


def test_cpu_forward_does_not_import_triton():
    code = (
        "import sys, torch, bnkit.torch as bt\n"
        "m = bt.BatchNormAct2d(3); m(torch.randn(2, 3, 4, 4)).sum().backward()\n"
        "print(sorted(k for k in sys.modules if k == 'triton' or k.startswith('bnkit.kernels.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}, timeout=120,
    ).stdout  # fmt: skip
    assert out.strip() == "[]"


def test_kernels_compile_for_an_h100_without_a_gpu(tmp_path):
    """The interpreter runs the kernels as Python; this compiles them for real (sm_90)."""
    pytest.importorskip("triton", reason="Triton is not installed (pip install 'triton==3.9.0')")
    pytest.importorskip("triton.backends.nvidia", reason="this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(SRC), TRITON_CACHE_DIR=str(tmp_path))  # a cold cache: really compile
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("compile_kernels_for_sm90.py"))],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "compiled 15 kernels" in proc.stdout
