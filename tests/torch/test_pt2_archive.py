"""``.pt2`` archives are read without unpickling or evaluating anything in them, within bounds.

Every crafted archive with a payload is first shown to run it through torch's own loader
(``torch.export.load``, or the module it returns), so the refusal is of a real attack. Issue 17's
findings (operators, integers and strings of the program, the memory budget, the pickle scan)
follow; its hangs and blow-ups themselves are files of the crafted corpus
(``tests/fuzz/crafted_pt2.py``), run with time and memory limits.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import tracemalloc
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
from bnkit.torch.pt2_archive import UnsafeArchiveError, read_exported_program


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


# ------------------------------------------------------------------------ issue 17: programs are data
# (the modules issue 17 added are imported in the tests that use them: the file runs on the code before it)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("torch.ops.higher_order.print", "higher-order operator torch.ops.higher_order.print"),
        ("torch.ops.higher_order.while_loop", "higher-order operator torch.ops.higher_order.while_loop"),
        ("torch.ops.higher_order.with_effects", "higher-order operator"),
        ("torch.ops.higher_order.auto_functionalized", "higher-order operator"),
        ("torch.ops.higher_order.flat_apply", "higher-order operator"),
        ("torch.ops.higher_order.invoke_leaf_function", "higher-order operator"),
        ("torch.ops.higher_order.call_torchbind", "higher-order operator"),
        ("torch.ops.higher_order.inline_asm_elementwise", "higher-order operator"),
        ("torch.ops.prim.Print.default", "operators of 'prim' are not computations on tensors"),
        ("torch.ops.prim.RaiseException.default", "operators of 'prim'"),
        ("torch.ops.profiler._record_function_enter.default", "operators of 'profiler'"),
        ("torch.ops._c10d_functional.all_reduce.default", "operators of '_c10d_functional'"),
        ("torch.ops.c10d.barrier.default", "operators of 'c10d'"),
        ("torch.ops.symm_mem.rendezvous.default", "operators of 'symm_mem'"),
        ("torch.ops.debugprims.load_tensor.default", "operators of 'debugprims'"),
        ("torch.ops.aten._print.default", "acts outside the model"),
        ("torch.ops.aten.warn.default", "acts outside the model"),
        ("torch.ops.aten.format.default", "acts outside the model"),
        ("torch.ops.aten.percentFormat.default", "acts outside the model"),
        ("torch.ops.aten.save.default", "acts outside the model"),
        ("torch.ops.aten.from_file.default", "acts outside the model"),
        ("torch.ops.aten.manual_seed.default", "acts outside the model"),
        ("torch.ops.aten.ljust.default", "takes and returns no tensor"),  # a str of any width
        ("torch.ops.aten.mul.left_t", "takes and returns no tensor"),  # a list repeated any number of times
        ("torch.os.system", "which is not a PyTorch operator"),
        ("torch.ops.load_library", "which is not a PyTorch operator"),
        ("torch.ops.aten.no_such_operator.default", "not a registered operator"),
        ("torch.ops.aten.mul", "an operator without its overload"),  # its overloads include mul.left_t
    ],
)
def test_operators_that_act_outside_the_model_or_loop_without_bound_are_refused(target, message):
    from bnkit.torch.pt2_errors import ArchiveError
    from bnkit.torch.pt2_program import check_target

    with pytest.raises(ArchiveError, match=re.escape(message)):
        check_target(target)


@pytest.mark.parametrize(
    "target",
    [
        "torch.ops.aten.conv2d.default",
        "torch.ops.aten.sym_size.int",
        "torch.ops.aten._assert_scalar.default",  # torch.export's checks of symbolic sizes
        "torch.ops.aten.sym_constrain_range_for_size.default",
        "torch.ops.prims.convert_element_type.default",
        "torch.ops.higher_order.cond",
        "torch.ops.higher_order.wrap_with_set_grad_enabled",
        "_operator.floordiv",
    ],
)
def test_operators_that_compute_on_tensors_are_kept(target):
    from bnkit.torch.pt2_program import check_target

    check_target(target)


def test_a_program_with_cond_reads_and_runs_as_torch_reads_it(tmp_path):
    class Branches(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3, 3)

        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda x: self.linear(x).relu(), lambda x: x - 1, (x,))

    torch.manual_seed(0)
    program = torch.export.export(Branches(), (torch.randn(2, 3),))
    path = tmp_path / "cond.pt2"
    torch.export.save(program, str(path))
    ours, _ = read_exported_program(path)
    for x in (torch.rand(2, 3), -torch.rand(2, 3)):
        torch.testing.assert_close(ours.module()(x), program.module()(x), rtol=0, atol=0)


def _assert_node(message: str) -> dict:
    return {
        "target": "torch.ops.aten._assert_scalar.default",
        "inputs": [
            {"name": "self", "arg": {"as_bool": True}, "kind": 1},
            {"name": "assert_msg", "arg": {"as_string": message}, "kind": 1},
        ],
        "outputs": [{"as_none": True}], "metadata": {}, "is_hop_single_tensor_return": None, "name": "assert_1",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("message", "refusal"),
    [
        ("\x1b]0;pwned\x07\x1b[2J", r"a string argument '\\x1b\]0;pwned\\x07\\x1b\[2J' holds a control character"),
        ("x" * 5000, "a string argument of 5,000 characters"),
    ],
)
def test_string_arguments_are_short_and_printable(small, tmp_path, message, refusal):
    def add(program):
        program["graph_module"]["graph"]["nodes"].insert(0, _assert_node(message))

    crafted = with_program(small, tmp_path / "crafted.pt2", add)
    with pytest.raises(ModelFileError, match=refusal) as info:
        load_model(crafted)
    assert "\x1b" not in str(info.value)
    plain = with_program(small, tmp_path / "plain.pt2", lambda p: p["graph_module"]["graph"]["nodes"].insert(
        0, _assert_node("Runtime assertion failed for expression Eq(s77, 2)")))  # fmt: skip
    read_exported_program(plain)


def _dynamic(program) -> None:
    assert program["range_constraints"] == {"s77": {"min_val": 2, "max_val": None}}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["range_constraints"]["s77"].update(min_val=2**64), "has min_val 18446744073709551616"),
        (lambda p: p["range_constraints"]["s77"].update(max_val=1e300), "has max_val 1e+300, not an int64"),
        (lambda p: p["graph_module"]["graph"]["nodes"][0]["inputs"][3]["arg"].update(as_ints=[2**63, 1]),
         "the integer 9223372036854775808 (in 'as_ints') is outside int64"),
    ],
)  # fmt: skip
def test_integers_the_program_gives_torch_are_int64(small, tmp_path, edit, message):
    def change(program):
        _dynamic(program)
        edit(program)

    with pytest.raises(ModelFileError, match=re.escape(message)):
        load_model(with_program(small, tmp_path / "crafted.pt2", change))


# --------------------------------------------------------------------------- issue 17: bounded reading


def _deflated_zeros_record(source, target, record: str, nbytes: int):
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zout:
        root = zin.namelist()[0].split("/", 1)[0] + "/"
        for info in zin.infolist():
            data = bytes(nbytes) if info.filename == root + record else zin.read(info.filename)
            zout.writestr(info.filename, data)
    return target


def test_a_record_is_read_only_as_far_as_its_tensors_reach(small, tmp_path):
    """A 64 MiB weight record of zeros (deflated to 64 KiB) for a tensor of 432 bytes: 432 bytes are read."""
    from bnkit.formats.limits import ReadLimits

    crafted = _deflated_zeros_record(small, tmp_path / "crafted.pt2", "data/weights/weight_0", 64 * 2**20)
    program, _ = read_exported_program(crafted, ReadLimits(max_model_bytes=2**20).budget())
    weight = program.state_dict["conv.weight"]
    assert weight.shape == (4, 3, 3, 3) and not weight.any()
    assert weight.untyped_storage().nbytes() == 4 * 27 * 4


def test_what_strides_and_offsets_span_is_charged(small, tmp_path):
    from bnkit.formats.limits import LimitExceeded, ReadLimits

    crafted = _deflated_zeros_record(small, tmp_path / "zeros.pt2", "data/weights/weight_0", 64 * 2**20 + 432)

    def offset(config):
        config["config"]["conv.weight"]["tensor_meta"]["storage_offset"] = {"as_int": 16 * 2**20}

    spanning = _with_weights_config(crafted, tmp_path / "spanning.pt2", offset)
    with pytest.raises(LimitExceeded, match=r"data/weights/weight_0 \(the 64 MiB its tensors' strides and offsets"):
        read_exported_program(spanning, ReadLimits(max_model_bytes=32 * 2**20).budget())
    program, _ = read_exported_program(spanning, ReadLimits(max_model_bytes=128 * 2**20).budget())
    assert program.state_dict["conv.weight"].storage_offset() == 16 * 2**20


def _with_weights_config(source, target, edit):
    name = "data/weights/model_weights_config.json"

    def change(record: str, data: bytes) -> bytes:
        if record != name:
            return data
        config = json.loads(data)
        edit(config)
        return json.dumps(config).encode()

    return rewrite(source, target, change)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # a bias of 2**40 values with stride 0 over 4 bytes: the old reader summarised 1,099,511,628,060 parameters
        (lambda m: m.update(sizes=[{"as_int": 2**40}], strides=[{"as_int": 0}]),
         r"weight 'fc.bias' \(data/weights/weight_5: torch.float32 of shape \(1099511627776,\)\) would take 4"),
        (lambda m: m.update(sizes=[{"as_int": 2**62}, {"as_int": 2**62}], strides=[{"as_int": 0}, {"as_int": 0}]),
         r"weight 'fc.bias' .* would take"),
    ],
)  # fmt: skip
def test_every_tensor_is_charged_its_values_whatever_its_strides_share(small, tmp_path, edit, message):
    crafted = _with_weights_config(
        small, tmp_path / "crafted.pt2", lambda config: edit(config["config"]["fc.bias"]["tensor_meta"])
    )
    with pytest.raises(ModelFileError, match="refused: " + message + ".*over the limit of 4 GiB"):
        load_model(crafted)


def test_an_empty_record_is_charged_before_its_zeros_are_made(small, tmp_path):
    from bnkit.formats.limits import LimitExceeded

    def huge(config):
        config["config"]["fc.weight"]["tensor_meta"].update(
            sizes=[{"as_int": 2**20}, {"as_int": 2**12}], strides=[{"as_int": 2**12}, {"as_int": 1}]
        )

    crafted = _with_weights_config(small, tmp_path / "sized.pt2", huge)
    empty = rewrite(crafted, tmp_path / "empty.pt2", lambda n, d: b"" if n == "data/weights/weight_4" else d)
    with pytest.raises(LimitExceeded, match=r"weight 'fc.weight' .* would take 16 GiB"):
        read_exported_program(empty)
    small_empty = rewrite(small, tmp_path / "zeros.pt2", lambda n, d: b"" if n == "data/weights/weight_4" else d)
    program, _ = read_exported_program(small_empty)  # as torch reads it: zeros of the described shape
    assert program.state_dict["fc.weight"].shape == (2, 256) and not program.state_dict["fc.weight"].any()


# ------------------------------------------------------------------------------ issue 17: the pickle scan


def _torch_save_zip(pickles: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in pickles.items():
            archive.writestr(f"model/{name}", data)
    return buffer.getvalue()


def test_every_pickle_is_scanned_whatever_the_case_of_its_name():
    from bnkit.torch.pickle_scan import scan_tensor_pickle

    harmless = pickle.dumps(((), {}), protocol=2)
    calls_exec = b"\x80\x02cbuiltins\nexec\nX\x01\x00\x00\x001\x85R."
    scan_tensor_pickle(_torch_save_zip({"data.pkl": harmless}), "inputs")
    with pytest.raises(UnsafeArchiveError, match="inputs would call builtins.exec when unpickled"):
        scan_tensor_pickle(_torch_save_zip({"data.pkl": harmless, "DATA.PKL": calls_exec}), "inputs")


def test_the_scan_keeps_no_entry_per_opcode():
    """300,000 opcodes that leave the stack as it was: the old scan kept a list entry for each (here
    2.6 MB, the bound 2.5 times over; the scan now peaks at 1 KB whatever the count). No more of
    them: tracemalloc makes every allocation slow."""
    from bnkit.torch.pickle_scan import pickle_globals

    noops = b"\x80\x02" + b"(1" * 150_000 + b"N."
    tracemalloc.start()
    try:
        assert list(pickle_globals(noops, "inputs")) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"the scan took {peak} bytes"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x80\x02" + b"(1" * 600_000 + b"N.", "a pickle of more than 1,000,000 opcodes"),
        (b"\x80\x02N" + b"\x94" * 200_000 + b".", "a pickle of more than 100,000 memo entries"),
        (b"\x80\x02" + b"N" * (16 * 2**20) + b".", "a pickle of 16 MiB"),
    ],
)
def test_the_scan_is_bounded(payload, message):
    from bnkit.torch.pickle_scan import pickle_globals

    with pytest.raises(UnsafeArchiveError, match=message):
        list(pickle_globals(payload, "inputs"))


# ------------------------------------------------------------------------ found by the .pt2 mutants


def test_an_extra_file_that_is_not_utf8_is_refused_as_torch_refuses_it(small, tmp_path):
    def bad_byte(name: str, data: bytes) -> bytes:
        return data.replace(b'"model": "', b'"model": "\xff', 1) if name == "extra/bnkit.json" else data

    crafted = rewrite(small, tmp_path / "crafted.pt2", bad_byte)
    with pytest.raises(ModelFileError, match="extra/bnkit.json is not UTF-8 text"):
        load_model(crafted)


def test_a_record_whose_directory_says_empty_is_not_read_as_zeros(small, tmp_path):
    """The central directory's size of weight_0 set to 0: its 432 bytes are there (as its CRC says)."""
    data = bytearray(small.read_bytes())
    with zipfile.ZipFile(small) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data/weights/weight_0"))
        start = archive.start_dir
    entry = start  # the central directory's entries, until this member's
    while data[entry + 46 : entry + 46 + len(info.filename)] != info.filename.encode():
        entry = data.index(b"PK\x01\x02", entry + 4)
    data[entry + 24 : entry + 28] = (0).to_bytes(4, "little")  # uncompressed size
    crafted = tmp_path / "crafted.pt2"
    crafted.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"data/weights/weight_0 claims to hold nothing, but 432 bytes"):
        load_model(crafted)
