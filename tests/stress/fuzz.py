"""Fuzz a live `casd serve` over TCP while a well-behaved client keeps working.

Starts a real daemon (tests.integration.harness.Daemon) and, from several concurrent raw
connections, sends N frames in all (default 100,000):

- random bytes, and valid frames of every message type mutated by bit flips, truncation,
  splicing, length-prefix lies, huge declared lengths and wrongly typed fields;
- valid frames in an invalid order: frames before HELLO, chunks nobody asked for,
  PUSH_END too early, follow-ups for rids that are not open, rid reuse, server messages
  sent by the client, and so on;
- pushes that lie: chunk bytes that do not hash to their id, PUSH_END with a wrong size
  or digest, zstd payloads that are garbage, decode to other bytes, or declare a huge
  size (decompression bombs);
- plain requests, most of them for things that do not exist (NOT_FOUND, INVALID).

Every connection ends in a way the server must notice: after a protocol violation the
server must send ERROR(0) and close by itself; otherwise we half-close (EOF) and the
server must close. Connections whose frames are all legal must get an answer to every
request. Every bound is a timeout (`--hang-timeout`); passing one is a failure.

Meanwhile a well-behaved client pushes, pulls and stats a few-MB blob, over and over, and
verifies every byte; each of its operations must succeed. At the end the daemon must be
alive, `casctl stats` and `casctl fsck --deep` must succeed, its log must hold no
"crashed" or Traceback line, and its peak RSS must stay under `--rss-limit-mb`.

Run:  .venv/bin/python -m tests.stress.fuzz [--frames N] [--seed S] [--connections C]
Also importable: `run(frames=..., workdir=...)` returns a Report (tests/stress/test_fuzz.py).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import io
import random
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import casproto
import msgpack
import trio
from casproto import ErrorCode

from casd import zstd
from casd.chunking import DEFAULT_PARAMS, EMPTY_DIGEST, Chunker, chunk_id, format_digest
from casd.client import open_client
from tests.integration.harness import Daemon, casctl

MAX_FRAME = casproto.MAX_FRAME
AGENT = "casd-fuzz/1"
FEATURES = (
    "zstd",
    casproto.PREFIX_FEATURE,
    casproto.RECIPE_FEATURE,
    casproto.INLINE_FEATURE,
    casproto.WANT_AT_FEATURE,
)
RECV_SIZE = 1 << 20
OPENERS = (
    casproto.Has,
    casproto.Stat,
    casproto.ListNames,
    casproto.Tag,
    casproto.Untag,
    casproto.Stats,
    casproto.Pull,
    casproto.PullDelta,
    casproto.PullInline,
    casproto.Want,
    casproto.WantDelta,
    casproto.WantAt,
    casproto.PushBegin,
    casproto.Sync,
    casproto.Fsck,
)
# rids far above any we open, for frames about requests that never existed.
NEVER_OPENED = 1 << 40


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _pack(obj: object) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def _sha(data: bytes) -> str:
    return format_digest(hashlib.sha256(data).digest()) if data else EMPTY_DIGEST


def zstd_rle_frame(
    declared: int | None, actual: int, *, single_segment: bool = False, window_log: int = 17
) -> bytes:
    """A zstd frame made of RLE blocks: `actual` zero bytes from ~4 wire bytes per 128 KiB.

    `declared` goes into the header's content size (None: no content size). With a small
    window and no single-segment flag, zstd accepts any declared size: a decompression bomb.
    """
    out = bytearray(b"\x28\xb5\x2f\xfd")
    if declared is None:
        out += bytes((0x00, (window_log - 10) << 3))
    elif single_segment:
        out += bytes((0xE0,)) + declared.to_bytes(8, "little")
    else:
        out += bytes((0xC0, (window_log - 10) << 3)) + declared.to_bytes(8, "little")
    block = 128 * 1024
    if actual == 0:
        out += (1).to_bytes(3, "little")  # last, raw, size 0
        return bytes(out)
    left = actual
    while left:
        n = min(block, left)
        left -= n
        out += (int(left == 0) | (1 << 1) | (n << 3)).to_bytes(3, "little") + b"\0"
    return bytes(out)


# --- figures --------------------------------------------------------------------------


@dataclass
class Report:
    frames_sent: int = 0
    connections: int = 0
    sessions: collections.Counter[str] = field(default_factory=collections.Counter)
    session_s: collections.Counter[str] = field(default_factory=collections.Counter)
    error_frames: int = 0  # ERROR frames received, any rid
    fatal_errors: int = 0  # ... of them with rid 0
    error_codes: collections.Counter[str] = field(default_factory=collections.Counter)
    server_closes: int = 0  # the server closed before we half-closed
    closes_after_eof: int = 0  # the server closed after our EOF
    resets: int = 0  # ... with a TCP reset
    replies: int = 0  # frames received, all kinds
    bytes_received: int = 0
    good_ops: int = 0
    good_iterations: int = 0
    good_max_op_s: float = 0.0
    idle_closed_by_hello_timeout: int = 0
    idle_connections: int = 0
    elapsed_s: float = 0.0
    rss_max_kb: int = 0  # VmHWM of the daemon
    daemon_alive: bool = False
    stats_ok: bool = False
    fsck_ok: bool = False
    daemon_exit: int | None = None
    log_problems: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    failures_total: int = 0

    @property
    def ok(self) -> bool:
        return (
            not self.failures
            and self.daemon_alive
            and self.stats_ok
            and self.fsck_ok
            and self.daemon_exit == 0
            and not self.log_problems
        )

    def summary(self) -> str:
        codes = ", ".join(f"{k} {v}" for k, v in self.error_codes.most_common())
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.sessions.items()))
        lines = [
            f"frames sent            {self.frames_sent}",
            f"connections            {self.connections} (+{self.idle_connections} idle)",
            f"error frames received  {self.error_frames} "
            f"({self.fatal_errors} fatal, rid 0); {codes}",
            f"server closes          {self.server_closes} on its own, "
            f"{self.closes_after_eof} after our EOF ({self.resets} resets)",
            f"frames received        {self.replies} ({self.bytes_received / 2**20:.0f} MiB)",
            f"idle conns timed out   {self.idle_closed_by_hello_timeout}/{self.idle_connections}"
            " (HELLO timeout)",
            f"well-behaved ops       {self.good_ops} ({self.good_iterations} put+get+stat "
            f"rounds, slowest op {self.good_max_op_s:.2f} s)",
            f"elapsed                {self.elapsed_s:.1f} s",
            f"daemon RSS max         {self.rss_max_kb / 1024:.1f} MiB (VmHWM)",
            f"daemon alive/stats/fsck --deep  {self.daemon_alive}/{self.stats_ok}/{self.fsck_ok}"
            f", exit on SIGTERM {self.daemon_exit}",
            f"log problems           {len(self.log_problems)}",
            f"failures               {self.failures_total}",
            f"sessions               {kinds}",
            "slowest scenarios      "
            + ", ".join(f"{k} {v:.1f} s" for k, v in self.session_s.most_common(6)),
        ]
        lines += [f"  FAIL {f}" for f in self.failures[:30]]
        lines += [f"  LOG  {p}" for p in self.log_problems[:10]]
        lines.append("RESULT " + ("OK" if self.ok else "FAILED"))
        return "\n".join(lines)


# --- what the fuzzer knows about the store --------------------------------------------


class Corpus:
    """Known ids, names and digests, and factories for every kind of frame."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.ids: list[bytes] = []
        self.sizes: dict[bytes, int] = {}
        self.data: dict[bytes, bytes] = {}
        self.digests: list[str] = []
        self.names: list[str] = []
        self.address = ""

    def learn(self, name: str, data: bytes, views: list[memoryview]) -> None:
        for v in views:
            cid = chunk_id(v)
            if cid not in self.sizes:
                self.sizes[cid] = len(v)
                self.data[cid] = bytes(v)
                self.ids.append(cid)
        self.digests.append(_sha(data))
        self.names.append(name)

    # -- field values --

    def chunk_ids(self, lo: int = 1, hi: int = 24) -> tuple[bytes, ...]:
        r = self.rng
        n = r.randint(lo, hi)
        known = r.random()
        return tuple(
            r.choice(self.ids) if self.ids and r.random() < known else r.randbytes(32)
            for _ in range(n)
        )

    def name(self) -> str:
        r = self.rng
        x = r.random()
        if x < 0.4 and self.names:
            return r.choice(self.names)
        if x < 0.8:
            return f"fuzz-{r.randrange(1 << 20):x}"
        return r.choice(
            ["", "a\x00b", "tab\tname", "sha256:" + "0" * 64, "x" * 256, "é" * 128, "/", " "]
        )

    def digest(self) -> str:
        r = self.rng
        x = r.random()
        if x < 0.5 and self.digests:
            return r.choice(self.digests)
        if x < 0.8:
            return format_digest(r.randbytes(32))
        return r.choice(["sha256:", "sha256:" + "G" * 64, "md5:00", "", "sha256:" + "0" * 63])

    def ref(self) -> str:
        return self.name() if self.rng.random() < 0.5 else self.digest()

    def source(self) -> str:
        return self.rng.choice(
            ["127.0.0.1:1", "127.0.0.1:0", "not-an-address", "127.0.0.1:99999", "[::1]:1", ""]
        )

    # -- messages --

    def request(self, rid: int, features: frozenset[str]) -> casproto.Message:
        """A request any client may send now (rid fresh); most ask for what is not there."""
        r = self.rng
        x = r.random()
        if x < 0.14:
            if r.random() < 0.01:
                return casproto.Has(rid, tuple(r.randbytes(32) for _ in range(casproto.MAX_BATCH)))
            return casproto.Has(rid, self.chunk_ids(1, 64))
        if x < 0.26:
            return casproto.Stat(rid, self.ref())
        if x < 0.34:
            return casproto.ListNames(rid, r.choice(["", "fuzz", "fuzz-seed", "zzz", "\x00"]))
        if x < 0.42:
            name = self.name()
            return casproto.Tag(rid, "fuzz-t" if name.startswith("good") else name, self.digest())
        if x < 0.48:
            name = self.name()
            return casproto.Untag(rid, "fuzz-u" if name.startswith("good") else name)
        if x < 0.55:
            return casproto.Stats(rid)
        if x < 0.68:
            if casproto.INLINE_FEATURE in features and r.random() < 0.15:
                # As PULL_DELTA, asking for any size inlined, at any rate.
                inline = r.choice([0, 1, 16384, r.getrandbits(64)])
                rate = r.choice([0, 1, 2_500_000, r.getrandbits(64)])
                return casproto.PullInline(
                    rid, self.ref(), self.digest(), r.getrandbits(64), inline, rate
                )
            if casproto.RECIPE_FEATURE in features and r.random() < 0.3:
                # A base it may or may not hold, and a checksum that is rarely right.
                return casproto.PullDelta(rid, self.ref(), self.digest(), r.getrandbits(64))
            return casproto.Pull(rid, self.ref())
        if x < 0.93:
            if casproto.WANT_AT_FEATURE in features and r.random() < 0.3:
                bitmap = bytes(r.randrange(256) for _ in range(r.randint(1, 64))) + b"\x01"
                start = r.choice([0, 1, r.randrange(1 << 20), (1 << 64) - 1])
                return casproto.WantAt(rid, self.digest(), start, bitmap)
            ids = self.chunk_ids(1, 8)
            if casproto.PREFIX_FEATURE in features and r.random() < 0.3:
                bases = tuple(self.chunk_ids(0, casproto.MAX_BASES) for _ in ids)
                return casproto.WantDelta(rid, ids, bases)
            return casproto.Want(rid, ids)
        if x < 0.96:
            return casproto.PushBegin(rid, r.choice([None, self.name()]))  # caller cancels it
        if x < 0.985:
            return casproto.Fsck(rid, r.random() < 0.05, None, None)
        if r.random() < 0.3 and self.names:  # from itself: a few names, a dry run or not
            names = tuple({r.choice(self.names) for _ in range(r.randint(1, 3))})
            return casproto.Sync(rid, self.address, None, names, False, r.random() < 0.5)
        return casproto.Sync(rid, self.source(), None, (self.name(),), False, r.random() < 0.5)

    def any_message(self, rid: int) -> casproto.Message:
        """A message of any type, either direction: the corpus that mutations start from."""
        r = self.rng
        ids = self.chunk_ids(1, 8)
        sizes = tuple(r.randint(0, 300_000) for _ in ids)
        stats = {"a": 1, "b": 2.5, "c": "x"}
        data = r.randbytes(r.randint(0, 2000))
        msgs: list[Callable[[], casproto.Message]] = [
            lambda: casproto.Hello(0, 1, FEATURES, r.choice([None, "tok"]), AGENT),
            lambda: casproto.Welcome(0, 1, ("zstd",), "casd/x", {"algo": "x", "min": 1}, 1 << 20),
            lambda: casproto.Error(rid, r.choice(list(ErrorCode)), "boom"),
            lambda: self.request(rid, frozenset(FEATURES)),
            lambda: casproto.Have(rid, casproto.pack_bitmap([True] * len(ids))),
            lambda: casproto.Stat(rid, self.ref()),
            lambda: casproto.BlobInfo(rid, self.digest(), 10, 1, ("n",)),
            lambda: casproto.ListNames(rid, ""),
            lambda: casproto.Names(rid, (("a", self.digest()), ("b", self.digest()))),
            lambda: casproto.Tag(rid, self.name(), self.digest()),
            lambda: casproto.Ok(rid),
            lambda: casproto.Untag(rid, self.name()),
            lambda: casproto.Stats(rid),
            lambda: casproto.StatsResult(rid, stats),
            lambda: casproto.PushBegin(rid, self.name()),
            lambda: casproto.PushRecipe(rid, ids, sizes),
            lambda: casproto.PushWant(rid, casproto.pack_bitmap([False] * len(ids))),
            lambda: casproto.Chunk(rid, ids[0], casproto.Codec.RAW, data),
            lambda: casproto.Chunk(rid, ids[0], casproto.Codec.ZSTD, zstd.compress(data, 1)),
            lambda: casproto.Chunk(rid, ids[0], casproto.Codec.ZSTD_PREFIX, data),
            lambda: casproto.PushEnd(rid, sum(sizes), self.digest()),
            lambda: casproto.PushDone(rid, self.digest(), 1, 1, 1, 1),
            lambda: casproto.Cancel(rid),
            lambda: casproto.Pull(rid, self.ref()),
            lambda: casproto.Recipe(rid, self.digest(), sum(sizes), ids, sizes, True),
            lambda: casproto.Want(rid, ids),
            lambda: casproto.WantDelta(rid, ids, tuple((self.chunk_ids(0, 2)) for _ in ids)),
            lambda: casproto.Sync(rid, self.source(), None, ("a",), False, True),
            lambda: casproto.SyncProgress(rid, stats),
            lambda: casproto.SyncDone(rid, stats, (("a", self.digest(), "copied"),)),
            lambda: casproto.Fsck(rid, False, None, None),
            lambda: casproto.FsckDone(rid, stats, ids),
            lambda: casproto.ChunkPack(
                rid,
                r.choice([casproto.Codec.RAW, casproto.Codec.ZSTD]),
                (len(data) + 1,),
                data + b"x",
            ),
            lambda: casproto.PullDelta(rid, self.ref(), self.digest(), r.getrandbits(64)),
            lambda: casproto.RecipeDelta(rid, self.digest(), 10, 1, data),
            lambda: casproto.RecipeInline(rid, self.digest(), 10, 1, data, 7, data, True),
            lambda: casproto.WantAt(rid, self.digest(), r.randrange(1 << 20), b"\x01" + data[:8]),
            lambda: casproto.Error(0, ErrorCode.BUSY, "go away"),  # never picked
        ]
        return msgs[r.randrange(len(msgs) - 1)]()  # every message but the last, a fatal ERROR

    # -- byte-level damage --

    def random_bytes(self) -> bytes:
        r = self.rng
        x = r.random()
        n = r.randint(1, 64) if x < 0.6 else r.randint(65, 4096) if x < 0.98 else 1 << 20
        return r.randbytes(n)

    def mutate(self, frame: bytes) -> bytes:
        r = self.rng
        body = frame[4:]
        op = r.randrange(12)
        if op == 0:  # bit flips anywhere, prefix included
            b = bytearray(frame)
            for _ in range(r.randint(1, 8)):
                i = r.randrange(len(b))
                b[i] ^= 1 << r.randrange(8)
            return bytes(b)
        if op == 1:  # bit flips in the body only: the frame still cuts cleanly
            b = bytearray(body)
            for _ in range(r.randint(1, 4)):
                i = r.randrange(len(b))
                b[i] ^= 1 << r.randrange(8)
            return _frame(bytes(b))
        if op == 2:  # truncated, the prefix still promising the whole body
            return frame[: r.randrange(len(frame))]
        if op == 3:  # truncated body, prefix fixed
            return _frame(body[: r.randint(1, max(1, len(body) - 1))])
        if op == 4:  # length prefix lies by a little
            return struct.pack(">I", max(0, len(body) + r.randint(-8, 8))) + body
        if op == 5:  # huge declared length
            n = r.choice([MAX_FRAME + 1, 1 << 31, (1 << 32) - 1, MAX_FRAME, MAX_FRAME - 1])
            return struct.pack(">I", n) + body
        if op == 6:  # random length prefix
            return struct.pack(">I", r.randrange(1 << 32)) + body
        if op == 7:  # interesting bytes in the body
            b = bytearray(body)
            for _ in range(r.randint(1, 3)):
                b[r.randrange(len(b))] = r.choice(
                    [0x00, 0xFF, 0x7F, 0x80, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC6, 0xDD, 0xDF, 0x90]
                )
            return _frame(bytes(b))
        if op == 8:  # bytes inserted / deleted, prefix fixed
            b = bytearray(body)
            i = r.randrange(len(b) + 1)
            if r.random() < 0.5 or len(b) < 2:
                b[i:i] = r.randbytes(r.randint(1, 16))
            else:
                del b[i : i + r.randint(1, min(16, len(b) - 1))]
            return _frame(bytes(b))
        if op == 9:  # trailing junk
            return frame + r.randbytes(r.randint(1, 32))
        if op == 10:  # zero length
            return b"\0\0\0\0" + body
        return frame + frame  # duplicated

    def splice(self, a: bytes, b: bytes) -> bytes:
        r = self.rng
        head = a[: r.randint(1, len(a))]
        tail = b[r.randrange(len(b)) :]
        if r.random() < 0.5 and len(head) > 4:
            return _frame(head[4:] + tail)  # prefix fixed
        return head + tail

    def weird_value(self) -> object:
        r = self.rng
        return r.choice(
            [
                None,
                True,
                False,
                -1,
                0,
                1,
                1 << 32,
                (1 << 64) - 1,
                -(1 << 63),
                1.5,
                float("nan"),
                "",
                "x" * 100,
                b"",
                b"\0" * 31,
                b"\0" * 32,
                b"\0" * 33,
                [],
                [b"\0" * 32] * 3,
                [1, 2, 3],
                [[b"\0" * 32] * 9],
                {},
                {"a": 1},
                {"a": [1, {"b": None}]},
                "sha256:" + "0" * 64,
                msgpack.ExtType(1, b"x"),
            ]
        )

    def wrong_types(self, msg: casproto.Message) -> bytes:
        """The message's body with one element of the wrong type, missing or extra."""
        r = self.rng
        wire = list(msgpack.unpackb(casproto.encode_message(msg)[4:], raw=False))
        op = r.randrange(8)
        if op < 3:
            wire[r.randrange(len(wire))] = self.weird_value()
        elif op == 3:
            wire = wire[: r.randint(0, len(wire) - 1)]
        elif op == 4:
            wire += [self.weird_value() for _ in range(r.randint(1, 3))]  # legal: ignored
        elif op == 5:
            wire[0] = r.choice([0, 4, 9, 37, 99, 127, 255, 1 << 33, -3, "10", 10.0, None])
        elif op == 6:
            depth = r.choice([10, 200, 2000, 100_000])
            return _frame(b"\x92" + _pack(wire[0]) + b"\x91" * depth + b"\xc0")
        else:
            return _frame(_pack(self.weird_value()))  # not an array at all
        try:
            return _frame(_pack(wire))
        except (TypeError, ValueError, OverflowError):
            return _frame(b"\xc1")


