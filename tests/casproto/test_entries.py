"""Recipe entries as bytes (RECIPE_DELTA, SPEC §4.1): ids, then sizes; exact round trip,
and shared runs of entries are shared bytes (what the zstd prefix finds)."""

from __future__ import annotations

import pytest
from casproto import ENTRY_SIZE, pack_entries, unpack_entries
from hypothesis import given
from hypothesis import strategies as st

entries = st.lists(st.tuples(st.binary(min_size=32, max_size=32), st.integers(0, 2**32 - 1)))


@given(entries)
def test_entries_round_trip(pairs: list[tuple[bytes, int]]) -> None:
    ids, sizes = tuple(i for i, _ in pairs), tuple(s for _, s in pairs)
    data = pack_entries(ids, sizes)
    assert len(data) == ENTRY_SIZE * len(pairs)
    assert unpack_entries(data, len(pairs)) == (ids, sizes)


def test_shared_entries_are_shared_bytes() -> None:
    old = [bytes([i]) * 32 for i in range(100)]
    new = [*old[:40], b"\xff" * 32, *old[40:]]
    a, b = pack_entries(old, [1000] * 100), pack_entries(new, [1000] * 101)
    assert a[: 40 * 32] in b
    assert a[40 * 32 : 100 * 32] in b


@pytest.mark.parametrize(
    ("ids", "sizes", "match"),
    [
        ([b"x" * 32], [1, 2], "1 ids but 2 sizes"),
        ([b"short"], [1], "32 bytes"),
        ([b"x" * 32], [2**32], "4 bytes"),
        ([b"x" * 32], [-1], "4 bytes"),
    ],
)
def test_bad_entries_are_refused(ids: list[bytes], sizes: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pack_entries(ids, sizes)


def test_data_of_another_length_is_refused() -> None:
    data = pack_entries([b"x" * 32], [5])
    with pytest.raises(ValueError, match="do not hold 2 entries"):
        unpack_entries(data, 2)
    with pytest.raises(ValueError, match="do not hold 1 entries"):
        unpack_entries(data + b"!", 1)
