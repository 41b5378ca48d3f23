"""The gzip casd writes itself (``oci convert``): one gzip member per MiB of tar.

A layer casd converts must be re-encoded, byte for byte, by every casd host that serves
it: a receiver gets the tar's chunks, not the compressed bytes. With one zlib stream
that costs a single core at zlib's speed (about 65 MB/s of tar here at level 1), and it
dominated the time of a sync on a fast link. So a converted layer is a *series of gzip
members*, each the deflate of one ``segment`` (1 MiB) of the tar:

- each member depends on its segment alone, so segments compress in parallel threads
  (both deflaters below release the GIL), and any host makes the same bytes;
- libdeflate level 1 ran at 174 MB/s on one core on a 153 MB tar of site-packages
  (268 MB/s on two), against 67 MB/s for zlib level 1, and its output was 3 % smaller;
- a member's header is casd's own (no name, mtime 0, OS "unknown"), so it does not
  depend on the library, only the deflate body does; :attr:`MembersParams.lib` records
  the library that made it. Another version may compress differently: the receiver
  verifies the layer digest anyway and falls back to fetching the compressed bytes.

Several members in one stream are plain RFC 1952: gzip(1), Go's compress/gzip (what
skopeo, podman and containerd use), zlib and Python all read them as one stream.

Two deflaters make members, named in :attr:`MembersParams.lib` (a layer is made again
only by the library that made it): ISA-L (``isal``), what ``oci convert`` uses by
default, and libdeflate, its default before. On the same 1 MiB segments of a 153 MB tar
of site-packages, one core: libdeflate level 1 227 MB/s for 0.387 of the tar, ISA-L
level 2 575 MB/s for 0.403 (level 1: 623 MB/s, 0.409; level 3: 387 MB/s, 0.396); on a
Debian root filesystem 221 against 607 MB/s, 0.413 against 0.429. Every host that syncs
a converted layer deflates it again in full, on every sync, and on a fast link that was
a third of the receiver's time (a 122 MB layer: 0.34 s of a 1.2 s sync over 1 Gbit/s);
4 % more bytes is what a plain registry client of the converted image pays for it.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import deflate
from isal import isal_zlib

from casd.oci.gzipre import LayerFormatError
from casd.pools import SharedPool

CODEC = "gzip-members"
#: Uncompressed bytes per member: large enough that losing deflate's 32 KiB of history at
#: each boundary costs nothing measurable, small enough to spread over threads.
SEGMENT = 1024 * 1024
#: No FNAME, mtime 0, XFL 0, OS 255 ("unknown").
HEADER = bytes([0x1F, 0x8B, 8, 0, 0, 0, 0, 0, 0, 255])
#: The deflaters, as :attr:`MembersParams.lib` names them: the family (the name's first
#: word) picks the code, the version is what makes the bytes (both are pinned).
LIB_ISAL = f"isa-l (isal {version('isal')})"
LIB_DEFLATE = f"libdeflate (deflate {version('deflate')})"
#: What ``oci convert`` makes members with unless told otherwise.
LIB = LIB_ISAL
#: Each family's levels that ``oci convert`` makes and hosts make again: those whose
#: output is a function of the input and the level alone. ISA-L picks its code by the
#: CPU; its levels 0-2 gave the same bytes from its AVX-512 and AVX2 code, level 3 did
#: not (and read memory it had not written), so a host with another CPU would never
#: make a level-3 layer again. Such a layer (as casd made them for a day) is still
#: read; its members are fetched, not made (:func:`makes_here`).
LEVELS = {"isa-l": range(0, 3), "libdeflate": range(1, 13)}
#: The levels a layer's parameters may name.
_NAMED_LEVELS = {"isa-l": range(0, 4), "libdeflate": range(1, 13)}
#: Short names (``casctl oci convert --lib``) of the deflaters this host has.
LIBS = {"isal": LIB_ISAL, "libdeflate": LIB_DEFLATE}


def _isal_body(segment: bytes | bytearray | memoryview, level: int) -> bytes:
    return isal_zlib.compress(segment, level, -15)  # raw deflate: no zlib wrapper


_BODIES: dict[str, Callable[[bytes | bytearray | memoryview, int], bytes | bytearray]] = {
    "isa-l": _isal_body,
    "libdeflate": deflate.deflate_compress,
}


def family(lib: str) -> str:
    """The deflater family a :attr:`MembersParams.lib` names ("isa-l", "libdeflate")."""
    return lib.split(" ", 1)[0]


def makes_here(lib: str, level: int | None = None) -> bool:
    """Whether this host has the deflater family ``lib`` names, and ``level`` is one of
    those it makes the same bytes at on any CPU (whether its version makes the same
    bytes is for the layer digest to say)."""
    fam = family(lib)
    return fam in _BODIES and (level is None or level in LEVELS[fam])


#: A receiver of a converted layer's compressed bytes deflates again every this many
#: members (and the last) to check it makes the same bytes, when the layer was made by
#: the same deflater as its own (see :class:`MembersDecoder`).
CHECK_EVERY = 16

_WORKERS = max(1, min(4, os.cpu_count() or 1))
#: Segments an encoder keeps in flight on the pool: every worker busy, memory bounded.
_IN_FLIGHT = 2 * _WORKERS
_executor = SharedPool(_WORKERS, "casd-deflate").get


@dataclass(frozen=True)
class MembersParams:
    level: int  # the deflater's level (LEVELS)
    segment: int = SEGMENT
    lib: str = LIB  # what made the members: its family makes them again; the digest decides

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "segment": self.segment, "lib": self.lib}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MembersParams:
        """Inverse of :meth:`to_dict`. Raises LayerFormatError on anything malformed."""
        try:
            params = cls(level=int(d["level"]), segment=int(d["segment"]), lib=str(d["lib"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise LayerFormatError(f"unreadable gzip-members parameters {d!r}") from exc
        # A deflater this host lacks is no error here: the layer is then fetched whole.
        levels = _NAMED_LEVELS.get(family(params.lib), range(0, 13))
        if params.level not in levels or not 4096 <= params.segment <= 64 * 1024 * 1024:
            raise LayerFormatError(f"invalid gzip-members parameters {d!r}")
        return params


def member(segment: bytes | bytearray | memoryview, level: int, lib: str = LIB) -> bytes:
    """One complete gzip member holding ``segment``, deflated by ``lib``'s family.

    Raises:
        LayerFormatError: this host lacks that deflater.
    """
    body_of = _BODIES.get(family(lib))
    if body_of is None:
        raise LayerFormatError(f"gzip members made by {lib}, which this host lacks")
    body = body_of(segment, level)
    return b"".join((HEADER, body, struct.pack("<II", deflate.crc32(segment), len(segment))))


class MembersEncoder:
    """Streams the member series of :class:`MembersParams`; the same interface as
    :class:`casd.oci.gzipre.GzipEncoder` (output independent of how input is split).

    Segments are compressed on the shared worker pool *behind* the caller: ``update``
    hands over whole segments and returns the members finished so far, waiting only when
    more than a few are in flight. The caller (reading chunks from the store, hashing)
    and the compression overlap, on different cores. Not thread-safe.
    """

    #: Takes input in pieces of any size without cost: callers need not gather it first.
    buffers_input = True

    def __init__(self, params: MembersParams) -> None:
        self.params = params
        # Input not yet in a segment, as the pieces it came in: a segment is joined from
        # them once (the only copy of the input made here, and it holds the GIL).
        self._pieces: list[bytes | memoryview] = []
        self._held = 0
        self._inflight: deque[Future[bytes]] = deque()
        self._emitted = False
        self._finished = False

    def _submit(self, segment: bytes) -> None:
        self._emitted = True
        p = self.params
        self._inflight.append(_executor().submit(member, segment, p.level, p.lib))

    def _ready(self, keep: int) -> bytes:
        # Members in order: those done, and as many more as needed to leave `keep` in flight.
        out = []
        while self._inflight and (len(self._inflight) > keep or self._inflight[0].done()):
            out.append(self._inflight.popleft().result())
        return b"".join(out)

    def update(self, data: bytes | bytearray | memoryview) -> bytes:
        """Compress more input; returns the members completed so far (may be empty).
        ``data`` must not change afterwards (it is kept until its segment is whole)."""
        if self._finished:
            raise ValueError("update() after finish()")
        seg = self.params.segment
        view = memoryview(data).cast("B")
        while self._held + len(view) >= seg:
            take = seg - self._held
            self._pieces.append(view[:take])
            self._submit(b"".join(self._pieces))
            self._pieces, self._held = [], 0
            view = view[take:]
        if view:
            self._pieces.append(view)
            self._held += len(view)
        return self._ready(keep=_IN_FLIGHT)

    def finish(self) -> bytes:
        """The remaining members (an empty input still gives one, empty, member)."""
        if self._finished:
            raise ValueError("finish() called twice")
        self._finished = True
        if self._held or not self._emitted:
            self._submit(b"".join(self._pieces))
            self._pieces, self._held = [], 0
        return self._ready(keep=0)


class MemberNotMadeAgain(LayerFormatError):
    """A gzip member that inflates right, but that this host's deflater, run on what it
    holds, makes otherwise."""


def _checked_member(
    data: bytes, level: int, segment: int, last: bool, deflate_again: bool = True, lib: str = LIB
) -> bytearray:
    """The segment gzip member ``data`` holds, if it is exactly the member this host's
    ``lib`` makes of that segment at ``level`` (pool worker). Without
    ``deflate_again``, only its framing, size and CRC are checked.

    Raises:
        LayerFormatError: it is not such a member.
    """
    if len(data) < len(HEADER) + 8 or not data.startswith(HEADER):
        raise LayerFormatError("a gzip member without casd's member header")
    _, size = struct.unpack_from("<II", data, len(data) - 8)
    if size > segment or (not last and size != segment):
        raise LayerFormatError(f"a gzip member of {size} bytes in a series of {segment}")
    try:
        seg = deflate.deflate_decompress(data[len(HEADER) : -8], size)
    except deflate.DeflateError as exc:
        raise LayerFormatError(f"a gzip member that does not inflate: {exc}") from None
    if len(seg) != size:
        raise LayerFormatError(f"a gzip member of {len(seg)} bytes that says {size}")
    if deflate.crc32(seg) != struct.unpack_from("<I", data, len(data) - 8)[0]:
        raise LayerFormatError("a gzip member whose CRC does not match its data")
    if deflate_again and member(seg, level, lib) != data:
        raise MemberNotMadeAgain(f"a gzip member this host's {family(lib)} does not make")
    return seg


class MembersDecoder:
    """The tar of a member series (:class:`MembersParams`) from its compressed bytes,
    each member checked to be exactly what :class:`MembersEncoder` makes of its segment
    here: decoding and the re-encoding check are one pass, on the pool.

    A receiver of a converted layer's compressed bytes must know it can make them again
    from the tar (it keeps the tar's chunks, not the bytes). Inflating with zlib and then
    re-encoding took a core for zlib alone (about 190 MB/s of tar); libdeflate inflates
    a member at about 680 MB/s, and does so on every worker. Members are told apart by
    their header, which casd writes and deflate data will not hold by chance (ten fixed
    bytes); a split in the wrong place makes a member that fails its check, never a
    wrong tar. ``feed`` the bytes in order, then ``finish``; both return the tar
    decoded so far. Not thread-safe.

    Deflating again cost a 396 MB tar 2.3 s of CPU, a quarter of what its landing cost
    (inflating, cutting, hashing and storing it). When the layer's parameters name one of
    this host's own deflaters, whose output is a function of its input and level alone, only
    every :data:`CHECK_EVERY`-th member and the last are deflated again: another
    library or version differs on nearly every member, so a sample finds it. The
    others are checked for framing, size and CRC. ``fully_checked`` says whether every
    member was deflated again; when it is not, the caller keeps the bytes until a whole
    re-encoding has made them (:meth:`casd.oci.layers.LayerCache.adopt`). Without
    ``deflate_again`` no member is deflated again: what is checked is that the series
    inflates, member by member, to data of the sizes and CRCs it states (how
    ``oci convert`` checks what it has just made).
    """

    def __init__(
        self, params: MembersParams, *, sample: bool = True, deflate_again: bool = True
    ) -> None:
        self.params = params
        self._buf = bytearray()
        self._searched = 0  # where the search for the next header goes on from
        self._inflight: deque[Future[bytearray]] = deque()
        # 0: no member is deflated again (only inflated, and its size and CRC checked).
        self._every = (
            0 if not deflate_again else CHECK_EVERY if sample and params.lib in LIBS.values() else 1
        )
        self._count = 0

    @property
    def fully_checked(self) -> bool:
        return self._every == 1

    def _submit(self, data: bytes, last: bool) -> None:
        p = self.params
        again = self._every > 0 and (last or self._count % self._every == 0)
        self._count += 1
        self._inflight.append(
            _executor().submit(_checked_member, data, p.level, p.segment, last, again, p.lib)
        )

    def _ready(self, keep: int) -> list[bytearray]:
        out = []
        while self._inflight and (len(self._inflight) > keep or self._inflight[0].done()):
            out.append(self._inflight.popleft().result())
        return out

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytearray]:
        buf = self._buf
        buf += data
        while True:
            nxt = buf.find(HEADER, max(self._searched, len(HEADER) + 10))
            if nxt < 0:
                self._searched = max(len(buf) - len(HEADER) + 1, 0)
                break
            self._submit(bytes(buf[:nxt]), last=False)
            del buf[:nxt]
            self._searched = 0
        return self._ready(keep=_IN_FLIGHT)

    def finish(self) -> list[bytearray]:
        """The rest of the tar. Raises LayerFormatError if the series is not whole."""
        if not self._buf:
            raise LayerFormatError("a member series that ends early, or is empty")
        self._submit(bytes(self._buf), last=True)
        self._buf = bytearray()
        return self._ready(keep=0)
