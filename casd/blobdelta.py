"""Whole-blob deltas: one blob encoded with zstd against another as its prefix (issue #7).

Chunk deltas (SPEC §4.3) encode each missing chunk against a few old chunks, and every
chunk still costs its id in the recipe and in the WANT. For a new version of a layer
whose files all changed a little (every tar header carries a new mtime), that leaves
most of the cost in ids. A whole-blob delta is what ``zstd --long --patch-from`` does:
the new blob is compressed in one stream, the old one as its prefix, with long-distance
matching, so a match may reach anywhere in the old version. The receiver decodes it
against the same old blob from its own store, cuts what comes out into its own chunks and
checks the digest, so nothing depends on the sender's recipe.

The source streams the delta (operation ``blob.delta``, its pieces as CALL_DATA frames,
:class:`Encoder`) and the receiver rebuilds the target as they arrive (:func:`rebuild`):
encoding, transfer and decoding overlap. The prefix is held whole in memory at both
ends, hence ``MAX_BASE``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from casd.auth import Scope
from casd.errors import DigestMismatch, UserError
from casd.oci.layers import BlobWriter, IterReader, iter_blob
from casd.server import ops
from casd.storage.interface import Store
from casd.zstd import (
    CompressionParameter,
    DecompressionParameter,
    ZstdCompressor,
    ZstdDecompressor,
    ZstdDict,
    ZstdError,
)

#: zstd level of a whole-blob delta: 3, with long-distance matching, as the issue measured.
LEVEL = 3
#: The largest base: it is held whole, at both ends, while the delta is made or decoded.
MAX_BASE = 1 << 30
#: The largest target chosen by :func:`pays` (a larger one is never encoded whole).
MAX_TARGET = 2 << 30
#: zstd's largest window on 64-bit builds: target and base together must fit in it.
MAX_WINDOW_LOG = 31
#: Decoded output is handed on in pieces of at most this many bytes.
PIECE = 1024 * 1024
#: The source flushes the frame after this much target input: a piece goes out, and is
#: decoded, while the next is encoded.
STEP_BYTES = 4 * 1024 * 1024


#: Before a transfer the choice can only estimate: the size of a whole-blob delta against
#: that of the chunks it replaces, and the time per byte of the target that making and
#: using one adds to a sync. Both ends read their base whole before the first piece
#: (reading a 122 MB layer from a store takes 0.6-0.9 s here), then the source reads and
#: encodes the target while the receiver decodes, cuts, hashes and stores it.
#: Deltas: 0.28-0.8 of the chunk bytes they replaced on the benchmark's converted steps
#: (the `prefix` column of bench/RESULTS.md is 0.15-0.55 of the `ideal` one).
#: Cost, streamed: on loopback (two daemons on this machine's 2 cores, pyapp layers of
#: 122 and 125 MB) 1.3 s and 1.4-2.0 s more than the chunk path, 11-16 ns per byte; in
#: the benchmark over 100 Mbit/s, where the link's delay process shares the cores too
#: (bench/results/oci-20261129-115334.json, chosen at 15 ns on two mlwheel steps), 3.3
#: and 3.7 s more once the 1.9 s of link time they saved is counted back: 25-30 ns.
#: Before it was streamed (encode, then transfer, then decode) it was 35-42 ns.
DELTA_SHARE = 0.5
CPU_PER_BYTE = 30e-9


@dataclass(frozen=True)
class Link:
    """What a chunk stream from a source measured: its rate (bytes/s), and the wire bytes
    it took per raw byte of chunk (compression and chunk deltas included; reported)."""

    rate: float
    wire_per_raw: float


def pays(chunk_wire: float, target_size: int, link: Link | None) -> bool:
    """Whether a whole-blob delta should beat fetching the chunks a blob of
    ``target_size`` bytes lacks, which would put about ``chunk_wire`` bytes on a link
    that the last chunk stream from that source found as ``link``. With nothing
    measured, no: the chunk transfer measures it."""
    if link is None or link.rate <= 0 or target_size > MAX_TARGET:
        return False
    saved = chunk_wire * (1 - DELTA_SHARE)
    return saved / link.rate > target_size * CPU_PER_BYTE


class DeltaTooLarge(UserError):
    """A base or target beyond what a whole-blob delta takes."""


def _window_log(base: int, target: int) -> int:
    need = max(base + target, 1).bit_length()
    if need > MAX_WINDOW_LOG:
        raise DeltaTooLarge(
            f"base and target come to {base + target} bytes, more than a zstd window reaches"
        )
    return max(20, need)


def read_base(store: Store, base: str) -> bytes:
    """The whole of blob ``base``, to serve as the prefix.

    Raises:
        DeltaTooLarge: it is larger than MAX_BASE.
    """
    recipe = store.get_recipe(base)
    if recipe.size > MAX_BASE:
        raise DeltaTooLarge(f"base {base} is {recipe.size} bytes; at most {MAX_BASE} are held")
    return b"".join(store.get_chunks(recipe.ids))


class Encoder:
    """The zstd frame of ``target`` with ``base`` as its prefix, made a step at a time:
    each :meth:`step` encodes about STEP_BYTES of the target and flushes what it made, so
    the receiver decodes a piece while the next one is encoded. Worker-thread calls, one
    at a time."""

    def __init__(self, store: Store, target: str, base: str) -> None:
        self._prefix = read_base(store, base)
        self.target_size = store.get_recipe(target).size
        self._comp = ZstdCompressor(
            options={
                CompressionParameter.compression_level: LEVEL,
                CompressionParameter.window_log: _window_log(len(self._prefix), self.target_size),
                CompressionParameter.enable_long_distance_matching: 1,
            },
            zstd_dict=ZstdDict(self._prefix, is_raw=True).as_prefix,
        )
        # The frame states its size: the decoder bounds its output by it.
        self._comp.set_pledged_input_size(self.target_size)
        self._input = iter_blob(store, target)
        self._done = False

    def step(self) -> bytes | None:
        """The next piece of the frame (may be empty), or None after the last."""
        if self._done:
            return None
        out, taken = [], 0
        for data in self._input:
            out.append(self._comp.compress(data))
            taken += len(data)
            if taken >= STEP_BYTES:
                out.append(self._comp.flush(ZstdCompressor.FLUSH_BLOCK))
                return b"".join(out)
        out.append(self._comp.flush())
        self._done = True
        self._prefix = b""
        return b"".join(out)


def encode(store: Store, target: str, base: str) -> bytes:
    """The whole frame at once (tests, small blobs)."""
    enc = Encoder(store, target, base)
    return b"".join(iter(enc.step, None))


def decode(pieces: Iterable[bytes], prefix: bytes, size: int, target: str) -> Iterator[bytes]:
    """The bytes the frame arriving as ``pieces`` encodes against ``prefix``, which must
    come to exactly ``size`` bytes, in pieces of at most PIECE bytes.

    Raises:
        DigestMismatch: the frame does not decode, decodes to another size, ends early or
            has bytes after it (named after ``target``, the blob it should have made).
    """
    dec = ZstdDecompressor(
        zstd_dict=ZstdDict(prefix, is_raw=True).as_prefix,
        options={DecompressionParameter.window_log_max: MAX_WINDOW_LOG},
    )
    made = 0
    try:
        for data in pieces:
            if dec.eof and data:
                raise DigestMismatch(target, "a delta with bytes after its zstd frame")
            while not dec.eof:
                out = dec.decompress(data, max_length=PIECE)
                data = b""
                made += len(out)
                if made > size:
                    raise DigestMismatch(target, f"a delta decoding to more than {size} bytes")
                if out:
                    yield out
                if dec.needs_input:
                    break
    except ZstdError as exc:
        raise DigestMismatch(target, f"a delta that does not decode: {exc}") from None
    if dec.unused_data:
        raise DigestMismatch(target, "a delta with bytes after its zstd frame")
    if not dec.eof or made != size:
        raise DigestMismatch(target, f"a delta decoding to {made} of {size} bytes")


def rebuild(
    store: Store,
    pieces: Iterable[bytes],
    base: str,
    target: str,
    size: int,
    cut: Callable[[Any], Iterator[Any]],
    tee: Callable[[bytes], None] | None = None,
) -> None:
    """Decode the delta arriving as ``pieces`` against ``base``, cut the result with
    ``cut`` (a stream in, chunks out), store it and commit it as ``target`` once its
    digest is checked; ``tee`` is handed its bytes in order. Worker thread: ``pieces``
    may block while the next piece crosses.

    Raises:
        DigestMismatch: the result is not ``target``; nothing of it is visible.
        DeltaTooLarge: ``base`` is larger than MAX_BASE.
    """
    prefix = read_base(store, base)

    def teed() -> Iterator[bytes]:
        for piece in decode(pieces, prefix, size, target):
            if tee is not None:
                tee(piece)
            yield piece

    with BlobWriter(store) as w:
        for chunk in cut(IterReader(teed())):
            w.add(chunk)
        if w.digest != target:
            raise DigestMismatch(target, w.digest)
        w.commit()


@ops.operation("blob.delta", Scope.READ, "stream a blob encoded against another as prefix")
async def _delta(ctx: Any, args: ops.Document, progress: ops.Progress) -> ops.Document:
    # Read scope: it only reads blobs the caller may read. The pieces go out while the
    # next ones are encoded (two in hand at most).
    target, base = ops.arg_str(args, "target"), ops.arg_str(args, "base")
    started = time.monotonic()
    clock = ops.ThreadClock()
    enc: Encoder = await ctx.run(Encoder, ctx.store, target, base)
    sent = await ops.stream_steps(ctx.run, enc.step, progress, clock)
    stats = ctx.stats
    stats.blob_deltas += 1
    stats.blob_delta_bytes += sent
    stats.blob_delta_target_bytes += enc.target_size
    stats.blob_delta_encode_s += clock.seconds
    return {
        "size": sent,
        "target_size": enc.target_size,
        "seconds": round(time.monotonic() - started, 4),
        "encode_cpu_s": round(clock.seconds, 4),
    }
