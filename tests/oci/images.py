"""Build OCI images for tests without docker: OCI image layouts written from Python
(deterministic tar + gzip), with umoci (Go's gzip), image indexes, and skopeo to push them
into a registry.

Layouts follow the image-spec layout: ``oci-layout``, ``index.json`` (one entry per tag,
annotated ``org.opencontainers.image.ref.name``), ``blobs/sha256/<hex>``. Several tags can
share one layout directory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
REF_NAME = "org.opencontainers.image.ref.name"

#: A layer: archive path -> file content (bytes), or a file/directory on this machine
#: (a directory is added recursively under that archive path).
LayerSpec = Mapping[str, "bytes | Path"]

CI_HINT = "`.ci/run` installs docker-registry, skopeo, umoci and apache2-utils (htpasswd)"


class ToolFailed(RuntimeError):
    """An external tool (skopeo, umoci) exited non-zero; the message has its stderr."""


def require_tool(name: str) -> str:
    """The path of ``name``; fails the test (never skips) when it is missing."""
    path = shutil.which(name)
    if path is None:
        import pytest

        pytest.fail(f"{name} is not installed: {CI_HINT}", pytrace=False)
    return path


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# --- layout primitives ---------------------------------------------------------------------


def init_layout(layout: Path) -> None:
    """Create an empty OCI layout at ``layout`` unless one is there."""
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    if not (layout / "oci-layout").exists():
        (layout / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
    if not (layout / "index.json").exists():
        (layout / "index.json").write_bytes(
            canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
        )


def write_blob(layout: Path, data: bytes) -> str:
    """Store ``data`` as a blob of the layout; returns its digest."""
    digest = sha256_digest(data)
    path = blob_path(layout, digest)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return digest


def blob_path(layout: Path, digest: str) -> Path:
    algorithm, encoded = digest.split(":", 1)
    return layout / "blobs" / algorithm / encoded


def read_blob(layout: Path, digest: str) -> bytes:
    return blob_path(layout, digest).read_bytes()


def set_tag(layout: Path, tag: str, descriptor: dict[str, Any]) -> None:
    """Point ``tag`` in the layout's index.json at ``descriptor`` (replacing that tag)."""
    index = json.loads((layout / "index.json").read_bytes())
    entries = [
        m for m in index.get("manifests", []) if m.get("annotations", {}).get(REF_NAME) != tag
    ]
    desc = dict(descriptor)
    desc["annotations"] = {**desc.get("annotations", {}), REF_NAME: tag}
    entries.append(desc)
    index["manifests"] = entries
    (layout / "index.json").write_bytes(canonical_json(index))


def tagged(layout: Path, tag: str) -> dict[str, Any]:
    """The index.json descriptor of ``tag``."""
    index = json.loads((layout / "index.json").read_bytes())
    for m in index.get("manifests", []):
        if m.get("annotations", {}).get(REF_NAME) == tag:
            return m  # type: ignore[no-any-return]
    raise KeyError(f"{layout} has no tag {tag!r}")


# --- tars ------------------------------------------------------------------------------------


