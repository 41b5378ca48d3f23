"""The OCI bridge end to end, with the real parts: Debian's docker-registry holds images
pushed by skopeo; real casd daemons import them (`casctl oci import`), sync them
(`casctl sync`) and serve them (`casd serve --oci-listen`); skopeo pulls them back into an
OCI layout, and every digest is compared with the upstream's."""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from casd import zstd
from casd.chunking import Chunker, chunk_id
from casd.oci.tarcut import TarCutter
from tests.integration.harness import Daemon, Result, casctl, ok
from tests.oci.images import (
    LayoutImage,
    LayoutIndex,
    build_index_two_platforms,
    build_layout_python,
    build_layout_umoci,
    push_layout,
    real_files,
    require_tool,
    skopeo_copy,
)
from tests.oci.registry_harness import Registry, auth_proxy, docker_registry, free_port

STDLIB = Path(json.__file__).parent.parent


@dataclass
class Casd:
    daemon: Daemon
    oci: str  # host:port of the OCI pull API

    def __call__(self, *args: str) -> Result:
        return casctl(self.daemon, *args)


def start_casd(tmp: Path, name: str, env: dict[str, str] | None = None, *extra: str) -> Casd:
    port = free_port()
    d = Daemon(
        tmp / name,
        tmp / f"{name}.log",
        args=["--oci-listen", f"127.0.0.1:{port}", *extra],
        env=env or {},
    )
    return Casd(d.start(), f"127.0.0.1:{port}")


#: A host without casd-gogzip: it cannot make Go-written layers again.
NO_GOGZIP = {"CASD_GOGZIP": ""}


@pytest.fixture
def casd_a(tmp_path: Path) -> Iterator[Casd]:
    c = start_casd(tmp_path, "a")
    yield c
    c.daemon.stop()


@pytest.fixture
def casd_b(tmp_path: Path) -> Iterator[Casd]:
    c = start_casd(tmp_path, "b")
    yield c
    c.daemon.stop()


@pytest.fixture
def bare_a(tmp_path: Path) -> Iterator[Casd]:
    c = start_casd(tmp_path, "bare-a", NO_GOGZIP)
    yield c
    c.daemon.stop()


@pytest.fixture
def bare_b(tmp_path: Path) -> Iterator[Casd]:
    c = start_casd(tmp_path, "bare-b", NO_GOGZIP)
    yield c
    c.daemon.stop()


@dataclass
class Upstream:
    registry: Registry
    one: LayoutImage
    many: LayoutImage
    index: LayoutIndex


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    for tool in ("docker-registry", "skopeo", "umoci"):
        require_tool(tool)
    layout = tmp_path_factory.mktemp("layout")
    one = build_layout_python(layout, "one", [real_files(STDLIB / "email", 300_000)])
    many = build_layout_python(
        layout,
        "many",
        [
            real_files(STDLIB / "json", 40_000),
            real_files(STDLIB / "email", 300_000),
            real_files("/usr/share/doc", 1_200_000, suffixes=(".gz",)),
            {"app/run.sh": b"#!/bin/sh\necho hi\n"},
            {"etc/empty-dir/.keep": b""},
        ],
        compresslevel=9,
    )
    index = build_index_two_platforms(layout, "multi", shared=real_files(STDLIB / "http", 80_000))
    with docker_registry(tmp_path_factory.mktemp("registry")) as reg:
        push_layout(layout, "one", reg.host, "lib/one", dest_tag="v1")
        push_layout(layout, "many", reg.host, "lib/many", dest_tag="v1")
        push_layout(layout, "multi", reg.host, "lib/multi", dest_tag="v1")
        yield Upstream(reg, one, many, index)


def pull_with_skopeo(oci: str, ref: str, dest: Path, *extra: str) -> dict[str, object]:
    """`skopeo copy docker://casd/REF oci:DEST:TAG`; returns the layout's index entry."""
    tag = ref.rsplit(":", 1)[1]
    skopeo_copy(f"docker://{oci}/{ref}", f"oci:{dest}:{tag}", *extra)
    index = json.loads((dest / "index.json").read_text())
    (entry,) = [
        m
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    ]
    return entry  # type: ignore[no-any-return]


