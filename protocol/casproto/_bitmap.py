"""Bitmaps of HAVE and PUSH_WANT: bit i is `(bitmap[i // 8] >> (i % 8)) & 1` (SPEC §4)."""

from __future__ import annotations

from collections.abc import Iterable

from ._errors import ErrorCode, LocalProtocolError

# The eight bits of every byte value, lowest first: unpacking then costs one list extend
# per byte instead of a shift per bit.
_BITS_OF_BYTE: tuple[tuple[bool, ...], ...] = tuple(
    tuple(bool(value >> bit & 1) for bit in range(8)) for value in range(256)
)


def pack_bitmap(bits: Iterable[bool]) -> bytes:
    """Pack flags into a bitmap of exactly `ceil(len(bits) / 8)` bytes.

    Args:
        bits: One flag per entry; entry i becomes bit i. Truthiness counts.

    Returns:
        The bitmap, unused high bits of the last byte zero.
    """
    flags = list(bits)
    out = bytearray((len(flags) + 7) // 8)
    for index, flag in enumerate(flags):
        if flag:
            out[index >> 3] |= 1 << (index & 7)
    return bytes(out)


def unpack_bitmap(bitmap: bytes, n: int) -> list[bool]:
    """Unpack a bitmap that answers a batch of `n` entries.

    Args:
        bitmap: The bitmap from a HAVE or PUSH_WANT.
        n: How many entries the batch it answers had.

    Returns:
        `n` flags; flag i is bit i.

    Raises:
        LocalProtocolError: MALFORMED if the bitmap is not `ceil(n / 8)` bytes long or has
            a bit set beyond entry `n - 1`.
        ValueError: if `n` is negative.
    """
    if n < 0:
        raise ValueError(f"entry count must be >= 0, not {n}")
    check_bitmap(bitmap, n)
    flags: list[bool] = []
    for value in bitmap:
        flags.extend(_BITS_OF_BYTE[value])
    del flags[n:]
    return flags


def check_bitmap(bitmap: bytes, n: int) -> None:
    """Raise LocalProtocolError(MALFORMED) unless `bitmap` is a valid bitmap of `n` bits."""
    if len(bitmap) != (n + 7) // 8:
        raise LocalProtocolError(
            f"bitmap for {n} entries must have {(n + 7) // 8} bytes, not {len(bitmap)}",
            ErrorCode.MALFORMED,
        )
    if n % 8 and bitmap[-1] >> (n % 8):
        raise LocalProtocolError(
            f"bitmap for {n} entries has bits set beyond the last entry", ErrorCode.MALFORMED
        )
