"""Importing an image from a registry into the store (``casctl oci import``).

The daemon does the work: it fetches the manifest (or index), the config and every layer
it lacks, and verifies every digest before anything becomes visible. A layer is spooled
to disk while its sha256 is checked, then, in a worker thread, decompressed, cut along
its tar members and stored as uncompressed chunks; at the same time the compressed bytes
are re-encoded with the parameters found on the first MiBs and compared byte for byte
(see casd.oci.layers for what is kept when that works and when it does not). The name
points at the image only once all of it is stored: a failed import leaves nothing behind
but chunks, which the next import reuses.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import platform as host_platform
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import trio

from casd.chunking import Chunker, format_digest
from casd.errors import CasdError, UserError
from casd.nursery import open_nursery
from casd.oci import media
from casd.oci.gzipre import LayerFormatError
from casd.oci.layers import (
    PIECE,
    BlobWriter,
    LayerCache,
    LayerError,
    LayerRecord,
    make_encoder,
    put_bytes,
    put_stream,
    read_record,
)
from casd.storage.interface import Store

log = logging.getLogger("casd.oci")

#: Layers downloaded and processed at once: one downloads while another is cut.
PARALLEL_LAYERS = 2

#: How much of a gzip layer the parameter search looks at.
PROBE_BYTES = 4 * 1024 * 1024


class ImportError_(CasdError):  # not the builtin ImportError
    """The image could not be imported: the registry's content is inconsistent."""


def host_platform_name() -> str:
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(
        host_platform.machine(), host_platform.machine()
    )
    return f"linux/{arch}"


def _platform_matches(desc: media.Descriptor, wanted: str) -> bool:
    p = desc.platform or {}
    parts = wanted.split("/")
    if len(parts) < 2:
        raise UserError(f"platform {wanted!r} should read OS/ARCH or OS/ARCH/VARIANT")
    if p.get("os") != parts[0] or p.get("architecture") != parts[1]:
        return False
    return len(parts) < 3 or p.get("variant") == parts[2]


@dataclass
class LayerOutcome:
    digest: str
    media_type: str
    size: int
    stored: str  # "present" | "reencodable" | "raw" | "uncompressed"
    uncompressed: str = ""
    uncompressed_size: int = 0
    new_bytes: int = 0
    note: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "media_type": self.media_type,
            "size": self.size,
            "stored": self.stored,
            "uncompressed": self.uncompressed,
            "uncompressed_size": self.uncompressed_size,
            "new_bytes": self.new_bytes,
            "note": self.note,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class ImportReport:
    name: str
    digest: str = ""
    media_type: str = ""
    manifests: int = 0
    layers: list[LayerOutcome] = field(default_factory=list)
    bytes_downloaded: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "digest": self.digest,
            "media_type": self.media_type,
            "manifests": self.manifests,
            "layers": tuple(layer.as_dict() for layer in self.layers),
            "bytes_downloaded": self.bytes_downloaded,
            "seconds": round(self.seconds, 3),
        }


# --- the thread-side work on one spooled layer -----------------------------------------


class _TeeReader:
    """A readable stream of a layer's uncompressed bytes that also hands every piece to
    ``on_data`` (the re-encoding check), so the layer is decompressed once."""

    def __init__(self, source: BinaryIO, on_data: Callable[[bytes], None] | None) -> None:
        self._source = source
        self._on_data = on_data
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._source.read(n if n and n > 0 else PIECE)
        self._seen(data)
        return data

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        data = self._source.read(len(view))
        view[: len(data)] = data
        self._seen(data)
        return len(data)

    def _seen(self, data: bytes) -> None:
        if data:
            self.sha.update(data)
            self.size += len(data)
            if self._on_data is not None:
                self._on_data(data)


class _ReencodeCheck:
    """Re-encodes uncompressed bytes as they are read and compares with the original
    compressed file as it goes; remembers the first mismatch."""

    def __init__(self, encoding: dict[str, Any], original: BinaryIO) -> None:
        self._enc = make_encoder(encoding)
        self._original = original
        self.offset = 0
        self.failed: str | None = None

    def feed(self, data: bytes) -> None:
        if self.failed is None:
            self._compare(self._enc.update(data))

    def _compare(self, out: bytes) -> None:
        if not out or self.failed is not None:
            return
        want = self._original.read(len(out))
        if want != out:
            at = self.offset + next(
                (i for i, (a, b) in enumerate(zip(want, out, strict=False)) if a != b),
                min(len(want), len(out)),
            )
            self.failed = f"re-encoded bytes differ from the original at offset {at}"
        self.offset += len(out)

    def finish(self) -> bool:
        if self.failed is None:
            self._compare(self._enc.finish())
        if self.failed is None and self._original.read(1):
            self.failed = "the original has bytes after the re-encoded stream ends"
        return self.failed is None


