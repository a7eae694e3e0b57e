"""When bnkit.torch layers take the Triton path, and when they do not (no Triton, no GPU needed).

The measured table is exercised through :class:`bnkit.kernels.dispatch.Dispatch` with a table
directory in ``tmp_path`` and a made-up compute capability: the lookup never asks CUDA. Shapes are
``meta`` tensors (shape and strides without storage), so ResNet-50's sizes cost nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import bnkit.torch as bt
from bnkit import kernels
from bnkit.kernels import dispatch
from bnkit.kernels.dispatch import Config, Dispatch, Entry, Table, TableError

SRC = Path(__file__).resolve().parents[2] / "src"
H100 = (9, 0)


@pytest.fixture(autouse=True)
def default_policy(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    kernels.set_enabled(None)
    yield
    kernels.set_enabled(None)


def meta(*shape, dtype=torch.bfloat16, memory_format=torch.contiguous_format):
    return torch.empty(shape, dtype=dtype, device="meta").contiguous(memory_format=memory_format)


def table(entries: dict[Config, bool], capability=H100) -> Table:
    return Table(
        family=dispatch.family_of(capability),
        device="TEST GPU",
        capability=capability,
        date="2026-01-01 00:00 UTC",
        versions={"bnkit": "0", "torch": "0", "triton": "0"},
        margin=1.05,
        entries={c: Entry(triton=on, ratio=1.3 if on else 0.8, shapes=("s",)) for c, on in entries.items()},
    )


def write(directory: Path, data, name="sm90.json") -> Path:
    path = directory / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


# a ResNet-50 stage-1 batch norm, bfloat16 channels_last: Triton on in training only
X = meta(256, 64, 56, 56, memory_format=torch.channels_last)
TRAIN = Config("train", "bfloat16", "channels_last", "<=64", "<=2Mi")
INFER = Config("infer", "bfloat16", "channels_last", "<=64", "<=2Mi")


@pytest.fixture
def measured(tmp_path):
    write(tmp_path, table({TRAIN: True, INFER: False}).to_json())
    return Dispatch(tables=tmp_path, capability_of=lambda index: H100)


# --------------------------------------------------------------------------- configurations


def test_shape_classes_have_the_documented_edges():
    assert [dispatch.channel_class(c) for c in (1, 64, 65, 256, 257, 1024, 1025, 4096)] == [
        "<=64", "<=64", "<=256", "<=256", "<=1024", "<=1024", ">1024", ">1024",
    ]  # fmt: skip
    edges = [1, 4096, 4097, 32768, 32769, 2**18, 2**18 + 1, 2**21, 2**21 + 1]
    assert [dispatch.per_channel_class(m) for m in edges] == [
        "<=4Ki", "<=4Ki", "<=32Ki", "<=32Ki", "<=256Ki", "<=256Ki", "<=2Mi", "<=2Mi", ">2Mi",
    ]  # fmt: skip


def test_resnet50_shapes_fall_in_distinct_classes():
    shapes = [(n, c, hw, hw) for n in (256, 32) for c, hw in ((64, 56), (256, 56), (512, 28), (2048, 7))]
    classes = {Config.of_shape("train", "float32", "nchw", s) for s in shapes}
    assert len(classes) == len(shapes)


@pytest.mark.parametrize(
    "x, expected",
    [
        (meta(2, 3, 4, 5), "nchw"),
        (meta(2, 3, 7), "nchw"),
        (meta(2, 3, 4, 5, memory_format=torch.channels_last), "channels_last"),
        (meta(2, 3, 2, 3, 2, memory_format=torch.channels_last_3d), "channels_last"),
        (meta(6, 5), "channels_last"),  # (N, C): rows of C channels
        (meta(6, 5, 1, 1), "channels_last"),
        (meta(5, 6).t(), "channels_last"),  # copied to contiguous (N, C): still rows
        (meta(2, 4, 5, 3).permute(0, 3, 1, 2), "channels_last"),  # a channels_last view
        (meta(2, 3, 4, 5).transpose(2, 3), "nchw"),  # neither: copied to contiguous NCHW
    ],
)
def test_memory_format_is_the_layout_the_kernels_walk(x, expected):
    assert dispatch.memory_format_of(x) == expected


def test_config_of_a_tensor():
    assert dispatch.config_of(X, "train") == TRAIN
    assert dispatch.config_of(meta(32, 2048, 7, 7, dtype=torch.float32), "infer") == Config(
        "infer", "float32", "nchw", ">1024", "<=4Ki"
    )
    with pytest.raises(ValueError, match="mode must be one of train, infer, bn_relu; got 'training'"):
        dispatch.config_of(X, "training")


def test_mode_follows_the_layer_state():
    bn = bt.BatchNorm2d(4)
    assert kernels.mode_of(bn) == "train" and kernels.mode_of(bn, fused=True) == "bn_relu"
    bn.eval()
    assert kernels.mode_of(bn) == "infer" and kernels.mode_of(bn, fused=True) == "infer"
    no_stats = bt.BatchNorm2d(4, track_running_stats=False).eval()
    assert kernels.mode_of(no_stats) == "train"  # batch statistics in eval()


def test_layers_ask_the_dispatch_with_their_mode(monkeypatch):
    asked = []
    monkeypatch.setattr(kernels, "use_triton", lambda x, mode="train": asked.append(mode) or False)
    x = torch.randn(2, 4, 3, 3)
    bt.BatchNorm2d(4)(x)
    bt.BatchNorm2d(4).eval()(x)
    bt.BatchNormAct2d(4)(x)
    bt.BatchNormAddAct2d(4)(x, x)
    bt.BatchNormAct2d(4).eval()(x)
    # a fused layer the table leaves on PyTorch asks again, as a plain batch norm, before its own ReLU
    assert asked == ["train", "infer", "bn_relu", "train", "bn_relu", "train", "infer", "infer"]


# --------------------------------------------------------------------------- the table


def test_the_table_decides_per_configuration(measured):
    assert measured.triton_wins(X, "train")
    assert not measured.triton_wins(X, "infer")  # measured slower: off
    assert not measured.triton_wins(X, "bn_relu")  # not measured: off
    assert not measured.triton_wins(X.contiguous(), "train")  # NCHW: not measured
    assert not measured.triton_wins(X.float(), "train")  # float32: not measured
    assert not measured.triton_wins(meta(32, 64, 56, 56, memory_format=torch.channels_last), "train")  # other class
    assert measured.triton_wins(meta(200, 40, 60, 60, memory_format=torch.channels_last), "train")  # same class


def test_no_table_for_the_device_family_means_pytorch(tmp_path):
    write(tmp_path, table({TRAIN: True}).to_json())  # sm90 only
    ampere = Dispatch(tables=tmp_path, capability_of=lambda index: (8, 0))
    assert ampere.table_for((8, 0)) is None
    assert not ampere.triton_wins(X, "train")
    assert not Dispatch(tables=tmp_path / "missing", capability_of=lambda index: H100).triton_wins(X, "train")


def test_table_is_read_once_and_decisions_are_cached(tmp_path):
    path = write(tmp_path, table({TRAIN: True}).to_json())
    asked = []
    d = Dispatch(tables=tmp_path, capability_of=lambda index: asked.append(index) or H100)
    assert d.triton_wins(X, "train")
    path.unlink()  # no file access after the first lookup
    assert d.triton_wins(X, "train")
    assert d.triton_wins(meta(128, 60, 50, 50, memory_format=torch.channels_last), "train")
    assert not d.triton_wins(X, "infer")  # a new configuration: the table is already in memory
    assert asked == [None]  # the capability once per device (meta tensors have no index)


def test_a_written_table_reads_back(tmp_path):
    original = table({TRAIN: True, INFER: False})
    assert dispatch.read_table(write(tmp_path, original.to_json())) == original


def test_shipped_tables_are_valid():
    shipped = dispatch._shipped_tables()
    for path in shipped.iterdir():
        if path.name.endswith(".json"):
            t = dispatch.read_table(path)
            assert path.name == f"{t.family}.json"


def test_the_shipped_default_has_no_table_for_an_unknown_family():
    assert not Dispatch(capability_of=lambda index: (1, 0)).triton_wins(X, "train")


def valid():
    return table({TRAIN: True}).to_json()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("device"), "missing field 'device'"),
        (lambda d: d.update(format=2), "format 2 is not the one this bnkit reads"),
        (lambda d: d.update(capability=[9]), r"capability must be \[major, minor\], got \[9\]"),
        (lambda d: d.update(family="sm80"), "family 'sm80' does not match capability"),
        (lambda d: d.update(margin="5%"), "field 'margin' must be int or float, got '5%'"),
        (lambda d: d["configurations"][0].update(triton="yes"), r"configurations\[0\]: field 'triton' must be bool"),
        (lambda d: d["configurations"][0].update(dtype="float64"), "dtype must be one of float32, bfloat16, float16"),
        (lambda d: d["configurations"][0].update(channels="64"), "channels must be one of <=64"),
        (lambda d: d["configurations"].append(d["configurations"][0]), "appears twice"),
        (lambda d: d.update(configurations={}), "field 'configurations' must be list"),
    ],
)
def test_malformed_tables_are_named_precisely(change, message):
    data = valid()
    change(data)
    with pytest.raises(TableError, match=message):
        dispatch.parse_table(data)


@pytest.mark.parametrize(
    "content",
    ["{not json", json.dumps([1, 2]), json.dumps({**valid(), "capability": [8, 0], "family": "sm80"})],
    ids=["bad_json", "not_an_object", "another_family"],
)
def test_a_malformed_table_warns_once_and_falls_back_to_pytorch(tmp_path, content):
    write(tmp_path, content)
    d = Dispatch(tables=tmp_path, capability_of=lambda index: H100)
    with pytest.warns(RuntimeWarning, match=r"bnkit: ignoring .*sm90.*take PyTorch's path"):
        assert not d.triton_wins(X, "train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the verdict is remembered: no second warning
        assert not d.triton_wins(X, "infer")


# --------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    "env, switch, expected",
    [
        (None, None, None), ("auto", None, None), ("", None, None),
        ("0", None, False), ("1", None, True), (None, False, False), (None, True, True),
        ("0", True, False), ("1", False, False),  # turning off wins
        ("auto", True, True), ("auto", False, False),
    ],
)  # fmt: skip
def test_environment_and_switch_combine_off_first(monkeypatch, env, switch, expected):
    if env is not None:
        monkeypatch.setenv(kernels.ENV_VAR, env)
    kernels.set_enabled(switch)
    assert kernels._policy() is expected


def test_overrides_and_table_decide_together(monkeypatch, measured, tmp_path):
    monkeypatch.setattr(kernels, "_triton_found", True)
    unmeasured = Dispatch(tables=tmp_path / "none", capability_of=lambda index: H100)
    assert kernels._choose(X, "train", measured) and not kernels._choose(X, "infer", measured)
    assert not kernels._choose(X, "train", unmeasured)
    assert kernels.enabled() and not kernels.forced()
    monkeypatch.setenv(kernels.ENV_VAR, "1")  # forced: the table is not asked
    assert kernels._choose(X, "infer", measured) and kernels._choose(X, "train", unmeasured)
    assert kernels.forced()
    monkeypatch.setenv(kernels.ENV_VAR, "0")  # forbidden: not even where the table says it wins
    assert not kernels._choose(X, "train", measured)
    assert not kernels.enabled() and not kernels.forced()
    monkeypatch.delenv(kernels.ENV_VAR)
    kernels.set_enabled(False)
    assert not kernels._choose(X, "train", measured)
    kernels.set_enabled(True)
    assert kernels._choose(X, "infer", measured)


def test_bad_settings_are_named(monkeypatch):
    with pytest.raises(TypeError, match="set_enabled expects True, False or None, got 'no'"):
        kernels.set_enabled("no")
    monkeypatch.setenv(kernels.ENV_VAR, "yes")
    with pytest.raises(ValueError, match="BNKIT_TRITON='yes' is not understood: use 0 .*, 1 .* or auto"):
        kernels.enabled()


def test_no_triton_means_no_triton_path(monkeypatch, measured):
    monkeypatch.setattr(kernels, "_triton_found", False)
    assert not kernels.enabled()
    kernels.set_enabled(True)
    assert not kernels._choose(X, "train", measured) and not kernels.forced()


def test_cpu_tensors_and_fx_proxies_take_the_native_path(monkeypatch):
    monkeypatch.setattr(kernels, "_triton_found", True)
    kernels.set_enabled(True)  # even forced
    assert not kernels.use_triton(torch.randn(2, 3))
    assert not kernels.use_triton(torch.randn(2, 3, dtype=torch.float64))
    proxy = torch.fx.Proxy(torch.fx.Graph().placeholder("x"))
    assert not kernels.use_triton(proxy)  # no bool() of a Proxy: symbolic tracing goes on


def test_cpu_forward_does_not_import_triton():
    code = (
        "import sys, torch, bnkit.torch as bt\n"
        "m = bt.BatchNormAct2d(3); m(torch.randn(2, 3, 4, 4)).sum().backward()\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] == 'triton' or k in "
        "('bnkit.kernels.ops', 'bnkit.kernels.triton_bn')))\n"
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
