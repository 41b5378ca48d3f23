"""Delta transfers (SPEC §4.3, issue #7): a chunk travels encoded against chunks the
receiver holds; a missing, wrong or corrupted base never breaks a transfer and never gets
an unverified byte stored; bases stay bounded whatever the size of the old version; and
the sender serves deltas only where the link time they save exceeds the CPU they cost."""

from __future__ import annotations

import functools
import hashlib
import os
import random
from typing import Any

import casproto
import pytest
import trio
import trio.testing

from casd.chunking import Chunker, format_digest
from casd.client import open_client_on_stream
from casd.deltachoice import Choosers, DeltaChooser, HostFigures
from casd.errors import ChunkCorrupt, ChunkMissing, PeerRefused
from casd.replicate import sync_into_store
from casd.storage.memory import MemoryStore
from casd.storage.testing import read_blob
from casd.tcpinfo import delivery, rtt
from tests.casd.server.test_service import client_for, serving


async def run(fn: Any, *args: Any) -> Any:
    return fn(*args)


def edited(data: bytes, at: list[int], seed: int = 1) -> bytes:
    rnd = random.Random(seed)
    out = bytearray(data)
    for pos in at:
        out[pos : pos + 100] = rnd.randbytes(100)
    return bytes(out)


async def push(store: MemoryStore, data: bytes, name: str) -> str:
    async with client_for(store) as c:
        result = await c.push(iter(list(Chunker().cut(data))), name=name)
    return result.digest