# --- one connection ---------------------------------------------------------------------


class Conn:
    """One raw connection: a reader that decodes (and, while we stay legal, checks) every
    frame the server sends, and helpers to write frames and wait with a bound."""

    def __init__(self, fz: Fuzzer, stream: trio.SocketStream, kind: str) -> None:
        self.fz = fz
        self.stream = stream
        self.kind = kind
        self.proto = casproto.Connection(casproto.Role.CLIENT)
        self.validate = True  # False once we send bytes whose effect we cannot track
        self.raw = casproto.FrameDecoder()
        self.by_rid: dict[int, list[casproto.Message]] = collections.defaultdict(list)
        self.changed = trio.Event()
        self.closed = trio.Event()
        self.reset = False
        self.eof_sent = False
        self.write_broken = False
        self.fatal: casproto.Error | None = None
        self.frames = 0
        self._rid = 0
        self.cancelled: set[int] = set()
        self.last_sent: casproto.Message | None = None
        self.opened: dict[int, str] = {}  # rid -> the request that opened it
        self.push_rid = 0  # the push a violation scenario opened
        self.push_ids: tuple[bytes, ...] = ()

    @property
    def features(self) -> frozenset[str]:
        return self.proto.features

    def next_rid(self) -> int:
        self._rid += 1
        return self._rid

    def fail(self, what: str) -> None:
        try:
            port = self.stream.socket.getsockname()[1]
        except OSError:
            port = "?"
        self.fz.fail(f"[{self.kind} :{port}] {what}")

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def reader(self) -> None:
        try:
            while True:
                data = await self.stream.receive_some(RECV_SIZE)
                if self.validate:
                    self._check(data)
                if not data:
                    break
                self.fz.report.bytes_received += len(data)
                self.raw.feed(data)
                while True:
                    try:
                        m = self.raw.next_message()
                    except casproto.LocalProtocolError as exc:
                        self.fail(f"the server sent a frame that does not decode: {exc}")
                        return
                    if m is None:
                        break
                    self._on_message(m)
                self._notify()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.reset = True
        finally:
            if self.raw.buffered and not self.reset:
                self.fail(f"the server closed inside a frame ({self.raw.buffered} bytes)")
            self.closed.set()
            self._notify()

    def _check(self, data: bytes) -> None:
        # Our own client-side state machine: the server must never break the protocol.
        try:
            self.proto.receive_data(data)
            while self.proto.next_event() not in (casproto.NEED_DATA, casproto.CLOSED):
                pass
        except casproto.RemoteProtocolError as exc:
            self.fail(f"the server broke the protocol: {exc}")
            self.validate = False

    def _on_message(self, m: casproto.Message) -> None:
        rep = self.fz.report
        rep.replies += 1
        if isinstance(m, casproto.Error):
            rep.error_frames += 1
            rep.error_codes[m.code.name] += 1
            if m.rid == 0:
                rep.fatal_errors += 1
                if self.fatal is None:
                    self.fatal = m
        elif self.fatal is not None:
            self.fail(f"the server sent {type(m).__name__} after its fatal ERROR")
        self.by_rid[m.rid].append(m)

    # -- writing --

    async def send(self, data: bytes, frames: int = 1) -> bool:
        if self.write_broken:
            return False
        try:
            with trio.fail_after(self.fz.hang_s):
                await self.stream.send_all(data)
        except trio.TooSlowError:
            self.fail(f"a {len(data)}-byte write blocked for {self.fz.hang_s} s")
            self.write_broken = True
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.write_broken = True
            return False
        self.frames += frames
        self.fz.report.frames_sent += frames
        return True

    async def send_msg(self, m: casproto.Message) -> bool:
        """Send a frame our state machine allows (it raises if we got that wrong)."""
        self.last_sent = m
        frame = self.proto.send(m)
        if isinstance(m, OPENERS):
            self.opened[m.rid] = type(m).__name__
        return await self.send(frame)

    async def send_raw(self, m: casproto.Message) -> bool:
        """Send a frame without telling our state machine (the server ignores or rejects it)."""
        return await self.send(casproto.encode_message(m))

    async def send_follow_up(self, m: casproto.Message) -> bool:
        """A push frame: legal while its request is open, a straggler the server ignores after."""
        if m.rid in self.proto.open_requests:
            return await self.send_msg(m)
        return await self.send_raw(m)

    # -- waiting --

    async def wait_for(self, pred: Callable[[], bool], what: str) -> bool:
        """Until pred() holds: False if the connection closed first; a failure on timeout."""
        with trio.move_on_after(self.fz.hang_s):
            while True:
                ev = self.changed
                if pred():
                    return True
                if self.closed.is_set():
                    return False
                await ev.wait()
        self.fail(f"no {what} within {self.fz.hang_s} s on an open connection")
        return False

    def ended(self, rid: int) -> bool:
        return rid not in self.proto.open_requests

    def last(self, rid: int) -> casproto.Message | None:
        got = self.by_rid.get(rid)
        return got[-1] if got else None

    async def handshake(self, features: tuple[str, ...] | None = None) -> bool:
        if features is None:
            r = self.fz.rng
            features = tuple(f for f in (*FEATURES, "bogus") if r.random() < 0.7)
        if not await self.send_msg(casproto.Hello(0, 1, features, None, AGENT)):
            return False
        if not await self.wait_for(lambda: bool(self.by_rid[0]), "WELCOME"):
            return False
        if not isinstance(self.by_rid[0][0], casproto.Welcome):
            self.fail(f"HELLO answered by {self.by_rid[0][0]!r}")
            return False
        return True

    # -- ending --

    async def finish_clean(self) -> None:
        """Every frame we sent was legal: a probe must be answered, every request must end,
        and the server must not have closed on us."""
        rid = self.next_rid()
        if not self.closed.is_set() and await self.send_msg(casproto.Stats(rid)):
            answered = await self.wait_for(lambda: self.ended(rid), "answer to a STATS probe")
            if answered and not isinstance(self.last(rid), casproto.StatsResult):
                self.fail(f"STATS probe answered by {self.last(rid)!r}")
            if not await self.wait_for(lambda: not self.proto.open_requests, "end of requests"):
                left = {k: self.opened.get(k, "?") for k in self.proto.open_requests}
                self.fail(f"requests still open: {dict(list(left.items())[:8])}")
        if self.closed.is_set():
            self.fail(f"the server closed a legal conversation (fatal: {self.fatal!r})")
            return
        await self.eof_and_expect_close()

    async def eof_and_expect_close(self) -> None:
        if self.closed.is_set():
            return
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.stream.send_eof()
        self.eof_sent = True
        with trio.move_on_after(self.fz.hang_s):
            await self.closed.wait()
            return
        self.fail(f"the server did not close within {self.fz.hang_s} s of our EOF")

    async def expect_fatal(self, codes: set[ErrorCode] | None) -> None:
        """We broke the protocol: the server must say ERROR(0, code) and close by itself."""
        with trio.move_on_after(self.fz.hang_s):
            await self.closed.wait()
        if not self.closed.is_set():
            self.fail(f"the server did not close within {self.fz.hang_s} s of a violation")
            return
        if codes is None or self.reset:
            return  # a reset may eat the ERROR frame; nothing to check then
        if self.fatal is None:
            self.fail("the server closed after a violation without ERROR(0)")
        elif self.fatal.code not in codes:
            self.fail(
                f"violation answered by {self.fatal.code.name} ({self.fatal.message}), "
                f"expected {sorted(c.name for c in codes)}"
            )