def _find_gzip_encoding(spool: str) -> tuple[dict[str, Any] | None, str]:
    """How to re-encode a gzip layer: a layer record's ``encoding``, or None and why not."""
    from casd.oci import gzipre, members

    found = _members_params(spool)
    if found is not None:  # made by `oci convert`, here or on another casd host
        return {"codec": members.CODEC, **found.to_dict()}, ""
    with open(spool, "rb") as f:
        comp = f.read(PROBE_BYTES)
    d = gzip.open(spool, "rb")  # noqa: SIM115 - closed below
    try:
        plain = d.read(PROBE_BYTES * 4)
    except (OSError, EOFError) as exc:
        raise ImportError_(f"layer is not valid gzip: {exc}") from None
    finally:
        d.close()
    try:
        params = gzipre.find_params(comp, plain)
    except gzipre.LayerFormatError as exc:
        return None, str(exc)
    if params is not None:
        return {"codec": "gzip", **params.to_dict()}, ""
    # Not zlib's: perhaps Go's pgzip (umoci, skopeo, podman, buildah), if the helper that
    # makes it again is here.
    from casd.oci import gogzip

    why = "no zlib parameters reproduce it (not made by zlib"
    if gogzip.helper() is None:
        return None, f"{why}; Go's gzip cannot be tried: no {gogzip.HELPER} on this host)"
    try:
        found = gogzip.find_params(comp, plain)
    except LayerFormatError as exc:
        return None, f"{why}; Go's gzip could not be tried: {exc})"
    if found is None:
        return None, f"{why}, nor by Go's pgzip)"
    return {"codec": gogzip.CODEC, **found.to_dict()}, ""


def _members_params(spool: str) -> Any:
    """The :class:`~casd.oci.members.MembersParams` that make the first gzip member of
    the layer, if casd's member header starts it and a level of one of this host's
    deflaters reproduces the member exactly; else None. The whole layer is checked later,
    as it is stored."""
    from casd.oci import members

    limit = 64 * 1024 * 1024  # the largest segment MembersParams allows
    with open(spool, "rb") as f:
        if f.read(len(members.HEADER)) != members.HEADER:
            return None
        d = zlib.decompressobj(-15)
        pieces: list[bytes] = []
        held = read = 0
        while not d.eof:
            piece = f.read(PIECE)
            if not piece:
                return None
            read += len(piece)
            try:
                out = d.decompress(piece, limit + 1 - held)
            except zlib.error:
                return None
            pieces.append(out)
            held += len(out)
            if held > limit or (d.unconsumed_tail and not d.eof):
                return None
        end = len(members.HEADER) + read - len(d.unused_data) + 8  # the member's last byte
        f.seek(0)
        original = f.read(end)
        more = bool(f.read(1))
    segment = b"".join(pieces)
    if len(original) != end or int.from_bytes(original[-4:], "little") != len(segment):
        return None
    size = len(segment) if more else max(len(segment), members.SEGMENT)
    # Likeliest first: convert's default, then the levels a user would pick.
    tries = [(members.LIB_ISAL, level) for level in (2, 1, 3, 0)] + [
        (members.LIB_DEFLATE, level) for level in (1, 6, 3, 9, 2, 4, 5, 7, 8, 10, 11, 12)
    ]
    for lib, level in tries:
        if members.member(segment, level, lib) == original:
            try:
                return members.MembersParams.from_dict(
                    {"level": level, "segment": size, "lib": lib}
                )
            except LayerFormatError:
                return None
    return None


