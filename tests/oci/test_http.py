"""The OCI HTTP server against an in-memory source, over real loopback sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import h11
import httpx
import pytest
import trio

from casd.errors import StoreError
from casd.oci.http import (
    OCI_ERROR_CODES,
    OciLimits,
    OciStats,
    RangeNotSatisfiable,
    is_valid_digest,
    is_valid_name,
    parse_range,
)

from .http_testing import (
    MemorySource,
    SeededImage,
    build_seeded_image,
    http_client,
    running_server,
    seed,
    sha256,
)

SKOPEO_ACCEPT = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
]

# The first bytes of a TLS 1.x ClientHello record (what skopeo sends first), then junk.
CLIENT_HELLO = bytes.fromhex("16030100de010000da0303") + bytes(range(32)) + b"\x00" * 150


@pytest.fixture
def image() -> SeededImage:
    return build_seeded_image("library/test", "v1")


@pytest.fixture
def source(image: SeededImage) -> MemorySource:
    src = MemorySource(piece_size=1000)
    seed(src, image)
    return src


@pytest.fixture
def stats() -> OciStats:
    return OciStats()


@pytest.fixture
async def base_url(source: MemorySource, stats: OciStats) -> AsyncIterator[str]:
    async with running_server(source, stats=stats) as url:
        yield url


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(base_url, timeout=10) as c:
        yield c


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def oci_codes(resp: httpx.Response) -> list[str]:
    assert resp.headers["content-type"] == "application/json"
    codes = [e["code"] for e in resp.json()["errors"]]
    assert set(codes) <= OCI_ERROR_CODES
    return codes


async def read_all(stream: trio.SocketStream) -> bytes:
    out = bytearray()
    while data := await stream.receive_some(65536):
        out += data
    return bytes(out)


async def read_response(
    stream: trio.SocketStream, conn: h11.Connection
) -> tuple[h11.Response, bytes]:
    """One response from a raw socket, parsed with h11 as a client."""
    response: h11.Response | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            return response, bytes(body)
        else:
            raise AssertionError(f"unexpected {event!r}")


def header(resp: h11.Response, name: str) -> str | None:
    for k, v in resp.headers:
        if k == name.encode():
            return v.decode()
    return None


@asynccontextmanager
async def raw(url: str) -> AsyncIterator[trio.SocketStream]:
    stream = await trio.open_tcp_stream("127.0.0.1", port_of(url))
    async with stream:
        yield stream


# --- unit: lexical rules and ranges ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "size", "want"),
    [
        ("bytes=500-1499", 2000, (500, 1500)),
        ("bytes=500-", 2000, (500, 2000)),
        ("bytes=-500", 2000, (1500, 2000)),
        ("bytes=-5000", 2000, (0, 2000)),
        ("bytes=0-99999", 2000, (0, 2000)),
        ("BYTES = 1-2", 2000, (1, 3)),
        ("bytes=0-1,5-6", 2000, None),  # multi-range: the whole body
        ("bytes=9-3", 2000, None),  # invalid: ignored
        ("items=0-1", 2000, None),
        ("bytes=x-y", 2000, None),
        ("bytes=-", 2000, None),
    ],
)
def test_parse_range(value: str, size: int, want: tuple[int, int] | None) -> None:
    assert parse_range(value, size) == want


@pytest.mark.parametrize(
    ("value", "size"), [("bytes=2000-", 2000), ("bytes=-0", 10), ("bytes=-1", 0), ("bytes=0-", 0)]
)
def test_parse_range_unsatisfiable(value: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(value, size)


def test_names_and_digests() -> None:
    assert is_valid_name("library/test")
    assert is_valid_name("a.b_c__d--e/f-g/h0")
    assert not is_valid_name("Upper")
    assert not is_valid_name("a//b")
    assert not is_valid_name("a/")
    assert not is_valid_name("-a")
    assert not is_valid_name("a" * 256)
    assert is_valid_digest(sha256(b"x"))
    assert is_valid_digest("sha512:" + "0" * 128)
    assert not is_valid_digest("sha256:" + "A" * 64)
    assert not is_valid_digest("sha256:abc")
    assert not is_valid_digest("md5:d41d8cd98f00b204e9800998ecf8427e")


# --- routes and headers ---------------------------------------------------------------------


async def test_base(client: httpx.AsyncClient) -> None:
    resp = await client.get("/v2/")
    assert resp.status_code == 200
    assert resp.json() == {}
    assert resp.headers["docker-distribution-api-version"] == "registry/2.0"
    assert resp.headers["content-type"] == "application/json"
    assert (await client.get("/v2")).status_code == 200


async def test_manifest_headers(client: httpx.AsyncClient, image: SeededImage) -> None:
    resp = await client.get(f"/v2/{image.repo}/manifests/{image.tag}")
    assert resp.status_code == 200
    assert resp.content == image.manifest
    assert resp.headers["content-type"] == image.manifest_type
    assert resp.headers["docker-content-digest"] == image.manifest_digest
    assert resp.headers["etag"] == f'"{image.manifest_digest}"'
    assert resp.headers["content-length"] == str(len(image.manifest))
    assert "content-encoding" not in resp.headers


async def test_blob_headers(client: httpx.AsyncClient, image: SeededImage) -> None:
    resp = await client.get(
        f"/v2/{image.repo}/blobs/{image.layer_digest}", headers={"Accept-Encoding": "gzip"}
    )
    assert resp.status_code == 200
    assert resp.content == image.layer
    assert resp.headers["content-type"] == "application/octet-stream"
    assert resp.headers["accept-ranges"] == "bytes"
    assert resp.headers["docker-content-digest"] == image.layer_digest
    assert resp.headers["etag"] == f'"{image.layer_digest}"'
    assert resp.headers["content-length"] == str(len(image.layer))
    assert "content-encoding" not in resp.headers


@pytest.mark.parametrize("what", ["manifest-tag", "manifest-digest", "config", "layer", "empty"])
async def test_head_matches_get(client: httpx.AsyncClient, image: SeededImage, what: str) -> None:
    url = {
        "manifest-tag": f"/v2/{image.repo}/manifests/{image.tag}",
        "manifest-digest": f"/v2/{image.repo}/manifests/{image.manifest_digest}",
        "config": f"/v2/{image.repo}/blobs/{image.config_digest}",
        "layer": f"/v2/{image.repo}/blobs/{image.layer_digest}",
        "empty": f"/v2/{image.repo}/blobs/{sha256(b'')}",
    }[what]
    get = await client.get(url)
    head = await client.head(url)
    assert get.status_code == head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.content))
    for name in ("content-type", "docker-content-digest", "etag"):
        assert head.headers[name] == get.headers[name]


async def test_if_none_match(client: httpx.AsyncClient, image: SeededImage) -> None:
    url = f"/v2/{image.repo}/blobs/{image.config_digest}"
    resp = await client.get(url, headers={"If-None-Match": f'"{image.config_digest}"'})
    assert resp.status_code == 304
    assert resp.content == b""
    resp = await client.get(url, headers={"If-None-Match": '"sha256:other"'})
    assert resp.status_code == 200


@pytest.mark.parametrize(
    ("range_", "status", "lo", "hi"),
    [
        ("bytes=500-1499", 206, 500, 1500),
        ("bytes=500-", 206, 500, None),
        ("bytes=-500", 206, -500, None),
        ("bytes=0-10000000", 206, 0, None),
        ("bytes=0-1,5-6", 200, 0, None),  # multi-range: documented as "whole body"
        ("bytes=9-3", 200, 0, None),
    ],
)
async def test_blob_ranges(
    client: httpx.AsyncClient,
    image: SeededImage,
    range_: str,
    status: int,
    lo: int,
    hi: int | None,
) -> None:
    size = len(image.layer)
    resp = await client.get(
        f"/v2/{image.repo}/blobs/{image.layer_digest}", headers={"Range": range_}
    )
    assert resp.status_code == status
    want = image.layer[lo:hi]
    assert resp.content == want
    assert resp.headers["content-length"] == str(len(want))
    if status == 206:
        first = lo % size
        assert resp.headers["content-range"] == f"bytes {first}-{first + len(want) - 1}/{size}"
    else:
        assert "content-range" not in resp.headers


@pytest.mark.parametrize("range_", ["bytes=99999-", "bytes=-0"])
async def test_blob_range_unsatisfiable(
    client: httpx.AsyncClient, image: SeededImage, range_: str
) -> None:
    resp = await client.get(
        f"/v2/{image.repo}/blobs/{image.layer_digest}", headers={"Range": range_}
    )
    assert resp.status_code == 416
    assert resp.headers["content-range"] == f"bytes */{len(image.layer)}"
    assert oci_codes(resp) == ["SIZE_INVALID"]


async def test_range_on_empty_blob(client: httpx.AsyncClient, image: SeededImage) -> None:
    url = f"/v2/{image.repo}/blobs/{sha256(b'')}"
    for range_ in ("bytes=0-", "bytes=-5", "bytes=0-0"):
        resp = await client.get(url, headers={"Range": range_})
        assert resp.status_code == 416
        assert resp.headers["content-range"] == "bytes */0"
    resp = await client.get(url)
    assert resp.status_code == 200
    assert resp.content == b""
    assert resp.headers["content-length"] == "0"


async def test_range_ignored_on_head_and_on_stale_if_range(
    client: httpx.AsyncClient, image: SeededImage
) -> None:
    url = f"/v2/{image.repo}/blobs/{image.layer_digest}"
    head = await client.head(url, headers={"Range": "bytes=0-9"})
    assert head.status_code == 200
    assert head.headers["content-length"] == str(len(image.layer))
    resp = await client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"sha256:old"'})
    assert resp.status_code == 200
    assert resp.content == image.layer
    resp = await client.get(
        url, headers={"Range": "bytes=0-9", "If-Range": f'"{image.layer_digest}"'}
    )
    assert resp.status_code == 206


async def test_tags_pagination(client: httpx.AsyncClient, image: SeededImage) -> None:
    url = f"/v2/{image.repo}/tags/list"
    tags = sorted(image.tags)
    resp = await client.get(url, params={"n": 3})
    assert resp.json() == {"name": image.repo, "tags": tags[:3]}
    assert resp.headers["link"] == f'<{url}?n=3&last={tags[2]}>; rel="next"'
    resp = await client.get(url, params={"n": 3, "last": tags[2]})
    assert resp.json()["tags"] == tags[3:6]
    assert ("link" in resp.headers) == (len(tags) > 6)
    resp = await client.get(url, params={"last": "zzzz"})
    assert resp.json()["tags"] == []
    for bad in ("-1", "x", "1.5"):
        resp = await client.get(url, params={"n": bad})
        assert resp.status_code == 400
        oci_codes(resp)


async def test_unknown_repository_codes(client: httpx.AsyncClient, image: SeededImage) -> None:
    resp = await client.get("/v2/nope/manifests/latest")
    assert resp.status_code == 404
    assert oci_codes(resp) == ["NAME_UNKNOWN"]
    resp = await client.get(f"/v2/nope/blobs/{image.layer_digest}")
    assert oci_codes(resp) == ["NAME_UNKNOWN"]
    resp = await client.get(f"/v2/{image.repo}/manifests/nope")
    assert oci_codes(resp) == ["MANIFEST_UNKNOWN"]
    resp = await client.get(f"/v2/{image.repo}/manifests/{'x' * 200}")
    assert resp.status_code == 404  # not a valid tag: no manifest can have it


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/library/test/blobs/uploads/"),
        ("PATCH", "/v2/library/test/blobs/uploads/1234-abcd"),
        ("PUT", "/v2/library/test/blobs/uploads/1234-abcd?digest=" + sha256(b"x")),
        ("PUT", "/v2/library/test/manifests/v1"),
        ("DELETE", "/v2/library/test/manifests/v1"),
        ("DELETE", "/v2/library/test/blobs/" + sha256(b"x")),
        ("POST", "/v2/library/test/something/else"),
        ("OPTIONS", "/v2/"),
    ],
)
async def test_write_methods_unsupported(client: httpx.AsyncClient, method: str, path: str) -> None:
    resp = await client.request(method, path, content=b"some body")
    assert resp.status_code == 405
    assert oci_codes(resp) == ["UNSUPPORTED"]
    assert resp.headers["allow"] == "GET, HEAD"


async def test_upload_status_unknown(client: httpx.AsyncClient) -> None:
    resp = await client.get("/v2/library/test/blobs/uploads/1234")
    assert resp.status_code == 404
    assert oci_codes(resp) == ["BLOB_UPLOAD_UNKNOWN"]


@pytest.mark.parametrize(
    "path", ["/", "/v1/_ping", "/v2/library/test/referrers/" + sha256(b"x"), "/v2/_catalog"]
)
async def test_unknown_paths(client: httpx.AsyncClient, path: str) -> None:
    resp = await client.get(path)
    assert resp.status_code == 404
    assert oci_codes(resp) == ["UNSUPPORTED"]


async def test_stats(client: httpx.AsyncClient, image: SeededImage, stats: OciStats) -> None:
    await client.get(f"/v2/{image.repo}/blobs/{image.layer_digest}")
    missing = await client.get(f"/v2/{image.repo}/blobs/{DUMMY}")
    assert stats.requests == 2
    assert stats.errors == 1
    assert stats.by_status == {200: 1, 404: 1}
    assert stats.body_bytes == len(image.layer) + len(missing.content)
    assert stats.bytes_sent > len(image.layer)
    assert stats.as_dict()["requests"] == 2


DUMMY = sha256(b"not here")


# --- what real clients do -------------------------------------------------------------------


async def test_tls_client_hello_then_plain_http(
    base_url: str, client: httpx.AsyncClient, image: SeededImage, stats: OciStats
) -> None:
    async with raw(base_url) as stream:
        await stream.send_all(CLIENT_HELLO)
        with trio.fail_after(5):  # answered (or closed) at once, not after a timeout
            reply = await read_all(stream)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 400 ")
    assert stats.aborted == 1
    resp = await client.get(f"/v2/{image.repo}/manifests/{image.tag}")
    assert resp.status_code == 200


async def test_garbage_gets_400(base_url: str) -> None:
    async with raw(base_url) as stream:
        await stream.send_all(b"HELLO THERE\r\n\r\n")
        with trio.fail_after(5):
            reply = await read_all(stream)
    assert reply.startswith(b"HTTP/1.1 400 ")


async def test_repeated_accept_headers(base_url: str, image: SeededImage) -> None:
    request = f"GET /v2/{image.repo}/manifests/{image.tag} HTTP/1.1\r\nHost: x\r\n"
    request += "".join(f"Accept: {a}\r\n" for a in SKOPEO_ACCEPT)
    request += "Accept-Encoding: gzip\r\nConnection: close\r\n\r\n"
    async with raw(base_url) as stream:
        await stream.send_all(request.encode())
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        with trio.fail_after(5):
            resp, body = await read_response(stream, conn)
            assert await stream.receive_some(1) == b""  # Connection: close honoured
    assert resp.status_code == 200
    assert body == image.manifest
    assert header(resp, "content-type") == image.manifest_type
    assert header(resp, "connection") == "close"


async def test_keep_alive(base_url: str, image: SeededImage, stats: OciStats) -> None:
    async with raw(base_url) as stream:
        conn = h11.Connection(h11.CLIENT)
        for digest, data in [
            (image.config_digest, image.config),
            (image.layer_digest, image.layer),
        ]:
            req = h11.Request(
                method="GET", target=f"/v2/{image.repo}/blobs/{digest}", headers=[("Host", "x")]
            )
            await stream.send_all(conn.send(req) + conn.send(h11.EndOfMessage()))
            with trio.fail_after(5):
                resp, body = await read_response(stream, conn)
            assert resp.status_code == 200
            assert body == data
            conn.start_next_cycle()
    assert stats.connections == 1
    assert stats.requests == 2


async def test_hundred_concurrent_requests(base_url: str, image: SeededImage) -> None:
    results: list[bytes] = []
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
    async with http_client(base_url, limits=limits, timeout=20) as c:

        async def one(i: int) -> None:
            digest = image.layer_digest if i % 2 else image.config_digest
            resp = await c.get(f"/v2/{image.repo}/blobs/{digest}")
            assert resp.status_code == 200
            results.append(resp.content)

        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(one, i)
    assert len(results) == 100
    assert results.count(image.layer) == 50
    assert results.count(image.config) == 50


async def test_silent_client_does_not_block_others(
    source: MemorySource, image: SeededImage
) -> None:
    stats = OciStats()
    limits = OciLimits(header_timeout=0.5)
    async with running_server(source, limits=limits, stats=stats) as url, raw(url) as silent:
        async with http_client(url, timeout=5) as c:
            with trio.fail_after(0.4):
                assert (await c.get("/v2/")).status_code == 200
        with trio.fail_after(3):  # the server gives up on the silent one
            assert await silent.receive_some(1) == b""
    assert stats.aborted == 0  # an idle connection closing is not an error


async def test_half_sent_request_times_out(source: MemorySource) -> None:
    stats = OciStats()
    limits = OciLimits(header_timeout=0.3)
    async with running_server(source, limits=limits, stats=stats) as url, raw(url) as slow:
        await slow.send_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
        with trio.fail_after(3):
            assert await read_all(slow) == b""
    assert stats.aborted == 1


async def test_connection_limit(source: MemorySource) -> None:
    limits = OciLimits(max_connections=2, header_timeout=0.5)
    async with running_server(source, limits=limits) as url, raw(url), raw(url):
        await trio.sleep(0.05)
        async with http_client(url, timeout=5) as c:
            start = trio.current_time()
            assert (await c.get("/v2/")).status_code == 200
            # waited for one of the two silent connections to time out
            assert trio.current_time() - start >= 0.3


class FailingSource(MemorySource):
    """Fails after the first piece of every blob, like a store finding a corrupt chunk."""

    async def _pieces(self, data: bytes, start: int, end: int) -> AsyncIterator[memoryview]:
        yield memoryview(data)[start : min(end, start + self.piece_size)]
        raise StoreError("chunk 00ff is corrupt")


async def test_source_failing_mid_stream(image: SeededImage) -> None:
    source = FailingSource(piece_size=100)
    seed(source, image)
    stats = OciStats()
    async with (
        running_server(source, stats=stats) as url,
        http_client(url, timeout=5) as c,
    ):
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get(f"/v2/{image.repo}/blobs/{image.layer_digest}")
        assert (await c.get(f"/v2/{image.repo}/manifests/{image.tag}")).status_code == 200
    assert stats.aborted == 1


class BrokenSource(MemorySource):
    async def blob_size(self, repo: str, digest: str) -> int | None:
        raise StoreError("the index is unreadable")


async def test_source_failing_before_headers(image: SeededImage) -> None:
    source = BrokenSource()
    seed(source, image)
    async with running_server(source) as url, http_client(url) as c:
        resp = await c.get(f"/v2/{image.repo}/blobs/{image.layer_digest}")
        assert resp.status_code == 500
        assert (await c.get("/v2/")).status_code == 200


class EndlessSource(MemorySource):
    """One huge blob generated on demand; counts what the server pulled from it."""

    SIZE = 1 << 30

    def __init__(self) -> None:
        super().__init__(piece_size=64 * 1024)
        self.pulled = 0
        self.add_repo("big")

    async def blob_size(self, repo: str, digest: str) -> int | None:
        await trio.lowlevel.checkpoint()
        return self.SIZE

    async def _pieces(self, data: bytes, start: int, end: int) -> AsyncIterator[memoryview]:
        piece = memoryview(bytes(self.piece_size))
        for pos in range(start, end, self.piece_size):
            await trio.lowlevel.checkpoint()
            self.pulled += min(self.piece_size, end - pos)
            yield piece[: min(self.piece_size, end - pos)]

    def open_blob(self, repo: str, digest: str, start: int, end: int):  # type: ignore[no-untyped-def]
        self.blobs["big"][digest] = b""
        return super().open_blob(repo, digest, start, end)


async def test_backpressure_and_send_timeout() -> None:
    source = EndlessSource()
    stats = OciStats()
    limits = OciLimits(send_timeout=0.5)
    async with running_server(source, limits=limits, stats=stats) as url, raw(url) as stream:
        await stream.send_all(f"GET /v2/big/blobs/{DUMMY} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await stream.receive_some(4096)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert f"content-length: {EndlessSource.SIZE}".encode() in head.lower()
        # The client reads nothing more: the server stops pulling from the source once the
        # socket buffers are full, then gives up after send_timeout.
        await trio.sleep(1.0)
        assert stats.aborted == 1
        assert stats.active == 0
        assert source.pulled < 64 * 1024 * 1024
        with trio.fail_after(5):  # what was buffered, then the end: far short of the blob
            assert len(await read_all(stream)) < 64 * 1024 * 1024


async def test_bad_chunked_body_gets_400(base_url: str) -> None:
    async with raw(base_url) as stream:
        await stream.send_all(
            b"PATCH /v2/library/test/blobs/uploads/1 HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"
        )
        with trio.fail_after(5):
            reply = await read_all(stream)
    assert reply.startswith(b"HTTP/1.1 400 ")


async def test_large_write_body_answered_and_closed(base_url: str) -> None:
    body = b"x" * (1024 * 1024)
    request = (
        f"PATCH /v2/library/test/blobs/uploads/1 HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    async with raw(base_url) as stream:
        await stream.send_all(request + body[: 128 * 1024])
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        with trio.fail_after(5):
            resp, reply = await read_response(stream, conn)
    assert resp.status_code == 405
    assert header(resp, "connection") == "close"
    assert b"UNSUPPORTED" in reply
