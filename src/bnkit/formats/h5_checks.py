"""HDF5 files (a legacy Keras ``.h5``, the ``model.weights.h5`` inside a ``.keras``) checked with h5py
before Keras reads them.

What HDF5 reads on Keras' behalf need not be in the file, nor be as small as the file:

* an *external link* opens another HDF5 file, a dataset's *external storage* or a *virtual dataset*
  reads other files' bytes, which would become weights (a conversion would copy a file of this
  machine into the model it writes): each is refused, naming the object;
* a dataset's shape is only a declaration: chunks never written read as the fill value, so a few
  bytes of file become gigabytes of array. Keras reads a layer's datasets (an HDF5 group) at a time
  and drops them once copied into the variables: the declared size of the largest group's datasets
  (and, for a chunked one, the chunk HDF5 decompresses) is charged to the
  :class:`~bnkit.formats.limits.Budget`;
* the elements of variable-length data point into a heap, and nothing stops them all pointing at
  the same large object (3,000 names of 1.5 MB each from a 1.6 MB file). Datasets of
  variable-length or reference data (Keras' weights are numbers) are refused, and so are
  attributes of variable-length sequences other than text. An array of texts (Keras' layer and
  weight names) cannot be bounded before it is read: HDF5 reads every element to convert even one
  (see ``docs/security.md``);
* a filter HDF5 does not have built in is looked up in its plugin folders, which loads shared
  libraries into the process: :func:`no_filter_plugins` empties the plugin search path while a file
  is read, and a dataset whose filter is not available is refused by name;
* HDF5 (2.0) loops forever, in C code that holds Python's lock (no signal handler or watchdog
  thread runs), on a global heap (where variable-length data lives: every Keras config and name)
  whose objects do not tile it: a free-space object of size 0 never advances. A byte inserted
  into a Keras file is enough. :func:`check_global_heaps` walks every heap as HDF5 does, in
  Python, before anything reads one.
"""

from __future__ import annotations

import contextlib
import math

from bnkit.formats.limits import JSON_EXPANSION, Budget, LimitExceeded, format_bytes
from bnkit.text import one_line

__all__ = ["H5FileError", "check_global_heaps", "check_h5", "no_filter_plugins", "read_json_attribute"]

SLACK = 2**16  # bytes a weight may declare past its model's variables (a chunk of a tiny model's dataset)


class H5FileError(ValueError):
    """An HDF5 object bnkit refuses to let Keras read; the message names it."""


def _shown(name: str) -> str:
    return repr(one_line(name if name.startswith("/") else "/" + name, 160))


@contextlib.contextmanager
def no_filter_plugins():
    """No HDF5 filter plugin is loaded in the block: HDF5's plugin search path is emptied, then restored."""
    from h5py import h5pl

    paths = [h5pl.get(i) for i in range(h5pl.size())]
    for _ in paths:
        h5pl.remove(0)
    try:
        yield
    finally:
        while h5pl.size():
            h5pl.remove(0)
        for path in paths:
            h5pl.append(path)


_HEAP_SIGNATURE = b"GCOL\x01\x00\x00\x00"  # a global heap collection, version 1, then its size
_HEAP_MIN_SIZE = 4096  # H5HG_MINSIZE
_OBJECT_HEADER = 16  # an object's index (2 bytes), reference count (2), reserved (4), size (8)


