"""Pack files: append-only sequences of self-describing chunk records (docs/format.md)."""

from __future__ import annotations

import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from casd.errors import ChunkCorrupt, NoSpace, PackBroken, StoreError

PACK_MAGIC = b"CASDPACK"
PACK_VERSION = 1
PACK_HEADER = struct.Struct(">8sII16x")  # magic, version, pack number, reserved
RECORD_HEADER = struct.Struct(">2sBBIII32sQ")  # magic, codec, flags, raw, stored, rsvd, id, xxh3
RECORD_MAGIC = b"CR"

# A pack takes appends until it passes this size: 1 GiB of chunks makes 16 files, and a
# gc rewrite of a mostly-dead pack moves at most 64 MiB.
PACK_TARGET = 64 * 1024 * 1024

# writev accepts at most IOV_MAX (1024 on Linux) buffers per call.
_IOV_MAX = 1024

# A handle of a removed pack is closed this long after the removal, not at once: a
# reader that took it just before may still be reading through it.
_RETIRE_S = 30.0

# Open read handles kept per store: each pack read is a pread on a cached fd. 256 packs
# cover 16 GiB of hot data; beyond that the least recently used handle is closed.
_MAX_READ_FDS = 256


def pack_name(number: int) -> str:
    return f"{number:08x}.pack"


def parse_pack_name(filename: str) -> int | None:
    """The number of a pack file's name, or None for any other file."""
    stem, dot, ext = filename.partition(".")
    if ext != "pack" or not dot or len(stem) != 8:
        return None
    try:
        return int(stem, 16)
    except ValueError:
        return None


def checksum(payload: bytes | memoryview) -> int:
    """xxh3-64 of a stored payload: detects bitrot, not adversaries (ids do that)."""
    return xxhash.xxh3_64_intdigest(payload)


@dataclass(frozen=True, slots=True)
class Location:
    """Where a chunk's record lives, and what the index knows about it."""

    pack: int
    offset: int
    stored_len: int
    raw_len: int
    codec: int
    xxh3: int

    STRUCT = struct.Struct(">IQIIBQ")

    def pack_value(self) -> bytes:
        return self.STRUCT.pack(
            self.pack, self.offset, self.stored_len, self.raw_len, self.codec, self.xxh3
        )

    @classmethod
    def unpack_value(cls, value: bytes) -> Location:
        return cls(*cls.STRUCT.unpack(value))


def _translate_os_error(exc: OSError, what: str) -> StoreError:
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"disk full while {what}")
    return StoreError(f"{what} failed: {exc}")


