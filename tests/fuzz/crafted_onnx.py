"""Crafted ``.onnx`` files: external data that leads out of the model's folder, tensors larger than their data,
custom operators, hostile names and nesting. Built with onnx.helper (the format as onnx writes it).

Each is read with ``bnkit summary``: a correct bnkit refuses it in one line naming the problem, or reads it.
"""

from __future__ import annotations

import os
from pathlib import Path

from crafted import Crafted
from crafted_keras import ESCAPES


def _model(nodes, inits, inputs=(("x", [1, 4]),), outputs=(("y", [1, 3]),), extra_opsets=()):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, "crafted",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *extra_opsets])


def _matmul(w):
    """x (1, 4) @ W (4, 3) -> y, with ``w`` as the initializer W."""
    from onnx import helper

    return _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [w])


def _external(location: str, dims=(4, 3), offset: int = 0, length: int | None = 48, data_type=None):
    from onnx import TensorProto

    w = TensorProto(name="W", data_type=data_type or TensorProto.FLOAT, dims=list(dims))
    w.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset)} | ({} if length is None else {"length": str(length)})
    for key, value in entries.items():
        w.external_data.add(key=key, value=value)
    return w


def _save(model, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _deep_if(depth: int) -> bytes:
    """A ModelProto whose graph nests ``depth`` If nodes, each the then_branch of the one above."""
    graph = _field(1, _field(4, b"Identity") + _field(1, b"x") + _field(2, b"y")) + _field(2, b"g")
    for level in range(depth):
        attribute = _field(1, b"then_branch") + _field(6, graph) + _varint(20 << 3) + _varint(5)  # type GRAPH
        node = _field(1, b"c") + _field(2, b"y") + _field(3, f"if{level}".encode()) + _field(4, b"If")
        graph = _field(1, node + _field(5, attribute)) + _field(2, f"g{level}".encode())
    return _varint(1 << 3) + _varint(8) + _field(7, graph) + _field(8, _varint(2 << 3) + _varint(17))


def _save_bytes(data: bytes, path: Path) -> Path:
    path.write_bytes(data)
    return path


def cases(folder: Path, sources: dict[str, Path]) -> list[Crafted]:
    try:
        import numpy as np
        from onnx import TensorProto, helper, numpy_helper
    except ModuleNotFoundError:  # without the onnx extra there is no .onnx reader to attack
        return []
    out: list[Crafted] = []

    def case(name, finding, path, expect_text="", expect="refused", forbidden=()):
        out.append(Crafted(f"onnx-{name}", finding, ("summary", str(path)), expect, expect_text, tuple(forbidden)))

    secret = folder / "secret.bin"
    secret.write_bytes(b"TOP-SECRET-" + b"\0" * 64)
    ok = _matmul(numpy_helper.from_array(np.ones((4, 3), np.float32), "W"))
    case("valid", "a valid model, for contrast", _save(ok, folder / "valid" / "m.onnx"), expect="read")

    case("dotdot", "external data named '../secret.bin' reads a file beside the model's folder",
         _save(_matmul(_external("../secret.bin")), folder / "dotdot" / "m.onnx"), "leads out of the model's folder",
         forbidden=("TOP-SECRET",))  # fmt: skip
    case("absolute", "external data at an absolute path reads any file of the machine",
         _save(_matmul(_external("/etc/passwd")), folder / "absolute" / "m.onnx"), "absolute path",
         forbidden=("root:",))  # fmt: skip
    link_folder = folder / "link"
    link_folder.mkdir()
    os.symlink(secret, link_folder / "data.bin")
    case("symlink-out", "a symbolic link in the model's folder points at a file outside it",
         _save(_matmul(_external("data.bin")), link_folder / "m.onnx"), "link leading out",
         forbidden=("TOP-SECRET",))  # fmt: skip
    zero_folder = folder / "devzero"
    zero_folder.mkdir()
    os.symlink("/dev/zero", zero_folder / "zero.bin")
    case("dev-zero", "external data linked to /dev/zero: endless bytes for a reader that trusts the length",
         _save(_matmul(_external("zero.bin", dims=(2**20, 2**20), length=None)), zero_folder / "m.onnx"),
         "link leading out")  # fmt: skip
    fifo_folder = folder / "fifo"
    fifo_folder.mkdir()
    os.mkfifo(fifo_folder / "pipe.bin")
    case("fifo", "external data in a FIFO: a reader that opens it waits forever for a writer",
         _save(_matmul(_external("pipe.bin")), fifo_folder / "m.onnx"), "not a regular file")  # fmt: skip
    (folder / "huge").mkdir()
    (folder / "huge" / "m.data").write_bytes(b"\0" * 48)
    case("huge-declared", "a tensor declares 2^40 floats (4 TiB) over 48 bytes of data",
         _save(_matmul(_external("m.data", dims=(2**20, 2**20), length=None)), folder / "huge" / "m.onnx"),
         "holds 48 bytes")  # fmt: skip
    (folder / "string").mkdir()
    (folder / "string" / "m.data").write_bytes(b"\0" * 48)
    case("string-external", "STRING data stored outside the model (onnx would read it as bytes)",
         _save(_matmul(_external("m.data", data_type=TensorProto.STRING)), folder / "string" / "m.onnx"),
         "STRING data cannot be stored outside")  # fmt: skip
    custom = _matmul(numpy_helper.from_array(np.ones((4, 3), np.float32), "W"))
    custom.graph.node.append(helper.make_node("Gelu", ["y"], ["z"], name="g" + ESCAPES, domain="com.microsoft"))
    custom.graph.output[0].name = "z"
    custom.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    case("custom-domain", "an onnxruntime contrib operator (a custom-op library would be loaded to run it), its "
         "node name with terminal escapes", _save(custom, folder / "custom.onnx"), "'com.microsoft'",
         forbidden=("\x1b",))  # fmt: skip
    truncated = folder / "truncated.onnx"
    data = ok.SerializeToString()
    truncated.write_bytes(data[: len(data) // 2])
    case("truncated", "the protobuf cut in half (an interrupted download)", truncated, "not a readable ONNX model")
    # protobuf's own writer refuses this nesting, so the bytes are written by hand
    case("deep-nesting", "200 nested If subgraphs: recursion in a reader that walks them",
         _save_bytes(_deep_if(200), folder / "deep.onnx"), "not a readable ONNX model")  # fmt: skip
    return out
