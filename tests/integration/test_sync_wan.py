"""casctl sync between two hosts joined by an emulated WAN link (network namespaces,
tbf rate limit, NFQUEUE delay). Correctness over a real link; speed is measured in
bench/sync.py, not asserted here."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import Daemon, casctl, ok, real_data
from tests.wanlink import WanLink, available

TOKEN = "wan-test-token"
pytestmark = pytest.mark.skipif(available() is not None, reason=f"no WAN emulation: {available()}")


@pytest.fixture(scope="module")
def link() -> Iterator[WanLink]:
    with WanLink(rate_mbit=100, rtt_ms=50, prefix="casdtest", subnet_index=7) as wan:
        yield wan


def start(host: object, tmp: Path, name: str) -> Daemon:
    d = Daemon(
        tmp / f"{name}-data",
        tmp / f"{name}.log",
        ["--token", TOKEN],
        listen=f"{host.addr}:7420",  # type: ignore[attr-defined]
        prefix=host.exec_prefix(),  # type: ignore[attr-defined]
    )
    return d.start()


def test_sync_over_a_wan_link(link: WanLink, tmp_path: Path) -> None:
    a, b = start(link.a, tmp_path, "a"), start(link.b, tmp_path, "b")
    try:
        v1 = real_data(12_000_000)
        ok(casctl(a, "put", "-", "--name", "app", "--token", TOKEN, input=v1))
        before = link.b.counters()
        cold = ok(casctl(b, "sync", a.address, b.address, "app", "--token", TOKEN, "--json")).json
        after = link.b.counters()
        assert ok(casctl(b, "get", "app", "--token", TOKEN)).out == v1
        on_wire = (after["rx_bytes"] - before["rx_bytes"]) + (
            after["tx_bytes"] - before["tx_bytes"]
        )
        # The report counts protocol bytes; the interface adds TCP/IP headers (~3-5 %).
        assert cold["wire_bytes"] <= on_wire <= 1.10 * cold["wire_bytes"] + 50_000

        v2 = v1[:4_000_000] + b"changed" + v1[4_000_000:]
        ok(casctl(a, "put", "-", "--name", "app", "--token", TOKEN, input=v2))
        warm = ok(casctl(b, "sync", a.address, b.address, "app", "--token", TOKEN, "--json")).json
        assert warm["chunks_fetched"] <= 2
        assert warm["wire_bytes"] < 0.03 * len(v2)
        assert ok(casctl(b, "get", "app", "--token", TOKEN)).out == v2

        noop = ok(casctl(b, "sync", a.address, b.address, "--all", "--token", TOKEN, "--json")).json
        assert noop["chunks_fetched"] == 0
        assert noop["blobs_unchanged"] == 1
    finally:
        a.kill()
        b.kill()


def test_a_blob_changed_throughout_comes_as_frames_against_its_old_version(
    link: WanLink, tmp_path: Path
) -> None:
    # v2 is v1 with neighbouring 2 MB sections swapped and a few bytes changed every
    # 30 KB: chunk dedup reuses nothing, and the old chunks at each chunk's own place
    # (what per-chunk deltas are encoded against) hold other bytes. The first chunks
    # measure the 100 Mbit/s link; the rest come as zstd frames against the stretch of v1
    # around their place (casd.chunkdelta), each chunk checked on arrival.
    a, b = start(link.a, tmp_path, "a3"), start(link.b, tmp_path, "b3")
    try:
        rnd = random.Random(3)
        v1 = rnd.randbytes(40_000_000)
        section = 2_000_000
        v2 = bytearray()
        for at in range(0, len(v1), 2 * section):
            v2 += v1[at + section : at + 2 * section] + v1[at : at + section]
        for pos in range(1000, len(v2), 30_000):
            v2[pos : pos + 8] = rnd.randbytes(8)
        ok(casctl(a, "put", "-", "--name", "model", "--token", TOKEN, input=v1))
        ok(casctl(b, "sync", a.address, b.address, "model", "--token", TOKEN))
        ok(casctl(a, "put", "-", "--name", "model", "--token", TOKEN, input=bytes(v2)))
        before = link.b.counters()
        r = ok(casctl(b, "sync", a.address, b.address, "model", "--token", TOKEN, "--json"))
        after = link.b.counters()
        report = r.json
        assert report["chunk_delta_frames"] == 1, report["delta_choice"]
        assert report["chunk_delta_fallbacks"] == 0
        assert "frames against" in report["delta_choice"]
        # The first ~2 MB came plain; the other 38 MB as a small fraction of themselves.
        on_wire = sum(after[k] - before[k] for k in ("rx_bytes", "tx_bytes"))
        assert on_wire < 0.2 * len(v2)
        assert ok(casctl(b, "get", "model", "--token", TOKEN)).out == bytes(v2)

    finally:
        a.kill()
        b.kill()


def test_wrong_token_across_hosts_is_refused(link: WanLink, tmp_path: Path) -> None:
    a, b = start(link.a, tmp_path, "a2"), start(link.b, tmp_path, "b2")
    try:
        r = casctl(b, "sync", a.address, b.address, "--all", "--dst-token", TOKEN)
        assert r.code == 1
        assert "UNAUTHORIZED" in r.err
        assert a.address in r.err
    finally:
        a.kill()
        b.kill()