class PackWriter:
    """Appends records to one pack file. Unusable after its first failure (restic's rule).

    After a failed write the file may end in a partial record; nothing in the index
    points there, and no later write may land after it, so the writer refuses further use
    and the store starts a new pack.
    """

    def __init__(self, directory: str, number: int) -> None:
        self.number = number
        self.path = os.path.join(directory, pack_name(number))
        self._broken: BaseException | None = None
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise _translate_os_error(exc, f"creating pack {self.path}") from exc
        try:
            os.write(self._fd, PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, number))
            os.fdatasync(self._fd)
            dfd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dfd)  # the new name must survive a crash before the index uses it
            finally:
                os.close(dfd)
        except OSError as exc:
            os.close(self._fd)
            raise _translate_os_error(exc, f"creating pack {self.path}") from exc
        self.size = PACK_HEADER.size

    def append(self, records: list[tuple[bytes, int, int, bytes]]) -> list[Location]:
        """Append (chunk id, codec, raw_len, payload) records and make them durable.

        Returns where each one landed. Nothing is indexed here; the caller commits the
        returned locations to the index only after this returns.

        Raises:
            PackBroken: an earlier append failed.
            NoSpace / StoreError: this append failed (the writer is now broken).
        """
        if self._broken is not None:
            raise PackBroken(f"pack {self.path} is unusable after an earlier failure") from (
                self._broken
            )
        iov: list[bytes] = []
        locs: list[Location] = []
        offset = self.size
        for cid, codec, raw_len, payload in records:
            xx = checksum(payload)
            header = RECORD_HEADER.pack(RECORD_MAGIC, codec, 0, raw_len, len(payload), 0, cid, xx)
            iov.append(header)
            iov.append(payload)
            locs.append(Location(self.number, offset, len(payload), raw_len, codec, xx))
            offset += len(header) + len(payload)
        try:
            for start in range(0, len(iov), _IOV_MAX):
                part = iov[start : start + _IOV_MAX]
                want = sum(len(b) for b in part)
                done = os.writev(self._fd, part)
                while done < want:  # short write: finish the rest buffer by buffer
                    flat = b"".join(part)[done:]
                    done += os.write(self._fd, flat)
            os.fdatasync(self._fd)
        except OSError as exc:
            self._broken = exc
            raise _translate_os_error(exc, f"writing pack {self.path}") from exc
        self.size = offset
        return locs

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class PackReader:
    """Reads records by location through cached read-only file handles. Thread-safe."""

    def __init__(self, directory: str) -> None:
        self._dir = directory
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._retired: list[tuple[float, int]] = []
        self._lock = threading.Lock()

    def _fd(self, number: int) -> int:
        with self._lock:
            fd = self._fds.get(number)
            if fd is not None:
                self._fds.move_to_end(number)
                return fd
            fd = os.open(os.path.join(self._dir, pack_name(number)), os.O_RDONLY)
            self._fds[number] = fd
            if len(self._fds) > _MAX_READ_FDS:
                _, old = self._fds.popitem(last=False)
                os.close(old)
            return fd

    def read(self, chunk_id: bytes, loc: Location) -> bytes:
        """The payload of the record at ``loc``, checked against the header and index.

        Raises:
            ChunkCorrupt: the bytes there are not this chunk's intact record.
        """
        buf = self._pread(chunk_id, loc.pack, RECORD_HEADER.size + loc.stored_len, loc.offset)
        return bytes(self._payload(chunk_id, loc, memoryview(buf)))

    def read_run(self, ids: Sequence[bytes], locs: Sequence[Location]) -> list[memoryview]:
        """The payloads of records that lie back to back in one pack, in one read; each
        checked as by :meth:`read`. The views share one buffer.

        Raises:
            ChunkCorrupt: one of them is not its chunk's intact record.
        """
        first, last = locs[0], locs[-1]
        span = last.offset + RECORD_HEADER.size + last.stored_len - first.offset
        view = memoryview(self._pread(ids[0], first.pack, span, first.offset))
        out = []
        for cid, loc in zip(ids, locs, strict=True):
            at = loc.offset - first.offset
            out.append(self._payload(cid, loc, view[at : at + RECORD_HEADER.size + loc.stored_len]))
        return out

    def _pread(self, chunk_id: bytes, pack: int, n: int, offset: int) -> bytes:
        try:
            buf = os.pread(self._fd(pack), n, offset)
        except FileNotFoundError as exc:
            raise ChunkCorrupt(chunk_id, f"its pack {pack_name(pack)} is missing") from exc
        except OSError as exc:
            raise ChunkCorrupt(chunk_id, f"reading pack {pack_name(pack)}: {exc}") from exc
        if len(buf) != n:
            raise ChunkCorrupt(chunk_id, f"pack {pack_name(pack)} is truncated")
        return buf

    @staticmethod
    def _payload(chunk_id: bytes, loc: Location, record: memoryview) -> memoryview:
        magic, codec, _flags, raw_len, stored_len, _r, cid, xx = RECORD_HEADER.unpack_from(record)
        if (
            magic != RECORD_MAGIC
            or cid != chunk_id
            or codec != loc.codec
            or raw_len != loc.raw_len
            or stored_len != loc.stored_len
        ):
            raise ChunkCorrupt(
                chunk_id, f"record header at {pack_name(loc.pack)}:{loc.offset} does not match"
            )
        payload = record[RECORD_HEADER.size :]
        actual = checksum(payload)
        if actual != loc.xxh3 or xx != loc.xxh3:
            raise ChunkCorrupt(
                chunk_id, f"checksum mismatch in {pack_name(loc.pack)} at offset {loc.offset}"
            )
        return payload

    def forget(self, number: int) -> None:
        """Stop using pack ``number`` (it is about to be removed)."""
        now = time.monotonic()
        with self._lock:
            fd = self._fds.pop(number, None)
            while self._retired and self._retired[0][0] < now - _RETIRE_S:
                os.close(self._retired.pop(0)[1])
            if fd is not None:
                self._retired.append((now, fd))

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            for _, fd in self._retired:
                os.close(fd)
            self._retired.clear()
