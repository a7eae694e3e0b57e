"""Crafted ``.pt2`` archives: issue 17's findings about torch.export programs, as files.

Each starts from the valid ``small.pt2`` (``make_corpus.valid_sources``: saved by bnkit, a free
batch size) or from a program exported here by torch, and changes what an attacker would: the
program's operators and shape expressions, the tensors' descriptions, the zip's members and
headers, the sample inputs' pickle. The files are written with the real zip module, then their
headers patched where the zip module will not write what a hostile file holds (an unknown
compression method, a name that is not UTF-8).

Large members are deflated zeros written in chunks: a few megabytes on disk, gigabytes once read.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from pathlib import Path

from crafted import Crafted

MiB = 2**20
GiB = 2**30
ENVIRON_FORMAT = "{0.__repr__.__func__.__globals__[torch].os.environ}"
RUNS_THE_PROGRAM = ("--input-shape", "3,8,8")  # summary then runs the program on an input of that shape


# --------------------------------------------------------------------------------------- zip helpers


def _root(archive: zipfile.ZipFile) -> str:
    return archive.namelist()[0].split("/", 1)[0] + "/"


def _copy(source: Path, target: Path, replace: dict | None = None, add: dict | None = None) -> Path:
    """Copy the archive member by member (stored); ``replace``/``add`` map a record name (relative to
    the archive's folder) to bytes, or to ``writer(zout, arcname)`` for a member written specially."""
    replace, add = dict(replace or {}), dict(add or {})
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as zout:
        root = _root(zin)
        for info in zin.infolist():
            name = info.filename[len(root) :]
            content = replace.pop(name, None)
            if content is None:
                zout.writestr(info.filename, zin.read(info.filename))
            elif callable(content):
                content(zout, info.filename)
            else:
                zout.writestr(info.filename, content, _method(content))
        for name, content in add.items():
            if callable(content):
                content(zout, root + name)
            else:
                zout.writestr(root + name, content, _method(content))
    return target


class _RepeatedBlocks:
    """A deflate compressor for members of repeated chunks: each chunk compressed once, then its
    block (ended by a full flush, so it stands alone) repeated; 2 GiB of zeros take a second, not 15."""

    def __init__(self) -> None:
        self.blocks: dict[bytes, bytes] = {}

    def compress(self, data: bytes) -> bytes:
        block = self.blocks.get(data)
        if block is None:
            compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
            block = compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)
            if len(data) == MiB:
                self.blocks[data] = block
        return block

    def flush(self) -> bytes:
        return zlib.compressobj(9, zlib.DEFLATED, -15).flush()


