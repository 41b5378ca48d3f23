"""An emulated WAN link between two network namespaces, for tests and benchmarks.

    from tests.wanlink import WanLink, available
    if (why := available()) is not None:
        pytest.skip(why)
    with WanLink(rate_mbit=100, rtt_ms=50) as link:
        server = link.b.popen("casd", "serve", "--listen", f"{link.b.addr}:7000", ...)
        link.a.run("casctl", "--server", f"{link.b.addr}:7000", ...)
        print(link.b.counters())          # bytes on the wire, read inside the namespace

Each ``Host`` is a network namespace holding one end of a veth pair (``wan0``), addressed
198.18.<subnet>.1 (``a``) and .2 (``b``), in 198.18.0.0/15, the range set aside for benchmarks;
nothing here sends traffic anywhere else. IPv6 is off in the namespaces so that only the
test's own traffic crosses the link.

* Rate: ``tc tbf`` on the egress of both veth ends (this kernel has no ``netem``).
* Delay: in each namespace an iptables rule (``-t raw PREROUTING -i wan0 -j NFQUEUE``) hands
  every incoming packet to ``tests.wandelay``, which accepts it RTT/2 later. Both directions
  are delayed, so a round trip costs ``rtt_ms``. The delay process runs at a real-time
  priority, so the hosts' own CPU load does not slow the link (a real one has its own).

Needs root, ``ip``/``tc`` (Debian: iproute2) and ``iptables`` (Debian: iptables). Everything
started here is stopped by PID and the namespaces are deleted on ``__exit__``, also after a
failure half-way through setup; namespaces left by a run that was killed are removed by
``cleanup_stale()``, which every ``WanLink.__enter__`` calls.

``python -m tests.wanlink --rate 100 --rtt 50`` builds a link and prints its measured RTT and
goodput (the self-check a benchmark should quote next to its results).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
IFACE = "wan0"
#: SCHED_FIFO priority of the delay processes.
DELAYER_PRIORITY = 20
_counter = itertools.count()
_NS_RE = re.compile(r"^(?P<prefix>.+)-(?P<pid>\d+)-(?P<n>\d+)-[ab]$")


def _ip_cmd() -> list[str]:
    return [shutil.which("ip") or "ip"]


def _check(cmd: list[str], timeout: float = 30.0, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a setup command; raise with its stderr (CalledProcessError's message has none)."""
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if cp.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({cp.returncode}): {cp.stderr.strip()}")
    return cp


def _list_netns() -> list[str]:
    out = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; always reaps (this PID only)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(10)


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The next stdout line of `proc`, waiting at most `timeout` s ('' on EOF or time-out)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                break
            chunk = os.read(fd, 1)  # one byte at a time: nothing past the line is consumed
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace").strip()


def cleanup_stale(prefix: str = "casd") -> list[str]:
    """Delete namespaces named ``{prefix}-{pid}-{n}-a|b`` whose creating process is gone.

    Kills what still runs in them first (only processes a crashed harness left behind can be
    there). Namespaces of live processes (a parallel run) are left alone. Returns the names.
    """
    removed: list[str] = []
    for name in _list_netns():
        m = _NS_RE.match(name)
        if not m or m["prefix"] != prefix or _pid_alive(int(m["pid"])):
            continue
        pids = subprocess.run(
            ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30, check=False
        ).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30, check=False)
        removed.append(name)
    return removed


@functools.cache
def _iptables() -> str | None:
    """The first iptables flavour that exists (the probe in `available` checks it works)."""
    for name in ("iptables", "iptables-legacy", "iptables-nft"):
        if path := shutil.which(name):
            return path
    return None


@functools.cache
def available() -> str | None:
    """None if a WanLink can be built here, else why not (for a visible ``pytest.skip``).

    Probes for real, once per process (~0.3 s): a namespace, a veth pair, tbf, the NFQUEUE
    rule and binding a queue with tests.wandelay.
    """
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, tc, iptables)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (Debian package iproute2)"
    if _iptables() is None:
        return "`iptables` not found (Debian package iptables)"
    try:
        with WanLink(rate_mbit=1000, rtt_ms=2, prefix="casdprobe"):
            pass
    except Exception as e:  # any failure is a reason to skip, shown to the user
        return f"cannot build an emulated link here: {e}"
    return None