def layout_blobs(dest: Path) -> set[str]:
    out = set()
    for p in (dest / "blobs" / "sha256").iterdir():
        assert "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest() == "sha256:" + p.name
        out.add("sha256:" + p.name)
    return out


def import_(c: Casd, ref: str, *extra: str) -> dict[str, object]:
    r = ok(c("oci", "import", ref, "--insecure", "--json", *extra))
    return json.loads(r.out)  # type: ignore[no-any-return]


def sync_(a: Casd, b: Casd, name: str) -> dict[str, Any]:
    """`casctl sync A B NAME --json`, run against A: its report."""
    r = ok(a("sync", a.daemon.address, b.daemon.address, name, "--json"))
    return json.loads(r.out)  # type: ignore[no-any-return]


@pytest.mark.parametrize("which", ["one", "many"])
def test_skopeo_pulls_an_imported_image_with_the_upstream_digests(
    upstream: Upstream, casd_a: Casd, tmp_path: Path, which: str
) -> None:
    image: LayoutImage = getattr(upstream, which)
    report = import_(casd_a, f"{upstream.registry.host}/lib/{which}:v1")
    assert report["digest"] == image.manifest_digest
    assert report["name"] == f"lib/{which}:v1"
    layers = report["layers"]
    assert isinstance(layers, list)
    assert {x["stored"] for x in layers} == {"reencodable"}  # Python's gzip reproduces

    dest = tmp_path / "pulled"
    entry = pull_with_skopeo(casd_a.oci, f"lib/{which}:v1", dest)
    assert entry["digest"] == image.manifest_digest
    assert layout_blobs(dest) == {image.manifest_digest, *image.blobs}
    for digest in image.blobs:
        assert (dest / "blobs/sha256" / digest[7:]).read_bytes() == image.blob(digest)

    # The layer records are casd's bookkeeping: `ls` shows them only when asked.
    shown = {e["name"] for e in json.loads(ok(casd_a("ls", "--json")).out)}
    everything = {e["name"] for e in json.loads(ok(casd_a("ls", "--all", "--json")).out)}
    assert shown == {f"lib/{which}:v1"}
    assert everything - shown == {f".oci/layer/{d}" for d in image.layer_digests}

    # A second import moves no layer again.
    again = import_(casd_a, f"{upstream.registry.host}/lib/{which}:v1")
    assert again["bytes_downloaded"] == 0
    assert {x["stored"] for x in again["layers"]} == {"present"}  # type: ignore[union-attr]


def test_an_index_with_two_platforms_is_served_whole(
    upstream: Upstream, casd_a: Casd, tmp_path: Path
) -> None:
    ref = f"{upstream.registry.host}/lib/multi:v1"
    report = import_(casd_a, ref, "--all-platforms")
    assert report["digest"] == upstream.index.index_digest
    assert report["manifests"] == 2
    dest = tmp_path / "pulled"
    entry = pull_with_skopeo(casd_a.oci, "lib/multi:v1", dest, "--all")
    assert entry["digest"] == upstream.index.index_digest
    assert layout_blobs(dest) == {upstream.index.index_digest, *upstream.index.blobs}

    # One platform only: the name points at that platform's manifest.
    arm = import_(casd_a, ref, "--platform", "linux/arm64", "--name", "multi-arm:v1")
    assert arm["digest"] == upstream.index.images["linux/arm64"].manifest_digest
    bad = casd_a("oci", "import", ref, "--insecure", "--platform", "linux/s390x")
    assert bad.code == 1
    assert "no image for platform linux/s390x" in bad.err
    assert "linux/amd64" in bad.err