# --- the scenarios ----------------------------------------------------------------------

Scenario = Callable[["Fuzzer", Conn], Awaitable[None]]
U, M, T, INV = ErrorCode.UNEXPECTED, ErrorCode.MALFORMED, ErrorCode.TOO_LARGE, ErrorCode.INVALID


async def send_requests(fz: Fuzzer, c: Conn, n: int) -> bool:
    """n legal requests; a PUSH_BEGIN among them is cancelled at once."""
    for _ in range(n):
        rid = c.next_rid()
        m = fz.corpus.request(rid, c.features)
        if not await c.send_msg(m):
            return False
        if isinstance(m, casproto.PushBegin) and rid in c.proto.open_requests:
            c.cancelled.add(rid)
            if not await c.send_msg(casproto.Cancel(rid)):
                return False
    return True


async def s_requests(fz: Fuzzer, c: Conn) -> None:
    """Legal requests, many at once, most for things that do not exist; some cancelled;
    CANCELs of requests that ended (ignored)."""
    if not await c.handshake():
        return
    r = fz.rng
    for _ in range(fz.plan(10, 400)):
        rid = c.next_rid()
        m = fz.corpus.request(rid, c.features)
        if not await c.send_msg(m):
            break
        if rid in c.proto.open_requests and (
            isinstance(m, casproto.PushBegin)
            or (isinstance(m, (casproto.Want, casproto.WantDelta)) and r.random() < 0.3)
        ):
            if not await c.send_msg(casproto.Cancel(rid)):
                break
            c.cancelled.add(rid)
        x = r.random()
        if x < 0.05:  # cancel something that may still be running
            live = [k for k in c.proto.open_requests if k not in c.cancelled]
            if live:
                k = r.choice(live)
                c.cancelled.add(k)
                if not await c.send_msg(casproto.Cancel(k)):
                    break
        elif x < 0.08:  # cancel what already ended, or never was: ignored
            k = r.choice([r.randint(1, rid), NEVER_OPENED + r.randrange(1000)])
            if c.ended(k) and not await c.send_raw(casproto.Cancel(k)):
                break
    await c.finish_clean()


