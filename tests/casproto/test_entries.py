"""Recipe entries as bytes (RECIPE_DELTA, SPEC §4.1): ids, then sizes; exact round trip,
and shared runs of entries are shared bytes (what the zstd prefix finds). RECIPE_INLINE's
choice of entries and of its frame's prefix, which both ends must make alike."""

from __future__ import annotations

import pytest
from casproto import (
    ENTRY_SIZE,
    INLINE_ID,
    MAX_INLINE,
    _entries,
    inline_limit,
    inline_prefix,
    inlined_places,
    pack_entries,
    unpack_entries,
)
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


# --- RECIPE_INLINE: which entries are inlined, and the prefix both ends build ----------

IDS = [bytes([i]) * 32 for i in range(1, 13)]
# Twelve chunks with a size each (an id names its bytes, so one size), and recipes of them.
worlds = st.lists(st.integers(1, 300), min_size=len(IDS), max_size=len(IDS))
recipe_entries = st.lists(st.integers(0, len(IDS) - 1), max_size=30)


def _split(world: list[int], picks: list[int]) -> tuple[list[bytes], list[int]]:
    return [IDS[k] for k in picks], [world[k] for k in picks]


@given(worlds, recipe_entries, recipe_entries, st.integers(1, 300))
def test_inlined_entries_are_the_small_ones_the_base_lacks(
    world: list[int], new: list[int], base: list[int], limit: int
) -> None:
    ids, sizes = _split(world, new)
    base_ids, _ = _split(world, base)
    places = inlined_places(ids, sizes, base_ids, limit)
    assert places == sorted(places)
    for i, (cid, size) in enumerate(zip(ids, sizes, strict=True)):
        assert (i in places) == (size <= limit and cid not in base_ids)


@given(worlds, recipe_entries, recipe_entries, st.integers(1, 300), st.integers(0, 2000))
def test_both_ends_build_the_same_prefix_of_what_the_new_version_dropped(
    world: list[int], new: list[int], base: list[int], limit: int, budget: int
) -> None:
    ids, sizes = _split(world, new)
    base_ids, base_sizes = _split(world, base)
    places = set(inlined_places(ids, sizes, base_ids, limit))
    # The receiver knows the inlined entries only as zero ids.
    seen_by_receiver = [INLINE_ID if i in places else c for i, c in enumerate(ids)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_entries, "MAX_INLINE_BYTES", budget)
        prefix = inline_prefix(base_ids, base_sizes, ids, limit)
        assert inline_prefix(base_ids, base_sizes, seen_by_receiver, limit) == prefix
    size_of = dict(zip(IDS, world, strict=True))
    assert len(set(prefix)) == len(prefix)  # each chunk once
    assert all(size_of[c] <= limit and c not in ids for c in prefix)
    assert sum(size_of[c] for c in prefix) <= budget
    # In base's order, and cut only where the budget ran out.
    order = [c for c in dict.fromkeys(base_ids) if size_of[c] <= limit and c not in ids]
    assert prefix == order[: len(prefix)]
    if len(prefix) < len(order):
        assert sum(size_of[c] for c in prefix) + size_of[order[len(prefix)]] > budget


def test_no_chunk_over_64_kib_is_inlined_whatever_is_asked() -> None:
    assert inline_limit(1 << 30) == MAX_INLINE == 64 * 1024
    assert inline_limit(16384) == 16384