def test_credentials_basic_and_bearer(upstream: Upstream, casd_a: Casd, tmp_path: Path) -> None:
    with docker_registry(tmp_path / "basic", users={"casd": "s3cret"}) as reg:
        push_layout(upstream.one.layout, "one", reg.host, "lib/one", creds=("casd", "s3cret"))
        denied = casd_a("oci", "import", f"{reg.host}/lib/one:one", "--insecure")
        assert denied.code == 1
        assert "--creds" in denied.err
        report = import_(casd_a, f"{reg.host}/lib/one:one", "--creds", "casd:s3cret")
        assert report["digest"] == upstream.one.manifest_digest
    with auth_proxy(upstream.registry.host, users={"u": "p"}, anonymous=False) as proxy:
        report = import_(
            casd_a, f"{proxy.host}/lib/many:v1", "--creds", "u:p", "--name", "via-token:v1"
        )
        assert report["digest"] == upstream.many.manifest_digest
        assert proxy.state.token_hits >= 1


def test_a_corrupted_layer_fails_the_import_and_names_nothing(
    upstream: Upstream, casd_a: Casd
) -> None:
    layer = upstream.many.layer_digests[1]
    with auth_proxy(upstream.registry.host, auth="none", corrupt={layer}) as proxy:
        r = casd_a("oci", "import", f"{proxy.host}/lib/many:v1", "--insecure", "--name", "bad:v1")
    assert r.code == 1
    assert "digest" in r.err.lower()
    names = json.loads(ok(casd_a("ls", "--json")).out)
    assert not [n for n in names if n["name"] == "bad:v1"]
    assert ok(casd_a("fsck")).code == 0


# --- versions of an image: dedup at rest, deltas on the wire ------------------------------


def package_tree(version: int) -> dict[str, bytes | Path]:
    """A site-packages-like layer of real Python packages; `version` bumps three of them
    (their files change) as a release of a few packages would."""
    spec: dict[str, bytes | Path] = {}
    for pkg in ("email", "json", "http", "xml", "logging", "urllib", "unittest", "asyncio"):
        for path in sorted((STDLIB / pkg).rglob("*.py")):
            rel = "usr/lib/app/site-packages/" + path.relative_to(STDLIB).as_posix()
            if version > 1 and pkg in ("json", "http", "logging"):
                spec[rel] = path.read_bytes() + f"\n# bumped to release {version}\n".encode()
            else:
                spec[rel] = path
    return spec


def zstd_of_chunks(chunks: list[bytes]) -> int:
    return len(zstd.compress(b"".join(chunks), 3))


def distinct_chunks(*tars: bytes) -> dict[bytes, bytes]:
    cutter = TarCutter(Chunker())
    out: dict[bytes, bytes] = {}
    for tar in tars:
        for c in cutter.cut(tar):
            out.setdefault(chunk_id(c), bytes(c))
    return out


def two_versions(layout: Path, registry: str, repo: str) -> dict[int, LayoutImage]:
    """v1 and v2 of an app image (a base layer, and a package tree with three packages
    changed), pushed to ``registry`` as REPO:v1 and REPO:v2."""
    base = real_files("/usr/share/doc", 600_000, suffixes=(".gz",))
    images = {
        v: build_layout_python(layout, f"v{v}", [base, package_tree(v)], compresslevel=6)
        for v in (1, 2)
    }
    for v in (1, 2):
        push_layout(layout, f"v{v}", registry, repo)
    return images


def lacking_after_v1(images: dict[int, LayoutImage]) -> tuple[dict[int, list[bytes]], list[bytes]]:
    """The versions' tars, and the chunks of v2's that v1's lack."""
    tars = {v: [gzip.decompress(im.blob(d)) for d in im.layer_digests] for v, im in images.items()}
    v1_chunks = distinct_chunks(*tars[1])
    return tars, [c for cid, c in distinct_chunks(*tars[2]).items() if cid not in v1_chunks]


