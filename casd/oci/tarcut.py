"""Tar-member-aware chunking: headers apart from file data, FastCDC inside members.

A tar archive interleaves 512-byte member headers with file data. A rebuilt image layer
usually changes every header (fresh mtimes) but few files, and with plain FastCDC each
changed header spoils the chunk that also holds its neighbours' data. :class:`TarCutter`
cuts the archive into *pieces* and each piece into chunks:

* the **header group** of a member: its header block (with GNU sparse extension blocks)
  and every extended header before it (pax ``x``/``g``/``X``, GNU ``L``/``K`` long names,
  each with its data). One chunk; a group larger than the chunker maximum (giant pax
  records) is cut by FastCDC so no chunk ever exceeds ``params.max``;
* the **data** of a member plus its padding to 512 bytes, cut by FastCDC (a piece below
  the chunker minimum is one chunk). Which members carry data follows Python's
  ``tarfile``: regular files and unknown types do, links, directories and devices do not.
  A pax ``size=`` record overrides the size of the member it precedes; sizes may be octal
  or GNU base-256;
* the **tail**: from the end-of-archive zero block to the end of the stream, cut by
  FastCDC. Where the stream stops looking like a tar (a header with a bad checksum or an
  unreadable size, a header group larger than ``MAX_HEADER_GROUP``, a truncated header),
  the tail starts at that header group instead. Nothing here raises on malformed input,
  and the chunks always concatenate to exactly the input: a non-tar is cut exactly as
  :meth:`Chunker.cut` cuts it.

Pieces are never merged: a directory entry costs one chunk, a small file two. Cutting is
a function of the bytes only, so :meth:`TarCutter.cut_stream` and :meth:`TarCutter.cut`
give the same chunks whatever the read sizes. Streams are read through a bounded window
(default 8 MiB, plus at most one header group); large members are cut window by window
as :meth:`Chunker.cut_stream` does, so the hot path is FastCDC over big buffers.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from typing import BinaryIO

from casd.chunking import Chunker

BLOCK = 512

#: Header groups longer than this end the tar parsing (the rest is cut by plain FastCDC).
#: Python's tarfile and GNU tar write pax records of a few hundred bytes; 1 MiB leaves room
#: for big xattrs while bounding what a header group holds in memory.
MAX_HEADER_GROUP = 1024 * 1024

_EXTENDED = frozenset(b"xgXLK")  # headers that describe the next member
_PAX = frozenset(b"xX")  # per-member pax records (a 'g' record's size is not honoured)
_NO_DATA = frozenset(b"123456")  # hard/symbolic links, devices, directories, fifos
_ZERO_BLOCK = bytes(BLOCK)


def _number(field: bytes | memoryview) -> int | None:
    """A numeric header field: octal (NUL/space padded) or GNU base-256; None if unreadable."""
    raw = bytes(field)
    if raw[:1] and raw[0] & 0x80:
        if raw[0] == 0xFF:  # negative base-256: never a valid size
            return None
        return int.from_bytes(bytes([raw[0] & 0x7F]) + raw[1:], "big")
    text = raw.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        return None


def _checksum_ok(header: memoryview) -> bool:
    stored = _number(header[148:156])
    if stored is None:
        return False
    raw = bytes(header)
    unsigned = sum(raw) - sum(raw[148:156]) + 8 * 0x20
    if stored == unsigned:
        return True
    # Some old tars summed signed chars; tarfile accepts both.
    signed = unsigned - 256 * sum(1 for b in raw[:148] + raw[156:] if b >= 0x80)
    return stored == signed


def _pax_size(records: bytes) -> int | None:
    """The ``size`` record of a pax extended header, if it has a readable one."""
    size = None
    pos = 0
    while pos < len(records):
        space = records.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(records[pos:space])
        except ValueError:
            break
        if length <= space - pos or pos + length > len(records):
            break
        key, sep, value = records[space + 1 : pos + length].partition(b"=")
        if sep and key == b"size":
            try:
                size = int(value.rstrip(b"\n"))
            except ValueError:
                size = None
        pos += length
    return size if size is not None and size >= 0 else None


def _padded(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


class _Source:
    """The input as a sliding window of bytes. ``buf[pos:end]`` is read but not handed out.

    A window is only ever appended to; when it is full, the unread tail moves into a
    fresh one, so views handed out earlier stay valid.
    """

    def __init__(self, buf: memoryview, stream: BinaryIO | None, window: int) -> None:
        self.buf = buf
        self.pos = 0
        self.end = len(buf) if stream is None else 0
        self.eof = stream is None
        self.window = window
        self._readinto = None if stream is None else stream.readinto  # type: ignore[attr-defined]

    def fill(self, want: int) -> int:
        """Make ``want`` bytes available unless the stream ends first; return how many are."""
        while self.end - self.pos < want and not self.eof:
            if self.pos + want > len(self.buf) or self.end == len(self.buf):
                tail = self.buf[self.pos : self.end]
                self.buf = memoryview(bytearray(max(self.window, want)))
                self.buf[: len(tail)] = tail
                self.pos, self.end = 0, len(tail)
            n = self._readinto(self.buf[self.end :])  # type: ignore[misc]
            if n:
                self.end += n
            else:
                self.eof = True
        return self.end - self.pos

    def take(self, n: int) -> memoryview:
        view = self.buf[self.pos : self.pos + n]
        self.pos += n
        return view


class TarCutter:
    """Cuts tar streams at member boundaries and by content inside members."""

    def __init__(self, chunker: Chunker) -> None:
        self.chunker = chunker
        self._cdc = chunker._cdc
        self._min = chunker.params.min
        self._max = chunker.params.max

    def cut(self, buf: bytes | bytearray | memoryview | mmap.mmap) -> Iterator[memoryview]:
        """Yield zero-copy views of the chunks of ``buf``, in order."""
        return self._cut(_Source(memoryview(buf).cast("B"), None, 0))

    def cut_stream(self, stream: BinaryIO, window: int = 8 * 1024 * 1024) -> Iterator[memoryview]:
        """Yield the chunks of a stream, identical to ``cut(stream.read())``.

        ``stream`` needs ``readinto``. Views stay valid after further iteration.
        """
        if window < 4 * self._max:
            raise ValueError("window must hold at least four maximal chunks")
        return self._cut(_Source(memoryview(bytearray(0)), stream, window))

    # --- the cutting -------------------------------------------------------------------

    def _cut(self, src: _Source) -> Iterator[memoryview]:
        while True:
            group = self._header_group(src)
            if group is None:
                yield from self._piece(src, None)  # the tail, to the end of the stream
                return
            length, data = group
            if length <= self._max:
                yield src.take(length)
            else:
                for c in self._cdc.cut_buf(src.take(length)):
                    yield c.data
            if data:
                yield from self._piece(src, data)

    def _header_group(self, src: _Source) -> tuple[int, int] | None:
        """Parse the header group at ``src.pos`` without consuming it.

        Returns its length and the padded length of the member data after it, or None
        when the archive ends or stops being a tar here.
        """
        off = 0
        pax_size: int | None = None
        while True:
            if off + BLOCK > MAX_HEADER_GROUP or src.fill(off + BLOCK) < off + BLOCK:
                return None
            start = src.pos + off
            header = src.buf[start : start + BLOCK]
            if header == _ZERO_BLOCK or not _checksum_ok(header):
                return None
            size = _number(header[124:136])
            if size is None:
                return None
            kind = header[156]
            off += BLOCK
            if kind in _EXTENDED:
                body = _padded(size)
                if off + body > MAX_HEADER_GROUP or src.fill(off + body) < off + body:
                    return None
                if kind in _PAX:
                    start = src.pos + off
                    found = _pax_size(bytes(src.buf[start : start + size]))
                    if found is not None:
                        pax_size = found
                off += body
                continue
            if kind == ord("S"):  # old GNU sparse: extension blocks while isextended is set
                extended = header[482]
                while extended:
                    if off + BLOCK > MAX_HEADER_GROUP or src.fill(off + BLOCK) < off + BLOCK:
                        return None
                    extended = src.buf[src.pos + off + 504]
                    off += BLOCK
            if pax_size is not None:
                size = pax_size
            if kind in _NO_DATA or (kind == 0 and _is_old_dir(header)):
                size = 0
            return off, _padded(size)

    def _piece(self, src: _Source, length: int | None) -> Iterator[memoryview]:
        """Cut the next ``length`` bytes (None: all that is left) by FastCDC; a stream that
        ends early ends the piece."""
        remaining = length if length is not None else 1 << 62
        if remaining <= self._min:  # one chunk, no need to run the cutter
            n = min(src.fill(remaining), remaining)
            if n:
                yield src.take(n)
            return
        lookahead = 2 * self._max
        while remaining > 0:
            avail = src.fill(min(remaining, lookahead))
            n = min(avail, remaining)
            if n == 0:
                return
            final = n == remaining or (src.eof and n == avail)
            chunks = list(self._cdc.cut_buf(src.buf[src.pos : src.pos + n]))
            if not final:
                chunks.pop()  # possibly cut by the window's end, not by content
            for c in chunks:
                yield c.data
            taken = sum(c.length for c in chunks)
            src.pos += taken
            remaining -= taken


def _is_old_dir(header: memoryview) -> bool:
    """A pre-POSIX directory: type NUL and a name ending in '/' (as tarfile reads it)."""
    name = bytes(header[:100]).split(b"\0", 1)[0]
    return name.endswith(b"/")
