"""Whole-blob deltas: one blob encoded with zstd against another as its prefix (issue #7).

Chunk deltas (SPEC §4.3) encode each missing chunk against a few old chunks, and every
chunk still costs its id in the recipe and in the WANT. For a new version of a layer
whose files all changed a little (every tar header carries a new mtime), that leaves
most of the cost in ids. A whole-blob delta is what ``zstd --long --patch-from`` does:
the new blob is compressed in one stream, the old one as its prefix, with long-distance
matching, so a match may reach anywhere in the old version. The receiver decodes it
against the same old blob from its own store, cuts what comes out into its own chunks and
checks the digest, so nothing depends on the sender's recipe.

The source makes the delta as a blob of its own (:func:`make`, operation ``blob.delta``)
and the receiver fetches it like any blob, then rebuilds the target with
:func:`rebuild`. The prefix is held whole in memory at both ends, hence ``MAX_BASE``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from casd.auth import Scope
from casd.chunking import Chunker
from casd.errors import DigestMismatch, UserError
from casd.oci.layers import BlobWriter, IterReader, iter_blob, put_stream
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


#: Before a transfer the choice can only estimate: the size of a whole-blob delta against
#: that of the chunks it replaces, and the time per byte of the target that making and
#: using one adds to a sync (the source reads base and target and encodes before the
#: receiver can fetch; the receiver then reads its base, decodes, cuts, hashes, stores).
#: Measured over 20 Mbit/s on the benchmark corpus (bench/results/oci-20261129-085722.json
#: against the chunk path of oci-20261129-065256.json), deltas of 10.3, 9.6 and 9.0 MB
#: stood for chunk transfers of 12.9, 18.5 and 19.8 MB, and took 6.1, 5.1 and 5.0 s
#: more outside the link: 35-42 ns per byte of the 174, 121 and 133 MB targets. The
#: `prefix` column of bench/RESULTS.md is 0.15-0.55 of the `ideal` one.
DELTA_SHARE = 0.5
CPU_PER_BYTE = 40e-9


@dataclass(frozen=True)
class Link:
    """What a chunk stream from a source measured: its rate (bytes/s), and the wire bytes
    it took per raw byte of chunk (compression and chunk deltas included)."""

    rate: float
    wire_per_raw: float


def pays(missing_raw: int, target_size: int, link: Link | None) -> bool:
    """Whether a whole-blob delta should beat fetching the ``missing_raw`` bytes of chunks
    a blob of ``target_size`` bytes lacks, over ``link`` as the last chunk stream from
    that source found it. With nothing measured, no: the chunk transfer measures it."""
    if link is None or link.rate <= 0 or target_size > MAX_TARGET:
        return False
    saved = missing_raw * link.wire_per_raw * (1 - DELTA_SHARE)
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


def _prefix(store: Store, base: str) -> bytes:
    recipe = store.get_recipe(base)
    if recipe.size > MAX_BASE:
        raise DeltaTooLarge(f"base {base} is {recipe.size} bytes; at most {MAX_BASE} are held")
    return b"".join(store.get_chunks(recipe.ids))


def encode(store: Store, target: str, base: str) -> Iterator[bytes]:
    """The zstd frame of ``target`` with ``base`` as its prefix, in pieces."""
    prefix = _prefix(store, base)
    size = store.get_recipe(target).size
    comp = ZstdCompressor(
        options={
            CompressionParameter.compression_level: LEVEL,
            CompressionParameter.window_log: _window_log(len(prefix), size),
            CompressionParameter.enable_long_distance_matching: 1,
        },
        zstd_dict=ZstdDict(prefix, is_raw=True).as_prefix,
    )
    comp.set_pledged_input_size(size)  # the frame states its size: the decoder bounds it
    for piece in iter_blob(store, target):
        if out := comp.compress(piece):
            yield out
    yield comp.flush()


def make(store: Store, target: str, base: str) -> dict[str, Any]:
    """Store the delta of ``target`` against ``base`` as an unnamed blob (collected after
    the GC grace period, like any unnamed blob) and describe it."""
    started = time.monotonic()
    size = store.get_recipe(target).size
    digest = put_stream(store, IterReader(encode(store, target, base)), Chunker())  # type: ignore[arg-type]
    return {
        "digest": digest,
        "size": store.get_recipe(digest).size,
        "target_size": size,
        "seconds": round(time.monotonic() - started, 4),
    }


def decode(store: Store, delta: str, base: str, size: int) -> Iterator[bytes]:
    """The bytes the delta blob ``delta`` encodes against ``base``, which must come to
    exactly ``size`` bytes, in pieces.

    Raises:
        DigestMismatch: the delta does not decode, decodes to another size, or has bytes
            after its frame.
    """
    prefix = _prefix(store, base)
    dec = ZstdDecompressor(
        zstd_dict=ZstdDict(prefix, is_raw=True).as_prefix,
        options={DecompressionParameter.window_log_max: MAX_WINDOW_LOG},
    )
    made = 0
    try:
        for data in iter_blob(store, delta):
            if dec.eof and data:
                raise DigestMismatch(delta, "a delta with bytes after its zstd frame")
            while not dec.eof:
                out = dec.decompress(data, max_length=PIECE)
                data = b""
                made += len(out)
                if made > size:
                    raise DigestMismatch(delta, f"a delta decoding to more than {size} bytes")
                if out:
                    yield out
                if dec.needs_input:
                    break
    except ZstdError as exc:
        raise DigestMismatch(delta, f"a delta that does not decode: {exc}") from None
    if dec.unused_data:
        raise DigestMismatch(delta, "a delta with bytes after its zstd frame")
    if not dec.eof or made != size:
        raise DigestMismatch(delta, f"a delta decoding to {made} of {size} bytes")


def rebuild(
    store: Store,
    delta: str,
    base: str,
    target: str,
    size: int,
    cut: Callable[[Any], Iterator[Any]],
    tee: Callable[[bytes], None] | None = None,
) -> None:
    """Decode ``delta`` against ``base``, cut the result with ``cut`` (a stream in, chunks
    out), store it and commit it as ``target`` once its digest is checked; ``tee`` is
    handed its bytes in order. Worker thread.

    Raises:
        DigestMismatch: the result is not ``target``; nothing of it is visible.
    """

    def teed() -> Iterator[bytes]:
        for piece in decode(store, delta, base, size):
            if tee is not None:
                tee(piece)
            yield piece

    with BlobWriter(store) as w:
        for chunk in cut(IterReader(teed())):
            w.add(chunk)
        if w.digest != target:
            raise DigestMismatch(target, w.digest)
        w.commit()


@ops.operation("blob.delta", Scope.READ, "encode a blob against another as a zstd prefix")
async def _delta(ctx: Any, args: ops.Document, progress: ops.Progress) -> ops.Document:
    # Read scope: what it stores is derived from blobs the caller may read, and unnamed,
    # so collected after the GC grace period like any unnamed blob.
    target, base = ops.arg_str(args, "target"), ops.arg_str(args, "base")
    return dict(await ctx.run(make, ctx.store, target, base))