def test_versions_share_chunks_at_rest_and_sync_as_deltas(
    upstream: Upstream, casd_a: Casd, casd_b: Casd, tmp_path: Path
) -> None:
    images = two_versions(tmp_path / "versions", upstream.registry.host, "lib/pyapp")
    a_before = json.loads(ok(casd_a("stats", "--json")).out)["store_stored_bytes"]
    for v in (1, 2):
        import_(casd_a, f"{upstream.registry.host}/lib/pyapp:v{v}")
    stored = json.loads(ok(casd_a("stats", "--json")).out)["store_stored_bytes"] - a_before

    tars, lacking = lacking_after_v1(images)
    unique = distinct_chunks(*tars[1], *tars[2])
    # Every distinct chunk once, each zstd'd as the store does: shared files are not
    # stored twice, and no compressed copy of a layer is kept.
    per_chunk = sum(len(zstd.compress(c, 3)) for c in unique.values())
    as_stream = zstd_of_chunks(list(unique.values()))
    print(
        f"stored {stored} B for v1+v2; their distinct chunks zstd'd one by one {per_chunk} B, "
        f"as one stream {as_stream} B; the two versions' gzip layers "
        f"{sum(images[1].layer_sizes) + sum(images[2].layer_sizes)} B"
    )
    assert stored <= 1.1 * per_chunk

    # B holds nothing yet: both layers come as their compressed bytes, the second
    # streaming while the first is still being stored; each counted once.
    first = sync_(casd_a, casd_b, "lib/pyapp:v1")
    assert first["layers_streamed"] == 2
    layers = sum(images[1].layer_sizes)
    assert layers <= first["layer_stream_bytes"] <= layers * 1.02 + 40_000
    r = sync_(casd_a, casd_b, "lib/pyapp:v2")
    plain = sum(images[2].layer_sizes)
    print(
        f"sync of v2: {r['wire_bytes']} B on the wire; zstd of the chunks B lacks "
        f"{zstd_of_chunks(lacking)} B; the gzip layers are {plain} B"
    )
    assert r["wire_bytes"] <= 1.2 * zstd_of_chunks(lacking)

    dest = tmp_path / "pulled"
    entry = pull_with_skopeo(casd_b.oci, "lib/pyapp:v2", dest)
    assert entry["digest"] == images[2].manifest_digest
    assert layout_blobs(dest) == {images[2].manifest_digest, *images[2].blobs}


def landings_pending(c: Casd) -> int:
    return int(json.loads(ok(c("stats", "--json")).out)["oci_landings_pending"])


def wait_landed(c: Casd, timeout: float = 60) -> None:
    """Until ``c`` stored the tars of the layers it synced as their bytes."""
    deadline = time.monotonic() + timeout
    while landings_pending(c) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert landings_pending(c) == 0


def test_a_first_pull_serves_before_its_tars_are_stored_and_a_killed_landing_resumes(
    upstream: Upstream, casd_a: Casd, casd_b: Casd, tmp_path: Path
) -> None:
    """A layer with no old version here comes as its compressed bytes; the sync ends once
    they are checked and kept, and the tar is stored after it. Killed before that is done,
    the receiver serves every layer on restart and then stores the tars it lacked."""
    image = upstream.many
    import_(casd_a, f"{upstream.registry.host}/lib/many:v1")
    r = sync_(casd_a, casd_b, "lib/many:v1")
    assert r["layers_streamed"] >= 3
    assert r["layers_deferred"] == r["layers_streamed"]
    casd_b.daemon.kill()  # likely before every tar is stored
    casd_b.daemon.start()
    entry = pull_with_skopeo(casd_b.oci, "lib/many:v1", tmp_path / "pulled")
    assert entry["digest"] == image.manifest_digest
    assert layout_blobs(tmp_path / "pulled") == {image.manifest_digest, *image.blobs}
    wait_landed(casd_b)
    # Every layer's tar is here now (its config names them).
    for diff_id in json.loads(image.config)["rootfs"]["diff_ids"]:
        assert ok(casd_b("stat", diff_id)).code == 0
    assert ok(casd_b("fsck", "--deep")).code == 0


def two_go_versions(tmp_path: Path) -> tuple[Path, dict[int, LayoutImage]]:
    """Two versions of an image umoci built (Go's pgzip), one file changed between them.
    Its tar (about 14 MB) is ten times its gzip (a large log of repeated lines), so
    making it again takes casd-gogzip far longer than its bytes take over loopback."""
    roots = {}
    for v in (1, 2):
        root = tmp_path / f"rootfs{v}"
        shutil.copytree(STDLIB / "email", root / "usr/lib/email")
        shutil.copytree(STDLIB / "asyncio", root / "usr/lib/asyncio")
        (root / "var/log").mkdir(parents=True)
        (root / "var/log/app.log").write_text(
            "".join(f"{i:08d} GET /static/app.js 200 {i % 977}\n" for i in range(250_000))
        )
        if v == 2:
            with open(root / "usr/lib/email/parser.py", "a") as f:
                f.write("\n# release 2\n")
        roots[v] = root
    layout = tmp_path / "umoci"
    return layout, {v: build_layout_umoci(layout, f"v{v}", [roots[v]]) for v in (1, 2)}


