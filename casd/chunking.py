"""Content-defined chunking and the hashes that name chunks and blobs.

The chunker parameters are part of the store format: two stores dedup against each other
only if they cut the same way, so they are recorded in every store and checked on open,
and ``tests/data/chunker_golden.json`` pins the cut points.

Why pyfastcdc: on this project's reference machine its compiled FastCDC-2020 cutter ran
1.7x faster than the ``fastcdc`` package's (2.0 vs 1.2 GB/s), releases the GIL, and yields
zero-copy memoryviews. Both packages silently fall back to pure Python (~6 MB/s) when their
extension is missing, so this module imports the compiled module directly and fails loudly.
"""

from __future__ import annotations

import hashlib
import io
import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import blake3

from casd.errors import ChunkerParamsMismatch, ConfigError

try:
    # The compiled cutter, never the pure-Python fallback the package would silently pick.
    from pyfastcdc.cy import FastCDC as _FastCDC
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "casd needs pyfastcdc's compiled extension (pyfastcdc.cy), which is missing; "
        "reinstall with `pip install --only-binary=pyfastcdc pyfastcdc`"
    ) from exc

ID_SIZE = 32  # BLAKE3-256


@dataclass(frozen=True, slots=True)
class ChunkerParams:
    """How blobs are cut. Part of the store format: changing it changes every chunk id."""

    algo: str = "fastcdc2020"
    # 16/64/256 KiB, the casync/desync defaults. Real mean chunk size with FastCDC-2020
    # normalization level 1 is about avg + min = 80 KiB: a 1 GiB blob is ~13k chunks,
    # ~470 KB of recipe, and LMDB handles ~650k lookups/s, so the index is never the limit.
    min: int = 16 * 1024
    avg: int = 64 * 1024
    max: int = 256 * 1024

    def to_dict(self) -> dict[str, str | int]:
        return {"algo": self.algo, "min": self.min, "avg": self.avg, "max": self.max}

    @classmethod
    def from_dict(cls, d: dict[str, str | int]) -> ChunkerParams:
        try:
            params = cls(
                algo=str(d["algo"]), min=int(d["min"]), avg=int(d["avg"]), max=int(d["max"])
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ChunkerParamsMismatch(f"unreadable chunker parameters {d!r}") from exc
        params.validate()
        return params

    def validate(self) -> None:
        if self.algo != "fastcdc2020":
            raise ConfigError(f"unknown chunking algorithm {self.algo!r} (casd has fastcdc2020)")
        # pyfastcdc's own bounds; checked here so the error names casd's setting.
        if not (64 <= self.min <= self.avg <= self.max) or self.max > 16 * 1024 * 1024:
            raise ConfigError(f"chunk sizes must satisfy 64 <= min <= avg <= max <= 16 MiB: {self}")


DEFAULT_PARAMS = ChunkerParams()


def chunk_id(data: bytes | bytearray | memoryview) -> bytes:
    """The id of a chunk: BLAKE3-256 of its bytes (releases the GIL on large inputs)."""
    return blake3.blake3(data).digest()


def format_digest(raw: bytes) -> str:
    """``sha256:<hex>`` as OCI writes blob digests."""
    return "sha256:" + raw.hex()


def parse_digest(text: str) -> bytes:
    """Inverse of :func:`format_digest`. Raises ValueError on anything else."""
    if not text.startswith("sha256:") or len(text) != 71:
        raise ValueError(f"not a sha256 digest: {text!r}")
    hexpart = text[7:]
    if hexpart != hexpart.lower():
        raise ValueError(f"digest must be lowercase hex: {text!r}")
    return bytes.fromhex(hexpart)


EMPTY_DIGEST = format_digest(hashlib.sha256(b"").digest())


class Chunker:
    """Cuts buffers and streams into content-defined chunks with fixed parameters."""

    def __init__(self, params: ChunkerParams = DEFAULT_PARAMS) -> None:
        params.validate()
        self.params = params
        self._cdc = _FastCDC(avg_size=params.avg, min_size=params.min, max_size=params.max)

    def cut(self, buf: bytes | bytearray | memoryview | mmap.mmap) -> Iterator[memoryview]:
        """Yield zero-copy views of the chunks of ``buf``, in order; the last ends at its end."""
        for c in self._cdc.cut_buf(memoryview(buf)):  # mmap objects need the view
            yield c.data

    def cut_stream(self, stream: BinaryIO, window: int = 8 * 1024 * 1024) -> Iterator[memoryview]:
        """Yield the chunks of a stream, identical to ``cut(stream.read())``.

        FastCDC decides each cut from the bytes after the previous cut only, so the cuts
        in a buffer are final except the last one, which the buffer's end may have made;
        that tail is cut again once more data is there. Chunks are handed out as soon as
        ``2 * max`` bytes past them have arrived, so a slow pipe does not hold them back
        for a whole window. Each window is a fresh buffer that is only ever appended to:
        the views handed out stay valid for as long as the caller keeps them.
        """
        if window < 4 * self.params.max:
            raise ValueError("window must hold at least four maximal chunks")
        lookahead = 2 * self.params.max
        readinto = stream.readinto  # type: ignore[attr-defined]
        buf = memoryview(bytearray(window))
        start = filled = 0  # buf[start:filled] holds bytes not yet handed out
        eof = False
        while True:
            if filled == window:
                # Move the unfinished tail into a fresh window (views of the old one live on).
                tail = buf[start:filled]
                buf = memoryview(bytearray(window))
                buf[: len(tail)] = tail
                start, filled = 0, len(tail)
            if not eof:
                n = readinto(buf[filled:])
                if n:
                    filled += n
                else:
                    eof = True
            if filled - start < lookahead and not eof and filled < window:
                continue
            if filled == start:
                return
            chunks = list(self._cdc.cut_buf(buf[start:filled]))
            if not eof:
                chunks.pop()  # possibly cut by the buffer's end, not by content
            for c in chunks:
                yield c.data
                start += c.length
            if eof and start == filled:
                return


def open_stream(path: str) -> BinaryIO:
    """Open a path for chunking; ``-`` is standard input."""
    import sys

    if path == "-":
        return sys.stdin.buffer
    return io.open(path, "rb", buffering=0)  # noqa: UP020 - unbuffered on purpose: readinto fills our window