def _deflated(nbytes: int, prefix: bytes = b"", fill: bytes = b"\0", suffix: bytes = b""):
    """A writer of ``prefix``, ``fill`` repeated, then ``suffix``: ``nbytes`` deflated (zip64 when large)."""

    def write(zout: zipfile.ZipFile, arcname: str) -> None:
        info = zipfile.ZipInfo(arcname)
        info.compress_type = zipfile.ZIP_DEFLATED
        chunk = fill * (MiB // len(fill))
        with zout.open(info, "w", force_zip64=nbytes >= zipfile.ZIP64_LIMIT) as member:
            member._compressor = _RepeatedBlocks()  # the zip module's own writer computes sizes and the CRC
            member.write(prefix)
            left = nbytes - len(prefix) - len(suffix)
            while left >= MiB:
                member.write(chunk)
                left -= MiB
            member.write(chunk[:left] + suffix)

    return write


def _method(content: bytes) -> int:
    return zipfile.ZIP_DEFLATED if len(content) > MiB else zipfile.ZIP_STORED


def _deflated_zeros(nbytes: int, prefix: bytes = b""):
    return _deflated(nbytes, prefix)


def _read_json(source: Path, name: str):
    with zipfile.ZipFile(source) as archive:
        return json.loads(archive.read(_root(archive) + name))


def _with_json(source: Path, target: Path, name: str, edit) -> Path:
    value = _read_json(source, name)
    value = edit(value) or value
    return _copy(source, target, {name: json.dumps(value).encode()})


def _patch_headers(path: Path, member_suffix: str, *, flag_bits: int = 0, method: int | None = None, name=None):
    """Patch the local and central headers of the member whose name ends in ``member_suffix``: OR
    ``flag_bits`` into its flags, set its compression ``method``, replace the ``member_suffix`` of its
    name by the bytes ``name`` (of the same length)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
        start_dir = archive.start_dir
    old_name = info.filename.encode("ascii")
    local = info.header_offset
    assert data[local : local + 4] == b"PK\x03\x04"
    central = start_dir
    while data[central : central + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack_from("<HHH", data, central + 28)
        if data[central + 46 : central + 46 + n] == old_name:
            break
        central += 46 + n + m + k
    else:
        raise AssertionError(f"{member_suffix} not in the central directory")
    for header, flags_at, method_at, name_at in ((local, 6, 8, 30), (central, 8, 10, 46)):
        (flags,) = struct.unpack_from("<H", data, header + flags_at)
        struct.pack_into("<H", data, header + flags_at, flags | flag_bits)
        if method is not None:
            struct.pack_into("<H", data, header + method_at, method)
        if name is not None:
            assert len(name) == len(member_suffix)
            end = header + name_at + len(old_name)
            data[end - len(name) : end] = name
    path.write_bytes(bytes(data))
    return path


def _torch_save_zip(pickles: dict[str, bytes]) -> bytes:
    """A zip laid out as torch.save writes one, holding the given pickles."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in pickles.items():
            archive.writestr(f"model/{name}", data)
        archive.writestr("model/version", b"3\n")
    return buffer.getvalue()


def _exec_pickle() -> bytes:
    """A pickle that would call ``builtins.exec`` (never loaded here: it is written opcode by opcode)."""
    return b"\x80\x02cbuiltins\nexec\nX\x0b\x00\x00\x00print('ran')\x85R."


# ------------------------------------------------------------------------------------ program edits


def _first_node(program: dict) -> dict:
    return program["graph_module"]["graph"]["nodes"][0]


def _input_name(program: dict) -> str:
    return next(
        spec["user_input"]["arg"]["as_tensor"]["name"]
        for spec in program["graph_module"]["signature"]["input_specs"]
        if "user_input" in spec
    )


def _insert_node(program: dict, node: dict) -> None:
    program["graph_module"]["graph"]["nodes"].insert(0, node)


def _print_environment(program: dict) -> None:
    """The ``print`` higher-order operator, as torch.export writes it (its arguments named: the
    reader of the time refused unnamed ones), formatting the input with a format string that walks
    from the tensor to ``os.environ``."""
    _insert_node(program, {
        "target": "torch.ops.higher_order.print",
        "inputs": [
            {"name": "format_str", "arg": {"as_string": ENVIRON_FORMAT}, "kind": 1},
            {"name": "x", "arg": {"as_tensor": {"name": _input_name(program)}}, "kind": 1},
        ],
        "outputs": [{"as_none": True}], "metadata": {}, "is_hop_single_tensor_return": False, "name": "print_1",
    })  # fmt: skip


def _floor_of_two(program: dict) -> None:
    """The flatten call (two arguments; no layer is rebuilt from it) made a call of ``math.floor``,
    which takes one."""
    node = next(n for n in program["graph_module"]["graph"]["nodes"] if "flatten" in n["target"])
    node["target"] = "math.floor"


def _aten_print(program: dict) -> None:
    """``aten::_print``, a registered operator that writes to stdout."""
    _insert_node(program, {
        "target": "torch.ops.aten._print.default",
        "inputs": [{"name": "s", "arg": {"as_string": "PRINTED-BY-THE-PROGRAM"}, "kind": 1}],
        "outputs": [{"as_none": True}], "metadata": {}, "is_hop_single_tensor_return": None, "name": "print_1",
    })  # fmt: skip


def _replace_symbol(program_text: str, evil: str) -> str:
    """The program's text with its batch symbol's every expression made ``evil`` (a srepr string)."""
    symbol = "Symbol('s77', positive=True, integer=True)"
    assert json.dumps(symbol) in program_text, "the source's free batch is s77"
    return program_text.replace(json.dumps(symbol), json.dumps(evil))


def _with_expression(source: Path, target: Path, evil: str) -> Path:
    with zipfile.ZipFile(source) as archive:
        text = archive.read(_root(archive) + "models/model.json").decode()
    return _copy(source, target, {"models/model.json": _replace_symbol(text, evil).encode()})


# every expression computes a number of gigabytes (or, Float's, loops in C code): torch evaluates it
# while reading; each keeps the batch symbol, so it still reads as a size
_EXPRESSIONS = {
    "pow-tower-operators": "Symbol('s77', positive=True, integer=True) + 0*Integer(10)**Integer(10)**Integer(10)",
    "nine-nine-nine": "Symbol('s77', positive=True, integer=True) + 0*9**9**9",
    "pow-10-10e8": "Add(Symbol('s77', positive=True, integer=True), Mul(Integer(0), Pow(Integer(10), 10**8)))",
    "two-to-2-36": "Add(Symbol('s77', positive=True, integer=True), Mul(Integer(0), 2**68719476736))",
    "lshift": "Add(Symbol('s77', positive=True, integer=True), Mul(Integer(0), LShift(Integer(1), 10**10)))",
    "float-huge-exponent": "Add(Symbol('s77', positive=True, integer=True), Mul(Integer(0), Float('1e999999999')))",
}


# ---------------------------------------------------------------------------------- tensor edits


def _weights_config(source: Path) -> dict:
    return _read_json(source, "data/weights/model_weights_config.json")


def _with_weight_meta(source: Path, target: Path, fqn: str, edit) -> Path:
    def change(config):
        edit(config["config"][fqn]["tensor_meta"], config["config"][fqn])

    return _with_json(source, target, "data/weights/model_weights_config.json", change)


def _stride_zero_bias(meta, entry) -> None:
    """fc.bias: 2**40 elements, all the same 4 bytes (stride 0)."""
    meta["sizes"] = [{"as_int": 2**40}]
    meta["strides"] = [{"as_int": 0}]


def _empty_record_of(sizes):
    def edit(source: Path, target: Path) -> Path:
        config = _weights_config(source)
        entry = config["config"]["fc.weight"]
        entry["tensor_meta"]["sizes"] = [{"as_int": s} for s in sizes]
        strides, step = [], 1
        for s in reversed(sizes):
            strides.insert(0, {"as_int": step})
            step *= s
        entry["tensor_meta"]["strides"] = strides
        name = "data/weights/" + entry["path_name"]
        return _copy(source, target, {"data/weights/model_weights_config.json": json.dumps(config).encode(), name: b""})

    return edit


def _many_weights(count: int):
    """``count`` more weight entries, all views of one record, none used by the program."""

    def edit(source: Path, target: Path) -> Path:
        config = _weights_config(source)
        template = config["config"]["fc.bias"]
        for i in range(count):
            config["config"][f"extra_{i}"] = template
        return _copy(source, target, {"data/weights/model_weights_config.json": json.dumps(config).encode()})

    return edit


# ------------------------------------------------------------------------------------------- cases


def cases(folder: Path, sources: dict[str, Path]) -> list[Crafted]:
    source = sources["pt2"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    found: list[Crafted] = []

    def add(name: str, finding: str, path: Path, expect: str = "refused", text: str = "", extra=(), **kw) -> None:
        found.append(Crafted(f"pt2-{name}", finding, ("summary", str(path), *extra), expect, text, **kw))

    def path(name: str) -> Path:
        return folder / f"{name}.pt2"

    # ---- programs are data: operators
    add(
        "print-environ",
        "a print operator whose format string walks to os.environ: bnkit printed the environment",
        _with_json(source, path("print-environ"), "models/model.json", _print_environment),
        text="higher-order operator torch.ops.higher_order.print",
        forbidden=("environ({",),
        extra=RUNS_THE_PROGRAM,
    )
    add(
        "aten-print",
        "aten::_print, a registered operator that writes to stdout",
        _with_json(source, path("aten-print"), "models/model.json", _aten_print),
        text="aten._print",
        forbidden=("PRINTED-BY-THE-PROGRAM",),
        extra=RUNS_THE_PROGRAM,
    )
    add(
        "fails-when-run",
        "an allowed operator called with arguments it refuses (math.floor of two): torch.fx printed a "
        "traceback of the program before bnkit's error line",
        _with_json(source, path("fails-when-run"), "models/model.json", _floor_of_two),
        text="math.floor() takes exactly one argument",
        forbidden=("Traceback", "FX-traced Module"),
        extra=RUNS_THE_PROGRAM,
    )
    add(
        "while-loop-forever",
        "a while_loop whose counter never advances: bnkit hung",
        _while_loop_forever(folder, path("while-loop-forever")),
        text="torch.ops.higher_order.while_loop",
    )

    # ---- programs are data: shape expressions
    for name, evil in _EXPRESSIONS.items():
        add(
            f"expression-{name}",
            f"a shape expression that computes without bound ({name}): bnkit hung",
            _with_expression(source, path(f"expression-{name}"), evil),
            text="a shape expression",
        )

    # ---- memory: what a member declares, not what it claims
    add(
        "weight-deflated-zeros",
        "a weight record of 2 GiB of deflated zeros (its tensor needs 432 bytes): read "
        "only as far as the tensor reaches",
        _copy(source, path("weight-deflated-zeros"), {"data/weights/weight_0": _deflated_zeros(2 * GiB)}),
        expect="read",
    )
    add(
        "archive-version-zeros",
        "archive_version: 1 GiB of deflated zeros",
        _copy(source, path("archive-version-zeros"), {"archive_version": _deflated_zeros(GiB, b"1")}),
        text="archive_version",
    )
    add(
        "extra-file-zeros",
        "extra/bnkit.json: 1 GiB of deflated zeros",
        _copy(source, path("extra-file-zeros"), {"extra/bnkit.json": _deflated_zeros(GiB, b"{}")}),
        text="extra/bnkit.json",
    )
    add(
        "program-json-spaces",
        "models/model.json: its program followed by 3 GiB of deflated spaces",
        _copy(source, path("program-json-spaces"), {"models/model.json": _deflated_spaces_after_program(source)}),
        text="models/model.json",
    )
    add(
        "sample-inputs-zip-zeros",
        "the sample inputs' zip holds a data.pkl of 2 GiB of deflated zeros",
        _copy(source, path("sample-inputs-zip-zeros"), {"data/sample_inputs/model.pt": _nested_zeros(2 * GiB)}),
        text="sample inputs",
    )
    add(
        "empty-record-6gib",
        "an empty weight record whose sizes say 6 GiB (torch reads it as torch.zeros)",
        _empty_record_of([3 * 2**17, 2**12])(source, path("empty-record-6gib")),
        text="weight 'fc.weight'",
    )
    add(
        "stride-zero-2-40",
        "a bias of 2**40 elements with stride 0 over 4 bytes: bnkit summarised 1,099,511,628,060 parameters",
        _with_weight_meta(source, path("stride-zero-2-40"), "fc.bias", _stride_zero_bias),
        text="weight 'fc.bias'",
    )
    add(
        "many-weights",
        "100,000 weight entries (0.9 GB to read): bounded by the per-tensor charge",
        _many_weights(100_000)(source, path("many-weights")),
        text="--max-model-bytes",
        extra=("--max-model-bytes", "1G"),
    )

    # ---- tracebacks
    add(
        "sizes-strides-lengths",
        "a weight with 4 sizes and 3 strides",
        _with_weight_meta(
            source, path("sizes-strides-lengths"), "conv.weight", lambda meta, entry: meta["strides"].pop()
        ),
        text="4 sizes and 3 strides",
    )
    add(
        "int-parameter",
        "an integer dtype on a parameter that requires grad",
        _with_weight_meta(
            source, path("int-parameter"), "conv.weight", lambda meta, entry: meta.update(dtype=_scalar_type("int"))
        ),
        text="weight 'conv.weight'",
    )
    add(
        "size-not-int",
        "a weight size that is a string",
        _with_weight_meta(
            source, path("size-not-int"), "conv.weight", lambda meta, entry: meta["sizes"][0].update(as_int="4")
        ),
        text="weight 'conv.weight'",
    )
    add(
        "nested-json-lists",
        "models/model.json: 100,000 nested lists",
        _copy(source, path("nested-json-lists"), {"models/model.json": _nested_program(source, 100_000)}),
        text="nested deeper",
    )
    for member, flag, method, what in (
        ("data/weights/weight_0", 0x1, None, "encrypted"),
        ("data/weights/weight_1", 0, 93, "compression method 93"),
        ("data/weights/weight_2", 0, 99, "compression method 99"),
    ):
        name = what.replace(" ", "-")
        crafted = _patch_headers(_copy(source, path(name), {}), member, flag_bits=flag, method=method)
        add(f"member-{name}", f"a zip member flagged {what}", crafted, text=what)
    add(
        "member-name-not-utf8",
        "a member name flagged UTF-8 that is not",
        _patch_headers(
            _copy(source, path("member-name-not-utf8"), add={"extra/XX.txt": b"x"}),
            "extra/XX.txt",
            flag_bits=0x800,
            name=b"extra/\xff\xfe.txt",
        ),
        text="not a readable zip archive",
    )

    # ---- the pickle scanner
    add(
        "sample-inputs-upper-case-pickle",
        "a DATA.PKL that would call exec beside a harmless data.pkl: torch "
        "finds data.pkl case-insensitively, the scan read only lower-case names",
        _copy(
            source,
            path("sample-inputs-upper-case-pickle"),
            {
                "data/sample_inputs/model.pt": _torch_save_zip(
                    {"data.pkl": _harmless_pickle(), "DATA.PKL": _exec_pickle()}
                )
            },
        ),
        text="builtins.exec",
    )
    add(
        "sample-inputs-noop-opcodes",
        "a sample-inputs pickle of 268 M no-op opcodes (280 KB deflated): the scan took 97 s and 2.6 GB",
        _copy(source, path("sample-inputs-noop-opcodes"), {"data/sample_inputs/model.pt": _noop_pickle_zip()}),
        text="sample inputs",
    )
    return found


def _scalar_type(name: str) -> int:
    from torch._export.serde.schema import ScalarType

    return ScalarType[name.upper()].value


def _while_loop_forever(folder: Path, target: Path) -> Path:
    """A program exported by torch with a while_loop counting to 3, its increment then made 0."""
    import torch

    class Loop(torch.nn.Module):
        def forward(self, x):
            def cond(i, y):
                return i < 3

            def body(i, y):
                return i + 1, y * 2

            return torch._higher_order_ops.while_loop(cond, body, (torch.zeros((), dtype=torch.int64), x))[1]

    source = folder / "while-loop-source.pt2"
    torch.export.save(torch.export.export(Loop(), (torch.randn(2, 3, 8, 8),)), str(source))

    def never_advance(program: dict) -> None:
        loop = next(n for n in program["graph_module"]["graph"]["nodes"] if n["target"].endswith("while_loop"))
        body = next(a["arg"]["as_graph"]["graph"] for a in loop["inputs"][1:2])
        increment = next(n for n in body["nodes"] if n["target"] == "torch.ops.aten.add.Tensor")
        increment["inputs"][1]["arg"] = {"as_int": 0}
        names = ("cond_fn", "body_fn", "carried_inputs", "additional_inputs")
        for argument, name in zip(loop["inputs"], names, strict=True):
            argument["name"] = name  # torch writes none; the reader of the time refused unnamed arguments

    return _with_json(source, target, "models/model.json", never_advance)


def _deflated_spaces_after_program(source: Path):
    program = json.dumps(_read_json(source, "models/model.json")).encode()
    return _deflated(3 * GiB, program, b" ")


def _nested_zeros(nbytes: int) -> bytes:
    """A torch.save-like zip whose data.pkl is ``nbytes`` of deflated zeros."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        _deflated_zeros(nbytes)(archive, "model/data.pkl")
    return buffer.getvalue()


def _nested_program(source: Path, depth: int) -> bytes:
    text = json.dumps(_read_json(source, "models/model.json"))
    assert text.startswith('{"graph_module": ')
    return ('{"nested": ' + "[" * depth + "]" * depth + ", " + text[1:]).encode()


def _harmless_pickle() -> bytes:
    import pickle

    return pickle.dumps(((), {}), protocol=2)


def _noop_pickle_zip() -> bytes:
    """A data.pkl of 134 M MARK/POP_MARK pairs (268 M opcodes that leave the stack as it was), deflated."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        _deflated(256 * MiB + 4, b"\x80\x02", b"(1", b"N.")(archive, "model/data.pkl")
        archive.writestr("model/version", b"3\n")
    return buffer.getvalue()