def ingest_layer(
    store: Store,
    chunker: Chunker,
    cache: LayerCache | None,
    spool: str,
    desc: media.Descriptor,
    diff_id: str | None,
) -> LayerOutcome:
    """Store one downloaded, digest-checked layer (runs in a worker thread)."""
    from casd.oci.tarcut import TarCutter

    started = time.monotonic()
    out = LayerOutcome(desc.digest, desc.media_type, desc.size, "raw")
    cutter = TarCutter(chunker)
    mt = desc.media_type
    if media.is_uncompressed_layer(mt):
        with open(spool, "rb") as f, BlobWriter(store) as w:
            for c in cutter.cut_stream(f):
                w.add(c)
            w.commit()
        out.stored, out.uncompressed, out.uncompressed_size = "uncompressed", w.digest, w.size
        out.new_bytes = w.new_bytes
        out.seconds = time.monotonic() - started
        return out

    encoding: dict[str, Any] | None = None
    check: _ReencodeCheck | None = None
    original: BinaryIO | None = None
    if media.is_gzip_layer(mt):
        encoding, out.note = _find_gzip_encoding(spool)
        if encoding is not None:
            original = open(spool, "rb")  # noqa: SIM115 - closed below
            check = _ReencodeCheck(encoding, original)
        decompressed: Any = gzip.open(spool, "rb")  # noqa: SIM115 - closed below
    elif media.is_zstd_layer(mt):
        from casd import zstd as zstd_mod

        decompressed = zstd_mod.open_reader(spool)
        out.note = "zstd layers are kept as they came (re-encoding zstd is not implemented)"
    else:
        raise ImportError_(f"layer {desc.digest} has an unsupported media type {mt!r}")

    with BlobWriter(store) as w:
        try:
            tee = _TeeReader(decompressed, check.feed if check else None)
            try:
                for c in cutter.cut_stream(tee):  # type: ignore[arg-type]
                    w.add(c)
            except (OSError, EOFError) as exc:  # zlib/zstd errors are OSError subclasses
                raise ImportError_(f"layer {desc.digest} does not decompress: {exc}") from None
            w.flush()
            du = format_digest(tee.sha.digest())
            if diff_id is not None and du != diff_id:
                raise ImportError_(
                    f"layer {desc.digest} decompresses to {du}, but the image config says "
                    f"its diff_id is {diff_id}"
                )
            reproduced = check is not None and check.finish()
            if check is not None and not reproduced:
                out.note = check.failed or "re-encoding did not reproduce the layer"
        finally:
            decompressed.close()
            if original is not None:
                original.close()
        w.commit()
    out.uncompressed, out.uncompressed_size = du, w.size
    out.new_bytes = w.new_bytes
    if reproduced:
        record = LayerRecord(desc.digest, desc.size, mt, du, w.size, encoding=encoding)
        out.stored = "reencodable"
    else:
        with open(spool, "rb") as f:
            raw = put_stream(store, f, chunker)
        if raw != desc.digest:  # the spool was verified; this would be a store bug
            raise LayerError(f"stored compressed layer reads back as {raw}, not {desc.digest}")
        record = LayerRecord(desc.digest, desc.size, mt, du, w.size, raw=raw, note=out.note)
        out.stored = "raw"
        out.new_bytes += desc.size  # upper bound: the compressed copy rarely dedups
    put_bytes(store, record.to_json(), chunker, media.layer_record_name(desc.digest))
    if reproduced and cache is not None:
        cache.adopt(desc.digest, spool)
    out.seconds = time.monotonic() - started
    return out


def layer_present(store: Store, digest: str) -> bool:
    """Whether casd can already serve compressed layer ``digest``."""
    if store.has_blob(digest):
        return True
    try:
        record = read_record(store, digest)
    except LayerError:
        return False
    return record is not None and store.has_blob(record.uncompressed)


# --- the async driver ----------------------------------------------------------------


Run = Callable[..., Awaitable[Any]]
Progress = Callable[[dict[str, int | float | str]], Awaitable[None]]


@dataclass
class ImportOptions:
    ref: str
    name: str | None = None
    platform: str | None = None
    all_platforms: bool = False
    insecure: bool = False
    creds: tuple[str, str] | None = None


