"""Test support for the OCI HTTP server: an in-memory source, a seeded image built from
real files, and a helper that runs the server on a free loopback port."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import ssl
import tarfile
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from casd.oci.http import ManifestHit, OciLimits, OciSource, OciStats, serve_oci
from casd.oci.media import OCI_CONFIG, OCI_MANIFEST

LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class MemorySource(OciSource):
    """Repositories held in dicts: tags → manifest digest, digest → manifest, digest → blob."""

    def __init__(self, piece_size: int = 64 * 1024) -> None:
        self.piece_size = piece_size
        self.repos: dict[str, dict[str, str]] = {}  # repo -> tag -> manifest digest
        self.manifests: dict[str, dict[str, ManifestHit]] = {}  # repo -> digest -> hit
        self.blobs: dict[str, dict[str, bytes]] = {}  # repo -> digest -> bytes
        self.opened: list[tuple[str, int, int]] = []

    def add_repo(self, repo: str) -> None:
        self.repos.setdefault(repo, {})
        self.manifests.setdefault(repo, {})
        self.blobs.setdefault(repo, {})

    def add_blob(self, repo: str, data: bytes) -> str:
        self.add_repo(repo)
        digest = sha256(data)
        self.blobs[repo][digest] = data
        return digest

    def add_manifest(self, repo: str, data: bytes, media_type: str, *tags: str) -> str:
        self.add_repo(repo)
        digest = sha256(data)
        self.manifests[repo][digest] = ManifestHit(data, media_type, digest)
        for tag in tags:
            self.repos[repo][tag] = digest
        return digest

    async def has_repository(self, repo: str) -> bool:
        await trio.lowlevel.checkpoint()
        return repo in self.repos

    async def manifest(self, repo: str, reference: str) -> ManifestHit | None:
        await trio.lowlevel.checkpoint()
        digest = self.repos.get(repo, {}).get(reference, reference)
        return self.manifests.get(repo, {}).get(digest)

    async def blob_size(self, repo: str, digest: str) -> int | None:
        await trio.lowlevel.checkpoint()
        data = self.blobs.get(repo, {}).get(digest)
        return None if data is None else len(data)

    async def _pieces(self, data: bytes, start: int, end: int) -> AsyncIterator[memoryview]:
        view = memoryview(data)
        for pos in range(start, end, self.piece_size):
            await trio.lowlevel.checkpoint()
            yield view[pos : min(end, pos + self.piece_size)]

    @asynccontextmanager
    async def open_blob(
        self, repo: str, digest: str, start: int, end: int
    ) -> AsyncIterator[AsyncIterator[bytes | memoryview]]:
        self.opened.append((digest, start, end))
        data = self.blobs[repo][digest]
        async with aclosing(self._pieces(data, start, end)) as pieces:
            yield pieces

    async def tags(self, repo: str) -> list[str] | None:
        await trio.lowlevel.checkpoint()
        tags = self.repos.get(repo)
        return None if tags is None else list(tags)


@dataclass(frozen=True)
class SeededImage:
    """One image as a conformance target must hold it (in ``repo``, under every tag)."""

    repo: str
    tag: str
    tags: tuple[str, ...]
    manifest: bytes
    manifest_digest: str
    manifest_type: str
    config: bytes
    config_digest: str
    layer: bytes
    layer_digest: str
    #: Other blobs served from the repository (name → bytes), e.g. an empty one.
    extra_blobs: dict[str, bytes] = field(default_factory=dict)


def _layer_tar() -> bytes:
    """A tar of real files (Debian copyright texts), deterministic for a given system."""
    files = sorted(Path("/usr/share/doc").glob("*/copyright"))[:12]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        contents = [(f"usr/share/doc/{p.parent.name}/copyright", p.read_bytes()) for p in files]
        if sum(len(c) for _, c in contents) < 4096:  # a system without docs: still > 2 KiB
            contents.append(("app/data.txt", b"casd oci test layer\n" * 400))
        for name, data in contents:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build_seeded_image(repo: str = "casd/conformance-test", tag: str = "latest") -> SeededImage:
    """A small OCI image: one gzip'd layer of real files, a config with the right
    diff_id, and an OCI manifest; tagged ``tag`` plus a few more tags for pagination."""
    tar = _layer_tar()
    layer = gzip.compress(tar, mtime=0)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": [sha256(tar)]},
            "history": [{"created_by": "casd tests"}],
        },
        sort_keys=True,
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
            "layers": [{"mediaType": LAYER_GZIP, "digest": sha256(layer), "size": len(layer)}],
        },
        indent=2,  # not canonical JSON on purpose: the server must serve these exact bytes
    ).encode()
    tags = (tag, "v1", "v1.0", "V2", "a-tag", "z_last")
    return SeededImage(
        repo=repo,
        tag=tag,
        tags=tuple(sorted(set(tags))),
        manifest=manifest,
        manifest_digest=sha256(manifest),
        manifest_type=OCI_MANIFEST,
        config=config,
        config_digest=sha256(config),
        layer=layer,
        layer_digest=sha256(layer),
        extra_blobs={"empty": b""},
    )


def seed(source: MemorySource, image: SeededImage) -> None:
    source.add_blob(image.repo, image.config)
    source.add_blob(image.repo, image.layer)
    for data in image.extra_blobs.values():
        source.add_blob(image.repo, data)
    source.add_manifest(image.repo, image.manifest, image.manifest_type, *image.tags)


@asynccontextmanager
async def running_server(
    source: OciSource, *, limits: OciLimits | None = None, stats: OciStats | None = None
) -> AsyncIterator[str]:
    """Serve ``source`` on 127.0.0.1 with a free port; yields the base URL."""
    async with trio.open_nursery() as nursery:
        serve = partial(serve_oci, stats=stats, limits=limits)
        host, port = await nursery.start(serve, source, "127.0.0.1", 0)
        try:
            yield f"http://{host}:{port}"
        finally:
            nursery.cancel_scope.cancel()


_TLS = ssl.create_default_context()  # built once: httpx would load the CA bundle per client


def http_client(base_url: str, **kwargs: Any) -> httpx.AsyncClient:
    """An httpx client for a test server (plain HTTP; the TLS context is shared)."""
    kwargs.setdefault("timeout", 10)
    return httpx.AsyncClient(base_url=base_url, verify=_TLS, **kwargs)