async def s_garbage(fz: Fuzzer, c: Conn) -> None:
    """Random bytes, mutated, spliced and wrongly typed frames, mixed with legal ones."""
    r = fz.rng
    corpus = fz.corpus
    if r.random() < 0.9 and not await c.handshake():
        return
    c.validate = False
    for _ in range(fz.plan(1, 120)):
        x = r.random()
        rid = r.randint(1, 64)
        if x < 0.2:
            data = corpus.random_bytes()
        elif x < 0.6:
            data = corpus.mutate(casproto.encode_message(corpus.any_message(rid)))
        elif x < 0.75:
            data = corpus.wrong_types(corpus.any_message(rid))
        elif x < 0.8:
            a = casproto.encode_message(corpus.any_message(rid))
            data = corpus.splice(a, casproto.encode_message(corpus.any_message(rid)))
        else:
            data = casproto.encode_message(corpus.request(c.next_rid(), frozenset(FEATURES)))
        if not await c.send(data) or c.closed.is_set():
            break
    await c.eof_and_expect_close()


async def s_idle(fz: Fuzzer, c: Conn) -> None:
    """A few bytes of HELLO or nothing, a pause, then we simply close."""
    r = fz.rng
    c.validate = False
    hello = casproto.encode_message(casproto.Hello(0, 1, FEATURES, None, AGENT))
    if r.random() < 0.7:
        await c.send(hello[: r.randint(1, len(hello) - 1)], frames=1)
    await trio.sleep(r.random() * 0.3)


