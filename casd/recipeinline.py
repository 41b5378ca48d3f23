"""Small new chunks in the recipe itself: their bytes instead of their ids (RECIPE_INLINE).

A rebuilt image layer gives every tar member a new header (fresh mtimes), and the tar
cutter makes each header a chunk of its own: the benchmark's Python app layer has 12,500
of them. As plain chunks each costs its id twice over, in the recipe and in the request for
it, and 36 bytes of id and size is more than the header's *change* (a few digits of
mtime and checksum): the ids alone were 450 KB of a 830 KB sync whose whole difference,
as one zstd frame against the old layer, is 330 KB.

So a receiver holding the old version asks with PULL_INLINE: the server answers with the
recipe whose small new chunks (at most ``limit`` bytes, not in the old version; casd asks
for 1 KiB: headers and the smallest files) have a zero id, and those chunks' bytes in one
zstd frame. The receiver hashes each for its id.
Nothing is trusted that would not be anyway: the ids are computed here, and the blob's
sha256 is checked before it commits, as for every sync. Measured on the benchmark's pyapp
v1->v2 step: 12,560 new chunks, 6.75 MB, came to 275 KB (22 bytes each; as chunk packs
they took about as much, and their ids 450 KB more).

Where the link is slow enough, the frame may also be encoded *against the base*: its
prefix is the old version's small chunks the new one dropped (what they replaced: the
old headers, old versions of small files). That costs a read of those chunks at both
ends (6.5 us a chunk here, 0.08 s for pyapp's 12,500 old headers), and saves from 8
bytes a chunk (only headers changed: pyapp v1->v2, 177 KB instead of 275 KB) to 243
(new versions of small files: mlwheel v1->v2, 161 KB instead of 606 KB). The client
says the link's rate as it measured it; the source, which sees both frames, sends the
one against the base where the bytes it saves take longer to cross than the client's
read (:func:`pays`), and reads the chunks at all only where the frame without them is
large enough that it could (:func:`worth_trying`). The receiver builds the same prefix
from its own store and checks the xxh3-64 of what it decodes: a base that differs here
(damage the store did not catch) would make other bytes, and it then asks again the old
way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import casproto
import xxhash

from casd.chunking import chunk_id
from casd.storage.interface import Recipe, Store
from casd.zstd import CompressionParameter, ZstdCompressor, ZstdDict, decompress_bounded

#: zstd level of the frame: headers compress to a few bytes each at any level; 3 is cheap.
LEVEL = 3
#: What a casd client asks to have inlined: a member's header (512 bytes, 1 KiB with pax
#: records) and the smallest files, where an id costs most against the bytes it names and
#: a delta of the chunk on its own saves little. Up to 16 KiB (the chunker's minimum:
#: every small file) the inlined chunks of a Debian step were 11 MB instead of 4.1 MB,
#: fetched before any other chunk (the recipe waits for them), where as chunks with
#: deltas of their own they stream beside the rest: over 100 Mbit/s that step took 1 s
#: longer (bench/results/oci-20261130-095814.json against oci-20261130-082334.json).
ASK = 1024


#: Reading one of the base's dropped small chunks from a store, to encode or decode
#: against it (DiskStore.get_chunks of pyapp's 12,500 old tar headers: 0.08 s).
READ_S_PER_CHUNK = 6.5e-6


def worth_trying(frame: int, rate: int, chunks: int) -> bool:
    """Whether, over a link of ``rate`` bytes/s (0: not measured), a source should read
    ``chunks`` of the base's chunks to see what encoding against them saves on a frame of
    ``frame`` bytes made without: not where the whole frame would cross sooner than both
    ends read them (no prefix can save more than the frame). Where only tar headers
    changed the frame is small (22 bytes a header) and the source is spared the read;
    where small files changed too it is larger, and a prefix saves most of it."""
    return rate > 0 and frame / rate > 2 * READ_S_PER_CHUNK * chunks


def pays(saved: int, rate: int, chunks: int) -> bool:
    """Whether a frame against ``chunks`` of the base's chunks that is ``saved`` bytes
    smaller should go instead: the bytes saved take longer to cross at ``rate`` than the
    client takes to read those chunks (the source has read them already)."""
    return rate > 0 and saved / rate > READ_S_PER_CHUNK * chunks


class InlineMismatch(Exception):
    """The inlined bytes did not decode to what the server encoded (its xxh3-64 differs):
    this side's copy of the base differs from the server's. Ask again without inlining."""


@dataclass(frozen=True)
class Encoded:
    """What the server puts in a RECIPE_INLINE, before the entries' recipe delta."""

    entries: bytes  # the recipe's entries, inlined ids zeroed (casproto.pack_entries)
    inline_sum: int
    frame: bytes
    against_base: bool  # the frame's prefix is base's dropped small chunks
    chunks: int  # entries inlined
    raw: int  # their bytes


