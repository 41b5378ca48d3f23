"""A pytest port of the OCI distribution-spec conformance *pull* checks (and the
content-discovery tag checks), plus a real pull with skopeo.

Every check takes the ``oci_target`` fixture: a base URL and the :class:`SeededImage` the
target holds. To run the same checks against another server, add a param to
``oci_target`` that seeds ``build_seeded_image()`` into it (config, layer, every blob in
``extra_blobs``, the manifest under every tag of ``image.tags``, all in ``image.repo``)
and yields ``OciTarget(name, base_url, image)``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from casd.oci.http import OCI_ERROR_CODES
from casd.oci.media import DOCKER_MANIFEST

from .http_testing import (
    MemorySource,
    SeededImage,
    build_seeded_image,
    http_client,
    running_server,
    seed,
    sha256,
)


@dataclass(frozen=True)
class OciTarget:
    name: str
    base_url: str
    image: SeededImage


TARGETS = ["memory", "casd"]


@pytest.fixture(scope="module")
def casd_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, SeededImage]]:
    """A real `casd serve --oci-listen` holding the seeded image the way users get images
    into casd: pushed by skopeo to Debian's docker-registry, then `casctl oci import`; the
    other tags with `casctl tag`, the extra blobs with `casctl put`."""
    from tests.integration.harness import Daemon, casctl, ok
    from tests.oci.images import init_layout, push_layout, set_tag, write_blob
    from tests.oci.registry_harness import docker_registry, free_port

    image = build_seeded_image()
    tmp = tmp_path_factory.mktemp("casd-target")
    layout = tmp / "layout"
    init_layout(layout)
    for blob in (image.config, image.layer, image.manifest):
        write_blob(layout, blob)
    set_tag(
        layout,
        image.tag,
        {
            "mediaType": image.manifest_type,
            "digest": image.manifest_digest,
            "size": len(image.manifest),
        },
    )
    port = free_port()
    daemon = Daemon(tmp / "data", tmp / "casd.log", args=["--oci-listen", f"127.0.0.1:{port}"])
    daemon.start()
    try:
        with docker_registry(tmp / "registry") as reg:
            push_layout(layout, image.tag, reg.host, image.repo)
            ok(
                casctl(
                    daemon, "oci", "import", f"{reg.host}/{image.repo}:{image.tag}", "--insecure"
                )
            )
        for tag in image.tags:
            ok(casctl(daemon, "tag", f"{image.repo}:{tag}", image.manifest_digest))
        for data in image.extra_blobs.values():
            ok(casctl(daemon, "put", "-", input=data))
        yield f"http://127.0.0.1:{port}", image
    finally:
        daemon.stop()


@pytest.fixture(params=TARGETS)
async def oci_target(request: pytest.FixtureRequest) -> AsyncIterator[OciTarget]:
    image = build_seeded_image()
    if request.param == "memory":
        source = MemorySource()
        seed(source, image)
        async with running_server(source) as url:
            yield OciTarget("memory", url, image)
    elif request.param == "casd":
        url, seeded = request.getfixturevalue("casd_target")
        yield OciTarget("casd", url, seeded)
    else:  # pragma: no cover - a new param without a branch here
        raise AssertionError(f"unknown OCI target {request.param}")


@pytest.fixture
async def client(oci_target: OciTarget) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(oci_target.base_url, timeout=10) as c:
        yield c


DUMMY_DIGEST = sha256(b"casd: this blob does not exist")


def error_codes(resp: httpx.Response) -> list[str]:
    """The codes of an OCI error body; asserts it is well formed and the codes valid."""
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert isinstance(body["errors"], list)
    assert body["errors"]
    codes = [e["code"] for e in body["errors"]]
    assert set(codes) <= OCI_ERROR_CODES, codes
    return codes


def manifest_url(t: OciTarget, ref: str) -> str:
    return f"/v2/{t.image.repo}/manifests/{ref}"


def blob_url(t: OciTarget, digest: str) -> str:
    return f"/v2/{t.image.repo}/blobs/{digest}"


# --- base -----------------------------------------------------------------------------------


async def test_base_route(client: httpx.AsyncClient) -> None:
    resp = await client.get("/v2/")
    assert resp.status_code == 200


# --- manifests ------------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["tag", "digest"])
async def test_get_manifest(oci_target: OciTarget, client: httpx.AsyncClient, by: str) -> None:
    im = oci_target.image
    ref = im.tag if by == "tag" else im.manifest_digest
    resp = await client.get(manifest_url(oci_target, ref), headers={"Accept": im.manifest_type})
    assert resp.status_code == 200
    assert resp.content == im.manifest
    assert resp.headers["content-type"] == im.manifest_type
    assert resp.headers["docker-content-digest"] == im.manifest_digest
    assert int(resp.headers["content-length"]) == len(im.manifest)
    assert "content-encoding" not in resp.headers


@pytest.mark.parametrize("by", ["tag", "digest"])
async def test_head_manifest(oci_target: OciTarget, client: httpx.AsyncClient, by: str) -> None:
    im = oci_target.image
    ref = im.tag if by == "tag" else im.manifest_digest
    resp = await client.head(manifest_url(oci_target, ref), headers={"Accept": im.manifest_type})
    assert resp.status_code == 200
    assert resp.content == b""
    assert resp.headers["docker-content-digest"] == im.manifest_digest
    assert int(resp.headers["content-length"]) == len(im.manifest)
    assert resp.headers["content-type"] == im.manifest_type


async def test_manifest_served_whatever_accept_says(
    oci_target: OciTarget, client: httpx.AsyncClient
) -> None:
    im = oci_target.image
    resp = await client.get(manifest_url(oci_target, im.tag), headers={"Accept": DOCKER_MANIFEST})
    assert resp.status_code == 200
    assert resp.content == im.manifest
    assert resp.headers["content-type"] == im.manifest_type


@pytest.mark.parametrize("ref", ["no-such-tag", DUMMY_DIGEST])
async def test_unknown_manifest(oci_target: OciTarget, client: httpx.AsyncClient, ref: str) -> None:
    resp = await client.get(manifest_url(oci_target, ref))
    assert resp.status_code == 404
    assert error_codes(resp) == ["MANIFEST_UNKNOWN"]
    head = await client.head(manifest_url(oci_target, ref))
    assert head.status_code == 404
    assert head.content == b""


async def test_unknown_repository(client: httpx.AsyncClient) -> None:
    resp = await client.get("/v2/casd/no-such-repo/manifests/latest")
    assert resp.status_code == 404
    assert error_codes(resp)[0] in {"NAME_UNKNOWN", "MANIFEST_UNKNOWN"}


# --- blobs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["config", "layer"])
async def test_get_blob(oci_target: OciTarget, client: httpx.AsyncClient, which: str) -> None:
    im = oci_target.image
    data, digest = (
        (im.config, im.config_digest) if which == "config" else (im.layer, im.layer_digest)
    )
    resp = await client.get(blob_url(oci_target, digest))
    assert resp.status_code == 200
    assert resp.content == data
    assert sha256(resp.content) == digest
    assert resp.headers["docker-content-digest"] == digest
    assert int(resp.headers["content-length"]) == len(data)
    assert "content-encoding" not in resp.headers


@pytest.mark.parametrize("which", ["config", "layer"])
async def test_head_blob(oci_target: OciTarget, client: httpx.AsyncClient, which: str) -> None:
    im = oci_target.image
    data, digest = (
        (im.config, im.config_digest) if which == "config" else (im.layer, im.layer_digest)
    )
    resp = await client.head(blob_url(oci_target, digest))
    assert resp.status_code == 200
    assert resp.content == b""
    assert resp.headers["docker-content-digest"] == digest
    assert int(resp.headers["content-length"]) == len(data)


async def test_unknown_blob(oci_target: OciTarget, client: httpx.AsyncClient) -> None:
    resp = await client.get(blob_url(oci_target, DUMMY_DIGEST))
    assert resp.status_code == 404
    assert error_codes(resp) == ["BLOB_UNKNOWN"]
    head = await client.head(blob_url(oci_target, DUMMY_DIGEST))
    assert head.status_code == 404
    assert head.content == b""


def _content_range(resp: httpx.Response) -> tuple[int, int, str]:
    unit, _, rest = resp.headers["content-range"].partition(" ")
    assert unit == "bytes"
    span, _, size = rest.partition("/")
    first, _, last = span.partition("-")
    return int(first), int(last), size


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=500-1499", 500, 1499),
        ("bytes=500-", 500, None),
        ("bytes=-500", None, None),
        ("bytes=0-0", 0, 0),
    ],
)
async def test_blob_range(
    oci_target: OciTarget,
    client: httpx.AsyncClient,
    header: str,
    first: int | None,
    last: int | None,
) -> None:
    im = oci_target.image
    size = len(im.layer)
    assert size > 1500
    resp = await client.get(blob_url(oci_target, im.layer_digest), headers={"Range": header})
    assert resp.status_code == 206
    if first is None:  # suffix
        first = size - 500
    if last is None:
        last = size - 1
    assert _content_range(resp) == (first, last, str(size)) or _content_range(resp) == (
        first,
        last,
        "*",
    )
    assert resp.content == im.layer[first : last + 1]
    assert int(resp.headers["content-length"]) == last + 1 - first


async def test_blob_range_past_end(oci_target: OciTarget, client: httpx.AsyncClient) -> None:
    im = oci_target.image
    size = len(im.layer)
    resp = await client.get(
        blob_url(oci_target, im.layer_digest), headers={"Range": f"bytes={size + 100}-"}
    )
    assert resp.status_code == 416
    assert resp.headers["content-range"] in {f"bytes */{size}", "bytes */*"}
    assert len(resp.content) == int(resp.headers["content-length"])


# --- tags -----------------------------------------------------------------------------------


def tags_url(t: OciTarget) -> str:
    return f"/v2/{t.image.repo}/tags/list"


async def test_tags_list(oci_target: OciTarget, client: httpx.AsyncClient) -> None:
    resp = await client.get(tags_url(oci_target))
    assert resp.status_code == 200
    body = resp.json()
    assert body["name"] == oci_target.image.repo
    assert body["tags"] == sorted(oci_target.image.tags)


async def test_tags_list_n(oci_target: OciTarget, client: httpx.AsyncClient) -> None:
    tags = sorted(oci_target.image.tags)
    assert len(tags) >= 3
    resp = await client.get(tags_url(oci_target), params={"n": 2})
    assert resp.status_code == 200
    assert resp.json()["tags"] == tags[:2]
    link = resp.headers["link"]
    assert link.endswith('>; rel="next"')
    assert link.startswith(f"<{tags_url(oci_target)}?")
    assert "n=2" in link
    assert f"last={tags[1]}" in link


async def test_tags_list_follow_links(oci_target: OciTarget, client: httpx.AsyncClient) -> None:
    collected: list[str] = []
    url: str | None = f"{tags_url(oci_target)}?n=2"
    pages = 0
    while url is not None:
        resp = await client.get(url)
        assert resp.status_code == 200
        page = resp.json()["tags"]
        assert len(page) <= 2
        collected += page
        link = resp.headers.get("link")
        url = link[1 : link.index(">")] if link else None
        pages += 1
        assert pages < 20
    assert collected == sorted(oci_target.image.tags)


async def test_tags_list_last(oci_target: OciTarget, client: httpx.AsyncClient) -> None:
    tags = sorted(oci_target.image.tags)
    resp = await client.get(tags_url(oci_target), params={"last": tags[1]})
    assert resp.json()["tags"] == tags[2:]
    resp = await client.get(tags_url(oci_target), params={"n": 1, "last": tags[1]})
    assert resp.json()["tags"] == tags[2:3]
    resp = await client.get(tags_url(oci_target), params={"n": 100, "last": tags[-1]})
    assert resp.json()["tags"] == []
    assert "link" not in resp.headers


async def test_tags_list_n_zero(oci_target: OciTarget, client: httpx.AsyncClient) -> None:
    resp = await client.get(tags_url(oci_target), params={"n": 0})
    assert resp.status_code == 200
    assert resp.json()["tags"] == []
    assert "link" not in resp.headers


async def test_tags_list_all_in_one_page_has_no_link(
    oci_target: OciTarget, client: httpx.AsyncClient
) -> None:
    n = len(oci_target.image.tags)
    resp = await client.get(tags_url(oci_target), params={"n": n})
    assert resp.json()["tags"] == sorted(oci_target.image.tags)
    assert "link" not in resp.headers


async def test_tags_list_unknown_repository(client: httpx.AsyncClient) -> None:
    resp = await client.get("/v2/casd/no-such-repo/tags/list")
    assert resp.status_code == 404
    assert error_codes(resp) == ["NAME_UNKNOWN"]


# --- error codes ----------------------------------------------------------------------------


async def test_error_body_on_bad_manifest_put(
    oci_target: OciTarget, client: httpx.AsyncClient
) -> None:
    # The suite's "400 response body should contain OCI-conforming JSON message".
    resp = await client.put(
        manifest_url(oci_target, "sha256:totallywrong"),
        content=b"{}",
        headers={"Content-Type": oci_target.image.manifest_type},
    )
    assert resp.status_code in {400, 404}
    if resp.status_code == 400:
        error_codes(resp)


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v2/casd/x/blobs/sha256:xyz", 400, "DIGEST_INVALID"),
        ("/v2/casd/x/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", 400, "DIGEST_INVALID"),
        ("/v2/Casd/UPPER/manifests/latest", 400, "NAME_INVALID"),
    ],
)
async def test_invalid_references(
    client: httpx.AsyncClient, path: str, status: int, code: str
) -> None:
    resp = await client.get(path)
    assert resp.status_code == status
    assert error_codes(resp) == [code]


# --- a real client --------------------------------------------------------------------------


async def test_skopeo_copy(oci_target: OciTarget, tmp_path: Path) -> None:
    skopeo = shutil.which("skopeo")
    assert skopeo is not None, "skopeo is a test dependency (Debian package skopeo)"
    im = oci_target.image
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    dest = tmp_path / "pulled"
    hostport = oci_target.base_url.removeprefix("http://")
    with trio.fail_after(25):
        result = await trio.run_process(
            [
                skopeo,
                "--policy",
                str(policy),
                "copy",
                "--src-tls-verify=false",
                f"docker://{hostport}/{im.repo}:{im.tag}",
                f"oci:{dest}:{im.tag}",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 0, result.stderr.decode()
    index = json.loads((dest / "index.json").read_text())
    [entry] = index["manifests"]
    assert entry["digest"] == im.manifest_digest
    blobs = dest / "blobs" / "sha256"
    assert (blobs / im.manifest_digest.split(":")[1]).read_bytes() == im.manifest
    assert (blobs / im.config_digest.split(":")[1]).read_bytes() == im.config
    assert (blobs / im.layer_digest.split(":")[1]).read_bytes() == im.layer
