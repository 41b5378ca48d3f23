"""Bitmaps of HAVE and PUSH_WANT (SPEC §4)."""

from __future__ import annotations

import pytest
from casproto import ErrorCode, LocalProtocolError, pack_bitmap, unpack_bitmap
from hypothesis import given
from hypothesis import strategies as st


def test_bit_i_lives_in_byte_i_div_8_lowest_bit_first() -> None:
    bits = [True] + [False] * 8 + [True]  # entries 0 and 9
    assert pack_bitmap(bits) == b"\x01\x02"
    assert unpack_bitmap(b"\x01\x02", 10) == bits


def test_an_empty_batch_has_an_empty_bitmap() -> None:
    assert pack_bitmap([]) == b""
    assert unpack_bitmap(b"", 0) == []


@given(st.lists(st.booleans(), max_size=300))
def test_bitmaps_round_trip(bits: list[bool]) -> None:
    bitmap = pack_bitmap(bits)
    assert len(bitmap) == (len(bits) + 7) // 8
    assert unpack_bitmap(bitmap, len(bits)) == bits


@pytest.mark.parametrize(
    ("bitmap", "n"),
    [(b"", 1), (b"\x00", 0), (b"\x00", 9), (b"\x00\x00", 8), (b"\x02", 1), (b"\x80", 7)],
)
def test_wrong_length_or_stray_bits_are_malformed(bitmap: bytes, n: int) -> None:
    with pytest.raises(LocalProtocolError) as info:
        unpack_bitmap(bitmap, n)
    assert info.value.code is ErrorCode.MALFORMED


def test_full_last_byte_is_fine() -> None:
    assert unpack_bitmap(b"\xff", 8) == [True] * 8


def test_negative_count_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        unpack_bitmap(b"", -1)