@dataclass
class Host:
    """One network namespace with one end of the link (`iface`) at `addr`."""

    name: str
    addr: str
    iface: str = IFACE
    _started: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def exec_prefix(self) -> list[str]:
        """The argv prefix that runs a command inside this namespace."""
        return [*_ip_cmd(), "netns", "exec", self.name]

    def run(self, *cmd: str, **kw: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` inside the namespace; defaults: check, text, captured, 60 s."""
        kw.setdefault("check", True)
        kw.setdefault("timeout", 60)
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run([*self.exec_prefix(), *cmd], **kw)

    def popen(self, *cmd: str, **kw: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` inside the namespace; the link stops it (by PID) on exit.

        `ip netns exec` execs the command, so ``proc.pid`` is the command's own PID. Give
        long-running commands their own time limit too: a SIGKILLed harness cannot stop them.
        """
        proc = subprocess.Popen([*self.exec_prefix(), *cmd], **kw)
        self._started.append(proc)
        return proc

    def counters(self) -> dict[str, int]:
        """Byte/packet/drop counters of `iface`, read from /sys inside the namespace."""
        keys = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets", "rx_dropped", "tx_dropped")
        base = f"/sys/class/net/{self.iface}/statistics"
        out = self.run("cat", *(f"{base}/{k}" for k in keys), timeout=10).stdout.split()
        return dict(zip(keys, map(int, out), strict=True))


class WanLink:
    """Two namespaces joined by a veth pair with a rate limit and a round-trip delay.

    ``rate_mbit=None`` leaves the rate alone (veth speed); ``rtt_ms=0`` adds no delay.
    `subnet_index` (0..511) picks 198.18.0.0/15's /24, so links used at once can differ;
    different namespaces never clash anyway. `lifetime_s` bounds the delay processes' life
    should this process die without cleaning up. After ``__exit__``, `delay_stats` holds
    each delay process's summary (packets, bypassed = accepted undelayed, lateness).
    """

    def __init__(
        self,
        rate_mbit: float | None = 100,
        rtt_ms: float = 50,
        *,
        prefix: str = "casd",
        subnet_index: int = 0,
        queue_num: int = 0,
        lifetime_s: float = 3600.0,
    ) -> None:
        if not 0 <= subnet_index < 512:
            raise ValueError("subnet_index must be in 0..511 (198.18.0.0/15 has 512 /24s)")
        if rate_mbit is not None and rate_mbit <= 0:
            raise ValueError("rate_mbit must be positive or None")
        if rtt_ms < 0:
            raise ValueError("rtt_ms must be >= 0")
        if "-" in prefix or not prefix:
            raise ValueError("prefix must be non-empty without '-' (names are prefix-pid-n-a)")
        self.rate_mbit = rate_mbit
        self.rtt_ms = rtt_ms
        self.prefix = prefix
        self.queue_num = queue_num
        self.lifetime_s = lifetime_s
        net = f"198.{18 + subnet_index // 256}.{subnet_index % 256}"
        tag = f"{prefix}-{os.getpid()}-{next(_counter)}"
        self._started: list[subprocess.Popen[Any]] = []
        self.a = Host(f"{tag}-a", f"{net}.1", _started=self._started)
        self.b = Host(f"{tag}-b", f"{net}.2", _started=self._started)
        self._created: list[str] = []
        self._delayers: dict[str, tuple[subprocess.Popen[bytes], IO[bytes]]] = {}
        self.delay_stats: dict[str, dict[str, Any]] = {}

    # tbf parameters. Burst: 2 ms at line rate, at least 16 KiB, so GSO super-packets of
    # ~1 ms (what TCP's pacing builds) pass whole; tbf would otherwise segment them and the
    # delay process would see far more packets. Limit: the burst plus one RTT (at least
    # 20 ms) of queue at line rate, a classic bottleneck buffer that TCP does not overflow
    # in slow start at these rates.
    def _tbf_args(self) -> list[str]:
        assert self.rate_mbit is not None
        rate_bps = self.rate_mbit * 1e6
        burst = max(int(rate_bps / 8 * 0.002), 16 * 1024)
        limit = burst + int(rate_bps / 8 * max(self.rtt_ms / 1000, 0.02))
        return ["tbf", "rate", f"{int(rate_bps)}bit", "burst", str(burst), "limit", str(limit)]

    def hosts(self) -> tuple[Host, Host]:
        return self.a, self.b

    def __enter__(self) -> WanLink:
        try:
            self._setup()
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        died = self._dead_delayers()
        self._teardown()
        if died and exc_type is None:
            # The delay was missing for part of the run: its results would be wrong.
            raise RuntimeError(f"delay process(es) died during the run: {died}")

    def _setup(self) -> None:
        cleanup_stale(self.prefix)
        ipt = _iptables()
        if self.rtt_ms > 0 and ipt is None:
            raise RuntimeError("iptables not found (Debian package iptables)")
        for h in self.hosts():
            _check(["ip", "netns", "add", h.name])
            self._created.append(h.name)
            # IPv6 off before the veth exists: no router solicitations or DAD on the link.
            _check(
                [
                    *h.exec_prefix(),
                    "sh",
                    "-c",
                    "for k in all default; do echo 1 > /proc/sys/net/ipv6/conf/$k/disable_ipv6;"
                    " done 2>/dev/null; true",
                ]
            )
        # Create both ends inside the namespaces: no name in the root namespace can clash.
        _check(["ip", "-n", self.a.name, "link", "add", IFACE, "type", "veth",
                "peer", "name", IFACE, "netns", self.b.name])  # fmt: skip
        for h in self.hosts():
            _check(["ip", "-n", h.name, "addr", "add", f"{h.addr}/24", "dev", IFACE])
            _check(["ip", "-n", h.name, "link", "set", "lo", "up"])
            if self.rate_mbit is not None:
                _check(["tc", "-n", h.name, "qdisc", "replace", "dev", IFACE, "root",
                        *self._tbf_args()])  # fmt: skip
        if self.rtt_ms > 0:
            assert ipt is not None
            for h in self.hosts():
                self._start_delayer(h)
            for h in self.hosts():
                proc, err = self._delayers[h.name]
                line = _read_line(proc, 20.0)
                if line != "ready":
                    _stop(proc)
                    err.seek(0)
                    raise RuntimeError(
                        f"delay process in {h.name} did not start: {line!r} "
                        f"{err.read().decode(errors='replace').strip()}"
                    )
            # Only now the rule: every packet finds a bound queue. --queue-bypass accepts
            # (undelayed, never dropped) should the delay process be gone.
            for h in self.hosts():
                _check([*h.exec_prefix(), ipt, "-w", "-t", "raw", "-A", "PREROUTING",
                        "-i", IFACE, "-j", "NFQUEUE", "--queue-num", str(self.queue_num),
                        "--queue-bypass"])  # fmt: skip
        for h in self.hosts():
            _check(["ip", "-n", h.name, "link", "set", IFACE, "up"])

    @contextlib.contextmanager
    def unthrottled(self) -> Iterator[None]:
        """Lift the rate limit for a while (the delay stays): for setup traffic that no
        measurement is about, so a slow link does not spend minutes on it."""
        if self.rate_mbit is None:
            yield
            return
        for h in self.hosts():
            _check(["tc", "-n", h.name, "qdisc", "del", "dev", IFACE, "root"])
        try:
            yield
        finally:
            for h in self.hosts():
                _check(["tc", "-n", h.name, "qdisc", "replace", "dev", IFACE, "root",
                        *self._tbf_args()])  # fmt: skip

    def _start_delayer(self, h: Host) -> None:
        err = tempfile.TemporaryFile()  # noqa: SIM115 - closed in _teardown
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        try:
            proc = subprocess.Popen(
                [*h.exec_prefix(), sys.executable, "-m", "tests.wandelay",
                 "--queue", str(self.queue_num), "--delay-ms", repr(self.rtt_ms / 2),
                 "--lifetime", repr(self.lifetime_s)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                cwd=REPO, env=env,
            )  # fmt: skip
        except BaseException:
            err.close()
            raise
        self._delayers[h.name] = (proc, err)
        # A real link does not share the hosts' CPUs. On a small machine the hosts' work
        # (two daemons, skopeo, compression threads) would otherwise delay the delayer's
        # wake-ups and so the packets: it gets a real-time priority. It sleeps in select()
        # between packets, and the kernel caps real-time tasks at 95 % of a CPU anyway.
        with contextlib.suppress(OSError):
            os.sched_setscheduler(proc.pid, os.SCHED_FIFO, os.sched_param(DELAYER_PRIORITY))

    def _dead_delayers(self) -> dict[str, str]:
        dead: dict[str, str] = {}
        for name, (proc, err) in self._delayers.items():
            if proc.poll() is not None:
                err.seek(0)
                dead[name] = f"exit {proc.returncode}: " + err.read().decode(errors="replace")
        return dead

    def check(self) -> None:
        """Raise if a delay process has died (the link would then carry traffic undelayed)."""
        if dead := self._dead_delayers():
            raise RuntimeError(f"delay process(es) died: {dead}")

    @property
    def pids(self) -> list[int]:
        """PIDs of every process this link started (delay processes and `popen`s)."""
        return [p.pid for p in self._started] + [p.pid for p, _ in self._delayers.values()]

    def _teardown(self) -> None:
        # Processes first (by PID), namespaces after: a namespace with a process in it would
        # outlive its name. Each step is guarded so one failure does not skip the rest.
        for proc in self._started:
            with contextlib.suppress(Exception):
                _stop(proc)
            for f in (proc.stdin, proc.stdout, proc.stderr):
                if f is not None:
                    with contextlib.suppress(Exception):
                        f.close()
        for name, (proc, err) in self._delayers.items():
            with contextlib.suppress(Exception):
                _stop(proc)  # SIGTERM: it accepts what it holds and prints its summary
            with contextlib.suppress(Exception):
                assert proc.stdout is not None
                for line in proc.stdout.read().decode(errors="replace").splitlines():
                    if line.startswith("{"):
                        self.delay_stats[name] = json.loads(line)
            with contextlib.suppress(Exception):
                if proc.stdout is not None:
                    proc.stdout.close()
            err.close()
        for name in reversed(self._created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30,
                           check=False)  # fmt: skip
        self._created.clear()


# --- measurements run inside the namespaces (stdlib-only scripts, bounded in time) ---------

_ECHO_SERVER = r"""
import socket, sys, time
addr, port, count, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((addr, port))
print("ready", flush=True)
deadline = time.monotonic() + timeout
for _ in range(count):
    s.settimeout(max(deadline - time.monotonic(), 0.001))
    try:
        data, peer = s.recvfrom(2048)
    except TimeoutError:
        break
    s.sendto(data, peer)
"""

_ECHO_CLIENT = r"""
import json, socket, sys, time
addr, port, count, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((addr, port))
samples = []
deadline = time.monotonic() + timeout
for i in range(count):
    t0 = time.monotonic()
    s.send(i.to_bytes(4, "big") + bytes(60))
    s.settimeout(max(min(deadline - t0, 2.0), 0.001))
    try:
        while int.from_bytes(s.recv(2048)[:4], "big") != i:
            pass
    except TimeoutError:
        continue
    samples.append(time.monotonic() - t0)
    time.sleep(0.005)  # let the link drain: measure the path, not a queue
print(json.dumps(samples))
"""

_BULK_RECEIVER = r"""
import json, socket, sys, time
addr, port, expect, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((addr, port))
ls.listen(1)
print("ready", flush=True)
deadline = time.monotonic() + timeout
ls.settimeout(timeout)
c, _ = ls.accept()
buf = bytearray(1 << 20)
total, first, quarter, at_quarter = 0, None, None, 0
while time.monotonic() < deadline:
    c.settimeout(max(deadline - time.monotonic(), 0.001))
    n = c.recv_into(buf)
    if not n:
        break
    now = time.monotonic()
    if first is None:
        first = now
    total += n
    if quarter is None and total >= expect // 4:
        quarter, at_quarter = now, total
end = time.monotonic()
print(json.dumps({"bytes": total, "first": first, "quarter": quarter, "at_quarter": at_quarter,
                  "end": end}), flush=True)
"""

_BULK_SENDER = r"""
import socket, sys, time
addr, port, nbytes, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.create_connection((addr, port), timeout=timeout)
block = bytes(1 << 20)
left = nbytes
while left > 0:
    left -= s.send(memoryview(block)[: min(left, len(block))])
s.shutdown(socket.SHUT_WR)
s.recv(1)  # wait for the receiver to close: every byte has arrived
"""


def _python(host: Host, script: str, *args: object, **kw: Any) -> subprocess.Popen[bytes]:
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("stdout", subprocess.PIPE)
    return host.popen(sys.executable, "-c", script, *map(str, args), **kw)


def measure_rtt(
    src: Host, dst: Host, count: int = 20, port: int = 5300, timeout: float = 20.0
) -> list[float]:
    """Round-trip times (s) of `count` UDP ping-pongs from `src` to `dst`, sequential."""
    server = _python(dst, _ECHO_SERVER, dst.addr, port, count, timeout)
    try:
        if _read_line(server, 10.0) != "ready":
            raise RuntimeError("echo server did not start")
        client = _python(src, _ECHO_CLIENT, dst.addr, port, count, timeout)
        out, _ = client.communicate(timeout=timeout + 10)
        if client.returncode != 0:
            raise RuntimeError(f"echo client failed ({client.returncode})")
        samples: list[float] = json.loads(out)
        return samples
    finally:
        _stop(server)
        assert server.stdout is not None
        server.stdout.close()


def measure_goodput(
    src: Host, dst: Host, nbytes: int = 20_000_000, port: int = 5301, timeout: float = 60.0
) -> dict[str, float]:
    """One TCP bulk transfer of `nbytes` from `src` to `dst`.

    Returns bytes received, ``mbit`` (first byte to last), ``steady_mbit`` (last three
    quarters, past slow start) and ``seconds``; each bound by `timeout`.
    """
    receiver = _python(dst, _BULK_RECEIVER, dst.addr, port, nbytes, timeout)
    try:
        if _read_line(receiver, 10.0) != "ready":
            raise RuntimeError("bulk receiver did not start")
        sender = _python(src, _BULK_SENDER, dst.addr, port, nbytes, timeout,
                         stdout=subprocess.DEVNULL)  # fmt: skip
        line = _read_line(receiver, timeout + 5)
        sender.wait(10)
        r = json.loads(line)
    finally:
        _stop(receiver)
        assert receiver.stdout is not None
        receiver.stdout.close()
    if r["bytes"] != nbytes or r["first"] is None:
        raise RuntimeError(f"bulk transfer incomplete: {r}")
    span = r["end"] - r["first"]
    steady = r["end"] - r["quarter"]
    return {
        "bytes": float(r["bytes"]),
        "seconds": span,
        "mbit": r["bytes"] * 8 / span / 1e6,
        "steady_mbit": (r["bytes"] - r["at_quarter"]) * 8 / steady / 1e6,
    }


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import statistics

    p = argparse.ArgumentParser(description="Build a WanLink and report what it measures.")
    p.add_argument("--rate", type=float, default=100.0, help="Mbit/s, 0 for unlimited")
    p.add_argument("--rtt", type=float, default=50.0, help="ms")
    p.add_argument("--bytes", type=int, default=20_000_000)
    p.add_argument("--pings", type=int, default=20)
    p.add_argument("--cleanup-stale", action="store_true", help="only remove stale namespaces")
    a = p.parse_args(argv)
    if a.cleanup_stale:
        print("removed:", cleanup_stale())
        return 0
    if (why := available()) is not None:
        print("unavailable:", why)
        return 1
    with WanLink(rate_mbit=a.rate or None, rtt_ms=a.rtt, lifetime_s=600) as link:
        rtts = measure_rtt(link.a, link.b, a.pings)
        before = link.b.counters()
        g = measure_goodput(link.a, link.b, a.bytes)
        after = link.b.counters()
    ms = sorted(x * 1000 for x in rtts)
    print(
        f"target {a.rate or 'unlimited'} Mbit/s, {a.rtt} ms RTT: "
        f"RTT median {statistics.median(ms):.2f} ms (min {ms[0]:.2f}, max {ms[-1]:.2f}, "
        f"n={len(ms)}); goodput {g['mbit']:.1f} Mbit/s overall, {g['steady_mbit']:.1f} steady "
        f"({g['bytes'] / 1e6:.0f} MB in {g['seconds']:.2f} s); "
        f"b rx_bytes +{after['rx_bytes'] - before['rx_bytes']}"
    )
    for name, st in link.delay_stats.items():
        print(f"  delay {name}: {json.dumps(st)}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