def _violation(
    setup: Callable[[Fuzzer, Conn], Awaitable[bool]] | None,
    make: Callable[[Fuzzer, Conn], bytes],
    codes: set[ErrorCode] | None,
    *,
    hello: bool = True,
    prefix: bool = True,
) -> Scenario:
    """A legal prefix, one frame that breaks the protocol, then the server must close."""

    async def scenario(fz: Fuzzer, c: Conn) -> None:
        if hello and not await c.handshake(FEATURES if setup is not None else None):
            return
        if hello and prefix and not await send_requests(fz, c, fz.plan(0, 20)):
            return
        if setup is not None and not await setup(fz, c):
            return
        data = make(fz, c)
        if not await c.send(data):
            return
        if fz.rng.random() < 0.3:  # trailing junk the server must ignore
            await c.send(fz.corpus.random_bytes())
        await c.expect_fatal(codes)

    return scenario


def _raw(m: casproto.Message) -> bytes:
    return casproto.encode_message(m)


async def _open_push(fz: Fuzzer, c: Conn) -> bool:
    c.push_rid = c.next_rid()
    return await c.send_msg(casproto.PushBegin(c.push_rid, None))


async def _push_with_fresh_recipe(fz: Fuzzer, c: Conn) -> bool:
    if not await _open_push(fz, c):
        return False
    ids = tuple(fz.rng.randbytes(32) for _ in range(3))
    c.push_ids = ids
    rid = c.push_rid
    return await c.send_msg(casproto.PushRecipe(rid, ids, (10, 20, 30)))


async def _push_wanting(fz: Fuzzer, c: Conn) -> bool:
    if not await _push_with_fresh_recipe(fz, c):
        return False
    rid = c.push_rid
    return await c.wait_for(
        lambda: any(isinstance(m, casproto.PushWant) for m in c.by_rid[rid]), "PUSH_WANT"
    )


def _before_hello(fz: Fuzzer, c: Conn) -> bytes:
    m = fz.corpus.any_message(fz.rng.randint(1, 9))
    while isinstance(m, casproto.Hello) or (isinstance(m, casproto.Error) and m.rid == 0):
        m = fz.corpus.request(1, frozenset())
    return _raw(m)


def _server_message(fz: Fuzzer, c: Conn) -> bytes:
    r = fz.rng
    while True:
        m = fz.corpus.any_message(c.next_rid())
        if isinstance(
            m,
            (
                casproto.Welcome,
                casproto.Have,
                casproto.BlobInfo,
                casproto.Names,
                casproto.Ok,
                casproto.StatsResult,
                casproto.PushWant,
                casproto.PushDone,
                casproto.Recipe,
                casproto.SyncProgress,
                casproto.SyncDone,
                casproto.FsckDone,
                casproto.ChunkPack,
            ),
        ) or (isinstance(m, casproto.Error) and m.rid != 0 and r.random() < 0.5):
            return _raw(m)


def _wrong_field(fz: Fuzzer, c: Conn) -> bytes:
    rid = c.next_rid()
    return _frame(
        _pack(
            fz.rng.choice(
                [
                    [10, rid, "not a list"],
                    [10, rid, [b"short"]],
                    [12, rid, 5],
                    [14, rid, None],
                    [16, rid, "name", b"digest"],
                    [42, rid, [b"\0" * 32, 7]],
                    [40, -1, "x"],
                    [19, "rid"],
                    [19, 1.5],
                    [60, rid, 1, None, None],
                    [30, rid, 5],
                    [31, rid, [b"\0" * 32], [-1]],
                    [31, rid, [b"\0" * 32], [1.0]],
                ]
            )
        )
    )


VIOLATIONS: dict[str, tuple[Scenario, float]] = {
    "v-before-hello": (_violation(None, _before_hello, {U}, hello=False), 3),
    "v-error0-first": (
        _violation(
            None, lambda fz, c: _raw(casproto.Error(0, ErrorCode.BUSY, "bye")), None, hello=False
        ),
        1,
    ),
    "v-bad-version": (
        _violation(
            None,
            lambda fz, c: _raw(casproto.Hello(0, fz.rng.choice([0, 2, 9]), (), None, AGENT)),
            {ErrorCode.UNSUPPORTED_VERSION},
            hello=False,
        ),
        1,
    ),
    "v-hello-rid": (
        _violation(
            None, lambda fz, c: _raw(casproto.Hello(7, 1, (), None, AGENT)), {U}, hello=False
        ),
        1,
    ),
    "v-hello-twice": (
        _violation(None, lambda fz, c: _raw(casproto.Hello(0, 1, (), None, AGENT)), {U}),
        1,
    ),
    "v-rid0-request": (
        _violation(None, lambda fz, c: _raw(fz.corpus.request(0, frozenset())), {U}),
        1,
    ),
    "v-server-message": (_violation(None, _server_message, {U}), 2),
    "v-client-error-rid": (
        _violation(
            None, lambda fz, c: _raw(casproto.Error(c.next_rid(), ErrorCode.INTERNAL, "x")), {U}
        ),
        1,
    ),
    "v-chunk-unwanted": (
        _violation(
            _open_push,
            lambda fz, c: _raw(
                casproto.Chunk(c.push_rid, fz.rng.randbytes(32), casproto.Codec.RAW, b"abc")
            ),
            {U},
        ),
        2,
    ),
    "v-chunk-not-next": (
        _violation(
            _push_wanting,
            lambda fz, c: _raw(
                casproto.Chunk(c.push_rid, c.push_ids[1], casproto.Codec.RAW, b"x" * 20)
            ),
            {U},
        ),
        2,
    ),
    "v-chunk-prefix-codec": (
        _violation(
            _push_wanting,
            lambda fz, c: _raw(
                casproto.Chunk(c.push_rid, c.push_ids[0], casproto.Codec.ZSTD_PREFIX, b"x")
            ),
            {U},
        ),
        1,
    ),
    "v-push-end-early": (
        _violation(
            _push_with_fresh_recipe,
            lambda fz, c: _raw(casproto.PushEnd(c.push_rid, 60, fz.corpus.digest())),
            {U},
        ),
        2,
    ),
    "v-rid-reuse": (
        _violation(_open_push, lambda fz, c: _raw(casproto.PushBegin(c.push_rid, None)), {U}),
        2,
    ),
    "v-after-cancel": (
        _violation(
            _open_push,
            lambda fz, c: (
                _raw(casproto.Cancel(c.push_rid))
                + _raw(casproto.PushRecipe(c.push_rid, (b"\1" * 32,), (5,)))
            ),
            {U},
        ),
        1,
    ),
    "v-follow-up-unopened": (
        _violation(
            None,
            lambda fz, c: _raw(
                fz.rng.choice(
                    [
                        casproto.Chunk(NEVER_OPENED, b"\0" * 32, casproto.Codec.RAW, b""),
                        casproto.PushRecipe(NEVER_OPENED, (b"\0" * 32,), (1,)),
                        casproto.PushEnd(NEVER_OPENED, 0, EMPTY_DIGEST),
                    ]
                )
            ),
            {U},
        ),
        2,
    ),
    "v-huge-length": (
        _violation(
            None,
            lambda fz, c: (
                struct.pack(">I", fz.rng.choice([MAX_FRAME + 1, (1 << 32) - 1]))
                + fz.rng.randbytes(10)
            ),
            {T},
        ),
        2,
    ),
    "v-zero-length": (_violation(None, lambda fz, c: b"\0\0\0\0abc", {M}), 1),
    "v-not-msgpack": (_violation(None, lambda fz, c: _frame(b"\xc1\xc1\xc1"), {M}), 1),
    "v-unknown-type": (
        _violation(None, lambda fz, c: _frame(_pack([fz.rng.choice([0, 4, 99, 255]), 1])), {M}),
        1,
    ),
    "v-missing-fields": (
        _violation(
            None, lambda fz, c: _frame(_pack([fz.rng.choice([10, 12, 16, 31, 42]), 5])), {M}
        ),
        1,
    ),
    "v-wrong-field-type": (_violation(None, _wrong_field, {M}), 3),
    "v-batch-too-large": (
        _violation(
            None,
            lambda fz, c: _frame(
                _pack([10, c.next_rid(), [b"\0" * 32] * (casproto.MAX_BATCH + 1)])
            ),
            {T},
        ),
        1,
    ),
    "v-sizes-mismatch": (
        _violation(
            None, lambda fz, c: _frame(_pack([31, c.next_rid(), [b"\0" * 32] * 2, [1]])), {INV}
        ),
        1,
    ),
    "v-empty-want": (
        _violation(None, lambda fz, c: _frame(_pack([42, c.next_rid(), []])), {INV}),
        1,
    ),
    "v-unknown-codec": (
        _violation(
            _open_push,
            lambda fz, c: _frame(_pack([33, c.push_rid, b"\0" * 32, 7, b"x"])),
            {INV},
        ),
        1,
    ),
}


