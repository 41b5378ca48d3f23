"""Numbers fixed by the wire protocol (SPEC §1, §2, §4)."""

from __future__ import annotations

from typing import Final

#: The only protocol version this package speaks (SPEC §3).
PROTOCOL_VERSION: Final = 1

#: Largest frame body in bytes (SPEC §2). The largest legitimate frames are a CHUNK
#: carrying a 256 KiB chunk and a recipe batch of 16,384 x ~40 B = 640 KiB; 16 MiB leaves
#: room for larger chunkers without letting a peer make us buffer unbounded data.
MAX_FRAME: Final = 16 * 1024 * 1024

#: Most ids in one HAS, PUSH_RECIPE, WANT or RECIPE (SPEC §4): 16,384 x 32 B = 512 KiB
#: of ids, well inside MAX_FRAME even with sizes and msgpack overhead.
MAX_BATCH: Final = 16 * 1024

#: Bytes in a chunk id: BLAKE3-256 (SPEC §1).
ID_SIZE: Final = 32

#: Largest bitmap in HAVE or PUSH_WANT: one bit per entry of the largest batch.
MAX_BITMAP: Final = MAX_BATCH // 8

#: Largest decoded chunk (SPEC §4): a CHUNK_PACK length beyond it is INVALID.
MAX_CHUNK_SIZE: Final = 16 * 1024 * 1024

#: msgpack's largest unsigned integer; every `uint` field must fit.
MAX_UINT: Final = 2**64 - 1