def _entries(files: LayerSpec) -> dict[str, bytes | Path]:
    """archive name -> content, with directories walked, parents added, names normalised."""
    out: dict[str, bytes | Path] = {}

    def add_parents(name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            out.setdefault("/".join(parts[:i]) + "/", b"")

    for raw_name, content in files.items():
        name = raw_name.strip("/")
        if not name:
            raise ValueError("a layer entry needs a path")
        if isinstance(content, Path) and content.is_dir() and not content.is_symlink():
            add_parents(name + "/x")
            out[name + "/"] = content
            for sub in sorted(content.rglob("*")):
                rel = sub.relative_to(content).as_posix()
                if sub.is_dir() and not sub.is_symlink():
                    out[f"{name}/{rel}/"] = sub
                elif sub.is_file() or sub.is_symlink():
                    out[f"{name}/{rel}"] = sub
        else:
            add_parents(name)
            out[name] = content
    return out


def make_tar(files: LayerSpec, *, mtime: int = 0) -> bytes:
    """A deterministic tar of ``files``: sorted, owner 0:0, fixed mtime, parents included;
    modes come from the files on disk (0644/0755 for bytes and implicit directories)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(_entries(files).items()):
            info = tarfile.TarInfo(name.rstrip("/"))
            info.mtime = mtime
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                info.mode = (
                    stat.S_IMODE(content.stat().st_mode) if isinstance(content, Path) else 0o755
                )
                tar.addfile(info)
            elif isinstance(content, Path) and content.is_symlink():
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(content)
                info.mode = 0o777
                tar.addfile(info)
            else:
                if isinstance(content, Path):
                    data = content.read_bytes()
                    info.mode = stat.S_IMODE(content.stat().st_mode)
                else:
                    data = content
                    info.mode = 0o644
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def compress(data: bytes, compression: str, compresslevel: int = 6) -> bytes:
    """``gzip`` (Python's gzip, header mtime 0, no file name), ``zstd`` or ``none``."""
    if compression == "gzip":
        return gzip.compress(data, compresslevel=compresslevel, mtime=0)
    if compression == "zstd":
        if sys.version_info >= (3, 14):
            from compression import zstd
        else:
            from backports import zstd
        return zstd.compress(data, level=compresslevel)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


def real_files(root: str | Path, limit_bytes: int, *, suffixes: Sequence[str] = ()) -> LayerSpec:
    """Up to ``limit_bytes`` of real files under ``root`` (e.g. /usr/share/doc), in a
    stable order, as a layer spec keyed by their path without the leading '/'."""
    out: dict[str, bytes | Path] = {}
    total = 0
    for path in sorted(Path(root).rglob("*")):
        if total >= limit_bytes:
            break
        if path.is_symlink() or not path.is_file() or "__pycache__" in path.parts:
            continue
        if suffixes and path.suffix not in suffixes:
            continue
        size = path.stat().st_size
        out[path.as_posix().lstrip("/")] = path
        total += size
    if total < limit_bytes:
        raise RuntimeError(f"only {total} bytes of real files under {root}")
    return out


# --- images ----------------------------------------------------------------------------------


@dataclass
class LayoutImage:
    """One image manifest in a layout (``tag`` names it in index.json, if tagged)."""

    layout: Path
    tag: str | None
    manifest_digest: str
    manifest: bytes
    media_type: str
    config_digest: str
    config: bytes
    layer_digests: list[str]
    layer_sizes: list[int]
    layer_media_types: list[str]
    diff_ids: list[str]
    platform: dict[str, str] = field(default_factory=dict)

    @property
    def blobs(self) -> list[str]:
        """Config and layer digests (what a pull fetches besides the manifest)."""
        return [self.config_digest, *self.layer_digests]

    def blob(self, digest: str) -> bytes:
        return read_blob(self.layout, digest)

    @classmethod
    def load(cls, layout: Path, manifest_digest: str, tag: str | None = None) -> LayoutImage:
        manifest = read_blob(layout, manifest_digest)
        doc = json.loads(manifest)
        config = read_blob(layout, doc["config"]["digest"])
        cfg = json.loads(config)
        return cls(
            layout=layout,
            tag=tag,
            manifest_digest=manifest_digest,
            manifest=manifest,
            media_type=doc.get("mediaType", OCI_MANIFEST),
            config_digest=doc["config"]["digest"],
            config=config,
            layer_digests=[x["digest"] for x in doc["layers"]],
            layer_sizes=[x["size"] for x in doc["layers"]],
            layer_media_types=[x["mediaType"] for x in doc["layers"]],
            diff_ids=list(cfg.get("rootfs", {}).get("diff_ids", [])),
            platform={"os": cfg.get("os", ""), "architecture": cfg.get("architecture", "")},
        )


@dataclass
class LayoutIndex:
    layout: Path
    tag: str
    index_digest: str
    index: bytes
    images: dict[str, LayoutImage]  # "linux/amd64" -> image

    @property
    def blobs(self) -> list[str]:
        """Every manifest, config and layer digest below the index."""
        out: list[str] = []
        for image in self.images.values():
            out += [image.manifest_digest, *image.blobs]
        return out


def add_image(
    layout: Path,
    layers: Sequence[LayerSpec],
    *,
    compression: str = "gzip",
    compresslevel: int = 6,
    architecture: str = "amd64",
    os_name: str = "linux",
    docker: bool = False,
    config_extra: Mapping[str, Any] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> LayoutImage:
    """Write an image's layers, config and manifest into ``layout`` (untagged)."""
    init_layout(layout)
    if docker and compression != "gzip":
        raise ValueError("docker media types here are for gzip layers only")
    descriptors, diff_ids, digests, sizes, types = [], [], [], [], []
    for spec in layers:
        tar = make_tar(spec)
        blob = compress(tar, compression, compresslevel)
        media_type = (
            DOCKER_LAYER_GZIP
            if docker
            else OCI_LAYER + {"gzip": "+gzip", "zstd": "+zstd", "none": ""}[compression]
        )
        digest = write_blob(layout, blob)
        descriptors.append({"mediaType": media_type, "digest": digest, "size": len(blob)})
        diff_ids.append(sha256_digest(tar))
        digests.append(digest)
        sizes.append(len(blob))
        types.append(media_type)
    config_obj: dict[str, Any] = {
        "architecture": architecture,
        "os": os_name,
        "created": "1970-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"casd tests layer {i}"} for i in range(len(layers))],
    }
    config_obj.update(config_extra or {})
    config = canonical_json(config_obj)
    config_digest = write_blob(layout, config)
    manifest_obj: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": {
            "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
            "digest": config_digest,
            "size": len(config),
        },
        "layers": descriptors,
    }
    if annotations:
        manifest_obj["annotations"] = dict(annotations)
    manifest = canonical_json(manifest_obj)
    manifest_digest = write_blob(layout, manifest)
    return LayoutImage(
        layout=layout,
        tag=None,
        manifest_digest=manifest_digest,
        manifest=manifest,
        media_type=manifest_obj["mediaType"],
        config_digest=config_digest,
        config=config,
        layer_digests=digests,
        layer_sizes=sizes,
        layer_media_types=types,
        diff_ids=diff_ids,
        platform={"os": os_name, "architecture": architecture},
    )


def build_layout_python(
    layout: Path,
    tag: str,
    layers: Sequence[LayerSpec],
    compresslevel: int = 6,
    **options: Any,
) -> LayoutImage:
    """Write a one-manifest image tagged ``tag`` into the OCI layout ``layout`` (created if
    needed), entirely from Python: deterministic tars, gzip via Python's ``gzip`` (header
    mtime 0) at ``compresslevel``, a config whose ``rootfs.diff_ids`` are the sha256 of the
    tars, OCI media types. ``options`` go to :func:`add_image` (compression="gzip"|"zstd"|
    "none", architecture, os_name, docker=True for Docker media types, config_extra,
    annotations). Same inputs, same digests."""
    image = add_image(layout, layers, compresslevel=compresslevel, **options)
    set_tag(
        layout,
        tag,
        {
            "mediaType": image.media_type,
            "digest": image.manifest_digest,
            "size": len(image.manifest),
        },
    )
    image.tag = tag
    return image


def build_index_two_platforms(
    layout: Path,
    tag: str,
    *,
    shared: LayerSpec | None = None,
    compresslevel: int = 6,
) -> LayoutIndex:
    """An OCI image index tagged ``tag`` with a linux/amd64 and a linux/arm64 image. Each
    has a small layer of its own (different content); ``shared``, if given, is a first
    layer both images have."""
    images: dict[str, LayoutImage] = {}
    entries = []
    for arch in ("amd64", "arm64"):
        own: dict[str, bytes | Path] = {
            "etc/arch": f"{arch}\n".encode(),
            f"usr/lib/{arch}/payload.bin": hashlib.sha512(arch.encode()).digest() * 512,
        }
        layers = [*([shared] if shared else []), own]
        image = add_image(layout, layers, compresslevel=compresslevel, architecture=arch)
        images[f"linux/{arch}"] = image
        entries.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": image.manifest_digest,
                "size": len(image.manifest),
                "platform": {"os": "linux", "architecture": arch},
            }
        )
    index = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    digest = write_blob(layout, index)
    set_tag(layout, tag, {"mediaType": OCI_INDEX, "digest": digest, "size": len(index)})
    return LayoutIndex(layout, tag, digest, index, images)


