"""Reproducing gzip streams: find zlib settings that re-encode a layer byte-exact.

casd keeps a gzip layer as its uncompressed tar plus a recipe to compress it again. The
recipe is a :class:`GzipParams`: the member header exactly as it came, and the zlib
``compressobj`` settings (level, raw-deflate window bits, memLevel, strategy) that give
the same deflate body. The trailer (CRC-32 and size mod 2**32) follows from the data.

How the importer uses this module (one pass over the layer, bounded memory)::

    probe = GzipProbe()
    for piece in compressed_pieces:          # as they arrive from the registry
        for data in probe.feed(piece):       # exhaust before the next feed
            chunk(data)                      # the uncompressed tar
    probe.finish()                           # LayerFormatError if truncated
    probe.params                             # GzipParams, or None and probe.reason says why

:class:`GzipProbe` decompresses with :class:`GzipDecoder` (which raises
:class:`LayerFormatError` on corrupt input) and meanwhile:

1. collects the compressed and uncompressed prefix of the first ``probe_size`` (1 MiB)
   of uncompressed data, or the whole member if it is shorter;
2. runs :func:`find_params` on it: tries candidate settings in :func:`candidates` order,
   compressing the prefix in 64 KiB slices and comparing what zlib has emitted so far
   (output before ``flush()`` is a prefix of the final stream) with the same bytes of the
   original body, so a wrong candidate is dropped at its first emitted block. The first
   candidate that matched at least ``EVIDENCE`` bytes wins (or the first one that never
   mismatched when zlib emitted too little to tell, e.g. for a megabyte of zeros);
3. keeps the winner's compressor and re-encodes the rest as it is decompressed, comparing
   byte by byte with the compressed input; only the unmatched lag of either side is
   held. At the end of the member the flushed tail and the trailer are compared too.

Not reproducible (``params`` None, ``reason`` set): no candidate matches (GNU gzip, Go's
compress/gzip, pigz with several threads...), a mismatch later in the stream, a stream
of several gzip members, or bytes after the member (such trailing data is ignored by the
decoder, as gzip(1) ignores trailing zeros; the raw bytes must then be kept as they are).

The deflate output must not depend on how the input was split: true for zlib levels 1-9
with Z_NO_FLUSH (tested), but not for level 0, whose stored blocks follow the input calls;
level 0 is therefore always fed fixed 64 KiB slices, in :class:`GzipEncoder` and in the
probe alike, so what was verified is what will be produced. The probe batches its input
to zlib into >= 64 KiB calls so zlib runs with the GIL released most of the time.

Output also depends on the zlib build (zlib-ng, a newer zlib may differ):
:attr:`GzipParams.zlib` records the version that verified the recipe, and a different
zlib must re-verify before serving.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from casd.errors import CasdError

ZLIB_VERSION = zlib.ZLIB_RUNTIME_VERSION

#: zlib is fed input in slices of this size (deterministic output, GIL released).
SLICE = 64 * 1024
#: How much uncompressed data the parameter search looks at.
PROBE_SIZE = 1024 * 1024
#: Input step of the parameter search (levels 1-9, whose output ignores the split).
SEARCH_STEP = 16 * 1024
#: Matched compressed bytes that make a candidate the answer without trying the others.
EVIDENCE = 1024
#: Largest uncompressed piece the decoder yields at once (bounds a decompression bomb).
OUT_PIECE = 1024 * 1024

_FHCRC, _FEXTRA, _FNAME, _FCOMMENT = 2, 4, 8, 16


class LayerFormatError(CasdError):
    """A layer's compressed bytes are not a valid stream of their format."""


