"""A recipe's entries as one byte string, what RECIPE_DELTA encodes (SPEC §4.1).

The ids come first, 32 bytes each, then the sizes, 4-byte little-endian each. Runs of
entries two versions of a blob share are then the same bytes in both: zstd, given the old
version's entries as prefix, sends them as matches, and only new ids cost their bytes.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence

from ._constants import ID_SIZE

#: Bytes per entry: its id and its size.
ENTRY_SIZE = ID_SIZE + 4


def _sizes_array(values: Sequence[int] | bytes) -> array[int]:
    out = array("I")
    assert out.itemsize == 4
    if isinstance(values, bytes):
        out.frombytes(values)
        if sys.byteorder == "big":  # pragma: no cover
            out.byteswap()
    else:
        out.extend(values)
        if sys.byteorder == "big":  # pragma: no cover
            out.byteswap()
    return out


def pack_entries(ids: Sequence[bytes], sizes: Sequence[int]) -> bytes:
    """The entries (``ids[i]``, ``sizes[i]``) as bytes.

    Raises:
        ValueError: ids and sizes differ in number, an id is not 32 bytes, or a size does
            not fit in 4 bytes.
    """
    if len(ids) != len(sizes):
        raise ValueError(f"{len(ids)} ids but {len(sizes)} sizes")
    joined = b"".join(ids)
    if len(joined) != ID_SIZE * len(ids):
        raise ValueError(f"chunk ids must be {ID_SIZE} bytes")
    try:
        return joined + _sizes_array(sizes).tobytes()
    except OverflowError:
        raise ValueError("a size does not fit in 4 bytes") from None


def unpack_entries(data: bytes, count: int) -> tuple[tuple[bytes, ...], tuple[int, ...]]:
    """(ids, sizes) of ``count`` entries packed by :func:`pack_entries`.

    Raises:
        ValueError: ``data`` is not ``count`` entries long.
    """
    if len(data) != count * ENTRY_SIZE:
        raise ValueError(f"{len(data)} bytes do not hold {count} entries")
    cut = count * ID_SIZE
    view = memoryview(data)
    ids = tuple(bytes(view[i : i + ID_SIZE]) for i in range(0, cut, ID_SIZE))
    return ids, tuple(_sizes_array(data[cut:]))
