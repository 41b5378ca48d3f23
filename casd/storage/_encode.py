"""Turning a chunk into what a store keeps, and back; shared by every store."""

from __future__ import annotations

from casd import zstd
from casd.chunking import chunk_id
from casd.errors import ChunkCorrupt
from casd.storage.interface import ChunkIn, Codec

# Keep the compressed form only when it saves at least 1/32 (3 %) of the chunk: below
# that, the decode cost on every read buys almost no space.
MIN_SAVING_SHIFT = 5

# zstd level for chunks at rest. Level 3 (zstd's default) compresses 64 KiB chunks of
# real files at ~200-550 MB/s per core here and saves a little more than level 1; the
# ingest path runs it in worker threads.
DEFAULT_LEVEL = 3


def encode_for_store(chunk: ChunkIn, *, verify: bool, level: int) -> tuple[Codec, bytes]:
    """Check a chunk and pick the form to keep: (codec, payload).

    Raises:
        ChunkCorrupt: ``verify`` and the data does not hash to the id, or the offered
            encoded form does not decode to the data.
    """
    data = chunk.data
    if verify and chunk_id(data) != chunk.id:
        raise ChunkCorrupt(chunk.id, "its bytes hash to another id")
    raw_len = len(data)
    if chunk.encoded is not None and chunk.codec == Codec.ZSTD:
        encoded = bytes(chunk.encoded)
        if verify and not chunk.decoded_from_encoded:
            try:
                decoded = zstd.decompress_bounded(encoded, raw_len)
            except ValueError as exc:
                raise ChunkCorrupt(chunk.id, f"its zstd form is invalid: {exc}") from exc
            if decoded != data:
                raise ChunkCorrupt(chunk.id, "its zstd form decodes to other bytes")
    elif level > 0 and raw_len >= 64:
        encoded = zstd.compress(data, level)
    else:
        return Codec.RAW, bytes(data)
    if len(encoded) <= raw_len - (raw_len >> MIN_SAVING_SHIFT):
        return Codec.ZSTD, encoded
    return Codec.RAW, bytes(data)


def decode_stored(
    chunk_id_: bytes, codec: int, payload: bytes | memoryview, raw_size: int
) -> bytes:
    """The chunk's bytes from its stored form.

    Raises:
        ChunkCorrupt: unknown codec, or the payload does not decode to ``raw_size`` bytes.
    """
    if codec == Codec.RAW:
        if len(payload) != raw_size:
            raise ChunkCorrupt(chunk_id_, f"stored {len(payload)} bytes, expected {raw_size}")
        return bytes(payload)  # no copy when it already is bytes
    if codec == Codec.ZSTD:
        try:
            return zstd.decompress_bounded(payload, raw_size)
        except ValueError as exc:
            raise ChunkCorrupt(chunk_id_, str(exc)) from exc
    raise ChunkCorrupt(chunk_id_, f"unknown codec {codec}")