@dataclass(frozen=True)
class GzipParams:
    """How to re-encode a gzip member: its header bytes and the zlib settings."""

    header: bytes
    level: int
    wbits: int  # raw deflate window bits, 9..15 (passed to zlib negated)
    mem_level: int
    strategy: int
    zlib: str = ZLIB_VERSION  # the zlib that verified these settings

    def to_dict(self) -> dict[str, str | int]:
        return {
            "header": self.header.hex(),
            "level": self.level,
            "wbits": self.wbits,
            "mem_level": self.mem_level,
            "strategy": self.strategy,
            "zlib": self.zlib,
        }

    @classmethod
    def from_dict(cls, d: dict[str, str | int]) -> GzipParams:
        """Inverse of :meth:`to_dict`. Raises LayerFormatError on anything malformed."""
        try:
            header = bytes.fromhex(str(d["header"]))
            params = cls(
                header=header,
                level=int(d["level"]),
                wbits=int(d["wbits"]),
                mem_level=int(d["mem_level"]),
                strategy=int(d["strategy"]),
                zlib=str(d["zlib"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LayerFormatError(f"unreadable gzip parameters {d!r}") from exc
        if (
            parse_header(header) != len(header)
            or not 0 <= params.level <= 9
            or not 9 <= params.wbits <= 15
            or not 1 <= params.mem_level <= 9
            or not 0 <= params.strategy <= 4
        ):
            raise LayerFormatError(f"invalid gzip parameters {d!r}")
        return params


def parse_header(buf: bytes | bytearray | memoryview) -> int | None:
    """The length of the gzip member header at the start of ``buf`` (RFC 1952), or None
    if ``buf`` ends before the header does.

    Raises:
        LayerFormatError: the bytes are not a gzip header zlib could decode.
    """
    b = bytes(buf[:10])
    if len(b) >= 2 and b[:2] != b"\x1f\x8b":
        raise LayerFormatError("not a gzip stream (bad magic bytes)")
    if len(b) >= 3 and b[2] != 8:
        raise LayerFormatError(f"gzip compression method {b[2]} is not deflate")
    if len(b) >= 4 and b[3] & 0xE0:
        raise LayerFormatError("gzip header has reserved flag bits set")
    if len(b) < 10:
        return None
    flags = b[3]
    pos = 10
    if flags & _FEXTRA:
        if len(buf) < pos + 2:
            return None
        pos += 2 + int.from_bytes(bytes(buf[pos : pos + 2]), "little")
    for flag in (_FNAME, _FCOMMENT):
        if flags & flag:
            end = bytes(buf[pos:]).find(b"\0")
            if end < 0:
                return None
            pos += end + 1
    if flags & _FHCRC:
        pos += 2
    return pos if len(buf) >= pos else None


def candidates(xfl: int = 0) -> list[tuple[int, int, int, int]]:
    """zlib settings ``(level, wbits, mem_level, strategy)`` to try, likeliest first.

    The header's XFL byte hints at the level (2: 9, 4: 1); then the common levels 6, 9, 1,
    then the rest, each with memLevel 8 then 9, default strategy and a 32 KiB window. Then
    the rare ones, for the three likeliest levels only: other strategies, smaller windows
    and memLevels (a candidate costs ~10 ms, mostly compressing until zlib emits a block).
    """
    levels = [9] if xfl == 2 else [1] if xfl == 4 else []
    levels += [lv for lv in (6, 9, 1, 2, 3, 4, 5, 7, 8, 0) if lv not in levels]
    top = levels[:3]
    out = [(lv, 15, mem, zlib.Z_DEFAULT_STRATEGY) for lv in levels for mem in (8, 9)]
    out += [(lv, 15, 8, zlib.Z_FILTERED) for lv in top if lv >= 4]  # lazy matching only
    out += [(lv, 15, 8, zlib.Z_FIXED) for lv in top]
    out += [(top[0], 15, 8, s) for s in (zlib.Z_RLE, zlib.Z_HUFFMAN_ONLY)]
    out += [(lv, wb, 8, 0) for wb in (14, 13, 12, 11, 10, 9) for lv in top]
    out += [(lv, 15, mem, 0) for mem in (7, 6, 5, 4, 3, 2, 1) for lv in top]
    return out


class _Deflater:
    """Raw deflate whose output does not depend on how the input is split.

    Levels 1-9 take input as it comes (zlib's output with Z_NO_FLUSH is split-independent
    there); level 0 cuts stored blocks at input call boundaries, so it is fed fixed
    SLICE-sized pieces.
    """

    def __init__(self, level: int, wbits: int, mem_level: int, strategy: int) -> None:
        self._z = zlib.compressobj(level, zlib.DEFLATED, -wbits, mem_level, strategy)
        self._pending = bytearray()
        self._stored = level == 0

    def update(self, data: bytes | bytearray | memoryview) -> bytes:
        if not self._stored:
            return self._z.compress(data)
        view = memoryview(data).cast("B")
        out: list[bytes] = []
        if self._pending:
            need = SLICE - len(self._pending)
            self._pending += view[:need]
            view = view[need:]
            if len(self._pending) < SLICE:
                return b""
            out.append(self._z.compress(self._pending))
            self._pending = bytearray()
        whole = len(view) - len(view) % SLICE
        for off in range(0, whole, SLICE):
            out.append(self._z.compress(view[off : off + SLICE]))
        self._pending += view[whole:]
        return b"".join(out)

    def flush(self) -> bytes:
        out = self._z.compress(self._pending) if self._pending else b""
        self._pending = bytearray()
        return out + self._z.flush()


def _trailer(crc: int, size: int) -> bytes:
    return struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF)


class GzipEncoder:
    """Re-encodes uncompressed bytes into the gzip member that ``params`` describe.

    The output is the same whatever way the input is split across :meth:`update` calls.
    """

    def __init__(self, params: GzipParams) -> None:
        self.params = params
        self._d = _Deflater(params.level, params.wbits, params.mem_level, params.strategy)
        self._crc = 0
        self._size = 0
        self._header_sent = False
        self._finished = False

    def _head(self) -> bytes:
        if self._header_sent:
            return b""
        self._header_sent = True
        return self.params.header

    def update(self, data: bytes | bytearray | memoryview) -> bytes:
        """Compress more input; returns the output bytes ready so far (may be empty)."""
        if self._finished:
            raise ValueError("update() after finish()")
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(memoryview(data).cast("B"))
        return self._head() + self._d.update(data)

    def finish(self) -> bytes:
        """The rest of the member: the deflate tail and the CRC-32/ISIZE trailer."""
        if self._finished:
            raise ValueError("finish() called twice")
        self._finished = True
        return self._head() + self._d.flush() + _trailer(self._crc, self._size)


# --- decoding ---------------------------------------------------------------------------


class GzipDecoder:
    """Incremental gzip decompression, member after member.

    ``feed()`` yields uncompressed pieces of at most OUT_PIECE bytes; exhaust it before
    feeding more. Data after the last member that does not start like a gzip member
    (e.g. zero padding) is counted in :attr:`trailing` and otherwise ignored.
    """

    def __init__(self) -> None:
        self._z = zlib.decompressobj(16 + 15)
        self._fed = 0
        self._in_member = False  # bytes of the current member have been given to zlib
        self._between = b""  # bytes after a member, too few to tell what they are
        self.members = 0  # completed members
        self.first_member_end: int | None = None  # offset of the first member's end
        self.trailing = 0  # bytes ignored after the last member
        self.size = 0  # uncompressed bytes yielded

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[bytes]:
        buf = bytes(data)
        self._fed += len(buf)
        while buf:
            if self.trailing:
                self.trailing += len(buf)
                return
            if self.members and not self._in_member:
                buf = self._between + buf
                self._between = b""
                if len(buf) < 2:
                    self._between = buf
                    return
                if buf[:2] != b"\x1f\x8b":
                    self.trailing = len(buf)
                    return
                self._z = zlib.decompressobj(16 + 15)
            self._in_member = True
            while True:
                try:
                    out = self._z.decompress(buf, OUT_PIECE)
                except zlib.error as exc:
                    raise LayerFormatError(
                        f"corrupt gzip data in member {self.members + 1}: {exc}"
                    ) from None
                if out:
                    self.size += len(out)
                    yield out
                buf = self._z.unconsumed_tail
                if self._z.eof or (not buf and len(out) < OUT_PIECE):
                    break
            if not self._z.eof:
                return
            buf = self._z.unused_data
            self.members += 1
            self._in_member = False
            if self.first_member_end is None:
                self.first_member_end = self._fed - len(buf)

    def finish(self) -> None:
        """Check the stream ended cleanly. Raises LayerFormatError if it is truncated."""
        if self._in_member:
            raise LayerFormatError(
                f"gzip stream is truncated (member {self.members + 1} is incomplete)"
            )
        if not self.members:
            raise LayerFormatError("empty gzip stream")
        if self._between:
            self.trailing += len(self._between)
            self._between = b""


def decompress(pieces: Iterable[bytes | bytearray | memoryview]) -> Iterator[bytes]:
    """Stream the uncompressed bytes of a gzip stream given as compressed pieces.

    Raises:
        LayerFormatError: corrupt or truncated data.
    """
    dec = GzipDecoder()
    for piece in pieces:
        yield from dec.feed(piece)
    dec.finish()


# --- the parameter search ---------------------------------------------------------------


def _first_diff(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> int:
    n = min(len(a), len(b))
    lo = 0
    while n - lo > 64:  # bisect on equal slices, then scan
        mid = (lo + n) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            n = mid
    for i in range(lo, n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class _Match:
    params: GzipParams
    deflater: _Deflater
    emitted: bytes  # output past the part compared with the original
    matched: int  # original body bytes confirmed equal


def _try(
    cand: tuple[int, int, int, int], header: bytes, body: memoryview, unc: memoryview, whole: bool
) -> tuple[_Match | None, bool]:
    """Compress ``unc`` with ``cand`` and compare with ``body``: (match, conclusive)."""
    level, wbits, mem, strategy = cand
    d = _Deflater(level, wbits, mem, strategy)
    emitted = bytearray()
    # Levels 1-9 do not care how input is split: small steps drop a wrong candidate sooner.
    step = SLICE if level == 0 else SEARCH_STEP
    for off in range(0, len(unc), step):
        out = d.update(unc[off : off + step])
        if out:
            start = len(emitted)
            if body[start : start + len(out)] != out[: max(0, len(body) - start)]:
                return None, True
            emitted += out
    params = GzipParams(header, level, wbits, mem, strategy)
    if whole:
        tail = d.flush() + _trailer(zlib.crc32(unc), len(unc))
        if bytes(emitted) + tail != body:
            return None, True
        return _Match(params, d, b"", len(body)), True
    matched = min(len(emitted), len(body))
    return _Match(params, d, bytes(emitted[matched:]), matched), matched >= EVIDENCE


def _search(
    compressed: bytes | bytearray, uncompressed: bytes | bytearray, whole: bool
) -> tuple[_Match | None, str]:
    try:
        hlen = parse_header(compressed)
    except LayerFormatError as exc:
        return None, str(exc)
    if hlen is None:
        return None, "gzip header is incomplete"
    header = bytes(compressed[:hlen])
    body = memoryview(compressed)[hlen:]
    unc = memoryview(uncompressed)
    fallback: _Match | None = None
    for cand in candidates(compressed[8]):
        found, conclusive = _try(cand, header, body, unc, whole)
        if found is not None and conclusive:
            return found, ""
        if found is not None:  # zlib emitted too little to tell: the rest would not either
            fallback = found
            break
    if fallback is not None:
        return fallback, ""
    what = "the gzip member" if whole else f"the first {len(unc)} bytes of data"
    return None, f"no zlib {ZLIB_VERSION} settings reproduce {what}"


def find_params(
    compressed: bytes | bytearray, uncompressed: bytes | bytearray, whole: bool = False
) -> GzipParams | None:
    """zlib settings that reproduce a gzip member, judged on a prefix.

    ``compressed`` is the start of the member (header included) and ``uncompressed`` at
    least the data it decodes to; ``whole`` says both are complete (then the answer is
    exact). Otherwise the answer is a candidate the caller must verify on the full stream.
    """
    found, _ = _search(compressed, uncompressed, whole)
    return None if found is None else found.params


class GzipProbe:
    """Decompresses a gzip layer as it streams and finds out whether zlib reproduces it.

    See the module docstring. After :meth:`finish`, :attr:`params` is the verified
    recipe, or None with :attr:`reason` saying why the layer is not reproducible.
    """

    def __init__(self, probe_size: int = PROBE_SIZE) -> None:
        self._probe_size = probe_size
        self._dec = GzipDecoder()
        self._state = "collect"  # -> "verify" -> "done" | "failed"
        self._comp = bytearray()  # collect: the compressed prefix; verify: unmatched input
        self._unc = bytearray()  # collect: the uncompressed prefix; verify: < SLICE batch
        self._enc = bytearray()  # verify: re-encoded output not yet compared
        self._match: _Match | None = None
        self._offset = 0  # compressed offset of self._comp[0] (verify)
        self._crc = 0
        self._usize = 0  # uncompressed bytes of the first member
        self.params: GzipParams | None = None
        self.reason = "stream not finished"

    @property
    def uncompressed_size(self) -> int:
        return self._dec.size

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[bytes]:
        """Yield the uncompressed pieces ``data`` completes; exhaust before feeding more."""
        if self._state in ("collect", "verify") and not self._dec.members:
            self._comp += data
        for piece in self._dec.feed(data):
            self._member_check()
            if self._state in ("collect", "verify") and not self._dec.members:
                self._uncompressed(piece)
            yield piece
        self._member_check()
        if self._state == "verify":
            self._compare()

    def finish(self) -> None:
        """End of input. Raises LayerFormatError if the stream is truncated or empty."""
        self._dec.finish()
        self._member_check()
        if self._state != "done":
            return
        if self._dec.members > 1:
            self._fail(f"the gzip stream has {self._dec.members} members")
        elif self._dec.trailing:
            self._fail(f"{self._dec.trailing} bytes follow the gzip member")
        else:
            assert self._match is not None
            self.params = self._match.params
            self.reason = ""

    # --- internals -----------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        self._state = "failed"
        self.reason = reason
        self.params = None
        self._match = None
        self._comp, self._unc, self._enc = bytearray(), bytearray(), bytearray()

    def _uncompressed(self, piece: bytes) -> None:
        self._usize += len(piece)
        self._unc += piece
        if self._state == "collect":
            if len(self._unc) >= self._probe_size:
                self._start(whole=False)
            return
        if len(self._unc) >= SLICE:
            assert self._match is not None
            self._crc = zlib.crc32(self._unc, self._crc)
            self._enc += self._match.deflater.update(self._unc)
            self._unc = bytearray()

    def _start(self, whole: bool) -> None:
        found, reason = _search(self._comp, self._unc, whole)
        if found is None:
            self._fail(reason)
            return
        self._match = found
        if whole:
            self._state = "done"
            return
        hlen = len(found.params.header)
        self._state = "verify"
        self._offset = hlen + found.matched
        self._comp = self._comp[self._offset :]
        self._enc = bytearray(found.emitted)
        self._crc = zlib.crc32(self._unc)
        self._unc = bytearray()

    def _compare(self) -> None:
        n = min(len(self._comp), len(self._enc))
        if not n:
            return
        if self._comp[:n] != self._enc[:n]:
            at = self._offset + _first_diff(self._comp[:n], self._enc[:n])
            assert self._match is not None
            p = self._match.params
            self._fail(
                f"re-encoding with zlib level {p.level} memLevel {p.mem_level} "
                f"differs from byte {at} of the gzip stream"
            )
            return
        del self._comp[:n]
        del self._enc[:n]
        self._offset += n

    def _member_check(self) -> None:
        """Once the first member has ended: decide the search, or verify its tail."""
        end = self._dec.first_member_end
        if end is None or self._state not in ("collect", "verify"):
            return
        if self._state == "collect":
            del self._comp[end:]
            self._start(whole=True)
            return
        assert self._match is not None
        self._crc = zlib.crc32(self._unc, self._crc)
        self._enc += self._match.deflater.update(self._unc)
        self._enc += self._match.deflater.flush() + _trailer(self._crc, self._usize)
        self._unc = bytearray()
        del self._comp[end - self._offset :]
        if len(self._comp) != len(self._enc):
            self._compare()  # reports where they part, if they do before one ends
            if self._state == "verify":
                self._fail("re-encoded gzip member has a different length")
            return
        self._compare()
        if self._state == "verify":
            self._state = "done"
