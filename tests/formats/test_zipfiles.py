"""bnkit.formats.zipfiles.SafeZip on archives made by Python's zipfile, then altered as an attacker would."""

from __future__ import annotations

import io
import struct
import warnings
import zipfile

import pytest

from bnkit.formats.limits import LimitExceeded
from bnkit.formats.zipfiles import SafeZip, ZipMemberError


def _zip(members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _patch_central_directory(data: bytes, offset_in_entry: int, fmt: str, value) -> bytes:
    """Set a field of every central-directory entry (signature PK\\x01\\x02)."""
    patched = bytearray(data)
    start = 0
    while (start := patched.find(b"PK\x01\x02", start)) >= 0:
        struct.pack_into(fmt, patched, start + offset_in_entry, value)
        start += 4
    return bytes(patched)


def test_a_member_is_read_whole_and_checked():
    archive = SafeZip(io.BytesIO(_zip({"a/config.json": b'{"x": 1}'}, zipfile.ZIP_DEFLATED)))
    assert archive.names() == ["a/config.json"]
    assert bytes(archive.read("a/config.json", 100)) == b'{"x": 1}'


def test_a_member_over_its_limit_is_refused_before_it_is_decompressed():
    zeros = _zip({"weights": bytes(64 * 2**20)}, zipfile.ZIP_DEFLATED)  # 64 MiB of zeros in ~64 KiB
    assert len(zeros) < 2**20
    archive = SafeZip(io.BytesIO(zeros))
    with pytest.raises(LimitExceeded, match=r"member 'weights' is 64 MiB, over the limit of 1 MiB for it"):
        archive.read("weights", 2**20)
    assert bytes(archive.read_prefix("weights", 16)) == bytes(16)  # only what a tensor needs


def test_a_member_whose_data_is_short_of_its_claim_is_named():
    data = _zip({"weight_0": b"\x01" * 100})
    with pytest.raises(ZipMemberError, match="member 'weight_0' holds 100 bytes, 200 expected"):
        SafeZip(io.BytesIO(data)).read_prefix("weight_0", 200)


def test_a_corrupt_member_is_named_not_a_traceback():
    data = bytearray(_zip({"model.json": bytes(range(256)) * 4}, zipfile.ZIP_DEFLATED))
    stream = 30 + len("model.json")  # after the local header
    data[stream + 2 : stream + 12] = b"\xff" * 10
    with pytest.raises(ZipMemberError, match="member 'model.json' cannot be read"):
        SafeZip(io.BytesIO(bytes(data))).read("model.json", 10_000)


def test_an_encrypted_member_is_refused_by_name():
    data = _patch_central_directory(_zip({"config.json": b"{}"}), 8, "<H", 0x1)  # general purpose flags
    with pytest.raises(ZipMemberError, match="member 'config.json' is encrypted"):
        SafeZip(io.BytesIO(data))


@pytest.mark.parametrize("method", [93, 99])  # Zstandard, AES: Python 3.11's zipfile reads neither
def test_a_compression_method_python_cannot_read_is_refused_by_name(method):
    data = _patch_central_directory(_zip({"model.weights.h5": b"data"}), 10, "<H", method)
    with pytest.raises(ZipMemberError, match=f"member 'model.weights.h5' uses compression method {method}"):
        SafeZip(io.BytesIO(data))


def test_a_name_flagged_utf8_that_is_not_is_refused():
    data = _zip({"name\u00e9.json": b"{}"})  # written with the UTF-8 flag
    bad = data.replace("name\u00e9".encode(), b"name\xff\xfe")
    with pytest.raises(ZipMemberError, match="not a readable zip archive .UnicodeDecodeError"):
        SafeZip(io.BytesIO(bad))


def test_two_members_of_one_name_are_refused():
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as archive:
        warnings.simplefilter("ignore")  # zipfile: "Duplicate name"
        archive.writestr("config.json", b'{"a": 1}')
        archive.writestr("config.json", b'{"a": 2}')
    with pytest.raises(ZipMemberError, match="two members named 'config.json'"):
        SafeZip(io.BytesIO(buffer.getvalue()))


def test_a_name_with_control_characters_is_shown_escaped():
    data = _zip({"x\x1b]0;PWNED\x07": b"A" * 10})
    with pytest.raises(LimitExceeded) as caught:
        SafeZip(io.BytesIO(data)).read("x\x1b]0;PWNED\x07", 1)
    assert "\x1b" not in str(caught.value) and "\\x1b]0;PWNED\\x07" in str(caught.value)


def test_not_a_zip_is_one_error():
    with pytest.raises(ZipMemberError, match="the archive is not a readable zip archive"):
        SafeZip(io.BytesIO(b"PK\x03\x04 truncated"))
