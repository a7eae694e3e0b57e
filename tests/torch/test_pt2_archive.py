"""``.pt2`` archives are read without unpickling or evaluating anything in them.

Every crafted archive here is first shown to run its payload through torch's own loader
(``torch.export.load``, or the module it returns), so the refusal is of a real attack.
"""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

from _crafted_pt2 import (
    INPUT_SHAPE,
    Small,
    payload_code,
    rewrite,
    small_pt2,
    with_pickled_sample_inputs,
    with_pickled_weight,
    with_program,
)
from bnkit.io import ModelFileError, load_model
from bnkit.torch.pt2_archive import read_exported_program


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return small_pt2(tmp_path_factory.mktemp("pt2"))


def _torch_load_runs_payload(path, marker, call=False) -> bool:
    try:
        program = torch.export.load(str(path))
        if call:
            program.module()(torch.randn(2, *INPUT_SHAPE))
    except Exception:  # torch may fail after the payload ran: that is the point
        pass
    ran = marker.exists()
    marker.unlink(missing_ok=True)
    return ran


@pytest.mark.parametrize(
    ("craft", "part"),
    [
        (with_pickled_sample_inputs, r"sample inputs \(data/sample_inputs/model.pt\) would call __builtin__.exec"),
        (with_pickled_weight, r"weight 'conv.weight' \(data/weights/weight_0\) is stored as a pickle"),
    ],
)
def test_pickled_parts_are_refused_by_name_and_never_run(small, tmp_path, craft, part):
    marker = tmp_path / "marker"
    crafted = craft(small, tmp_path / "crafted.pt2", marker)
    assert _torch_load_runs_payload(crafted, marker), "the crafted archive should be a real attack on torch.export.load"
    with pytest.raises(ModelFileError, match="refused, bnkit runs nothing from a model file: .*" + part) as info:
        load_model(crafted)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def _rename_node_output(program):
    node = program["graph_module"]["graph"]["nodes"][1]
    old = node["outputs"][0]["as_tensor"]["name"]
    text = json.dumps(program).replace(json.dumps(old), json.dumps("x = exec('1'); y"))
    program.clear()
    program.update(json.loads(text))


def _call_os_system(program):
    node = program["graph_module"]["graph"]["nodes"][1]
    node["target"] = "torch.os.system"
    node["inputs"] = [{"name": "command", "arg": {"as_string": "true"}, "kind": 1}]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_call_os_system, "a graph node calls torch.os.system, which is not a PyTorch operator"),
        (_rename_node_output, "is not a Python name: torch.fx would write it into code it runs"),
    ],
)
def test_program_json_that_would_run_code_is_refused(small, tmp_path, edit, message):
    crafted = with_program(small, tmp_path / "crafted.pt2", edit)
    with pytest.raises(ModelFileError, match=message):
        load_model(crafted)


def test_a_shape_expression_is_never_evaluated(tmp_path):
    torch.manual_seed(0)
    batch = torch.export.Dim("batch", max=64)
    program = torch.export.export(Small().eval(), (torch.randn(2, *INPUT_SHAPE),), dynamic_shapes={"x": {0: batch}})
    source = tmp_path / "dynamic.pt2"
    torch.export.save(program, str(source))
    assert load_model(source)(torch.randn(5, *INPUT_SHAPE)).shape == (5, 2)  # dynamic programs load

    marker = tmp_path / "marker"

    def inject(program):
        text = json.dumps(program)
        symbol = next(s for s in program["range_constraints"])
        expression = f"Symbol('{symbol}', positive=True, integer=True)"
        assert json.dumps(expression) in text
        evil = f"{expression} + 0*len(str(exec({payload_code(marker)!r})))"
        program.clear()
        program.update(json.loads(text.replace(json.dumps(expression), json.dumps(evil), 1)))

    crafted = with_program(source, tmp_path / "crafted.pt2", inject)
    assert _torch_load_runs_payload(crafted, marker), "sympy.sympify should evaluate the crafted expression"
    with pytest.raises(ModelFileError, match="a shape expression holds 'len', which is not integer arithmetic"):
        load_model(crafted)
    assert not marker.exists()


def test_guards_code_is_dropped_not_run(small, tmp_path):
    marker = tmp_path / "marker"
    code = payload_code(marker).encode().hex()

    def add_guard(program):  # Python source torch compiles into the module's input check
        program["guards_code"] = [f"exec(bytes.fromhex('{code}').decode()) is None"]

    crafted = with_program(small, tmp_path / "crafted.pt2", add_guard)
    assert _torch_load_runs_payload(crafted, marker, call=True)
    model = load_model(crafted)
    model(torch.randn(2, *INPUT_SHAPE))
    model.eval()
    assert not marker.exists()


def test_tensors_are_those_torch_reads(small):
    """Read without pickle, the weights are bit for bit the ones torch.export.load gives a trusted file."""
    ours, extra = read_exported_program(small)
    theirs = torch.export.load(str(small))
    assert ours.state_dict.keys() == theirs.state_dict.keys()
    for key, value in theirs.state_dict.items():
        assert type(ours.state_dict[key]) is type(value)
        torch.testing.assert_close(ours.state_dict[key], value, rtol=0, atol=0)
    x = torch.randn(2, *INPUT_SHAPE)
    torch.testing.assert_close(ours.module()(x), theirs.module()(x), rtol=0, atol=0)
    assert "bnkit.json" in extra
    assert ours.example_inputs is None  # a pickle: never read


def _damaged(name: str, data: bytes):
    if name.startswith("data/weights/weight_"):
        return data[: len(data) // 2]
    return data


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_damaged, r"shape \(4, 3, 3, 3\) needs 108 values, data/weights/weight_0 holds 54 \(truncated\?\)"),
        (lambda n, d: b"{" if n == "models/model.json" else d, "models/model.json is not valid JSON"),
        (lambda n, d: b"9" if n == "archive_version" else d, "archive version '9'"),
    ],
)
def test_damaged_archives_give_one_line(small, tmp_path, change, message):
    damaged = rewrite(small, tmp_path / "damaged.pt2", change)
    with pytest.raises(ModelFileError, match=message) as info:
        load_model(damaged)
    assert "\n" not in str(info.value)


def test_older_and_other_archives_are_named(tmp_path):
    legacy = tmp_path / "legacy.pt2"
    with zipfile.ZipFile(legacy, "w") as archive:  # the torch <= 2.6 layout, with pickled weights
        archive.writestr("legacy/serialized_exported_program.json", "{}")
        archive.writestr("legacy/serialized_state_dict.pt", b"")
    with pytest.raises(ModelFileError, match="torch 2.6 and older, whose weights are pickles"):
        load_model(legacy)
    aoti = tmp_path / "aoti.pt2"
    with zipfile.ZipFile(aoti, "w") as archive:  # compiled code only: nothing bnkit will load
        archive.writestr("package/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(ModelFileError, match="an AOTInductor package"):
        load_model(aoti)
