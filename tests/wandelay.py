"""Delay every packet of one NFQUEUE by a fixed time: the "delay" half of the emulated WAN link.

Run inside a network namespace (``ip netns exec NS python -m tests.wandelay --queue 0
--delay-ms 25``) next to an iptables rule ``-t raw -A PREROUTING -i wan0 -j NFQUEUE --queue-num 0
--queue-bypass``. This kernel has no ``netem``, so delay is emulated in user space: every packet
the rule queues is held by the kernel until this process gives its verdict, and the verdict
(always ACCEPT) is sent ``delay`` after the packet's notification arrived.

It speaks nfnetlink_queue over a raw ``AF_NETLINK``/``NETLINK_NETFILTER`` socket with the
standard library only, so CI needs no compiled package (libnetfilter_queue is not used).

Why it should never drop a packet:

* copy mode META: only metadata (the packet id) crosses to user space, never the payload;
* ``NFQA_CFG_F_GSO``: GSO super-packets are queued whole instead of being segmented first, so
  the packet rate stays moderate at 1 Gbit/s;
* a huge queue length and a forced (``SO_RCVBUFFORCE``) 64 MiB socket receive buffer;
* ``NFQA_CFG_F_FAIL_OPEN``: should the queue or the socket still overflow, the kernel accepts
  the packet at once instead of dropping it. Such a packet is not delayed; it is counted as
  ``bypassed`` (a gap in the packet ids, or an ``ENOBUFS`` from the socket) in the summary;
* on exit every held packet is accepted before the socket closes (closing drops them).

The delay is the same for every packet, so release order is arrival order: the timer "heap" is
a FIFO deque, and one ``NFQNL_MSG_VERDICT_BATCH`` (accept every id up to N) releases all packets
that are due at once, which keeps the syscall count at one recv per packet plus one send per
wake-up. select() wakes a little late (timer slack, the VM's wake-up latency, ~0.1-0.3 ms
here), so the process learns that oversleep (a moving average, capped at min(1 ms, delay/4))
and releases that much early: releases are on time on average (``late_mean_ms`` ~ 0).

Protocol with the harness: one line ``ready`` on stdout once the queue is bound (the harness
adds the iptables rule only after that, so no packet passes undelayed), and one JSON summary
line on stdout when it exits (SIGTERM/SIGINT, the ``--lifetime`` limit, or its parent's
death). Exit status 0 on a clean stop, 2 when binding the queue failed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from typing import Any

# <linux/netlink.h>, <linux/netfilter/nfnetlink.h>, <linux/netfilter/nfnetlink_queue.h>
NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_FAIL_OPEN = 0x1
NFQA_CFG_F_GSO = 0x4
NF_ACCEPT = 1
NFNETLINK_V0 = 0
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # <asm-generic/socket.h>; 3.11 lacks it

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, portid (host order)
_NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (big endian)
_NLATTR = struct.Struct("=HH")  # nla_len, nla_type (host order)
_PACKET_MSG_TYPE = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET
_BE32 = struct.Struct("!I")


def _attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    raw = _NLATTR.pack(_NLATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _message(msg_type: int, queue: int, attrs: bytes, flags: int, seq: int = 0) -> bytes:
    """An nfnetlink_queue message: nlmsghdr + nfgenmsg(AF_UNSPEC, v0, queue) + attributes."""
    body = _NFGENMSG.pack(socket.AF_UNSPEC, NFNETLINK_V0, queue) + attrs
    kind = (NFNL_SUBSYS_QUEUE << 8) | msg_type
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


class Queue:
    """A bound nfnetlink queue with the config above."""

    def __init__(self, num: int, maxlen: int, rcvbuf: int) -> None:
        self.num = num
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            # SO_RCVBUFFORCE ignores net.core.rmem_max (root only); fall back to the capped one.
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.bind((0, 0))
            self._seq = 0
            cmd = struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET)
            self._config(_attr(NFQA_CFG_CMD, cmd))
            # copy_range 0 with META: no payload bytes are copied to us.
            self._config(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)))
            self._config(_attr(NFQA_CFG_QUEUE_MAXLEN, _BE32.pack(maxlen)))
            flags = NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO
            self._config(
                _attr(NFQA_CFG_FLAGS, _BE32.pack(flags)) + _attr(NFQA_CFG_MASK, _BE32.pack(flags))
            )
        except BaseException:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self._verdict_prefix = (
            _NLMSGHDR.pack(
                32, (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT_BATCH, NLM_F_REQUEST, 0, 0
            )
            + _NFGENMSG.pack(socket.AF_UNSPEC, NFNETLINK_V0, num)
            + _NLATTR.pack(12, NFQA_VERDICT_HDR)
        )

    def _config(self, attrs: bytes) -> None:
        """Send one config message and wait for its ACK, raising the kernel's error."""
        self._seq += 1
        self.sock.sendto(
            _message(NFQNL_MSG_CONFIG, self.num, attrs, NLM_F_REQUEST | NLM_F_ACK, self._seq),
            (0, 0),
        )
        while True:
            data = self.sock.recv(65536)
            _len, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data)
            if kind == NLMSG_ERROR and seq == self._seq:
                (err,) = struct.unpack_from("=i", data, _NLMSGHDR.size)
                if err:
                    raise OSError(-err, f"nfqueue config: {os.strerror(-err)}")
                return

    def accept_upto(self, packet_id: int) -> None:
        """Accept every packet still held whose id is <= packet_id (kernel handles wrap)."""
        msg = self._verdict_prefix + struct.pack("!II", NF_ACCEPT, packet_id)
        while True:
            try:
                self.sock.send(msg)
                return
            except BlockingIOError:
                # Netlink sends to the kernel are processed synchronously; this is just paranoia.
                select.select([], [self.sock], [], 0.01)

    def close(self) -> None:
        self.sock.close()