# --- external tools --------------------------------------------------------------------------


def _run(argv: Sequence[str], timeout: float = 120) -> str:
    try:
        p = subprocess.run(list(argv), capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ToolFailed(f"{argv[0]} timed out after {timeout} s: {' '.join(argv)}") from exc
    if p.returncode != 0:
        raise ToolFailed(
            f"{' '.join(argv)} exited {p.returncode}:\n{p.stderr.decode(errors='replace')}"
        )
    return p.stdout.decode(errors="replace")


def build_layout_umoci(
    layout: Path,
    tag: str,
    rootfs_dirs: Sequence[Path],
    *,
    architecture: str = "amd64",
) -> LayoutImage:
    """An image tagged ``tag`` built with umoci (Go's gzip): one layer per directory in
    ``rootfs_dirs``, each inserted at ``/``. Runs ``umoci gc`` and makes the blobs
    world-readable (umoci writes them 0600)."""
    umoci = require_tool("umoci")
    if not (layout / "index.json").exists():
        _run([umoci, "init", "--layout", str(layout)])
    image = f"{layout}:{tag}"
    _run([umoci, "new", "--image", image])
    for rootfs in rootfs_dirs:
        _run([umoci, "insert", "--image", image, str(rootfs), "/"])
    _run(
        [
            umoci,
            "config",
            "--image",
            image,
            "--os",
            "linux",
            "--architecture",
            architecture,
            "--author",
            "casd-tests",
        ]
    )
    _run([umoci, "gc", "--layout", str(layout)])
    for path in (layout / "blobs").rglob("*"):
        if path.is_file():
            path.chmod(0o644)
    return LayoutImage.load(layout, tagged(layout, tag)["digest"], tag)


def skopeo_policy() -> Path:
    """A signature policy that accepts anything (tests only), in the temp directory."""
    path = Path(tempfile.gettempdir()) / "casd-tests-skopeo-policy.json"
    body = canonical_json({"default": [{"type": "insecureAcceptAnything"}]})
    if not path.exists() or path.read_bytes() != body:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(body)
        tmp.replace(path)
    return path


def skopeo_copy(src: str, dst: str, *extra: str, timeout: float = 120) -> str:
    """``skopeo copy`` with an accept-anything policy and TLS verification off on both sides
    (loopback registries speak plain HTTP). ``extra`` goes before SRC DST, e.g. "--all",
    "--dest-creds", "u:p". Raises ToolFailed with skopeo's stderr.

    skopeo keeps a blob-info cache (/var/lib/containers/cache/blob-info-cache-v1.boltdb for
    root) that may turn uploads into cross-repository mounts; results stay correct, so it
    is not cleared here, but byte-counting tests should keep it in mind."""
    skopeo = require_tool("skopeo")
    return _run(
        [
            skopeo,
            "--policy",
            str(skopeo_policy()),
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            *extra,
            src,
            dst,
        ],
        timeout,
    )


def push_layout(
    layout: Path,
    tag: str,
    registry: str,
    repo: str,
    *,
    dest_tag: str | None = None,
    creds: tuple[str, str] | None = None,
    all_platforms: bool | None = None,
) -> None:
    """Push ``oci:LAYOUT:TAG`` to ``docker://REGISTRY/REPO:DEST_TAG`` with digests preserved
    (``registry`` is host:port, or a URL whose scheme is dropped). Indexes are pushed with
    all their images (``--all``) unless ``all_platforms`` is False."""
    host = registry.split("://", 1)[-1].rstrip("/")
    extra = ["--preserve-digests"]
    if all_platforms is None:
        all_platforms = tagged(layout, tag).get("mediaType") == OCI_INDEX
    if all_platforms:
        extra.append("--all")
    if creds is not None:
        extra += ["--dest-creds", f"{creds[0]}:{creds[1]}"]
    skopeo_copy(f"oci:{layout}:{tag}", f"docker://{host}/{repo}:{dest_tag or tag}", *extra)
