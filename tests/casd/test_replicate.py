"""Choosing delta bases: which chunks of the old version a missing chunk resembles."""

from __future__ import annotations

import hashlib

from casd.replicate import choose_bases
from casd.storage.interface import Recipe


def ids(*names: str) -> tuple[bytes, ...]:
    return tuple(hashlib.sha256(n.encode()).digest() for n in names)


def recipe(names: str, size: int = 4096) -> Recipe:
    chunk_ids = ids(*names.split())
    return Recipe("sha256:" + "0" * 64, size * len(chunk_ids), chunk_ids, (size,) * len(chunk_ids))


def need(r: Recipe, names: str) -> list[tuple[bytes, int]]:
    wanted = set(ids(*names.split()))
    return [(c, s) for c, s in zip(r.ids, r.sizes, strict=True) if c in wanted]


def test_a_changed_chunk_gets_the_old_chunk_between_the_same_anchors() -> None:
    old, new = recipe("a b c d"), recipe("a X c d")
    assert choose_bases(new, need(new, "X"), old) == {ids("X")[0]: ids("b")}


def test_a_run_of_changes_gets_every_old_chunk_of_the_run() -> None:
    old, new = recipe("a b1 b2 c"), recipe("a X Y Z c")
    bases = choose_bases(new, need(new, "X Y Z"), old)
    assert set(bases) == set(ids("X", "Y", "Z"))
    assert all(v == ids("b1", "b2") for v in bases.values())


def test_changes_at_the_ends_align_to_the_old_ends() -> None:
    old, new = recipe("p a b q"), recipe("X a b Y")
    bases = choose_bases(new, need(new, "X Y"), old)
    assert bases == {ids("X")[0]: ids("p"), ids("Y")[0]: ids("q")}


def test_long_runs_map_by_position_within_the_bound() -> None:
    old_names = " ".join(f"o{i}" for i in range(40))
    new_names = " ".join(f"n{i}" for i in range(40))
    old, new = recipe(f"a {old_names} z"), recipe(f"a {new_names} z")
    bases = choose_bases(new, need(new, new_names), old, max_bases=4)
    assert all(len(v) <= 4 for v in bases.values())
    # The 20th new chunk of the run is encoded against old chunks around the 20th.
    near = {ids(f"o{i}")[0] for i in range(17, 24)}
    assert set(bases[ids("n20")[0]]) <= near


def test_no_old_chunk_in_between_means_no_base() -> None:
    old, new = recipe("a b"), recipe("a X b")
    assert choose_bases(new, need(new, "X"), old) == {}


def test_chunks_too_small_to_pay_get_no_base() -> None:
    old, new = recipe("a b c", size=512), recipe("a X c", size=512)
    assert choose_bases(new, need(new, "X"), old) == {}


def test_bases_stay_within_a_budget_of_the_chunks_size() -> None:
    """A 4 KiB chunk is not encoded against eight 256 KiB chunks: zstd would index 2 MiB
    of prefix to save a few hundred bytes."""
    big = " ".join(f"o{i}" for i in range(10))
    old = recipe(f"a {big} z", size=256 * 1024)
    new = Recipe(
        "sha256:" + "0" * 64,
        2 * 256 * 1024 + 4096,
        ids("a", "X", "z"),
        (256 * 1024, 4096, 256 * 1024),
    )
    (bases,) = choose_bases(new, [(ids("X")[0], 4096)], old).values()
    assert len(bases) == 1
