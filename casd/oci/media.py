"""OCI and Docker media types, and reading the documents that name blobs.

casd keeps every manifest, index and config as an ordinary blob (its sha256 is its OCI
digest). Each layer additionally has a *layer record*: a small JSON blob, found under the
name ``.oci/layer/<digest>``, that says how the layer is held (see casd.oci.layers).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})

#: What casd sends as Accept when it fetches a manifest from a registry.
ACCEPT = (OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST)

#: Manifests and indexes larger than this are refused (the spec asks registries to take
#: at least 4 MB); it also bounds what the GC and the server parse.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024

#: Names under this prefix hold layer records; they are bookkeeping, not images.
LAYER_RECORD_PREFIX = ".oci/layer/"


def layer_record_name(digest: str) -> str:
    return LAYER_RECORD_PREFIX + digest


def is_gzip_layer(media_type: str) -> bool:
    return (
        media_type.endswith("+gzip")
        or media_type.endswith(".tar.gzip")
        or (media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip")
    )


def is_zstd_layer(media_type: str) -> bool:
    return media_type.endswith("+zstd")


def is_uncompressed_layer(media_type: str) -> bool:
    return media_type.endswith(".tar") or media_type.endswith("layer.v1.tar")


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.platform is not None:
            out["platform"] = self.platform
        return out


@dataclass(frozen=True)
class Document:
    """A parsed manifest or index: its kind, media type and the blobs it names."""

    kind: str  # "manifest" | "index"
    media_type: str
    config: Descriptor | None
    layers: tuple[Descriptor, ...]
    manifests: tuple[Descriptor, ...]
    raw: dict[str, Any]


class NotAnImageDocument(ValueError):
    """The bytes are not an OCI/Docker manifest or index."""


def _descriptor(obj: object) -> Descriptor:
    if not isinstance(obj, dict):
        raise NotAnImageDocument("a descriptor is not an object")
    digest, size, media_type = obj.get("digest"), obj.get("size"), obj.get("mediaType", "")
    if not isinstance(digest, str) or not isinstance(size, int) or isinstance(size, bool):
        raise NotAnImageDocument("a descriptor lacks a digest or size")
    if not isinstance(media_type, str):
        raise NotAnImageDocument("a descriptor's mediaType is not text")
    platform = obj.get("platform")
    return Descriptor(media_type, digest, size, platform if isinstance(platform, dict) else None)


def parse_document(data: bytes, media_type: str | None = None) -> Document:
    """Parse a manifest or index. ``media_type`` (from Content-Type) wins over the
    document's own ``mediaType``; OCI lets a manifest omit it, so the shape decides last.

    Raises:
        NotAnImageDocument: not JSON, or not shaped like a manifest or index.
    """
    if len(data) > MAX_MANIFEST_SIZE:
        raise NotAnImageDocument(f"document of {len(data)} bytes is larger than 4 MiB")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotAnImageDocument(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise NotAnImageDocument("not a schemaVersion 2 image document")
    own = doc.get("mediaType")
    mt = media_type or (own if isinstance(own, str) else "")
    if mt in INDEX_TYPES or (not mt and "manifests" in doc):
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise NotAnImageDocument("an index without a manifests list")
        return Document(
            "index", mt or OCI_INDEX, None, (), tuple(_descriptor(m) for m in entries), doc
        )
    if mt in MANIFEST_TYPES or (not mt and "config" in doc):
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise NotAnImageDocument("a manifest without a layers list")
        return Document(
            "manifest",
            mt or OCI_MANIFEST,
            _descriptor(doc.get("config")),
            tuple(_descriptor(x) for x in layers),
            (),
            doc,
        )
    raise NotAnImageDocument(f"unsupported media type {mt!r}")


def sniff(data: bytes) -> Document | None:
    """The document if ``data`` is a manifest or index, else None. Cheap for other blobs."""
    if data[:1] != b"{" or len(data) > MAX_MANIFEST_SIZE:
        return None
    try:
        return parse_document(data)
    except NotAnImageDocument:
        return None


def record_children(data: bytes) -> list[str]:
    """The blobs a layer record keeps alive (its uncompressed content, and the compressed
    bytes when they are stored as they came)."""
    try:
        rec = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return []
    if not isinstance(rec, dict) or "casd_oci_layer" not in rec:
        return []
    out = [d for d in (rec.get("uncompressed"), rec.get("raw")) if isinstance(d, str)]
    return out


def references(
    digest: str,
    read_small: Callable[[str], bytes | None],
    resolve_name: Callable[[str], str | None],
) -> list[str]:
    """The blobs ``digest`` keeps alive through OCI: for a manifest its config, layers and
    their layer records; for an index its manifests; for a layer record its content.

    ``read_small(d)`` returns a blob's bytes if it exists and is at most
    MAX_MANIFEST_SIZE, else None; ``resolve_name(n)`` the digest a name points at or None.
    Blobs that are not image documents have no references.
    """
    data = read_small(digest)
    if data is None or data[:1] != b"{":
        return []
    doc = sniff(data)
    if doc is None:
        return record_children(data)
    out: list[str] = []
    if doc.config is not None:
        out.append(doc.config.digest)
    for layer in doc.layers:
        out.append(layer.digest)
        record = resolve_name(layer_record_name(layer.digest))
        if record is not None:
            out.append(record)
    out.extend(m.digest for m in doc.manifests)
    return out