async def prepared(size: int = 3_000_000) -> tuple[MemoryStore, MemoryStore, bytes, bytes]:
    """A source holding v1 and v2 (three small edits) and a destination holding v1."""
    v1 = os.urandom(size)  # incompressible: only a delta avoids resending changed chunks
    v2 = edited(v1, [size // 5, size // 2, size * 4 // 5])
    src, dst = MemoryStore(), MemoryStore()
    await push(src, v1, "blob")
    async with client_for(src) as c:
        await sync_into_store(c, dst, run, [("blob", format_digest(hashlib.sha256(v1).digest()))])
    await push(src, v2, "blob")
    return src, dst, v1, v2


async def sync_v2(src: MemoryStore, dst: MemoryStore, v2: bytes) -> dict[str, Any]:
    digest = format_digest(hashlib.sha256(v2).digest())
    async with client_for(src) as c:
        report = await sync_into_store(c, dst, run, [("blob", digest)])
    assert read_blob(dst, digest) == v2
    return report.as_dict()


async def test_with_the_base_present_changed_chunks_travel_as_small_deltas() -> None:
    src, dst, _, v2 = await prepared()
    r = await sync_v2(src, dst, v2)
    assert r["chunks_fetched"] >= 3
    assert r["chunks_delta"] == r["chunks_fetched"]
    assert r["bytes_fetched"] < 20_000  # three 100-byte edits, not three ~80 KiB chunks
    assert r["delta_raw_bytes"] > 10 * r["delta_wire_bytes"]
    assert r["delta_decode_s"] > 0
    assert r["delta_fallbacks"] == 0


class FlakyBase(MemoryStore):
    """A destination store whose chunks of the old version fail to read (as a chunk the
    index lost, or one whose record fails its checksum, would)."""

    def __init__(self, fail: type[Exception] | None = None, lie: bool = False) -> None:
        super().__init__()
        self.fail = fail
        self.lie = lie
        self.old: set[bytes] = set()

    def get_chunk(self, chunk_id: bytes) -> bytes:
        data = super().get_chunk(chunk_id)
        if chunk_id in self.old:
            if self.fail is ChunkCorrupt:
                raise ChunkCorrupt(chunk_id, "checksum mismatch (test)")
            if self.fail is ChunkMissing:
                raise ChunkMissing(chunk_id)
            if self.lie:  # bitrot the checksum did not catch: different bytes
                return bytes(b ^ 0x01 for b in data)
        return data


@pytest.mark.parametrize(
    ("fail", "lie"),
    [(ChunkMissing, False), (ChunkCorrupt, False), (None, True)],
    ids=["base-absent", "base-corrupt", "base-wrong-bytes"],
)
async def test_a_bad_base_falls_back_to_the_plain_chunk_and_stores_nothing_wrong(
    fail: type[Exception] | None, lie: bool
) -> None:
    size = 3_000_000
    v1 = os.urandom(size)
    v2 = edited(v1, [size // 5, size // 2, size * 4 // 5])
    src, dst = MemoryStore(), FlakyBase(fail, lie)
    await push(src, v1, "blob")
    async with client_for(src) as c:
        await sync_into_store(c, dst, run, [("blob", format_digest(hashlib.sha256(v1).digest()))])
    await push(src, v2, "blob")
    # Every chunk of v1 that v2 does not reuse (so every base) now fails to read.
    dst.old = set(dst.get_recipe(dst.resolve("blob")).ids) - set(
        src.get_recipe(src.resolve("blob")).ids
    )

    r = await sync_v2(src, dst, v2)  # also checks every byte of v2 in dst
    assert r["chunks_fetched"] >= 3
    assert r["delta_fallbacks"] >= 3
    assert r["chunks_delta"] == 0  # what was stored came as plain, verified chunks
    dst.old = set()  # the injected fault ends: every chunk stored must verify
    assert dst.check(deep=True).clean


async def test_bases_stay_bounded_whatever_the_size_of_the_old_version() -> None:
    """The old version is 40 MB; a delta never needs more than MAX_BASES of its chunks
    (about 2 MiB) in memory, however much of it is asked to serve as a base."""
    src, dst, _, _ = await prepared(40_000_000)
    v2 = edited(read_blob(src, src.resolve("blob")), [i * 1_000_000 for i in range(1, 39)], 7)
    await push(src, v2, "blob")
    largest = 0
    real_get = dst.get_chunk
    in_base: list[int] = []

    def counting(chunk_id: bytes) -> bytes:
        data = real_get(chunk_id)
        in_base.append(len(data))
        return data

    dst.get_chunk = counting  # type: ignore[method-assign]
    digest = format_digest(hashlib.sha256(v2).digest())
    async with client_for(src) as c:
        real_fetch = c.fetch_chunks

        async def fetch(
            need: Any, sink: Any, *, bases: Any = None, read_base: Any = None, **kw: Any
        ) -> int:
            def bounded(ids: tuple[bytes, ...]) -> bytes:
                nonlocal largest
                assert len(ids) <= casproto.MAX_BASES
                data: bytes = read_base(ids)
                largest = max(largest, len(data))
                return data

            return await real_fetch(
                need, sink, bases=bases, read_base=bounded if read_base else None, **kw
            )

        c.fetch_chunks = fetch  # type: ignore[method-assign]
        report = await sync_into_store(c, dst, run, [("blob", digest)])
    assert read_blob(dst, digest) == v2
    assert report.chunks_delta > 0
    assert 0 < largest <= casproto.MAX_BASES * 256 * 1024
    assert largest < 40_000_000 // 10


# --- the choice ------------------------------------------------------------------------


MB = 1_000_000


def simulate(
    chooser: DeltaChooser,
    *,
    link_rate: float | None,
    saved_per_raw: float,
    cpu_per_raw: float,
    app_limited: bool = False,
    n: int = 40,
) -> list[bool]:
    """Batches of 1 MB: deltas save ``saved_per_raw`` of each raw byte on the wire for
    ``cpu_per_raw`` CPU seconds; the kernel reports ``link_rate`` (None: not TCP)."""
    kinds = []
    for _ in range(n):
        kind = chooser.choose()
        kinds.append(kind)
        if kind:
            chooser.record(True, MB, int(saved_per_raw * MB), cpu_per_raw * MB)
        else:
            chooser.record(False, MB)
        if link_rate is not None:
            chooser.observe_link(link_rate, app_limited)
    return kinds


def test_the_first_batch_goes_as_deltas_to_measure_what_they_save() -> None:
    assert DeltaChooser().choose() is True


def test_on_a_fast_link_where_encoding_costs_more_than_sending_deltas_stop() -> None:
    # 1 Gbit/s: a delta saves 0.3 B per raw byte, 2.4 ns of link; it costs 30 ns of CPU.
    kinds = simulate(DeltaChooser(), link_rate=125 * MB, saved_per_raw=0.3, cpu_per_raw=30e-9)
    assert kinds[0] is True
    assert kinds[1:].count(True) <= len(kinds[1:]) // 16 + 1  # only re-measuring


def test_on_a_slow_link_deltas_win() -> None:
    # 20 Mbit/s: the same delta saves 120 ns of link per raw byte for 30 ns of CPU.
    kinds = simulate(DeltaChooser(), link_rate=2.5 * MB, saved_per_raw=0.3, cpu_per_raw=30e-9)
    assert all(kinds)


def test_the_receivers_decode_is_counted_too() -> None:
    # Encoding alone (30 ns) is under the 36 ns of link a byte saves; with the receiver's
    # decode (half as much again) it is not.
    c = DeltaChooser()
    simulate(c, link_rate=0.3 / 36e-9, saved_per_raw=0.3, cpu_per_raw=30e-9, n=4)
    assert not c.pays()


def test_when_the_link_waits_for_the_sender_deltas_only_slow_it_down() -> None:
    # The kernel marks its samples application-limited: the link is not the bottleneck.
    kinds = simulate(
        DeltaChooser(), link_rate=2.5 * MB, saved_per_raw=0.9, cpu_per_raw=1e-9, app_limited=True
    )
    assert kinds[1:].count(True) <= len(kinds[1:]) // 16 + 1


def test_without_a_tcp_link_to_measure_deltas_are_served_as_asked() -> None:
    assert all(simulate(DeltaChooser(), link_rate=None, saved_per_raw=0.3, cpu_per_raw=1e-6))


def test_the_choice_follows_a_change_of_conditions() -> None:
    chooser = DeltaChooser()
    assert all(simulate(chooser, link_rate=2.5 * MB, saved_per_raw=0.3, cpu_per_raw=30e-9))
    later = simulate(chooser, link_rate=125 * MB, saved_per_raw=0.3, cpu_per_raw=30e-9, n=60)
    assert later[-32:].count(False) >= 30
    again = simulate(chooser, link_rate=2.5 * MB, saved_per_raw=0.3, cpu_per_raw=30e-9, n=60)
    assert all(again[-20:])


def test_what_a_host_measured_of_its_link_outlives_its_connection() -> None:
    choosers = Choosers(limit=2)
    first = choosers.for_host("198.18.0.2")
    simulate(first, link_rate=125 * MB, saved_per_raw=0.3, cpu_per_raw=30e-9, n=3)
    again = choosers.for_host("198.18.0.2")
    assert again.saved_per_raw is None  # what deltas save depends on the data: measured anew
    # At 1 Gbit/s a delta could not pay even if it saved every byte: no measuring batch.
    assert again.choose() is False
    assert choosers.for_host("198.18.0.3").choose() is True  # a host not seen before
    choosers.for_host("198.18.0.4")  # a third host: the least recently seen is dropped
    assert choosers.for_host("198.18.0.2").choose() is True


def test_a_sync_whose_deltas_saved_little_does_not_turn_them_off_for_the_next() -> None:
    choosers = Choosers()
    # 20 Mbit/s: an image step whose changed chunks have nothing in common with the old.
    little = choosers.for_host("198.18.0.2")
    simulate(little, link_rate=2.5 * MB, saved_per_raw=0.001, cpu_per_raw=30e-9, n=4)
    assert not little.pays()
    # The next sync from that host moves other data: it measures what deltas save there.
    following = choosers.for_host("198.18.0.2")
    kinds = simulate(following, link_rate=2.5 * MB, saved_per_raw=0.3, cpu_per_raw=30e-9)
    assert all(kinds)


def test_a_batch_weighs_by_its_size() -> None:
    # 20 Mbit/s, batches of 1 MB that pay; then a batch of one 512-byte chunk whose bases
    # had to be read: 0.2 ms, 400 ns per byte. It must not turn deltas off, here or for
    # the host's next connection.
    choosers = Choosers()
    chooser = choosers.for_host("198.18.0.2")
    simulate(chooser, link_rate=2.5 * MB, saved_per_raw=0.3, cpu_per_raw=30e-9, n=8)
    chooser.record(True, 512, 0, 0.2e-3)
    assert chooser.pays()
    assert choosers.for_host("198.18.0.2").choose() is True


async def test_a_sync_from_a_host_found_not_to_pay_skips_the_measuring_batch() -> None:
    """A new connection starts from what earlier ones from the same host measured: where
    deltas were found not to pay, its first batch goes plain instead of being encoded
    to measure again (one batch in ``explore_every`` still is)."""
    size = 6_000_000
    v1 = os.urandom(size)
    v2 = edited(v1, list(range(40_000, size, 90_000)))  # about 65 chunks change
    src, dst = MemoryStore(), MemoryStore()
    await push(src, v1, "blob")
    async with client_for(src) as c:
        await sync_into_store(c, dst, run, [("blob", format_digest(hashlib.sha256(v1).digest()))])
    await push(src, v2, "blob")
    digest = format_digest(hashlib.sha256(v2).digest())
    async with serving(src) as (ctx, stream, _):
        # What earlier connections from this host measured: a 1 Gbit/s link, on which a
        # delta's CPU costs more than the link time it saves.
        chooser = ctx.choosers.for_host("?")
        simulate(chooser, link_rate=125 * MB, saved_per_raw=0.3, cpu_per_raw=30e-9, n=4)
        async with open_client_on_stream(stream, "mem") as c:  # type: ignore[arg-type]
            report = (await sync_into_store(c, dst, run, [("blob", digest)])).as_dict()
    assert read_blob(dst, digest) == v2
    assert report["chunks_fetched"] > 10
    assert report["chunks_delta"] == 0
    assert ctx.stats.delta_batches == 0
    assert ctx.stats.plain_batches > 0


async def test_the_kernel_reports_a_delivery_rate_for_a_tcp_stream() -> None:
    async def drain(stream: trio.SocketStream) -> None:
        while await stream.receive_some(1 << 20):
            pass

    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, drain, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        port = listeners[0].socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        for _ in range(20):
            await stream.send_all(b"x" * (1 << 20))
        got = delivery(stream)
        round_trip = rtt(stream)
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert got is not None
    assert got.rate > 0
    assert delivery(trio.testing.memory_stream_pair()[0]) is None
    # The smoothed round trip, which paces when a layer stream asks for the next one.
    assert round_trip is not None
    assert 0 < round_trip < 0.5
    assert rtt(trio.testing.memory_stream_pair()[0]) is None


async def test_the_kernel_says_when_the_receiver_holds_the_sender_back() -> None:
    # A receiver that reads slowly: the sender spends most of its busy time waiting for
    # its window, which tcpi_rwnd_limited counts (and the choice reads as "not the link").
    async def slow(stream: trio.SocketStream) -> None:
        while True:
            await trio.sleep(0.01)  # 64 KiB per 10 ms at most
            if not await stream.receive_some(64 * 1024):
                return

    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, slow, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        port = listeners[0].socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        chooser = DeltaChooser()
        before = delivery(stream)
        assert before is not None
        chooser.observe_link(before.rate, False, before.busy_us, before.rwnd_limited_us)
        with trio.move_on_after(1.5):
            while True:
                await stream.send_all(b"x" * (1 << 20))
        after = delivery(stream)
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert after is not None
    assert after.busy_us is not None
    assert after.rwnd_limited_us is not None
    assert 0 < after.rwnd_limited_us <= after.busy_us
    chooser.observe_link(after.rate, False, after.busy_us, after.rwnd_limited_us)
    assert chooser.receiver_limited
    chooser.record(True, MB, int(0.9 * MB), 1e-9 * MB)  # deltas that would pay on a link
    assert not chooser.pays()


def test_a_receiver_that_keeps_up_again_lets_the_link_decide() -> None:
    c = DeltaChooser()
    c.record(True, MB, int(0.3 * MB), 30e-9 * MB)
    c.observe_link(2.5 * MB, False, 0, 0)
    c.observe_link(2.5 * MB, False, 1_000_000, 900_000)  # 90 % waiting for the window
    assert c.receiver_limited
    assert not c.pays()
    for k in range(2, 12):  # then a receiver that keeps up
        c.observe_link(2.5 * MB, False, k * 1_000_000, 900_000)
    assert not c.receiver_limited
    assert c.pays()


# --- pushes (CHUNK_DELTA, SPEC §5.1) ---------------------------------------------------


async def test_a_push_with_a_base_sends_changed_chunks_as_deltas(tmp_path: Any) -> None:
    size = 3_000_000
    v1 = os.urandom(size)
    v2 = edited(v1, [size // 5, size // 2, size * 4 // 5])
    store = MemoryStore()
    await push(store, v1, "blob")
    old = tmp_path / "v1"
    old.write_bytes(v1)
    async with client_for(store) as c:
        c.chunker_params = Chunker().params
        r = await c.push(iter(list(Chunker().cut(v2))), name="blob", base=str(old))
    assert read_blob(store, r.digest) == v2
    assert r.chunks_transferred >= 3
    assert r.chunks_delta == r.chunks_transferred
    assert r.bytes_transferred < 20_000


async def test_a_push_whose_base_is_bad_on_the_server_fails_cleanly_and_plain_works(
    tmp_path: Any,
) -> None:
    size = 3_000_000
    v1 = os.urandom(size)
    v2 = edited(v1, [size // 2])
    store = FlakyBase(ChunkCorrupt)
    await push(store, v1, "blob")
    store.old = set(store.get_recipe(store.resolve("blob")).ids)  # every base now fails
    old = tmp_path / "v1"
    old.write_bytes(v1)
    async with client_for(store) as c:
        c.chunker_params = Chunker().params
        with pytest.raises(PeerRefused, match="delta base") as info:
            await c.push(iter(list(Chunker().cut(v2))), name="blob", base=str(old))
        assert info.value.code_name == "INVALID"
        store.old = set()
        assert store.resolve("blob") == format_digest(hashlib.sha256(v1).digest())
        r = await c.push(iter(list(Chunker().cut(v2))), name="blob")
    assert read_blob(store, r.digest) == v2
    assert store.check(deep=True).clean


@pytest.mark.parametrize("prefix_size", [64 * 1024, 330_000, 1_300_000])
def test_a_delta_finds_its_base_in_incompressible_data_whatever_the_prefix_size(
    prefix_size: int,
) -> None:
    """zstd's default tables at low levels miss matches in a large prefix of random bytes
    (compressed files inside a tar); casd sizes them to the prefix."""
    from casd import zstd

    old = os.urandom(prefix_size)
    at = prefix_size // 3
    chunk = bytearray(old[at : at + 60_000])
    chunk[30_000:30_100] = os.urandom(100)
    delta = zstd.compress_with_prefix(bytes(chunk), old, 1)
    assert len(delta) < 1_000
    assert zstd.decompress_bounded(delta, len(chunk), prefix=old) == chunk


def test_batches_chosen_before_the_first_went_out_go_by_what_it_measured() -> None:
    # A server reads the next batches while the first is sent: they are chosen before
    # the connection has a delivery-rate sample. With its host's link known (1 Gbit/s,
    # from an earlier sync), the first batch's figures already say no, and re-measuring
    # is pointless too; a host whose link is not known keeps encoding until its
    # connection has a sample.
    fast = DeltaChooser(host=HostFigures(link_rate=125 * MB))
    assert fast.choose() is True  # what a delta costs is not known yet: measure once
    fast.record(True, MB, int(0.3 * MB), 30e-9 * MB)
    assert [fast.choose() for _ in range(40)] == [False] * 40
    unknown = DeltaChooser()
    assert unknown.choose() is True
    unknown.record(True, MB, int(0.3 * MB), 30e-9 * MB)
    assert unknown.choose() is True