def _read_prefix(store: Store, ids: Sequence[bytes]) -> bytes:
    return b"".join(store.get_chunks(ids))


def _frame(content: bytes, prefix: bytes) -> bytes:
    # Prefix and content are at most MAX_INLINE_BYTES each: the window covers both within
    # zstd's default decoder limit (2^27), and long-distance matching finds an old header
    # anywhere in the prefix.
    window = min(max(17, (len(prefix) + len(content)).bit_length()), 27)
    comp = ZstdCompressor(
        options={
            CompressionParameter.compression_level: LEVEL,
            CompressionParameter.window_log: window,
            CompressionParameter.enable_long_distance_matching: 1,
        },
        zstd_dict=ZstdDict(prefix, is_raw=True).as_prefix if len(prefix) >= 8 else None,
    )
    return comp.compress(content, mode=ZstdCompressor.FLUSH_FRAME)


def encode(store: Store, recipe: Recipe, base: Recipe, limit: int, rate: int) -> Encoded | None:
    """``recipe`` with its small new chunks inlined (SPEC §4.1), encoded against
    ``base``'s dropped small chunks where over a link of ``rate`` bytes/s (0: never) that
    pays; None when there is nothing to inline or more than a RECIPE_INLINE carries.
    Worker thread.

    Raises:
        ChunkMissing, ChunkCorrupt: this store cannot read a chunk of either blob.
    """
    places = casproto.inlined_places(recipe.ids, recipe.sizes, base.ids, limit)
    if not places or sum(recipe.sizes[i] for i in places) > casproto.MAX_INLINE_BYTES:
        return None
    distinct = list(dict.fromkeys(recipe.ids[i] for i in places))
    got = dict(zip(distinct, store.get_chunks(distinct), strict=True))
    content = b"".join(got[recipe.ids[i]] for i in places)
    frame, against_base = _frame(content, b""), False
    prefix_ids = casproto.inline_prefix(base.ids, base.sizes, recipe.ids, limit)
    if worth_trying(len(frame), rate, len(prefix_ids)):
        against = _frame(content, _read_prefix(store, prefix_ids))
        if pays(len(frame) - len(against), rate, len(prefix_ids)):
            frame, against_base = against, True
    ids = list(recipe.ids)
    for i in places:
        ids[i] = casproto.INLINE_ID
    return Encoded(
        casproto.pack_entries(ids, recipe.sizes),
        xxhash.xxh3_64_intdigest(content),
        frame,
        against_base,
        len(places),
        len(content),
    )


def decode(
    store: Store,
    ids: tuple[bytes, ...],
    sizes: tuple[int, ...],
    base: Recipe,
    limit: int,
    against_base: bool,
    inline_sum: int,
    frame: bytes | bytearray | memoryview,
) -> tuple[tuple[bytes, ...], list[tuple[bytes, bytes]]]:
    """The recipe's real ids, and the inlined chunks (id, bytes), first of each id, from a
    RECIPE_INLINE whose entries decoded to ``ids`` and ``sizes``. Worker thread.

    Raises:
        ValueError: the answer breaks SPEC §4.1 (an inlined chunk over ``limit``, more
            than MAX_INLINE_BYTES, a frame that does not decode to their size).
        InlineMismatch: the bytes decoded are not the server's (the bases differ).
        ChunkMissing, ChunkCorrupt: this store cannot read a chunk of ``base``.
    """
    places = [i for i, c in enumerate(ids) if c == casproto.INLINE_ID]
    total = 0
    for i in places:
        if sizes[i] > limit:
            raise ValueError(f"an inlined chunk of {sizes[i]} bytes, over the {limit} asked for")
        total += sizes[i]
    if total > casproto.MAX_INLINE_BYTES:
        raise ValueError(f"{total} bytes inlined, over {casproto.MAX_INLINE_BYTES}")
    prefix = b""
    if against_base:
        prefix = _read_prefix(store, casproto.inline_prefix(base.ids, base.sizes, ids, limit))
    content = decompress_bounded(frame, total, prefix=prefix if len(prefix) >= 8 else None)
    if xxhash.xxh3_64_intdigest(content) != inline_sum:
        raise InlineMismatch(
            f"the {len(places)} inlined chunks did not decode to the server's bytes "
            f"against this store's copy of {base.digest}"
        )
    out = list(ids)
    chunks: dict[bytes, bytes] = {}
    view = memoryview(content)
    at = 0
    for i in places:
        data = bytes(view[at : at + sizes[i]])
        at += sizes[i]
        cid = chunk_id(data)
        out[i] = cid
        chunks.setdefault(cid, data)
    return tuple(out), list(chunks.items())
