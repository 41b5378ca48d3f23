"""A recipe's entries as one byte string, what RECIPE_DELTA encodes (SPEC §4.1).

The ids come first, 32 bytes each, then the sizes, 4-byte little-endian each. Runs of
entries two versions of a blob share are then the same bytes in both: zstd, given the old
version's entries as prefix, sends them as matches, and only new ids cost their bytes.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Sequence
from typing import Final

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


#: RECIPE_INLINE carries chunks of at most this many bytes inline, whatever PULL_INLINE
#: asks (SPEC §4.1). Beyond it an id (36 bytes with its size) is under 0.06 % of the
#: chunk, and the chunk may be one the receiver holds from another blob.
MAX_INLINE: Final = 64 * 1024
#: The most bytes one RECIPE_INLINE carries inline, and the most its frame's prefix holds:
#: a receiver holds both in memory while it decodes.
MAX_INLINE_BYTES: Final = 64 * 1024 * 1024
#: The id an inlined entry has in RECIPE_INLINE's entries: no BLAKE3 output is all zeros
#: as far as anyone will ever find.
INLINE_ID: Final = bytes(ID_SIZE)


def inline_limit(asked: int) -> int:
    """The largest chunk a PULL_INLINE asking for ``asked`` gets inline."""
    return min(asked, MAX_INLINE)


def inlined_places(
    ids: Sequence[bytes], sizes: Sequence[int], base_ids: Iterable[bytes], limit: int
) -> list[int]:
    """Places of the entries a RECIPE_INLINE carries inline (SPEC §4.1): every entry whose
    chunk is at most ``limit`` bytes and is not one of base's. Repeats are inlined again
    (zstd makes a repeat a match of a few bytes)."""
    base = set(base_ids)
    return [
        i for i, (c, s) in enumerate(zip(ids, sizes, strict=True)) if s <= limit and c not in base
    ]


def inline_prefix(
    base_ids: Sequence[bytes], base_sizes: Sequence[int], ids: Iterable[bytes], limit: int
) -> list[bytes]:
    """The chunks of base, in order, whose bytes concatenated are the prefix of
    RECIPE_INLINE's frame (SPEC §4.1): the first entry of each distinct id of at most
    ``limit`` bytes that the new recipe (``ids``, inlined entries included or not) lacks,
    i.e. what the new version replaced; taken in base's order until the next would bring
    the total over MAX_INLINE_BYTES.

    The new recipe's inlined entries are not base's, so the two ends, one of which knows
    their ids and one of which does not, choose the same chunks."""
    kept = set(ids)
    seen: set[bytes] = set()
    out: list[bytes] = []
    total = 0
    for c, s in zip(base_ids, base_sizes, strict=True):
        if s > limit or c in kept or c in seen:
            continue
        if total + s > MAX_INLINE_BYTES:
            break
        seen.add(c)
        out.append(c)
        total += s
    return out