async def _want_delta_unnegotiated(fz: Fuzzer, c: Conn) -> None:
    if not await c.handshake(("zstd",)):
        return
    if not await c.send_raw(casproto.WantDelta(c.next_rid(), (b"\0" * 32,), ((),))):
        return
    await c.expect_fatal({U})


VIOLATIONS["v-want-delta-unnegotiated"] = (_want_delta_unnegotiated, 1)


async def s_eof_inside_frame(fz: Fuzzer, c: Conn) -> None:
    """The stream ends mid-frame: MALFORMED, before or after the handshake."""
    if fz.rng.random() < 0.7 and not await c.handshake():
        return
    frame = casproto.encode_message(fz.corpus.any_message(1))
    if not await c.send(frame[: fz.rng.randint(1, len(frame) - 1)]):
        return
    await c.eof_and_expect_close()
    if not c.reset and (c.fatal is None or c.fatal.code != ErrorCode.MALFORMED):
        c.fail(f"a stream cut inside a frame got {c.fatal!r}, expected ERROR(0, MALFORMED)")


# -- pushes that lie --

PUSH_EXPECT: dict[str, set[ErrorCode] | None] = {
    "valid": None,  # PUSH_DONE
    "empty": None,
    "dup-ids": None,
    "lying-digest": {ErrorCode.DIGEST_MISMATCH},
    "lying-size": {ErrorCode.DIGEST_MISMATCH},
    "corrupt-data": {ErrorCode.CHUNK_CORRUPT},
    "wrong-length": {ErrorCode.CHUNK_CORRUPT},
    "zstd-garbage": {ErrorCode.CHUNK_CORRUPT},
    "zstd-other-data": {ErrorCode.CHUNK_CORRUPT},
    "zstd-size-lie": {ErrorCode.CHUNK_CORRUPT},
    "zstd-no-size": {ErrorCode.CHUNK_CORRUPT},
    "zstd-huge-window": {ErrorCode.CHUNK_CORRUPT, ErrorCode.INVALID},
    "zstd-bomb": {ErrorCode.CHUNK_CORRUPT, ErrorCode.INVALID},
    "held-size-lie": {ErrorCode.INVALID, ErrorCode.DIGEST_MISMATCH},
    "stragglers": {ErrorCode.CHUNK_CORRUPT},
    "cancel-midway": {ErrorCode.CANCELLED},
    "invalid-name": {ErrorCode.INVALID},
}


def _push(variant: str) -> Scenario:
    async def scenario(fz: Fuzzer, c: Conn) -> None:
        await _push_scenario(fz, c, variant)

    return scenario


async def _push_scenario(fz: Fuzzer, c: Conn, variant: str) -> None:
    r = fz.rng
    corpus = fz.corpus
    if not await c.handshake(FEATURES):
        return
    if not await send_requests(fz, c, fz.plan(0, 5)):
        return
    if variant == "empty":
        chunks: list[bytes] = []
    elif variant == "stragglers":
        chunks = [r.randbytes(200_000) for _ in range(48)]  # > FLUSH_BYTES: stored mid-push
    else:
        chunks = [r.randbytes(r.randint(1, 20_000)) for _ in range(r.randint(1, 6))]
    if variant == "dup-ids" and chunks:
        chunks = chunks + chunks[:1] + chunks
    ids = [chunk_id(x) for x in chunks]
    sizes = [len(x) for x in chunks]
    blob = b"".join(chunks)
    if variant in ("valid", "held-size-lie") and corpus.ids:  # dedup against held chunks
        held = r.choice(corpus.ids)
        at = r.randint(0, len(ids))
        ids.insert(at, held)
        lie = variant == "held-size-lie"
        sizes.insert(at, corpus.sizes[held] + (r.choice([-1, 1, 1000]) if lie else 0))
        chunks.insert(at, corpus.data[held])  # held, so never sent: the bytes stay aligned
        blob = b"" if lie else b"".join(chunks)  # a lying size: the digest does not matter
    bomb = 0
    if variant == "zstd-bomb":
        bomb = r.choice([64 << 20, 256 << 20, 1 << 30])
        ids.append(r.randbytes(32))
        sizes.append(bomb)
    size = sum(sizes)
    digest = _sha(blob) if blob or variant == "empty" else corpus.digest()
    name = f"fuzz-push-{r.randrange(1 << 24):x}" if r.random() < 0.5 else None
    if variant == "invalid-name":
        name = r.choice(["bad\tname", "sha256:" + "0" * 64, "x" * 300])
    rid = c.next_rid()
    if not await c.send_msg(casproto.PushBegin(rid, name)):
        return
    cut = r.randint(1, len(ids)) if ids else 0
    batches = [b for b in ((0, cut), (cut, len(ids))) if b[0] < b[1]]
    for lo, hi in batches:
        if not await c.send_follow_up(
            casproto.PushRecipe(rid, tuple(ids[lo:hi]), tuple(sizes[lo:hi]))
        ):
            return

    def wants() -> list[casproto.Message]:
        return [m for m in c.by_rid[rid] if isinstance(m, casproto.PushWant)]

    if not await c.wait_for(lambda: len(wants()) == len(batches) or c.ended(rid), "PUSH_WANT"):
        return
    wanted: list[int] = []
    for (lo, hi), w in zip(batches, wants(), strict=False):
        bits = casproto.unpack_bitmap(w.bitmap, hi - lo)
        wanted += [lo + i for i, b in enumerate(bits) if b]
    victim = r.choice(wanted) if wanted else -1
    if variant == "stragglers" and wanted:
        victim = wanted[0]
    for n, i in enumerate(wanted):
        if variant == "cancel-midway" and n == len(wanted) // 2:
            break
        codec, payload = casproto.Codec.RAW, chunks[i] if i < len(chunks) else b""
        if r.random() < 0.5 and "zstd" in c.features:
            codec, payload = casproto.Codec.ZSTD, zstd.compress(payload, 1)
        if (i == victim and variant in DAMAGING) or (bomb and i == len(ids) - 1):
            codec, payload = _damage(fz, variant, sizes[i], bomb)
        if not await c.send_follow_up(casproto.Chunk(rid, ids[i], codec, payload)):
            return
    if variant == "cancel-midway":
        if rid in c.proto.open_requests and not await c.send_msg(casproto.Cancel(rid)):
            return
    else:
        if variant == "lying-digest":
            digest = format_digest(r.randbytes(32))
        elif variant == "lying-size":
            size += r.choice([-1, 1, 1 << 40])
        if not await c.send_follow_up(casproto.PushEnd(rid, max(0, size), digest)):
            return
    if not await c.wait_for(lambda: c.ended(rid), "end of the push"):
        return
    end = c.last(rid)
    expect = PUSH_EXPECT[variant]
    if expect is None:
        if not isinstance(end, casproto.PushDone) or end.digest != digest or end.size != size:
            c.fail(f"push {variant} ended with {end!r}")
        elif name:
            corpus.names.append(name)
            corpus.digests.append(digest)
    elif variant == "cancel-midway" and isinstance(end, casproto.Error):
        pass  # CANCELLED, or the push failed first on a chunk the dedup skipped: both end it
    elif not isinstance(end, casproto.Error) or end.code not in expect:
        c.fail(f"push {variant} ended with {end!r}, expected {sorted(e.name for e in expect)}")
    await c.finish_clean()


