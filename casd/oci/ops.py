"""The OCI bridge's operations, run by the daemon for ``casctl oci ...`` (SPEC §4.5)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from casd.auth import Scope
from casd.chunking import Chunker, format_digest
from casd.errors import BlobMissing, UserError
from casd.oci import media
from casd.oci.gzipre import LayerFormatError
from casd.oci.importer import ImportOptions, import_image
from casd.oci.layers import (
    PIECE,
    IterReader,
    LayerCache,
    LayerError,
    LayerRecord,
    encode_layer,
    put_bytes,
    put_stream,
    read_record,
    read_small,
)
from casd.refs import check_name
from casd.server import ops
from casd.storage.interface import Store

if TYPE_CHECKING:
    from casd.oci import members

log = logging.getLogger("casd.oci")


def _spool_dir(ctx: Any) -> str:
    base = ctx.data_dir or tempfile.gettempdir()
    return os.path.join(base, "oci-tmp")


@ops.operation("oci.import", Scope.WRITE, "import an image from a registry")
async def _import(ctx: Any, args: ops.Document, progress: ops.Progress) -> ops.Document:
    creds = ops.arg_opt_str(args, "creds")
    pair: tuple[str, str] | None = None
    if creds is not None:
        user, sep, password = creds.partition(":")
        if not sep:
            raise UserError("--creds must read USER:PASSWORD")
        pair = (user, password)
    name = ops.arg_opt_str(args, "name")
    if name is not None:
        check_name(name)
    opts = ImportOptions(
        ref=ops.arg_str(args, "ref"),
        name=name,
        platform=ops.arg_opt_str(args, "platform"),
        all_platforms=ops.arg_bool(args, "all_platforms"),
        insecure=ops.arg_bool(args, "insecure"),
        creds=pair,
    )
    report = await import_image(ctx.store, ctx.run, _spool_dir(ctx), ctx.oci_cache, opts, progress)
    return report.as_dict()


# --- inspect -------------------------------------------------------------------------


def _image(store: Store, name: str) -> tuple[str, media.Document]:
    try:
        digest = store.resolve(name)
    except BlobMissing:
        raise UserError(f"no image named {name!r} (`casctl ls` lists names)") from None
    data = read_small(store, digest)
    doc = media.sniff(data) if data is not None else None
    if doc is None:
        raise UserError(f"{name!r} names {digest}, which is not an image manifest or index")
    return digest, doc


def _manifests(store: Store, digest: str, doc: media.Document) -> list[tuple[str, media.Document]]:
    if doc.kind == "manifest":
        return [(digest, doc)]
    out = []
    for m in doc.manifests:
        data = read_small(store, m.digest)
        sub = media.sniff(data) if data is not None else None
        if sub is None:
            raise LayerError(f"manifest {m.digest} of index {digest} is missing")
        out.append((m.digest, sub))
    return out


def _layer_blobs(
    store: Store, layer: media.Descriptor
) -> tuple[str, LayerRecord | None, list[str]]:
    """How a layer is stored, its record, and the blobs holding its bytes."""
    rec = read_record(store, layer.digest)
    if rec is None:
        if store.has_blob(layer.digest):
            kind = "uncompressed" if media.is_uncompressed_layer(layer.media_type) else "blob"
            return kind, None, [layer.digest]
        return "missing", None, []
    blobs = [rec.uncompressed] + ([rec.raw] if rec.raw else [])
    return ("reencodable" if rec.reencodable else "raw"), rec, blobs


def inspect_image(store: Store, name: str) -> dict[str, Any]:
    digest, doc = _image(store, name)
    entries: list[dict[str, Any]] = []
    layer_blobs: dict[str, list[str]] = {}
    for mdigest, mdoc in _manifests(store, digest, doc):
        layers: list[dict[str, Any]] = []
        for layer in mdoc.layers:
            kind, rec, blobs = _layer_blobs(store, layer)
            layer_blobs[layer.digest] = blobs
            layers.append(
                {
                    "digest": layer.digest,
                    "media_type": layer.media_type,
                    "size": layer.size,
                    "uncompressed_size": rec.uncompressed_size if rec else layer.size,
                    "stored": kind,
                    "note": rec.note if rec else "",
                }
            )
        entries.append(
            {
                "digest": mdigest,
                "media_type": mdoc.media_type,
                "config": mdoc.config.digest if mdoc.config else "",
                "layers": layers,
            }
        )
    # Bytes only a layer's own blobs reference: what deleting the image would free.
    unique = _unique_bytes(store, layer_blobs)
    for entry in entries:
        for row in entry["layers"]:
            row["unique_bytes"] = unique.get(row["digest"], 0)
    return {"name": name, "digest": digest, "media_type": doc.media_type, "manifests": entries}


def _unique_bytes(store: Store, layer_blobs: dict[str, list[str]]) -> dict[str, int]:
    owner: dict[bytes, tuple[str, int]] = {}  # chunk -> (layer, size), for our layers' chunks
    own_blobs: dict[str, str] = {}
    for layer, blobs in layer_blobs.items():
        for b in blobs:
            if not store.has_blob(b):
                continue  # a raw layer synced as its compressed bytes only
            own_blobs[b] = layer
            recipe = store.get_recipe(b)
            for cid, size in zip(recipe.ids, recipe.sizes, strict=True):
                prev = owner.get(cid)
                if prev is not None and prev[0] != layer:
                    owner[cid] = ("", size)  # shared between two of this image's layers
                else:
                    owner[cid] = (layer, size)
    for digest, _ in store.iter_blobs():
        if digest in own_blobs or not owner:
            continue
        for cid in store.get_recipe(digest).ids:
            if cid in owner:
                owner[cid] = ("", owner[cid][1])
    out: dict[str, int] = {}
    for layer, size in owner.values():
        if layer:
            out[layer] = out.get(layer, 0) + size
    return out


@ops.operation("oci.inspect", Scope.READ, "describe an image and how its layers are stored")
async def _inspect(ctx: Any, args: ops.Document, progress: ops.Progress) -> ops.Document:
    return dict(await ctx.run(inspect_image, ctx.store, ops.arg_str(args, "name")))


# --- convert -------------------------------------------------------------------------

#: What `oci convert` re-compresses with by default: gzip members of 1 MiB of tar each,
#: deflated by ISA-L at level 2 (casd.oci.members). Every casd host that syncs a converted
#: layer deflates it again in full, so its speed is what each receiver pays, on every sync;
#: measured here on 1 MiB segments of a 153 MB tar of site-packages, one core: ISA-L level 2
#: 575 MB/s for 0.403 of the tar, libdeflate level 1 227 MB/s for 0.387, level 6 58 MB/s
#: (zlib level 6 as one stream: 21 MB/s, 0.36). Plain registry clients of the converted
#: image pay the size; `--lib` and `--level` pick.
CONVERT_LIB = "isal"
CONVERT_LEVELS = {"isal": 2, "libdeflate": 1}


def ensure_uncompressed(store: Store, chunker: Chunker, rec: LayerRecord) -> None:
    """Make sure the layer's tar is in the store: a layer synced raw arrives as its
    compressed bytes only, and its tar is recovered from them here (no transfer)."""
    if store.has_blob(rec.uncompressed):
        return
    if rec.raw is None or not store.has_blob(rec.raw):
        raise LayerError(f"layer {rec.digest}: neither its tar nor its compressed bytes are here")
    from casd.oci import gzipre
    from casd.oci.layers import BlobWriter, IterReader, iter_blob
    from casd.oci.tarcut import TarCutter

    with BlobWriter(store) as w:
        tar = IterReader(gzipre.decompress(iter_blob(store, rec.raw)))
        for c in TarCutter(chunker).cut_stream(tar):  # type: ignore[arg-type]
            w.add(c)
        if w.digest != rec.uncompressed:
            raise LayerError(
                f"layer {rec.digest} decompresses to {w.digest}, its record says {rec.uncompressed}"
            )
        w.commit()


def _misconverted(digest: str, lib: str, why: str) -> LayerError:
    return LayerError(
        f"converting layer {digest}: {lib} made gzip members that do not give back the "
        f"layer's tar ({why}); nothing was recorded (run it again, or use --lib libdeflate)"
    )


def _convert_layer(
    store: Store,
    chunker: Chunker,
    cache: LayerCache | None,
    layer: media.Descriptor,
    oci: bool,
    level: int,
    lib: str,
) -> media.Descriptor:

    from casd.oci import members

    kind, rec, _ = _layer_blobs(store, layer)
    if kind == "missing":
        raise LayerError(f"layer {layer.digest} is not in the store")
    # Converted already, or a plain tar: nothing to gain. A layer zlib or Go's gzip makes
    # again is converted too: members re-encode on every core, several times faster.
    if kind == "uncompressed" or (
        rec is not None and (rec.encoding or {}).get("codec") == members.CODEC
    ):
        return layer
    if rec is None:
        raise LayerError(f"layer {layer.digest} has no record: re-import the image first")
    mt = media.OCI_LAYER_GZIP if oci else media.DOCKER_LAYER_GZIP

    # libdeflate's key is the one records written before ISA-L came have.
    memo_key = (
        f"{members.CODEC}-{level}" if lib == "libdeflate" else f"{members.CODEC}-{lib}-{level}"
    )
    done = (rec.converted or {}).get(memo_key)
    if done is not None:
        prior = read_record(store, done)
        if prior is not None and store.has_blob(prior.uncompressed):
            return media.Descriptor(mt, prior.digest, prior.size)
    ensure_uncompressed(store, chunker, rec)
    params = members.MembersParams(level, lib=members.LIBS[lib])
    encoding = {"codec": members.CODEC, **params.to_dict()}
    draft = LayerRecord("", 0, "", rec.uncompressed, rec.uncompressed_size, encoding=encoding)
    for attempt in range(1, CONVERT_ATTEMPTS + 1):
        try:
            digest, size = _encode_checked(store, cache, draft, params, rec, layer.digest, lib)
            break
        except members.MemberNotMadeAgain as exc:
            # The deflater made other bytes of a segment the second time: one of the two
            # is bytes no host would make again (as ISA-L level 2 did, once, on 2 of 201
            # members of a 200 MB tar, inside a daemon; never when run alone). A layer
            # named by such bytes would cross whole to every receiver, forever.
            log.warning("converting layer %s (attempt %d): %s", layer.digest, attempt, exc)
            if attempt == CONVERT_ATTEMPTS:
                raise LayerError(
                    f"converting layer {layer.digest}: {lib} made other gzip members of the "
                    f"same tar each of {CONVERT_ATTEMPTS} times ({exc}); nothing was "
                    "recorded (use --lib libdeflate)"
                ) from None
    new = LayerRecord(digest, size, mt, rec.uncompressed, rec.uncompressed_size, encoding=encoding)
    put_bytes(store, new.to_json(), chunker, media.layer_record_name(digest))
    # Remember it in the original's record: the next image sharing the layer reuses it.
    memo = dataclasses.replace(rec, converted={**(rec.converted or {}), memo_key: digest})
    put_bytes(store, memo.to_json(), chunker, media.layer_record_name(layer.digest))
    return media.Descriptor(mt, digest, size)


#: Times a layer is encoded before convert gives up on members that deflate otherwise
#: each time.
CONVERT_ATTEMPTS = 3


def _encode_checked(
    store: Store,
    cache: LayerCache | None,
    draft: LayerRecord,
    params: members.MembersParams,
    rec: LayerRecord,
    original: str,
    lib: str,
) -> tuple[str, int]:
    """The digest and size of ``draft``'s encoding, written to ``cache`` as it goes.

    It is inflated again as it goes, and must give back the tar, and each member is
    deflated a second time and must come out the same, before anything names it: a new
    layer digest is made here, so no later check could tell a wrong member from a right
    one (receivers check what they make against this digest), nor a member this host
    made once from the one it, and every other host, makes.

    Raises:
        MemberNotMadeAgain: a member came out otherwise the second time.
        LayerError: the members do not give back the tar.
    """
    from casd.oci import members

    sha = hashlib.sha256()
    check, tar_sha, tar_size = members.MembersDecoder(params, sample=False), hashlib.sha256(), 0
    size = 0

    def inflated(segs_of: Callable[[], list[bytearray]]) -> int:
        # The tar the members checked so far give back: hashed; its size.
        try:
            segs = segs_of()
        except members.MemberNotMadeAgain:
            raise
        except LayerFormatError as exc:
            raise _misconverted(original, lib, str(exc)) from None
        for seg in segs:
            tar_sha.update(seg)
        return sum(len(seg) for seg in segs)

    tmp: Any = None
    if cache is not None:
        fd, tmp_path = tempfile.mkstemp(dir=cache.dir, prefix="tmp")
        tmp = os.fdopen(fd, "wb")
    try:
        for piece in encode_layer(store, draft):
            sha.update(piece)
            size += len(piece)
            if tmp is not None:
                tmp.write(piece)
            tar_size += inflated(functools.partial(check.feed, piece))
        tar_size += inflated(check.finish)
        if format_digest(tar_sha.digest()) != rec.uncompressed or tar_size != rec.uncompressed_size:
            raise _misconverted(original, lib, "the members inflate to another tar")
        digest = format_digest(sha.digest())
        if tmp is not None:
            tmp.close()
            tmp = None
            assert cache is not None
            cache.adopt(digest, tmp_path)
    finally:
        if tmp is not None:
            tmp.close()
            os.unlink(tmp_path)
    return digest, size


def convert_image(
    store: Store,
    cache: LayerCache | None,
    name: str,
    new_name: str,
    level: int | None = None,
    lib: str = CONVERT_LIB,
) -> dict[str, Any]:
    from casd.oci import members

    check_name(new_name)
    if lib not in members.LIBS:
        raise UserError(f"--lib must be one of {', '.join(members.LIBS)}, not {lib!r}")
    if level is None:
        level = CONVERT_LEVELS[lib]
    levels = members.LEVELS[members.family(members.LIBS[lib])]
    if level not in levels:
        raise UserError(f"--level must be {levels.start}..{levels.stop - 1} for {lib}, not {level}")
    chunker = Chunker()
    digest, doc = _image(store, name)
    converted: dict[str, tuple[str, int]] = {}  # old manifest digest -> new (digest, size)
    layers_changed = 0
    for mdigest, mdoc in _manifests(store, digest, doc):
        raw = dict(mdoc.raw)
        oci = mdoc.media_type == media.OCI_MANIFEST
        new_layers = []
        for entry, desc in zip(raw["layers"], mdoc.layers, strict=True):
            new = _convert_layer(store, chunker, cache, desc, oci, level, lib)
            if new.digest != desc.digest:
                layers_changed += 1
                entry = {
                    **entry,
                    "mediaType": new.media_type,
                    "digest": new.digest,
                    "size": new.size,
                }
                entry.pop("urls", None)
            new_layers.append(entry)
        raw["layers"] = new_layers
        data = json.dumps(raw, indent=3).encode() if new_layers != mdoc.raw["layers"] else None
        if data is None:
            size = len(read_small(store, mdigest) or b"")
            converted[mdigest] = (mdigest, size)
        else:
            converted[mdigest] = (put_bytes(store, data, chunker), len(data))
    if doc.kind == "manifest":
        top = converted[digest][0]
    else:
        raw = dict(doc.raw)
        raw["manifests"] = [
            {**m, "digest": converted[m["digest"]][0], "size": converted[m["digest"]][1]}
            for m in raw["manifests"]
        ]
        top = put_bytes(store, json.dumps(raw, indent=3).encode(), chunker)
    store.tag(new_name, top)
    return {"name": new_name, "digest": top, "source": digest, "layers_converted": layers_changed}


@ops.operation("oci.convert", Scope.WRITE, "re-compress an image's layers reproducibly")
async def _convert(ctx: Any, args: ops.Document, progress: ops.Progress) -> ops.Document:
    return dict(
        await ctx.run(
            convert_image,
            ctx.store,
            ctx.oci_cache,
            ops.arg_str(args, "name"),
            ops.arg_str(args, "new_name"),
            None if args.get("level") is None else int(ops.arg_number(args, "level", 0)),
            ops.arg_str(args, "lib", CONVERT_LIB),
        )
    )


# --- a layer as a registry serves it (the sync's path where nothing is held) ---------------


@ops.operation("oci.layer", Scope.READ, "stream a layer's compressed bytes, as a registry would")
async def _layer(ctx: Any, args: ops.Document, progress: ops.Progress) -> ops.Document:
    # Read scope, as a registry's blob GET. From a blob, the layer cache or a verified
    # re-encoding (casd.oci.source): a re-encoding that fails to match holds back its last
    # piece, so what streams is never a whole wrong layer. Pieces of at most PIECE bytes.
    from casd.oci.source import StoreSource

    digest = ops.arg_str(args, "digest")
    source = StoreSource(ctx.store, ctx.run, ctx.oci_cache, ctx.landings)
    size = await source.blob_size("", digest)
    if size is None:
        raise BlobMissing(f"no layer {digest} in this store")
    sent = 0
    async with source.open_blob("", digest, 0, size) as pieces:
        async for piece in pieces:
            for at in range(0, len(piece), PIECE):
                await progress.data(piece[at : at + PIECE])
            sent += len(piece)
    ctx.stats.layers_streamed += 1
    ctx.stats.layer_stream_bytes += sent
    return {"digest": digest, "size": sent}


# --- materialize (the sync fallback) -----------------------------------------------------


def materialize(store: Store, digest: str, cache: LayerCache | None = None) -> dict[str, Any]:
    if store.has_blob(digest):
        return {"digest": digest, "created": False}
    rec = read_record(store, digest)
    if rec is None:
        raise BlobMissing(f"no layer {digest} in this store")
    # The cache's copy if it has one (checked when it went in; the digest is checked
    # again here): re-encoding a Go-written layer costs seconds of both cores.
    cached = cache.path(digest) if cache is not None and cache.has(digest) else None
    if cached is not None:
        with open(cached, "rb") as f:
            got = put_stream(store, f, Chunker())
    else:
        got = put_stream(store, IterReader(encode_layer(store, rec)), Chunker())  # type: ignore[arg-type]
    if got != digest:
        raise LayerError(f"re-encoding layer {digest} gave {got}")
    return {"digest": digest, "created": True}


@ops.operation("oci.materialize", Scope.WRITE, "store a layer's compressed bytes as a blob")
async def _materialize(ctx: Any, args: ops.Document, progress: ops.Progress) -> ops.Document:
    return dict(await ctx.run(materialize, ctx.store, ops.arg_str(args, "digest"), ctx.oci_cache))