async def import_image(
    store: Store,
    run: Run,
    spool_dir: str,
    cache: LayerCache | None,
    opts: ImportOptions,
    progress: Progress,
    chunker: Chunker | None = None,
) -> ImportReport:
    from casd.oci import registry

    chunker = chunker or Chunker()
    ref = registry.parse_reference(opts.ref)
    name = opts.name or default_name(ref)
    report = ImportReport(name=name)
    started = time.monotonic()
    counters: dict[str, int | float | str] = {"bytes_done": 0, "bytes_total": 0, "layers": 0}
    os.makedirs(spool_dir, exist_ok=True)

    async with registry.RegistryClient(
        ref.registry, insecure=opts.insecure, creds=opts.creds
    ) as rc:
        data, mt, digest = await rc.get_manifest(ref.repository, ref.reference)
        doc = media.parse_document(data, mt)
        to_store: list[tuple[bytes, str]] = []  # (bytes, digest): committed at the end
        manifests: list[tuple[bytes, media.Document, str]] = []
        top_digest = digest
        if doc.kind == "index":
            if opts.all_platforms:
                chosen = list(doc.manifests)
                to_store.append((data, digest))
            else:
                wanted = opts.platform or host_platform_name()
                chosen = [m for m in doc.manifests if _platform_matches(m, wanted)][:1]
                if not chosen:
                    have = ", ".join(
                        "/".join(
                            str(x)
                            for x in (
                                (m.platform or {}).get("os"),
                                (m.platform or {}).get("architecture"),
                            )
                        )
                        for m in doc.manifests
                    )
                    raise UserError(
                        f"{opts.ref} has no image for platform {wanted} (it has: {have}); "
                        "pick one with --platform or take all with --all-platforms"
                    )
                top_digest = chosen[0].digest
            for m in chosen:
                mdata, mmt, mdigest = await rc.get_manifest(ref.repository, m.digest)
                mdoc = media.parse_document(mdata, mmt)
                if mdoc.kind != "manifest":
                    raise ImportError_(f"index entry {m.digest} is not an image manifest")
                manifests.append((mdata, mdoc, mdigest))
        else:
            if opts.platform or opts.all_platforms:
                log.info("%s is a single manifest; platform options ignored", opts.ref)
            manifests.append((data, doc, digest))
        report.manifests = len(manifests)

        # Configs first: they carry the diff_ids every layer is checked against.
        layers: list[tuple[media.Descriptor, str | None]] = []
        seen: set[str] = set()
        for mdata, mdoc, mdigest in manifests:
            assert mdoc.config is not None
            cfg = await _fetch_small(rc, ref.repository, mdoc.config)
            diff_ids = _diff_ids(cfg)
            to_store.append((cfg, mdoc.config.digest))
            for i, layer in enumerate(mdoc.layers):
                if layer.digest in seen:
                    continue
                seen.add(layer.digest)
                diff = diff_ids[i] if i < len(diff_ids) else None
                layers.append((layer, diff))
            to_store.append((mdata, mdigest))

        counters["bytes_total"] = sum(d.size for d, _ in layers)
        limiter = trio.CapacityLimiter(PARALLEL_LAYERS)
        outcomes: dict[str, LayerOutcome] = {}

        async def one_layer(desc: media.Descriptor, diff: str | None) -> None:
            async with limiter:
                if await run(layer_present, store, desc.digest):
                    outcomes[desc.digest] = LayerOutcome(
                        desc.digest, desc.media_type, desc.size, "present"
                    )
                    counters["bytes_done"] = int(counters["bytes_done"]) + desc.size
                    await progress(dict(counters))
                    return
                fd, spool = tempfile.mkstemp(dir=spool_dir, prefix="layer-")
                try:
                    with os.fdopen(fd, "wb") as f:
                        async with rc.stream_blob(ref.repository, desc.digest, desc.size) as body:
                            async for piece in body:
                                f.write(piece)
                                report.bytes_downloaded += len(piece)
                                counters["bytes_done"] = int(counters["bytes_done"]) + len(piece)
                                await progress(dict(counters))
                    outcomes[desc.digest] = await run(
                        ingest_layer, store, chunker, cache, spool, desc, diff
                    )
                    counters["layers"] = int(counters["layers"]) + 1
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(spool)

        async with open_nursery() as nursery:
            for desc, diff in layers:
                nursery.start_soon(one_layer, desc, diff)
        report.layers = [outcomes[d.digest] for d, _ in layers]

        def commit() -> None:
            for blob, expect in to_store:
                got = put_bytes(store, blob, chunker)
                if got != expect:
                    raise ImportError_(f"document {expect} stored as {got}")
            store.tag(name, top_digest)

        await run(commit)
    report.digest = top_digest
    report.media_type = media.parse_document(
        next(b for b, d in to_store if d == top_digest)
    ).media_type
    report.seconds = time.monotonic() - started
    return report


async def _fetch_small(rc: Any, repo: str, desc: media.Descriptor) -> bytes:
    if desc.size > media.MAX_MANIFEST_SIZE:
        raise ImportError_(f"config {desc.digest} is {desc.size} bytes, larger than 4 MiB")
    parts = []
    async with rc.stream_blob(repo, desc.digest, desc.size) as body:
        async for piece in body:
            parts.append(bytes(piece))
    return b"".join(parts)


def _diff_ids(config: bytes) -> list[str]:
    try:
        doc = json.loads(config)
        ids = doc.get("rootfs", {}).get("diff_ids", [])
    except (ValueError, AttributeError):
        return []
    return [d for d in ids if isinstance(d, str)] if isinstance(ids, list) else []


def default_name(ref: Any) -> str:
    """``REPO:TAG`` (without the registry host), or ``REPO@DIGEST`` for digest pulls."""
    if ref.digest and not ref.tag:
        return f"{ref.repository}:{ref.digest.replace(':', '-')[:19]}"
    return f"{ref.repository}:{ref.tag or 'latest'}"