DAMAGING = {v for v, codes in PUSH_EXPECT.items() if codes and ErrorCode.CHUNK_CORRUPT in codes}


def _damage(fz: Fuzzer, variant: str, size: int, bomb: int) -> tuple[casproto.Codec, bytes]:
    """The chunk payload a lying push sends for its victim entry."""
    r = fz.rng
    raw = casproto.Codec.RAW
    z = casproto.Codec.ZSTD
    if variant == "zstd-bomb":
        return z, zstd_rle_frame(bomb, bomb)
    if variant in ("corrupt-data", "stragglers"):
        return raw, bytes(size) if size else b"\0"
    if variant == "wrong-length":
        return raw, r.randbytes(size + r.choice([-1, 1, 100])) if size else b"x"
    if variant == "zstd-garbage":
        return z, r.choice([b"", r.randbytes(50), b"\x28\xb5\x2f\xfd" + r.randbytes(40)])
    if variant == "zstd-other-data":
        return z, zstd.compress(r.randbytes(size), 1)
    if variant == "zstd-size-lie":
        return z, zstd_rle_frame(size + r.choice([1, 1000]), size + 1)
    if variant == "zstd-no-size":
        return z, zstd_rle_frame(None, size)
    assert variant == "zstd-huge-window", variant
    return z, zstd_rle_frame(1 << 30, 1 << 20, single_segment=True)


# -- WANTs cancelled while their chunks are being written --


async def s_want_cancel(fz: Fuzzer, c: Conn) -> None:
    r = fz.rng
    if not await c.handshake() or not fz.corpus.ids:
        return
    for _ in range(fz.plan(1, 12)):
        rid = c.next_rid()
        ids = tuple(r.choice(fz.corpus.ids) for _ in range(r.randint(1, 40)))
        if not await c.send_msg(casproto.Want(rid, ids)):
            return
        if r.random() < 0.5:
            await c.wait_for(lambda rid=rid: bool(c.by_rid[rid]), "first CHUNK")
        if rid in c.proto.open_requests and not await c.send_msg(casproto.Cancel(rid)):
            return
    await c.finish_clean()


async def s_reuse_rids(fz: Fuzzer, c: Conn) -> None:
    """Every request reuses rid 1, sent the moment the one before ended (legal, SPEC §7)."""
    r = fz.rng
    if not await c.handshake(FEATURES):
        return
    for _ in range(fz.plan(2, 40)):
        x = r.random()
        if x < 0.5:
            data = r.randbytes(r.randint(1, 3000)) if x < 0.3 else b""
            frames: list[casproto.Message] = [casproto.PushBegin(1, None)]
            if data:
                frames.append(casproto.PushRecipe(1, (chunk_id(data),), (len(data),)))
            for m in frames:
                if not await c.send_msg(m):
                    return
            if data:
                got = await c.wait_for(lambda: bool(c.by_rid[1]), "PUSH_WANT")
                if not got or not isinstance(c.by_rid[1][-1], casproto.PushWant):
                    break
                if casproto.unpack_bitmap(c.by_rid[1][-1].bitmap, 1)[0] and not await c.send_msg(
                    casproto.Chunk(1, chunk_id(data), casproto.Codec.RAW, data)
                ):
                    return
            if not await c.send_msg(casproto.PushEnd(1, len(data), _sha(data))):
                return
            expect: type = casproto.PushDone
        else:
            if not await c.send_msg(r.choice([casproto.Stats(1), casproto.ListNames(1, "good")])):
                return
            expect = (
                casproto.StatsResult if isinstance(c.last_sent, casproto.Stats) else casproto.Names
            )
        if not await c.wait_for(lambda: c.ended(1), "end of a request on a reused rid"):
            return
        if not isinstance(c.last(1), expect):
            c.fail(f"a request on a reused rid ended with {c.last(1)!r}")
        c.by_rid[1].clear()
    await c.finish_clean()


# --- the run ------------------------------------------------------------------------------


# Every scenario with its weight in the random mix; each also runs once at the start.
_PUSH_WEIGHT = {"valid": 8.0, "zstd-bomb": 0.2, "stragglers": 0.3}
SCENARIOS: dict[str, tuple[Scenario, float]] = {
    "requests": (s_requests, 30),
    "garbage": (s_garbage, 30),
    "idle": (s_idle, 1),
    "eof-inside-frame": (s_eof_inside_frame, 2),
    "want-cancel": (s_want_cancel, 4),
    "reuse-rids": (s_reuse_rids, 3),
    **{f"push-{v}": (_push(v), _PUSH_WEIGHT.get(v, 1.0)) for v in PUSH_EXPECT},
    **VIOLATIONS,
}


