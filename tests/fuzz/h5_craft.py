"""HDF5 files as an attacker writes them, for the crafted ``.keras`` (its ``model.weights.h5``) and
``.h5`` files: edits made with h5py on a copy of a file Keras saved, and one made on its bytes
(:func:`shared_heap_names`), where h5py will not write what a hostile file holds.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

KERNEL_SHAPE = (3, 3, 3, 4)  # the conv kernel of fuzz_models.small_keras, float32: 432 bytes


def edited(data: bytes, edit) -> bytes:
    """``data`` (an HDF5 file) with ``edit(h5py.File)`` applied."""
    import h5py

    buffer = io.BytesIO(data)
    with h5py.File(buffer, "r+") as f:
        edit(f)
    return buffer.getvalue()


def attribute(path: Path, name: str):
    """The root attribute ``name`` of the HDF5 file ``path``."""
    import h5py

    with h5py.File(path, "r") as f:
        return f.attrs[name]


def edit_file(source: Path, target: Path, edit) -> Path:
    target.write_bytes(edited(source.read_bytes(), edit))
    return target


def fill_bomb(name: str, nbytes: int):
    """Replace dataset ``name`` by a chunked float32 one declaring ``nbytes`` and storing nothing."""

    def edit(f) -> None:
        del f[name]
        f.create_dataset(name, shape=(nbytes // 4,), dtype="f4", chunks=(2**20,))

    return edit


def external_storage(name: str, other: Path):
    """Replace dataset ``name`` by one whose bytes are read from the file ``other``."""

    def edit(f) -> None:
        del f[name]
        f.create_dataset(name, shape=KERNEL_SHAPE, dtype="f4", external=[(str(other), 0, 432)])

    return edit


def other_file(path: Path) -> Path:
    """An HDF5 file a crafted one points at: ``/secret`` and ``/vars/0``, ``/vars/1`` (a conv's kernel and bias)."""
    import h5py
    import numpy as np

    with h5py.File(path, "w") as f:
        f["secret"] = np.full(KERNEL_SHAPE, 7.0, dtype="f4")
        f["vars/0"] = np.full(KERNEL_SHAPE, 7.0, dtype="f4")
        f["vars/1"] = np.zeros(4, dtype="f4")
    return path


def virtual(name: str, other: Path):
    """Replace dataset ``name`` by a virtual dataset mapping ``other``'s ``/secret``."""

    def edit(f) -> None:
        import h5py

        del f[name]
        layout = h5py.VirtualLayout(shape=KERNEL_SHAPE, dtype="f4")
        layout[...] = h5py.VirtualSource(str(other), "secret", shape=KERNEL_SHAPE)
        f.create_virtual_dataset(name, layout)

    return edit


def external_link(name: str, other: Path):
    """Replace group ``name`` by an external link to ``other``'s ``/vars``."""

    def edit(f) -> None:
        import h5py

        del f[name]
        f[name] = h5py.ExternalLink(str(other), "/vars")

    return edit


def unknown_filter(name: str, code: int = 32004):
    """Replace dataset ``name`` by one chunk filtered with HDF5 filter ``code`` (not built in: a plugin's)."""

    def edit(f) -> None:
        import h5py

        del f[name]
        plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        plist.set_chunk(KERNEL_SHAPE)
        plist.set_filter(code, h5py.h5z.FLAG_OPTIONAL, ())
        space = h5py.h5s.create_simple(KERNEL_SHAPE)
        dataset = h5py.h5d.create(f.id, name.encode(), h5py.h5t.IEEE_F32LE, space, dcpl=plist)
        dataset.write_direct_chunk((0, 0, 0, 0), bytes(432), filter_mask=0)  # as if the filter had run

    return edit


def vlen_dataset(name: str):
    """Replace dataset ``name`` by one of variable-length text."""

    def edit(f) -> None:
        import h5py

        del f[name]
        f.create_dataset(name, data=["x"] * 4, dtype=h5py.string_dtype())

    return edit


def shared_heap_names(data: bytes, owner: str, attribute: str, count: int, length: int) -> bytes:
    """``data`` with attribute ``attribute`` of ``owner`` set to ``count`` names that all point at one
    heap object of ``length`` bytes: ``count × length`` bytes once read, from a file of ``length``."""
    import h5py
    import numpy as np

    def edit(f) -> None:
        names = ["N" * length] + ["a"] * (count - 1)
        f[owner].attrs[attribute] = np.array(names, dtype=h5py.string_dtype())

    data = bytearray(edited(data, edit))
    # the attribute's elements are 16-byte descriptors, one after the other: the length (4 bytes),
    # then the heap collection's address (8) and the object's index (4)
    first = struct.pack("<I", length)
    one = struct.pack("<I", 1)
    at = next(
        i for i in range(len(data) - 32) if data[i : i + 4] == first and data[i + 16 : i + 20] == one
    )  # fmt: skip
    for element in range(1, count):
        data[at + 16 * element : at + 16 * element + 16] = data[at : at + 16]
    return bytes(data)


def looping_heap(data: bytes) -> bytes:
    """``data`` (an HDF5 file) with its last global heap's free-space object given the size 0: HDF5
    2.0 then loops forever reading any variable-length data in that heap (a config, a name; an
    edit with h5py writes its new ones in a heap of its own, the last)."""
    data = bytearray(data)
    heap = data.rindex(b"GCOL\x01\x00\x00\x00")
    end = heap + int.from_bytes(data[heap + 8 : heap + 16], "little")
    at = heap + 16
    while int.from_bytes(data[at : at + 2], "little") != 0:  # objects until the free space (index 0)
        at += 16 + (int.from_bytes(data[at + 8 : at + 16], "little") + 7) // 8 * 8
        assert at < end, "a heap without free space"
    data[at + 8 : at + 16] = bytes(8)
    return bytes(data)
