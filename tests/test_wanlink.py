"""The emulated WAN link does what it claims: RTT, rate, byte counters, and cleanup.

Skips (visibly, with the reason) where a link cannot be built: not root, no iproute2 or
iptables, a kernel without network namespaces or NFQUEUE. About 10 s when it runs.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import wanlink
from tests.wanlink import WanLink, measure_goodput, measure_rtt

PREFIX = "casdtest"  # not the default: these tests must not touch a benchmark's namespaces


@pytest.fixture(scope="module")
def usable() -> None:
    if (why := wanlink.available()) is not None:
        pytest.skip(f"emulated WAN link unavailable: {why}")


@pytest.fixture(scope="module")
def link(usable: None) -> Iterator[WanLink]:
    with WanLink(rate_mbit=100, rtt_ms=50, prefix=PREFIX, subnet_index=7, lifetime_s=120) as lk:
        yield lk


def _ours() -> list[str]:
    return [n for n in wanlink._list_netns() if n.startswith(f"{PREFIX}-")]


def _running(pid: int, marker: str) -> bool:
    """Whether `pid` is alive and still the command we started (PIDs get reused)."""
    try:
        return marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_addresses_are_in_the_benchmark_range(link: WanLink) -> None:
    assert link.a.addr == "198.18.7.1"
    assert link.b.addr == "198.18.7.2"
    assert link.a.name != link.b.name
    assert {link.a.name, link.b.name} <= set(_ours())


def test_rtt_matches_target(link: WanLink) -> None:
    samples = measure_rtt(link.a, link.b, count=15, timeout=10)
    assert len(samples) >= 13, f"lost ping-pongs: {len(samples)}/15"
    median_ms = statistics.median(samples) * 1000
    assert 0.9 * 50 <= median_ms <= 1.5 * 50, sorted(samples)
    # No packet may skip the delay: not one round trip under the target.
    assert min(samples) * 1000 >= 50 * 0.98, sorted(samples)


def test_bulk_tcp_goodput_and_counters(link: WanLink) -> None:
    nbytes = 20_000_000
    a0, b0 = link.a.counters(), link.b.counters()
    g = measure_goodput(link.a, link.b, nbytes, timeout=30)
    a1, b1 = link.a.counters(), link.b.counters()
    assert g["bytes"] == nbytes
    # Past slow start, within [0.75, 1.05] of the 100 Mbit tbf rate (tbf counts headers).
    assert 75 <= g["steady_mbit"] <= 105, g
    # The wire carried at least the payload each way it was counted.
    assert a1["tx_bytes"] - a0["tx_bytes"] >= nbytes
    assert b1["rx_bytes"] - b0["rx_bytes"] >= nbytes
    assert b1["tx_bytes"] > b0["tx_bytes"]  # ACKs went back
    link.check()  # both delay processes still alive


def test_exit_removes_namespaces_and_processes(usable: None) -> None:
    with WanLink(rate_mbit=1000, rtt_ms=10, prefix=PREFIX, subnet_index=8, lifetime_s=60) as lk:
        names = {lk.a.name, lk.b.name}
        assert names <= set(_ours())
        samples = measure_rtt(lk.a, lk.b, count=3, timeout=5)
        # A process of the caller's, left running on purpose: __exit__ must stop it.
        sleeper = lk.b.popen("sleep", "60")
        pids = lk.pids
        assert sleeper.pid in pids
    assert len(samples) == 3
    assert not names & set(_ours())
    assert sleeper.returncode is not None
    for pid in pids:
        assert not _running(pid, "tests.wandelay")
        assert not _running(pid, "sleep")
    # Each delay process saw the pings and let every packet through delayed.
    assert set(lk.delay_stats) == names
    for st in lk.delay_stats.values():
        assert st["packets"] >= 3
        assert st["bypassed"] == 0


def test_failure_half_way_through_setup_cleans_up(
    usable: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tc rejects this, after the namespaces and the veth pair exist.
    monkeypatch.setattr(WanLink, "_tbf_args", lambda self: ["tbf", "rate", "nonsense"])
    link = WanLink(rate_mbit=10, rtt_ms=10, prefix=PREFIX, subnet_index=9)
    with pytest.raises(RuntimeError, match="tc"), link:
        pass
    assert not {link.a.name, link.b.name} & set(_ours())


def _kill_a_delay_process(link: WanLink) -> None:
    with link:
        os.kill(link.pids[0], signal.SIGKILL)  # the only processes are the two delayers
        for _ in range(200):  # bounded: the kill lands within milliseconds
            if link._dead_delayers():
                break
            time.sleep(0.01)
        with pytest.raises(RuntimeError, match="died"):
            link.check()


def test_dead_delay_process_is_reported(usable: None) -> None:
    link = WanLink(rate_mbit=None, rtt_ms=10, prefix=PREFIX, subnet_index=10, lifetime_s=60)
    # __exit__ raises too: whatever ran over the link ran partly undelayed.
    with pytest.raises(RuntimeError, match="died during the run"):
        _kill_a_delay_process(link)
    assert not {link.a.name, link.b.name} & set(_ours())


def test_cleanup_stale_removes_only_dead_owners(usable: None) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = f"{PREFIX}-{gone.pid}-0-a"
    live = f"{PREFIX}-{os.getpid()}-99999-a"  # owner alive: a parallel run's, keep it
    try:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
        removed = wanlink.cleanup_stale(PREFIX)
        assert stale in removed
        assert live not in removed
        assert live in _ours()
        assert stale not in _ours()
    finally:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
