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
* the elements of a variable-length attribute point into a heap, and nothing stops them all
  pointing at the same large object (4,000 names of 4 MB each from a 4 MB file): the elements of
  an attribute array are read first into fixed-size strings, bounded, and a name over
  :data:`MAX_NAME_BYTES` is refused. Datasets of variable-length or reference data (Keras' weights
  are numbers) are refused;
* a filter HDF5 does not have built in is looked up in its plugin folders, which loads shared
  libraries into the process: :func:`no_filter_plugins` empties the plugin search path while a file
  is read, and a dataset whose filter is not available is refused by name.
"""

from __future__ import annotations

import contextlib
import math

from bnkit.formats.limits import Budget, LimitExceeded, format_bytes
from bnkit.text import one_line

__all__ = ["H5FileError", "MAX_NAME_BYTES", "check_h5", "no_filter_plugins", "read_json_attribute"]

MAX_NAME_BYTES = 4096  # a layer or weight name; Keras' own are tens of bytes


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


def check_h5(h5file, budget: Budget, what: str, charge_under: str = "/") -> None:
    """Check every link, dataset and attribute of the open ``h5file`` (see the module doc).

    Keras reads the weights a layer (an HDF5 group) at a time into arrays it drops once they are
    copied into the model's variables (charged apart, :mod:`bnkit.formats.keras_variables`): the
    datasets below ``charge_under`` (those Keras reads) of the largest group are charged to
    ``budget``. Every other check applies to the whole file. ``what`` names the file in messages.
    """
    import h5py

    def on_link(name: str, link) -> None:
        if isinstance(link, h5py.ExternalLink):
            raise H5FileError(
                f"{what}: {_shown(name)} is an external link to {one_line(link.filename, 160)!r}: "
                "it would read another file; refused"
            )

    h5file.visititems_links(on_link)  # links only: no object, no other file, is opened
    prefix = "/" + charge_under.strip("/")
    groups: dict[str, tuple[int, int]] = {}  # group name -> (bytes its datasets declare, how many)

    def on_object(name: str, obj) -> None:
        for attribute in obj.attrs:
            _check_attribute(obj, attribute, f"{what}: {_shown(name)} attribute {one_line(attribute, 80)!r}", budget)
        if isinstance(obj, h5py.Dataset):
            nbytes = _check_dataset(obj, f"{what}: dataset {_shown(name)}", budget.total)
            if prefix == "/" or ("/" + name).startswith(prefix + "/"):
                group = name.rpartition("/")[0]
                total, count = groups.get(group, (0, 0))
                groups[group] = (total + nbytes, count + 1)

    for attribute in h5file.attrs:
        _check_attribute(h5file, attribute, f"{what}: attribute {one_line(attribute, 80)!r}", budget)
    h5file.visititems(on_object)  # each object once, through hard links only
    if groups:
        group, (nbytes, count) = max(groups.items(), key=lambda item: item[1][0])
        budget.charge(nbytes, f"{what}: the {count} dataset(s) in {_shown(group)}, as declared,")


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
            raise H5FileError(
                f"{what} is compressed with HDF5 filter {code} ({one_line(name.decode('utf-8', 'replace'), 60)}), "
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
    """Charge the attribute's declared size; bound its variable-length elements before anyone reads them."""
    import h5py
    import numpy as np

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
    if count <= 1:
        return  # one string: its bytes are in the file (HDF5 checks the length against its heap object)
    # each element may point at the same large heap object: read them cut to MAX_NAME_BYTES + 1 first
    cut_bytes = count * (MAX_NAME_BYTES + 1)
    if cut_bytes > budget.left:  # checked, not kept: the array is dropped at once
        budget.charge(cut_bytes, f"{what} ({count} names)")
    cut = np.zeros(shape, dtype=f"S{MAX_NAME_BYTES + 1}")
    attribute.read(cut, mtype=h5py.h5t.py_create(cut.dtype))
    longest = max((len(item) for item in cut.flat), default=0)
    if longest > MAX_NAME_BYTES:
        raise H5FileError(f"{what} holds a name longer than {format_bytes(MAX_NAME_BYTES)}; Keras' names are short")


def read_json_attribute(obj, name: str, what: str, budget: Budget):
    """The attribute ``name`` of ``obj`` (a JSON text, as Keras stores configs) parsed, bounded by ``budget``.

    A fixed-length string is bounded by its storage before it is read; a variable-length one's
    bytes are in the file, uncompressed, and HDF5 checks its length against them.
    """
    import h5py

    from bnkit.formats.limits import parse_json

    attribute = obj.attrs.get_id(name)
    dtype = attribute.dtype
    if dtype.hasobject and h5py.check_string_dtype(dtype) is None:
        raise H5FileError(f"{what} is not text ({dtype})")
    if not dtype.hasobject and attribute.get_storage_size() > budget.json_limit():
        raise LimitExceeded(
            f"{what} is {format_bytes(attribute.get_storage_size())}, over the limit of "
            f"{format_bytes(budget.json_limit())} for it (raise it with --max-model-bytes)"
        )
    value = obj.attrs[name]
    if not isinstance(value, (str, bytes)):
        raise H5FileError(f"{what} is not a text but {type(value).__name__} {getattr(value, 'shape', '')}")
    return parse_json(value, what, budget)