class Fuzzer:
    def __init__(self, daemon: Daemon, frames: int, seed: int, connections: int, hang_s: float):
        self.daemon = daemon
        self.target = frames
        self.rng = random.Random(seed)
        self.seed = seed
        self.workers = connections
        self.hang_s = hang_s
        self.report = Report()
        self.corpus = Corpus(self.rng)
        self.corpus.address = daemon.address
        host, port = daemon.address.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.done = trio.Event()
        self.scenarios = SCENARIOS
        self.tour = collections.deque(self.scenarios)  # every scenario once, first

    def fail(self, what: str) -> None:
        self.report.failures_total += 1
        if len(self.report.failures) < 200:
            self.report.failures.append(what)

    def plan(self, lo: int, hi: int) -> int:
        left = self.target - self.report.frames_sent
        return max(0, min(left, self.rng.randint(lo, hi)))

    def pick(self) -> str:
        if self.tour:
            return self.tour.popleft()
        names = list(self.scenarios)
        return self.rng.choices(names, [self.scenarios[n][1] for n in names])[0]

    async def worker(self) -> None:
        while self.report.frames_sent < self.target and not self.done.is_set():
            kind = self.pick()
            try:
                with trio.fail_after(10):
                    stream = await trio.open_tcp_stream(self.host, self.port)
            except (OSError, trio.TooSlowError) as exc:
                self.fail(f"cannot connect to the daemon: {exc!r}")
                self.done.set()
                return
            self.report.connections += 1
            self.report.sessions[kind] += 1
            c = Conn(self, stream, kind)
            t0 = time.monotonic()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(c.reader)
                    with trio.fail_after(self.hang_s * 4):
                        await self.scenarios[kind][0](self, c)
                    nursery.cancel_scope.cancel()
            except trio.TooSlowError:
                c.fail(f"scenario took more than {self.hang_s * 4} s")
            except Exception as exc:  # a bug in the fuzzer itself: report it, go on
                c.fail(f"fuzzer error: {traceback.format_exc(limit=-3)}")
                del exc
            finally:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
                self.report.session_s[kind] += time.monotonic() - t0
            if c.closed.is_set():
                if c.eof_sent:
                    self.report.closes_after_eof += 1
                else:
                    self.report.server_closes += 1
                self.report.resets += c.reset

    async def seed_store(self) -> None:
        """A few blobs with real chunks, so requests also hit things that exist."""
        r = random.Random(self.seed + 7)
        async with open_client(self.daemon.address) as client:
            chunker = Chunker(client.chunker_params or DEFAULT_PARAMS)
            for k, n in enumerate((1 << 20, 200_000, 5_000, 1)):
                data = r.randbytes(n)
                views = list(chunker.cut(data))
                await client.push(iter(views), name=f"fuzz-seed-{k}")
                self.corpus.learn(f"fuzz-seed-{k}", data, views)

    async def good_client(self) -> None:
        """Put, get and stat a few-MB blob over and over; every operation must succeed."""
        r = random.Random(self.seed + 1)
        base = bytearray(r.randbytes(4 << 20))
        rep = self.report
        rounds = 0
        while not self.done.is_set() or rounds == 0:
            try:
                async with open_client(self.daemon.address) as client:
                    chunker = Chunker(client.chunker_params or DEFAULT_PARAMS)
                    for _ in range(5):
                        at = r.randrange(len(base) - 65536)
                        base[at : at + 65536] = r.randbytes(65536)
                        data = bytes(base)
                        views = await trio.to_thread.run_sync(lambda: list(chunker.cut(data)))  # noqa: B023
                        digest = _sha(data)
                        t = time.monotonic()
                        with trio.fail_after(self.hang_s):
                            put = await client.push(iter(views), name=f"good-{rounds % 3}")
                        self._good_op(t)
                        if put.digest != digest or put.size != len(data):
                            self.fail(f"good client: push returned {put}")
                        t = time.monotonic()
                        buf = io.BytesIO()
                        with trio.fail_after(self.hang_s):
                            await client.pull(digest, buf)
                        self._good_op(t)
                        if buf.getvalue() != data:
                            self.fail("good client: pulled bytes differ from pushed bytes")
                        t = time.monotonic()
                        with trio.fail_after(self.hang_s):
                            info = await client.stat(digest)
                        self._good_op(t)
                        if info.size != len(data) or info.digest != digest:
                            self.fail(f"good client: stat returned {info}")
                        rounds += 1
                        rep.good_iterations = rounds
                        if self.done.is_set():
                            break
            except Exception as exc:
                self.fail(f"good client: {type(exc).__name__}: {exc}")
                await trio.sleep(0.5)

    def _good_op(self, started: float) -> None:
        self.report.good_ops += 1
        self.report.good_max_op_s = max(self.report.good_max_op_s, time.monotonic() - started)

    async def idle(self, started: trio.Event) -> None:
        """Connections that never say HELLO: the daemon's HELLO timeout must drop them."""
        streams = []
        for _ in range(2):
            streams.append(await trio.open_tcp_stream(self.host, self.port))
        self.report.idle_connections = len(streams)
        started.set()
        closed = 0
        try:
            await self.done.wait()
            for s in streams:
                with trio.move_on_after(0.01):
                    try:
                        if await s.receive_some(1) == b"":
                            closed += 1
                    except trio.BrokenResourceError:
                        closed += 1
        finally:
            for s in streams:
                await s.aclose()
        self.report.idle_closed_by_hello_timeout = closed

    async def main(self) -> None:
        await self.seed_store()
        async with trio.open_nursery() as nursery:
            started = trio.Event()
            nursery.start_soon(self.idle, started)
            await started.wait()
            nursery.start_soon(self.good_client)
            async with trio.open_nursery() as fuzzers:
                for _ in range(self.workers):
                    fuzzers.start_soon(self.worker)
            self.done.set()


def _proc_status(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run(
    frames: int = 100_000,
    *,
    seed: int = 1,
    connections: int = 8,
    hang_s: float = 30.0,
    rss_limit_mb: int = 1024,
    workdir: Path | None = None,
) -> Report:
    """Start a daemon in `workdir` (a temporary directory if None), fuzz it, check it."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="casd-fuzz-")))
        daemon = Daemon(workdir / "data", workdir / "casd.log")
        daemon.start()
        stack.callback(daemon.kill)
        assert daemon.proc is not None
        pid = daemon.proc.pid
        fz = Fuzzer(daemon, frames, seed, connections, hang_s)
        t0 = time.monotonic()
        trio.run(fz.main)
        rep = fz.report
        rep.elapsed_s = time.monotonic() - t0
        rep.rss_max_kb = _proc_status(pid, "VmHWM")
        rep.daemon_alive = daemon.proc.poll() is None
        if rep.daemon_alive:
            stats = casctl(daemon, "stats", "--json", timeout=60)
            rep.stats_ok = stats.code == 0 and "requests" in stats.json
            if not rep.stats_ok:
                fz.fail(f"casctl stats failed ({stats.code}): {stats.err}")
            fsck = casctl(daemon, "fsck", "--deep", timeout=300)
            rep.fsck_ok = fsck.code == 0
            if not rep.fsck_ok:
                fz.fail(f"casctl fsck --deep failed ({fsck.code}): {fsck.out!r} {fsck.err}")
            rep.daemon_exit = daemon.stop()
        if rep.rss_max_kb > rss_limit_mb * 1024:
            fz.fail(f"daemon peak RSS {rep.rss_max_kb // 1024} MiB exceeds {rss_limit_mb} MiB")
        if rep.idle_closed_by_hello_timeout < rep.idle_connections and rep.elapsed_s > 40:
            fz.fail("a connection that never said HELLO outlived the HELLO timeout")
        text = daemon.log.read_text(errors="replace")
        rep.log_problems = [
            line for line in text.splitlines() if "crashed" in line or "Traceback" in line
        ]
        return rep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=100_000, help="frames to send in all")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--connections", type=int, default=8, help="concurrent fuzzing connections")
    p.add_argument("--hang-timeout", type=float, default=30.0, help="seconds that count as a hang")
    p.add_argument("--rss-limit-mb", type=int, default=1024, help="daemon peak RSS allowed")
    p.add_argument("--workdir", type=Path, help="keep the store and log here")
    args = p.parse_args(argv)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    rep = run(
        args.frames,
        seed=args.seed,
        connections=args.connections,
        hang_s=args.hang_timeout,
        rss_limit_mb=args.rss_limit_mb,
        workdir=args.workdir,
    )
    print(rep.summary())
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