def check_global_heaps(data, start: int, end: int, what: str) -> None:
    """Refuse a global heap in ``data[start:end]`` (the file's bytes: ``bytes`` or an ``mmap``) whose
    objects would not advance HDF5's walk through it to its end (see the module doc).

    A valid heap is tiled exactly by its objects, the last the free space; a heap's signature and
    header (8 fixed bytes, a size of at least 4 KiB) do not occur by chance in weights.
    """
    at = data.find(_HEAP_SIGNATURE, start, end)
    while at >= 0:
        size = int.from_bytes(data[at + 8 : at + 16], "little")
        heap_end = at + size
        if size >= _HEAP_MIN_SIZE and heap_end <= end:
            position = at + 16
            while position + _OBJECT_HEADER <= heap_end:
                index = int.from_bytes(data[position : position + 2], "little")
                object_size = int.from_bytes(data[position + 8 : position + 16], "little")
                # as HDF5 steps: an object's header and its data padded to 8 bytes; the free space (index 0) as is
                step = (_OBJECT_HEADER + (object_size + 7) // 8 * 8 if index else object_size) % 2**64
                if step == 0 or position + step > heap_end:
                    raise H5FileError(
                        f"{what}: the global heap at byte {at - start} is damaged (an object of {object_size} bytes "
                        f"at byte {position - start} does not fit it): HDF5 would loop on it forever"
                    )
                position += step
        at = data.find(_HEAP_SIGNATURE, at + 1, end)


def check_h5(h5file, budget: Budget, what: str, variables: int, charge_under: str = "/") -> int:
    """Check every link, dataset and attribute of the open ``h5file`` (see the module doc).

    Keras reads the weights a layer (an HDF5 group) at a time into arrays it drops once they are
    copied into the model's variables (charged apart, :mod:`bnkit.formats.keras_variables`): the
    datasets below ``charge_under`` (those Keras reads) of the largest group are charged to
    ``budget``, and one that declares more than twice the ``variables`` bytes of the whole model
    (a float64 copy of them all) is refused. Every other check applies to the whole file. ``what``
    names the file in messages. Returns the bytes all those datasets declare.
    """
    import h5py

    # h5py turns an exception raised in this callback into a SystemError: stop by returning the name
    external = h5file.visititems_links(lambda name, link: name if isinstance(link, h5py.ExternalLink) else None)
    if external is not None:  # links only were visited: no object, no other file, is opened
        target = h5file.get(external, getlink=True)
        raise H5FileError(
            f"{what}: {_shown(external)} is an external link to {one_line(target.filename, 160)!r}: "
            "it would read another file; refused"
        )
    prefix = "/" + charge_under.strip("/")
    groups: dict[str, tuple[int, int]] = {}  # group name -> (bytes its datasets declare, how many)

    def on_object(name: str, obj) -> None:
        for attribute in obj.attrs:
            _check_attribute(obj, attribute, f"{what}: {_shown(name)} attribute {one_line(attribute, 80)!r}", budget)
        if isinstance(obj, h5py.Dataset):
            nbytes = _check_dataset(obj, f"{what}: dataset {_shown(name)}", budget.total)
            if prefix == "/" or ("/" + name).startswith(prefix + "/"):
                if nbytes > 2 * variables + SLACK:
                    raise LimitExceeded(
                        f"{what}: dataset {_shown(name)} of shape {obj.shape} declares "
                        f"{format_bytes(nbytes)}, more than the model's variables take together "
                        f"({format_bytes(variables)}, as its config declares them)"
                    )
                group = name.rpartition("/")[0]
                total, count = groups.get(group, (0, 0))
                groups[group] = (total + nbytes, count + 1)

    for attribute in h5file.attrs:
        _check_attribute(h5file, attribute, f"{what}: attribute {one_line(attribute, 80)!r}", budget)
    h5file.visititems(on_object)  # each object once, through hard links only
    if groups:
        group, (nbytes, count) = max(groups.items(), key=lambda item: item[1][0])
        budget.charge(nbytes, f"{what}: the {count} dataset(s) in {_shown(group)}, as declared,")
    return sum(nbytes for nbytes, _ in groups.values())


def _check_dataset(dataset, what: str, ceiling: int) -> int:
    """Refuse what HDF5 would read from elsewhere or with a plugin; return the bytes reading it takes
    (the array, and the chunk a filter decompresses into), counted up to past ``ceiling``."""
    from h5py import h5z

    if dataset.is_virtual:
        raise H5FileError(f"{what} is a virtual dataset: it would read other files; refused")
    if dataset.external:
        files = ", ".join(repr(one_line(str(entry[0]), 80)) for entry in dataset.external[:3])
        raise H5FileError(f"{what} is stored in external files ({files}): it would read other files; refused")
    if dataset.dtype.hasobject:
        raise H5FileError(f"{what} holds variable-length or reference data ({dataset.dtype}), not numbers")
    plist = dataset.id.get_create_plist()
    for index in range(plist.get_nfilters()):
        code, _flags, _values, name = plist.get_filter(index)
        if not h5z.filter_avail(code):
            label = one_line(name.decode("utf-8", "replace"), 60)
            raise H5FileError(
                f"{what} is compressed with HDF5 filter {code}{f' ({label})' if label else ''}, "
                "which is not built in (bnkit loads no HDF5 filter plugins)"
            )
    itemsize = dataset.dtype.itemsize
    nbytes = _product(dataset.shape or (), itemsize, ceiling)  # shape None: an empty dataspace
    if dataset.chunks and plist.get_nfilters():
        nbytes += _product(dataset.chunks, itemsize, ceiling)
    return nbytes


def _product(shape, itemsize: int, ceiling: int) -> int:
    """``itemsize × prod(shape)``, stopped once past ``ceiling`` (a shape of 10**9 dimensions stays cheap)."""
    nbytes = 0 if 0 in shape else itemsize
    for size in shape if nbytes else ():
        nbytes *= size
        if nbytes > ceiling:
            break
    return nbytes


def _check_attribute(obj, name: str, what: str, budget: Budget) -> None:
    """Charge the attribute's declared size; refuse variable-length data other than text."""
    import h5py

    attribute = obj.attrs.get_id(name)
    shape = attribute.shape
    dtype = attribute.dtype
    count = math.prod(shape) if shape else 1
    budget.charge(count * dtype.itemsize, what)
    if not dtype.hasobject:
        return
    string = h5py.check_string_dtype(dtype)
    if string is None or string.length is not None:
        if h5py.check_ref_dtype(dtype) is not None:
            return  # references are read as numbers; nothing dereferences them
        raise H5FileError(f"{what} holds variable-length data other than text ({dtype}); Keras writes none")


def read_json_attribute(obj, name: str, what: str, budget: Budget):
    """The attribute ``name`` of ``obj`` (a JSON text, as Keras stores configs) parsed, bounded by ``budget``.

    A fixed-length string is bounded by its storage before it is read; a variable-length one's
    bytes are in the file, uncompressed, and HDF5 checks its length against them.
    """
    import h5py

    from bnkit.formats.limits import parse_json

    attribute = obj.attrs.get_id(name)
    dtype = attribute.dtype
    if attribute.shape != ():  # an array's elements could all point at one large heap object
        raise H5FileError(f"{what} is not one text but an array of shape {attribute.shape}")
    if dtype.hasobject and h5py.check_string_dtype(dtype) is None:
        raise H5FileError(f"{what} is not text ({dtype})")
    if not dtype.hasobject:  # a fixed-length text: its storage is its size
        size = attribute.get_storage_size()
        budget.charge(size * JSON_EXPANSION, f"{what} ({format_bytes(size)} of JSON)")
        budget = None  # charged
    value = obj.attrs[name]
    if not isinstance(value, (str, bytes)):
        raise H5FileError(f"{what} is not a text but {type(value).__name__} {getattr(value, 'shape', '')}")
    return parse_json(value, what, budget)
