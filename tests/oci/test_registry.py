"""casd.oci.registry against a real docker-registry, and the AuthProxy in front of it for
bearer tokens, redirects to storage and corrupted answers."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from casd.errors import UpstreamError, UserError
from casd.oci import media
from casd.oci.registry import (
    BadReference,
    ImageRef,
    RegistryClient,
    RegistryError,
    parse_reference,
    parse_www_authenticate,
)
from tests.oci.images import (
    LayoutImage,
    LayoutIndex,
    build_index_two_platforms,
    build_layout_python,
    build_layout_umoci,
    push_layout,
    real_files,
    require_tool,
)
from tests.oci.registry_harness import AuthProxy, Registry, auth_proxy, docker_registry, free_port

REPO = "casd/python"
MULTI = "casd/multi"
USER, PASSWORD = "casd", "s3cret"


@dataclass
class Images:
    python: LayoutImage
    index: LayoutIndex


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    for tool in ("docker-registry", "skopeo", "htpasswd"):
        require_tool(tool)
    layout = tmp_path_factory.mktemp("layout")
    stdlib = Path(json.__file__).parent.parent
    python = build_layout_python(
        layout,
        "v1",
        [
            real_files(stdlib / "email", 300_000),
            # already-compressed real files: a layer of > 1 MiB that needs several chunks
            {
                **real_files("/usr/share/doc", 1_500_000, suffixes=(".gz",)),
                "app/hello.txt": b"hello\n",
            },
        ],
    )
    index = build_index_two_platforms(layout, "multi", compresslevel=9)
    return Images(python, index)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, images: Images) -> Iterator[Registry]:
    with docker_registry(tmp_path_factory.mktemp("registry")) as reg:
        push_layout(images.python.layout, "v1", reg.host, REPO)
        push_layout(images.python.layout, "v1", reg.host, REPO, dest_tag="v2")
        push_layout(images.index.layout, "multi", reg.host, MULTI, dest_tag="v1")
        yield reg


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory, images: Images) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("basic-registry")
    with docker_registry(root, users={USER: PASSWORD}) as reg:
        push_layout(images.python.layout, "v1", reg.host, REPO, creds=(USER, PASSWORD))
        yield reg


@pytest.fixture
def proxy(registry: Registry) -> Iterator[AuthProxy]:
    with auth_proxy(registry.host) as p:
        yield p


def client(host: str, **kw: object) -> RegistryClient:
    return RegistryClient(host, insecure=True, trust_env=False, **kw)  # type: ignore[arg-type]


async def pull_all(rc: RegistryClient, repo: str, image: LayoutImage) -> None:
    """Fetch the image's manifest and every blob; check they are the layout's bytes."""
    data, mt, digest = await rc.get_manifest(repo, image.manifest_digest)
    assert (data, mt, digest) == (image.manifest, media.OCI_MANIFEST, image.manifest_digest)
    sizes = dict(zip(image.layer_digests, image.layer_sizes, strict=True))
    sizes[image.config_digest] = len(image.config)
    for blob in image.blobs:
        async with rc.stream_blob(repo, blob, sizes[blob]) as stream:
            got = b"".join([chunk async for chunk in stream])
            assert stream.verified
        assert got == image.blob(blob)


async def drain(
    rc: RegistryClient,
    repo: str,
    digest: str,
    size: int | None = None,
    seen: list[int] | None = None,
) -> int:
    """Stream a blob to nowhere; its byte count (also appended to ``seen`` as it goes)."""
    total = 0
    async with rc.stream_blob(repo, digest, size) as stream:
        async for chunk in stream:
            total += len(chunk)
            if seen is not None:
                seen.append(total)
    return total


# --- references and headers ----------------------------------------------------------------

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("debian", ImageRef("registry-1.docker.io", "library/debian", "latest", None)),
        ("docker.io/debian:12", ImageRef("registry-1.docker.io", "library/debian", "12", None)),
        ("index.docker.io/u/app:1", ImageRef("registry-1.docker.io", "u/app", "1", None)),
        ("user/app", ImageRef("registry-1.docker.io", "user/app", "latest", None)),
        ("localhost/app", ImageRef("localhost", "app", "latest", None)),
        ("localhost:5000/a/b:v1.2", ImageRef("localhost:5000", "a/b", "v1.2", None)),
        ("127.0.0.1:5000/a/b_c-d", ImageRef("127.0.0.1:5000", "a/b_c-d", "latest", None)),
        ("ghcr.io/o/r@" + D, ImageRef("ghcr.io", "o/r", None, D)),
        ("ghcr.io/o/r:t@" + D, ImageRef("ghcr.io", "o/r", "t", D)),
        ("[::1]:5000/x", ImageRef("[::1]:5000", "x", "latest", None)),
    ],
)
def test_parse_reference(text: str, expected: ImageRef) -> None:
    ref = parse_reference(text)
    assert ref == expected
    assert ref.reference == (expected.digest or expected.tag)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        ("Debian", "lowercase"),
        ("https://ghcr.io/o/r", "without a scheme"),
        ("ghcr.io/o/r@sha256:abc", "64 lowercase hex"),
        ("ghcr.io/o/r@md5:" + "a" * 32, "not supported"),
        ("ghcr.io/o/r:bad!tag", "tag 'bad!tag'"),
        ("ghcr.io/", "repository name is missing"),
        ("ghcr.io/a//b", "not a valid repository name"),
        ("bad_host.io:x/r", "not a valid registry host"),
    ],
)
def test_parse_reference_rejects(text: str, says: str) -> None:
    with pytest.raises(BadReference, match=None) as info:
        parse_reference(text)
    assert isinstance(info.value, UserError)
    assert says in str(info.value)


def test_www_authenticate_parsing() -> None:
    got = parse_www_authenticate(
        [
            'Bearer realm="https://auth.example/token",service="reg, eu",'
            'scope="repository:a/b:pull,push"',
            'Basic realm="say \\"hi\\"", Negotiate abc==',
        ]
    )
    assert [(c.scheme, c.params) for c in got] == [
        (
            "bearer",
            {
                "realm": "https://auth.example/token",
                "service": "reg, eu",
                "scope": "repository:a/b:pull,push",
            },
        ),
        ("basic", {"realm": 'say "hi"'}),
        ("negotiate", {"token68": "abc=="}),
    ]


def test_next_link() -> None:
    link = '</v2/a/tags/list?n=2&last=b>; rel="next", <https://x.example/y>; rel=prev'
    assert RegistryClient._next_link(link) == "/v2/a/tags/list?n=2&last=b"
    assert RegistryClient._next_link('<https://x.example/y>; rel="prev"') is None
    assert RegistryClient._next_link(None) is None


# --- anonymous registry ------------------------------------------------------------------


async def test_manifest_by_tag_and_digest(registry: Registry, images: Images) -> None:
    image = images.python
    async with client(registry.host) as rc:
        by_tag = await rc.get_manifest(REPO, "v1")
        by_digest = await rc.get_manifest(REPO, image.manifest_digest)
    assert by_tag == by_digest == (image.manifest, media.OCI_MANIFEST, image.manifest_digest)


async def test_stream_every_blob(registry: Registry, images: Images) -> None:
    image = images.python
    assert max(image.layer_sizes) > (1 << 20), "want a layer that needs several chunks"
    async with client(registry.host) as rc:
        await pull_all(rc, REPO, image)
        async with rc.stream_blob(REPO, image.layer_digests[-1]) as stream:
            sizes = [len(c) async for c in stream]
        assert max(sizes) <= 1 << 20
        assert len(sizes) >= 2
        assert stream.received == image.layer_sizes[-1] == stream.size
        assert await rc.fetch_blob(REPO, image.config_digest, limit=1 << 20) == image.config


async def test_index_and_its_manifests(registry: Registry, images: Images) -> None:
    index = images.index
    async with client(registry.host) as rc:
        data, mt, digest = await rc.get_manifest(MULTI, "v1")
        assert (data, mt, digest) == (index.index, media.OCI_INDEX, index.index_digest)
        doc = media.parse_document(data, mt)
        assert [m.platform for m in doc.manifests] == [
            {"os": "linux", "architecture": "amd64"},
            {"os": "linux", "architecture": "arm64"},
        ]
        for image in index.images.values():
            await pull_all(rc, MULTI, image)


async def test_list_tags(registry: Registry) -> None:
    async with client(registry.host) as rc:
        assert sorted(await rc.list_tags(REPO)) == ["v1", "v2"]


async def test_not_found_names_what(registry: Registry, images: Images) -> None:
    async with client(registry.host) as rc:
        with pytest.raises(RegistryError) as info:
            await rc.get_manifest("casd/nope", "v1")
        # distribution says MANIFEST_UNKNOWN here; the client asks tags/list to tell.
        assert info.value.kind == RegistryError.NAME_UNKNOWN
        assert "repository casd/nope not found" in str(info.value)

        with pytest.raises(RegistryError) as info:
            await rc.get_manifest(REPO, "no-such-tag")
        assert info.value.kind == RegistryError.MANIFEST_UNKNOWN
        assert "manifest casd/python:no-such-tag not found" in str(info.value)
        assert "has no such tag (its tags: v1, v2)" in str(info.value)

        with pytest.raises(RegistryError) as info:
            await rc.get_manifest(REPO, "sha256:" + "0" * 64)
        assert info.value.kind == RegistryError.MANIFEST_UNKNOWN
        assert "has no such digest" in str(info.value)
        assert isinstance(info.value, UpstreamError)

        with pytest.raises(RegistryError) as info:
            await drain(rc, REPO, "sha256:" + "0" * 64)
        assert info.value.kind == RegistryError.BLOB_UNKNOWN


async def test_plain_http_registry_without_insecure(registry: Registry) -> None:
    async with RegistryClient(registry.host, insecure=False, trust_env=False) as rc:
        with pytest.raises(RegistryError) as info:
            await rc.get_manifest(REPO, "v1")
    assert info.value.kind == RegistryError.TLS
    assert "--insecure" in str(info.value)


async def test_connection_refused() -> None:
    async with client(f"127.0.0.1:{free_port()}") as rc:
        with pytest.raises(RegistryError) as info:
            await rc.get_manifest(REPO, "v1")
    assert info.value.kind == RegistryError.CONNECT
    assert "cannot connect" in str(info.value)


# --- answers that must be rejected ---------------------------------------------------------


async def test_corrupt_blob_is_rejected_at_the_end(registry: Registry, images: Images) -> None:
    image = images.python
    layer = image.layer_digests[-1]
    with auth_proxy(registry.host, auth="none", corrupt={layer}) as p:
        async with client(p.host) as rc:
            seen: list[int] = []
            with pytest.raises(RegistryError) as info:
                await drain(rc, REPO, layer, image.layer_sizes[-1], seen)
            assert info.value.kind == RegistryError.DIGEST_MISMATCH
            assert seen[-1] == image.layer_sizes[-1], "the mismatch shows only at the end"
            assert layer in str(info.value)


async def test_wrong_blob_size_is_rejected(registry: Registry, images: Images) -> None:
    image = images.python
    async with client(registry.host) as rc:
        for claimed in (image.layer_sizes[0] - 1, image.layer_sizes[0] + 1):
            with pytest.raises(RegistryError) as info:
                await drain(rc, REPO, image.layer_digests[0], claimed)
            assert info.value.kind == RegistryError.SIZE_MISMATCH


async def test_corrupt_manifest_is_rejected(registry: Registry, images: Images) -> None:
    image = images.python
    with auth_proxy(registry.host, auth="none", corrupt={"manifest"}) as p:
        async with client(p.host) as rc:
            for ref in ("v1", image.manifest_digest):
                with pytest.raises(RegistryError) as info:
                    await rc.get_manifest(REPO, ref)
                assert info.value.kind == RegistryError.DIGEST_MISMATCH
    # An honest body under a lying Docker-Content-Digest header is refused too.
    with auth_proxy(registry.host, auth="none", fake_manifest_digest="sha256:" + "1" * 64) as p:
        async with client(p.host) as rc:
            with pytest.raises(RegistryError, match="Docker-Content-Digest") as info:
                await rc.get_manifest(REPO, "v1")
            assert info.value.kind == RegistryError.DIGEST_MISMATCH


async def test_media_type_from_document_without_content_type(
    registry: Registry, images: Images
) -> None:
    with auth_proxy(registry.host, auth="none", drop_content_type=True) as p:
        async with client(p.host) as rc:
            _, mt, _ = await rc.get_manifest(MULTI, "v1")
    assert mt == media.OCI_INDEX


# --- basic auth ------------------------------------------------------------------------------


async def test_basic_auth(basic_registry: Registry, images: Images) -> None:
    async with client(basic_registry.host) as rc:
        with pytest.raises(RegistryError) as info:
            await rc.get_manifest(REPO, "v1")
        assert info.value.kind == RegistryError.UNAUTHORIZED
        assert "--creds" in str(info.value)

    async with client(basic_registry.host, creds=(USER, "wrong")) as rc:
        with pytest.raises(RegistryError) as info:
            await rc.get_manifest(REPO, "v1")
        assert info.value.kind == RegistryError.UNAUTHORIZED
        assert "refused the credentials" in str(info.value)

    async with client(basic_registry.host, creds=(USER, PASSWORD)) as rc:
        await pull_all(rc, REPO, images.python)


# --- bearer tokens ---------------------------------------------------------------------------


def _query(seen_path: str) -> dict[str, list[str]]:
    return urllib.parse.parse_qs(urllib.parse.urlsplit(seen_path).query)


async def test_bearer_anonymous_token_is_cached(proxy: AuthProxy, images: Images) -> None:
    async with client(proxy.host) as rc:
        await pull_all(rc, REPO, images.python)
        await rc.get_manifest(REPO, "v2")
        assert proxy.state.token_hits == 1
        assert rc.token_fetches == 1
        query = _query(proxy.state.token_requests[0].path)
        assert query["service"] == ["test"]
        assert query["scope"] == [f"repository:{REPO}:pull"]
        assert proxy.state.token_requests[0].header("authorization") is None
        # Another repository is another scope: one more token, then cached again.
        await rc.get_manifest(MULTI, "v1")
        await rc.get_manifest(MULTI, images.index.index_digest)
        assert proxy.state.token_hits == 2
    # Only the very first request went out without a token: once the registry asked for
    # bearer tokens, a new scope's token is fetched before its first request.
    unauthenticated = [s for s in proxy.state.requests if s.header("authorization") is None]
    assert len(unauthenticated) == 1


async def test_bearer_with_credentials(registry: Registry, images: Images) -> None:
    with auth_proxy(
        registry.host, users={USER: PASSWORD}, anonymous=False, token_field="access_token"
    ) as p:
        async with client(p.host) as rc:
            with pytest.raises(RegistryError) as info:
                await rc.get_manifest(REPO, "v1")
            assert info.value.kind == RegistryError.UNAUTHORIZED
            assert "--creds" in str(info.value)
        async with client(p.host, creds=(USER, "wrong")) as rc:
            with pytest.raises(RegistryError, match="refused") as info:
                await rc.get_manifest(REPO, "v1")
            assert info.value.kind == RegistryError.UNAUTHORIZED
        hits = p.state.token_hits
        async with client(p.host, creds=(USER, PASSWORD)) as rc:
            await pull_all(rc, REPO, images.python)
        assert p.state.token_hits == hits + 1
        assert (p.state.token_requests[-1].header("authorization") or "").startswith("Basic ")


async def test_expired_token_is_renewed(registry: Registry, images: Images) -> None:
    """A token the registry no longer accepts is dropped and fetched again, once."""
    with auth_proxy(registry.host) as p:
        async with client(p.host) as rc:
            await rc.get_manifest(REPO, "v1")
            p.state.tokens.clear()  # the registry forgets every token
            await rc.get_manifest(REPO, "v1")
            assert p.state.token_hits == 2


async def test_redirect_to_storage_drops_authorization(registry: Registry, images: Images) -> None:
    with auth_proxy(registry.host, redirect_blobs=True, redirect_hops=2) as p:
        async with client(p.host) as rc:
            await pull_all(rc, REPO, images.python)
        blobs = [s for s in p.state.requests if "/blobs/" in s.path]
        assert blobs
        assert all(s.header("authorization") for s in blobs), "the registry gets the token"
        storage = p.state.storage_requests
        assert len(storage) == 2 * len(images.python.blobs)  # two hops per blob
        assert [s.header("authorization") for s in storage] == [None] * len(storage)


async def test_redirect_limit(registry: Registry, images: Images) -> None:
    with auth_proxy(registry.host, auth="none", redirect_blobs=True, redirect_hops=6) as p:
        async with client(p.host) as rc:
            with pytest.raises(RegistryError, match="more than 5 redirects") as info:
                await drain(rc, REPO, images.python.config_digest)
    assert info.value.kind == RegistryError.PROTOCOL


async def test_corrupt_blob_from_storage(registry: Registry, images: Images) -> None:
    digest = images.python.layer_digests[0]
    with auth_proxy(registry.host, redirect_blobs=True, corrupt={digest}) as p:
        async with client(p.host) as rc:
            with pytest.raises(RegistryError) as info:
                await rc.fetch_blob(REPO, digest, limit=1 << 30)
    assert info.value.kind == RegistryError.DIGEST_MISMATCH


# --- umoci-built images ----------------------------------------------------------------------


async def test_umoci_image_round_trip(registry: Registry, tmp_path: Path) -> None:
    require_tool("umoci")
    rootfs = tmp_path / "rootfs"
    (rootfs / "app").mkdir(parents=True)
    (rootfs / "app" / "hello.txt").write_text("hello from umoci\n")
    image = build_layout_umoci(tmp_path / "layout", "u1", [rootfs])
    assert len(image.layer_digests) == 1
    assert image.media_type == media.OCI_MANIFEST
    push_layout(image.layout, "u1", registry.host, "casd/umoci")
    async with client(registry.host) as rc:
        await pull_all(rc, "casd/umoci", image)
