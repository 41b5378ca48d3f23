"""Pull-through: the OCI pull API of a casd that fetches what it lacks from another casd.

``casd serve --oci-listen ... --upstream HOST:PORT`` makes this daemon's OCI API a
mirror: a client (skopeo, podman, containerd) asking for an image tag the store does
not hold starts a sync of that image from the upstream casd, the same sync as
``casctl sync`` (deltas against the older versions held here, layers whole where
nothing is held), and is answered as it lands:

- the manifest as soon as it is stored (the sync goes on for the rest);
- a blob the sync has not brought yet is waited for while a pull is under way;
- a layer is served as its compressed bytes reach the layer cache, whether they
  cross whole or are made here from its tar's chunks (casd.oci.source: its last byte
  waits until the whole layer checked).

So a client's pull and the sync overlap instead of following each other: ``casctl
sync`` then ``skopeo copy`` from this host takes both their times, a pull-through
about the sync's. A tag that is here is served from here, as before; the mirror does
not ask upstream whether it moved (sync it for that).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import trio
from casproto import ErrorCode

from casd.client import open_client
from casd.errors import CasdError, PeerRefused, UpstreamError
from casd.nursery import open_nursery
from casd.oci.http import ManifestHit
from casd.oci.source import StoreSource
from casd.replicate import resolve_names
from casd.server.service import ServerContext, pull_images

log = logging.getLogger("casd.mirror")

#: How often a request waiting for a pull looks again (seconds).
POLL = 0.005


@dataclass(frozen=True)
class Upstream:
    address: str  # HOST:PORT of the casd to pull from
    token: str | None = None  # CASD_UPSTREAM_TOKEN


class _Pull:
    def __init__(self, name: str) -> None:
        self.name = name
        self.digest: str | None = None  # what the name pointed at upstream, once asked
        self.done = trio.Event()
        self.error: Exception | None = None


class Mirror:
    """The pulls under way, one per name, run in ``nursery`` (the daemon's handlers')."""

    def __init__(self, ctx: ServerContext, upstream: Upstream, nursery: trio.Nursery) -> None:
        self.ctx = ctx
        self.upstream = upstream
        self._nursery = nursery
        self._pulls: dict[str, _Pull] = {}

    @property
    def busy(self) -> bool:
        return bool(self._pulls)

    def pull(self, name: str) -> _Pull:
        """The pull of ``name`` (REPO:TAG), started if none is under way."""
        p = self._pulls.get(name)
        if p is None:
            p = self._pulls[name] = _Pull(name)
            self._nursery.start_soon(self._run, p)
        return p

    async def _run(self, p: _Pull) -> None:
        source = self.upstream.address
        try:
            async with open_client(
                source, token=self.upstream.token, tls_ca=self.ctx.tls_ca
            ) as src:
                src.allow_deltas = self.ctx.deltas
                sizes: dict[str, int] = {}
                kernel_rate = [0.0]

                async def rate() -> None:
                    stats = await src.stats()
                    kernel_rate[0] = float(stats.get("peer_link_mbit", 0) or 0) * 1e6 / 8

                async def names() -> None:
                    pairs.extend(await resolve_names(src, [p.name], False, sizes))
                    p.digest = pairs[0][1]

                pairs: list[tuple[str, str]] = []
                async with open_nursery() as first:  # one round trip for both
                    first.start_soon(rate)
                    first.start_soon(names)
                report = await pull_images(self.ctx, src, source, pairs, sizes, kernel_rate[0])
                report.wire_bytes = src.peer.wire_bytes  # the whole conversation
            log.info("pulled %s through from %s: %s", p.name, source, report.as_dict())
        except (CasdError, OSError) as exc:
            p.error = exc
            log.warning("pulling %s through from %s failed: %s", p.name, source, exc)
        except Exception as exc:  # a bug: this pull fails, the daemon goes on
            p.error = exc
            log.exception("pulling %s through from %s failed", p.name, source)
        finally:
            del self._pulls[p.name]
            p.done.set()


class MirrorSource(StoreSource):
    """:class:`casd.oci.source.StoreSource`, completed by pulls from the upstream."""

    def __init__(self, mirror: Mirror) -> None:
        ctx = mirror.ctx
        super().__init__(ctx.store, ctx.run, ctx.oci_cache, ctx.landings)
        self.mirror = mirror

    async def manifest(self, repo: str, reference: str) -> ManifestHit | None:
        hit = await super().manifest(repo, reference)
        if hit is not None:
            return hit
        if reference.startswith("sha256:"):
            # An index's manifest, asked for after the index: the pull brings it.
            while self.mirror.busy:
                await trio.sleep(POLL)
                if (hit := await super().manifest(repo, reference)) is not None:
                    return hit
            return None
        p = self.mirror.pull(f"{repo}:{reference}")
        while not p.done.is_set():
            if p.digest is not None:
                found: ManifestHit | None = await self.run(self._hit, p.digest)
                if found is not None:
                    return found
            await trio.sleep(POLL)
        if p.error is not None:
            if isinstance(p.error, PeerRefused) and p.error.code_name == "NOT_FOUND":
                return None  # upstream has no such image either: a 404 here too
            raise UpstreamError(
                f"pulling {repo}:{reference} from {self.mirror.upstream.address}: {p.error}",
                int(ErrorCode.UNREACHABLE),
            )
        return await super().manifest(repo, reference)

    async def blob_size(self, repo: str, digest: str) -> int | None:
        while True:
            size = await super().blob_size(repo, digest)
            if size is not None or not self.mirror.busy:
                return size
            await trio.sleep(POLL)


def upstream_from(address: str | None) -> Upstream | None:
    if not address:
        return None
    return Upstream(address, os.environ.get("CASD_UPSTREAM_TOKEN") or None)