def test_go_gzip_layers_are_made_again_and_sync_as_deltas_as_they_are(
    upstream: Upstream, casd_a: Casd, casd_b: Casd, tmp_path: Path, gogzip_helper: str
) -> None:
    """With casd-gogzip, an image as umoci built it keeps its digests and still moves as
    chunks: the receiver makes the layer's exact bytes again from the tar."""
    layout, images = two_go_versions(tmp_path)
    for v in (1, 2):
        push_layout(layout, f"v{v}", upstream.registry.host, "lib/gonative")
        report = import_(casd_a, f"{upstream.registry.host}/lib/gonative:v{v}")
        (layer,) = report["layers"]  # type: ignore[misc]
        assert layer["stored"] == "reencodable", layer["note"]

    first = sync_(casd_a, casd_b, "lib/gonative:v1")
    assert first["layers_streamed"] == 1  # nothing to encode against: as a registry sends it
    assert first["layer_stream_bytes"] < images[1].layer_sizes[0] * 1.02 + 20_000
    # A restarted daemon has measured no link from A yet: the fewest bytes, chunks.
    casd_b.daemon.stop()
    casd_b.daemon.start()
    r = sync_(casd_a, casd_b, "lib/gonative:v2")
    layer_size = images[2].layer_sizes[0]
    print(f"Go-gzip v2 synced in {r['wire_bytes']} B; its gzip layer is {layer_size} B")
    assert r["layers_streamed"] == 0
    assert r["layers_whole"] == 0
    assert r["wire_bytes"] < layer_size / 10

    # A standard client gets the image exactly as umoci wrote it, from B's own tar.
    for v in (1, 2):
        dest = tmp_path / f"pulled{v}"
        entry = pull_with_skopeo(casd_b.oci, f"lib/gonative:v{v}", dest)
        assert entry["digest"] == images[v].manifest_digest
        assert layout_blobs(dest) == {images[v].manifest_digest, *images[v].blobs}
    assert ok(casd_b("fsck", "--deep")).code == 0


def test_on_a_link_faster_than_casd_gogzip_a_go_gzip_layer_comes_whole(
    upstream: Upstream, casd_a: Casd, casd_b: Casd, tmp_path: Path, gogzip_helper: str
) -> None:
    """Over loopback, measured by the first sync, the compressed bytes cross sooner than
    the helper would make them again: they come as they are, though v1 is here."""
    layout, images = two_go_versions(tmp_path)
    for v in (1, 2):
        push_layout(layout, f"v{v}", upstream.registry.host, "lib/gofast")
        import_(casd_a, f"{upstream.registry.host}/lib/gofast:v{v}")
    first = sync_(casd_a, casd_b, "lib/gofast:v1")
    print(f"the first sync measured {first['link_mbit']} Mbit/s")
    assert first["link_mbit"] > 0
    r = sync_(casd_a, casd_b, "lib/gofast:v2")
    layer_size = images[2].layer_sizes[0]
    assert r["layers_whole"] == 1
    # The compressed bytes streamed into B's layer cache, as a first pull's do, not the
    # tar's chunks as deltas against v1; the tar is stored after the sync, so the next
    # version has its base here.
    assert r["layers_streamed"] == r["layers_deferred"] == 1
    assert layer_size <= r["layer_stream_bytes"] <= layer_size * 1.02 + 20_000
    wait_landed(casd_b)
    (diff_id,) = json.loads(images[2].config)["rootfs"]["diff_ids"]
    assert ok(casd_b("stat", diff_id)).code == 0
    # A reports its kernel's figure for the asking host (0 here: it samples delivery
    # rates while serving chunk batches it may encode, and none crossed), which B's
    # syncs weigh layers by when it is the faster figure.
    assert json.loads(ok(casd_a("stats", "--json")).out)["peer_link_mbit"] >= 0
    dest = tmp_path / "pulled"
    entry = pull_with_skopeo(casd_b.oci, "lib/gofast:v2", dest)
    assert entry["digest"] == images[2].manifest_digest
    assert layout_blobs(dest) == {images[2].manifest_digest, *images[2].blobs}
    assert ok(casd_b("fsck", "--deep")).code == 0