def _packet_id(msg: memoryview, n: int) -> int | None:
    """The packet id of an NFQNL_MSG_PACKET message, or None for anything else."""
    if n < 28 or _NLMSGHDR.unpack_from(msg)[1] != _PACKET_MSG_TYPE:
        return None
    off = _NLMSGHDR.size + _NFGENMSG.size
    total = min(n, _NLMSGHDR.unpack_from(msg)[0])
    while off + 4 <= total:  # NFQA_PACKET_HDR comes first in practice: one iteration
        alen, akind = _NLATTR.unpack_from(msg, off)
        if akind & 0x3FFF == NFQA_PACKET_HDR:
            return int(_BE32.unpack_from(msg, off + 4)[0])
        if alen < 4:
            return None
        off += (alen + 3) & ~3
    return None


def run(queue_num: int, delay_s: float, lifetime_s: float, maxlen: int, rcvbuf: int) -> int:
    # The harness's death is noticed by polling getppid() (twice a second) rather than with
    # PR_SET_PDEATHSIG, which fires when the parent *thread* exits (a trio worker thread, say).
    parent = os.getppid()
    stop = False

    def on_signal(_sig: int, _frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        q = Queue(queue_num, maxlen, rcvbuf)
    except OSError as e:
        print(json.dumps({"error": f"cannot bind queue {queue_num}: {e}"}), flush=True)
        return 2
    print("ready", flush=True)

    now = time.monotonic
    held: collections.deque[tuple[float, int]] = collections.deque()
    buf = bytearray(65536)
    view = memoryview(buf)
    recv_into = q.sock.recv_into
    started = now()
    deadline = started + lifetime_s
    packets = bypassed = late_1ms = releases = max_held = 0
    late_sum = late_max = early = 0.0
    max_early = min(0.001, delay_s / 4)
    last_id: int | None = None
    # select() rather than poll()/epoll: its timeout has microsecond resolution, theirs is
    # rounded up to whole milliseconds, which would add up to 1 ms per direction.
    # A signal must end the select() at once (PEP 475 would otherwise resume it): the
    # handler's wake-up byte makes `wake_r` readable.
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    rlist = [q.sock, wake_r]
    try:
        while not stop:
            t = now()
            # Release everything that is due (less the expected oversleep) with one verdict.
            if held and held[0][0] <= t + early:
                last = 0
                while held and held[0][0] <= t + early:
                    due, last = held.popleft()
                    late = t - due
                    late_sum += late
                    if late > late_max:
                        late_max = late
                    if late > 0.001:
                        late_1ms += 1
                q.accept_upto(last)
                releases += 1
            if t >= deadline or os.getppid() != parent:
                break
            wait = min(deadline - t, 0.5)  # wake now and then to notice the parent's death
            for_release = bool(held) and held[0][0] - early - t < wait
            if for_release:
                wait = max(held[0][0] - early - t, 0.0)
            t_sel = now()
            if not select.select(rlist, [], [], wait)[0]:
                if for_release and wait > 0:
                    # select() wakes late (timer slack, a VM's wake-up latency): learn by how
                    # much and wake that much earlier, so releases are on time on average.
                    over = min(max(now() - t_sel - wait, 0.0), max_early)
                    early += 0.1 * (over - early)
                continue
            with contextlib.suppress(BlockingIOError):
                wake_r.recv(64)
            # Drain whatever has arrived; cap the burst so releases are never starved.
            for _ in range(256):
                try:
                    n = recv_into(buf)
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno == errno.ENOBUFS:
                        bypassed += 1  # overrun; fail-open accepted what we missed
                        continue
                    raise
                arrived = now()
                pid = _packet_id(view, n)
                if pid is None:
                    continue
                if last_id is not None and pid != (last_id + 1) & 0xFFFFFFFF:
                    # The kernel numbers before sending: a gap is a notification it could not
                    # deliver, which fail-open accepted undelayed.
                    bypassed += (pid - last_id - 1) & 0xFFFFFFFF
                last_id = pid
                held.append((arrived + delay_s, pid))
                packets += 1
            if len(held) > max_held:
                max_held = len(held)
    finally:
        # Closing the socket makes the kernel drop what it still holds: accept it all first.
        if last_id is not None:
            with contextlib.suppress(OSError):
                q.accept_upto(last_id)
        q.close()
        signal.set_wakeup_fd(-1)
        wake_r.close()
        wake_w.close()
    summary = {
        "queue": queue_num,
        "delay_ms": delay_s * 1000.0,
        "packets": packets,
        "bypassed": bypassed,
        "releases": releases,
        "max_held": max_held,
        "late_mean_ms": (late_sum / packets * 1000.0) if packets else 0.0,
        "late_max_ms": late_max * 1000.0,
        "late_over_1ms": late_1ms,
        "early_ms": early * 1000.0,
        "seconds": now() - started,
    }
    print(json.dumps(summary), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--queue", type=int, default=0, help="NFQUEUE number (per namespace)")
    p.add_argument("--delay-ms", type=float, required=True, help="hold time per packet")
    p.add_argument("--lifetime", type=float, default=3600.0, help="exit after this many s")
    p.add_argument("--maxlen", type=int, default=1 << 20, help="kernel queue length, packets")
    p.add_argument("--rcvbuf", type=int, default=64 << 20, help="socket receive buffer, bytes")
    a = p.parse_args(argv)
    return run(a.queue, a.delay_ms / 1000.0, a.lifetime, a.maxlen, a.rcvbuf)


if __name__ == "__main__":
    sys.exit(main())