def test_a_host_without_casd_gogzip_gets_go_gzip_layers_as_their_bytes(
    upstream: Upstream, casd_a: Casd, bare_b: Casd, tmp_path: Path, gogzip_helper: str
) -> None:
    layout, images = two_go_versions(tmp_path)
    push_layout(layout, "v1", upstream.registry.host, "lib/gobare")
    import_(casd_a, f"{upstream.registry.host}/lib/gobare:v1")
    r = sync_(casd_a, bare_b, "lib/gobare:v1")
    assert r["wire_bytes"] < images[1].layer_sizes[0] * 1.05 + 20_000
    dest = tmp_path / "pulled"
    entry = pull_with_skopeo(bare_b.oci, "lib/gobare:v1", dest)
    assert entry["digest"] == images[1].manifest_digest
    assert layout_blobs(dest) == {images[1].manifest_digest, *images[1].blobs}


def test_without_casd_gogzip_go_gzip_layers_are_kept_raw_and_convert_makes_them_sync_as_deltas(
    upstream: Upstream, bare_a: Casd, bare_b: Casd, tmp_path: Path
) -> None:
    casd_a, casd_b = bare_a, bare_b
    roots = {}
    for v in (1, 2):
        root = tmp_path / f"rootfs{v}"
        shutil.copytree(STDLIB / "email", root / "usr/lib/email")
        shutil.copytree(STDLIB / "asyncio", root / "usr/lib/asyncio")
        if v == 2:
            with open(root / "usr/lib/email/parser.py", "a") as f:
                f.write("\n# release 2\n")
        roots[v] = root
    layout = tmp_path / "umoci"
    images = {v: build_layout_umoci(layout, f"v{v}", [roots[v]]) for v in (1, 2)}
    for v in (1, 2):
        push_layout(layout, f"v{v}", upstream.registry.host, "lib/goimg")
        report = import_(casd_a, f"{upstream.registry.host}/lib/goimg:v{v}")
        (layer,) = report["layers"]  # type: ignore[misc]
        assert layer["stored"] == "raw"  # Go's gzip: zlib does not reproduce it
        assert "casd-gogzip" in layer["note"]

    converted = {}
    for v in (1, 2):
        out = json.loads(
            ok(casd_a("oci", "convert", f"lib/goimg:v{v}", f"lib/goimg:v{v}-casd", "--json")).out
        )
        assert out["layers_converted"] == 1
        converted[v] = out["digest"]
        info = json.loads(ok(casd_a("oci", "inspect", f"lib/goimg:v{v}-casd", "--json")).out)
        (m,) = info["manifests"]
        assert m["config"] == images[v].config_digest  # image id and diff_ids unchanged
        assert m["layers"][0]["stored"] == "reencodable"

    # B holds no version yet: the layer comes as its compressed bytes, as from a registry.
    first = sync_(casd_a, casd_b, "lib/goimg:v1-casd")
    assert first["layers_streamed"] == 1
    converted_size = json.loads(ok(casd_a("oci", "inspect", "lib/goimg:v1-casd", "--json")).out)[
        "manifests"
    ][0]["layers"][0]["size"]
    assert first["layer_stream_bytes"] < converted_size * 1.02 + 20_000
    r = sync_(casd_a, casd_b, "lib/goimg:v2-casd")
    layer_size = images[2].layer_sizes[0]
    print(f"converted v2 synced in {r['wire_bytes']} B; its gzip layer is {layer_size} B")
    # An old version here: chunks, as deltas (a converted layer, however fast the link).
    assert r["layers_streamed"] == r["layers_whole"] == 0
    assert r["wire_bytes"] < layer_size / 10

    dest = tmp_path / "pulled"
    entry = pull_with_skopeo(casd_b.oci, "lib/goimg:v2-casd", dest)
    assert entry["digest"] == converted[2]
    got = json.loads((dest / "blobs/sha256" / converted[2][7:]).read_bytes())
    assert got["config"]["digest"] == images[2].config_digest
    diff_ids = json.loads(images[2].config)["rootfs"]["diff_ids"]
    (layer_digest,) = [x["digest"] for x in got["layers"]]
    tar = gzip.decompress((dest / "blobs/sha256" / layer_digest[7:]).read_bytes())
    assert "sha256:" + hashlib.sha256(tar).hexdigest() == diff_ids[0]


def test_a_streamed_layer_that_is_not_the_layer_falls_back_to_chunks(
    upstream: Upstream, casd_a: Casd, casd_b: Casd, tmp_path: Path
) -> None:
    """The source streams a layer from its cache as it is; a damaged copy there reaches
    the destination, which finds the digest wrong, stores none of it, and fetches the
    layer's chunks instead."""
    root = tmp_path / "rootfs"
    shutil.copytree(STDLIB / "email", root / "usr/lib/email")
    image = build_layout_umoci(tmp_path / "umoci", "v1", [root])
    push_layout(tmp_path / "umoci", "v1", upstream.registry.host, "lib/rot")
    import_(casd_a, f"{upstream.registry.host}/lib/rot:v1")
    ok(casd_a("oci", "convert", "lib/rot:v1", "lib/rot:v1-casd"))
    info = json.loads(ok(casd_a("oci", "inspect", "lib/rot:v1-casd", "--json")).out)
    layer = info["manifests"][0]["layers"][0]["digest"]
    cached = casd_a.daemon.data / "oci-cache" / layer.replace(":", "-")
    damaged = bytearray(cached.read_bytes())
    damaged[len(damaged) // 2] ^= 0x40
    cached.write_bytes(bytes(damaged))

    r = sync_(casd_a, casd_b, "lib/rot:v1-casd")
    assert r["layers_streamed"] == 0
    assert r["chunks_fetched"] > 0  # the tar's chunks came instead
    entry = pull_with_skopeo(casd_b.oci, "lib/rot:v1-casd", tmp_path / "pulled")
    assert entry["digest"] == info["digest"]
    tar = gzip.decompress((tmp_path / "pulled/blobs/sha256" / layer[7:]).read_bytes())
    diff_ids = json.loads(image.config)["rootfs"]["diff_ids"]
    assert "sha256:" + hashlib.sha256(tar).hexdigest() == diff_ids[0]
    assert ok(casd_b("fsck", "--deep")).code == 0


def test_casctl_oci_export_writes_a_layout_skopeo_reads(
    upstream: Upstream, casd_a: Casd, tmp_path: Path
) -> None:
    import_(casd_a, f"{upstream.registry.host}/lib/many:v1")
    out = tmp_path / "exported"
    ok(casd_a("oci", "export", "lib/many:v1", str(out)))
    assert layout_blobs(out) == {upstream.many.manifest_digest, *upstream.many.blobs}
    again = tmp_path / "copied"
    skopeo_copy(f"oci:{out}:v1", f"oci:{again}:v1")
    assert layout_blobs(again) == layout_blobs(out)


def test_a_raw_layer_syncs_as_its_compressed_bytes_and_converts_on_arrival(
    upstream: Upstream, bare_a: Casd, bare_b: Casd, tmp_path: Path
) -> None:
    casd_a, casd_b = bare_a, bare_b
    root = tmp_path / "rootfs"
    shutil.copytree(STDLIB / "email", root / "usr/lib/email")
    image = build_layout_umoci(tmp_path / "umoci", "v1", [root])
    push_layout(tmp_path / "umoci", "v1", upstream.registry.host, "lib/raw")
    import_(casd_a, f"{upstream.registry.host}/lib/raw:v1")
    r = sync_(casd_a, casd_b, "lib/raw:v1")
    layer = image.layer_sizes[0]
    print(f"raw layer of {layer} B synced in {r['wire_bytes']} B")
    # Only the compressed bytes cross (not the tar as well); the overhead is the protocol's.
    assert r["wire_bytes"] < layer * 1.05 + 20_000
    entry = pull_with_skopeo(casd_b.oci, "lib/raw:v1", tmp_path / "pulled")
    assert entry["digest"] == image.manifest_digest
    # B recovers the tar from the compressed bytes it has when asked to convert.
    out = json.loads(ok(casd_b("oci", "convert", "lib/raw:v1", "lib/raw:v1-casd", "--json")).out)
    assert out["layers_converted"] == 1
    info = json.loads(ok(casd_b("oci", "inspect", "lib/raw:v1-casd", "--json")).out)
    assert info["manifests"][0]["config"] == image.config_digest


# --- pull-through: `casd serve --oci-listen ... --upstream A` ------------------------------


def pulled_through(c: Casd) -> list[dict[str, Any]]:
    """The reports of the pulls ``c`` made through its upstream, from its log."""
    out = []
    for line in c.daemon.log.read_text().splitlines():
        if "pulled " in line and " through from " in line:
            out.append(
                ast.literal_eval(line[line.index(": {", line.index(" through from ")) + 2 :])
            )
    return out


def http_get(url: str) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_mirror_pulls_through_what_it_lacks_as_deltas_and_serves_it_as_it_lands(
    upstream: Upstream, casd_a: Casd, tmp_path: Path
) -> None:
    """A client asks the mirror B for an image it lacks: B syncs it from A (the first
    version's layers whole, the next as deltas against it) and serves it as it lands;
    the client gets the upstream's digests."""
    images = two_versions(tmp_path / "versions", upstream.registry.host, "lib/mirrored")
    for v in (1, 2):
        import_(casd_a, f"{upstream.registry.host}/lib/mirrored:v{v}")
    b = start_casd(tmp_path, "mirror", None, "--upstream", casd_a.daemon.address)
    try:
        for v in (1, 2):
            dest = tmp_path / f"pulled-v{v}"
            entry = pull_with_skopeo(b.oci, f"lib/mirrored:v{v}", dest)
            assert entry["digest"] == images[v].manifest_digest
            assert layout_blobs(dest) == {images[v].manifest_digest, *images[v].blobs}
        first, second = pulled_through(b)
        assert first["layers_streamed"] == 2  # nothing to encode against: whole
        _, lacking = lacking_after_v1(images)
        print(
            f"v2 through the mirror: {second['wire_bytes']} B on the wire, zstd of the "
            f"chunks it lacked {zstd_of_chunks(lacking)} B"
        )
        assert second["wire_bytes"] <= 1.2 * zstd_of_chunks(lacking)
        # Both are B's own now: served again without asking A (A stopped).
        assert ok(b("stat", "lib/mirrored:v2")).code == 0
        casd_a.daemon.stop()
        again = pull_with_skopeo(b.oci, "lib/mirrored:v1", tmp_path / "again")
        assert again["digest"] == images[1].manifest_digest
        assert len(pulled_through(b)) == 2
    finally:
        b.daemon.stop()


def test_a_mirror_answers_404_for_what_upstream_lacks_and_an_error_when_it_is_gone(
    casd_a: Casd, tmp_path: Path
) -> None:
    b = start_casd(tmp_path, "mirror", None, "--upstream", casd_a.daemon.address)
    try:
        status, body = http_get(f"http://{b.oci}/v2/lib/nothing/manifests/v9")
        assert status == 404, body
        assert b"MANIFEST_UNKNOWN" in body or b"NAME_UNKNOWN" in body
        casd_a.daemon.stop()
        status, body = http_get(f"http://{b.oci}/v2/lib/nothing/manifests/v9")
        assert status == 500, body
        assert casd_a.daemon.address.encode() in body  # the message names the upstream
        assert b.daemon.proc is not None
        assert b.daemon.proc.poll() is None  # B goes on
    finally:
        b.daemon.stop()


def test_upstream_without_the_oci_api_is_refused_at_start(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "x", tmp_path / "x.log", args=["--upstream", "127.0.0.1:1"])
    with pytest.raises(RuntimeError, match="add --oci-listen"):
        d.start()
