#!/usr/bin/env python3
"""Image version series for the headline OCI benchmark (issue #6), built with real tools.

    .venv/bin/python bench/oci_corpus.py                  # the full corpus into bench/corpus
    .venv/bin/python bench/oci_corpus.py --quick          # a tiny offline corpus (CI smoke run)
    .venv/bin/python bench/oci_corpus.py --series pyapp   # one series (and what it builds on)
    .venv/bin/python bench/oci_corpus.py --force          # rebuild even what is built
    .venv/bin/python bench/oci_corpus.py --share          # per-step shared fractions and ideals

Every series is ONE OCI image layout (``<out>/<series>/``) holding its versions as tags
v1, v2, ...; every layer is written by **umoci** (Go's gzip, the file mtimes as they are:
nothing is normalised), from software nobody on this project wrote, fetched from Debian's
mirror and PyPI:

- ``debian``: layer 1 = ``debootstrap --variant=minbase bookworm`` (apt caches and lists
  removed, as Debian's official images do); layer 2 = one ``apt-get install`` run in a
  chroot of ``umoci unpack``'ed layer 1, captured by ``umoci repack`` (the file diff, with
  whiteouts). v1 installs python3, ca-certificates, curl and git from bookworm; v2 is the
  same Dockerfile rebuilt with bookworm-updates and bookworm-security enabled (security
  upgrades of python3.11, perl, openssl, ...); v3 adds python3-pip, python3-venv and
  openssh-client. A *mixed* series: upgraded packages rebuilt, the
  rest identical file data under new tar headers.
- ``pyapp``: FROM debian v1 (its two layers, same blobs) plus a layer of
  ``pip install --no-deps --no-compile --target /usr/local/lib/python3.11/dist-packages``
  of ~30 pinned, mostly pure-Python packages (Django, boto3/botocore, sympy, Babel, Flask,
  requests, ...); each version bumps about 5 of them by one real release. The *high
  share* kind (a pure-Python bump).
- ``mlwheel``: FROM debian v1 plus a layer of one big compiled wheel, scipy 1.11.4, 1.12.0,
  1.13.1, 1.14.1 (cp311 manylinux x86_64, ~110-120 MB unpacked). The *low share* kind
  (compiled libraries rebuilt between releases).

``--quick`` builds one small series offline (``quick-pystd``: stdlib directories of the
running Python, 3 versions, 1-10 MB layers) in a few seconds, into ``<out>/quick``.

``<out>/corpus.json`` records for every series and version the layout, tag, manifest
digest, layers (digest, compressed and uncompressed size, diff_id, what went in), the exact
commands (``$CORPUS`` = the output directory, ``$WORK`` = a scratch directory), the tool
versions and the build times. Downloads are cached under ``<out>/cache`` (the debootstrap
rootfs as a tarball, wheels, .debs), so ``--force`` rebuilds without the slow fetches.
Debian's mirror only serves the newest bookworm packages, so a rebuild months later gets
newer .debs: corpus.json lists the exact package versions each layer got. PyPI pins are
exact. See bench/CORPUS.md.

``layer_share(layout, old_tag, new_tag)`` (and ``--share``) measures a step: the fraction
of v(n)'s new-layer content that v(n-1) already has, by casd's chunking (tar-aware FastCDC,
as ``casctl oci`` ingests, and plain FastCDC), the ideal transfer (zstd -3 of the distinct
chunks v(n) has and v(n-1) lacks, each chunk its own frame), and a zstd -3 long-distance
encoding of v(n)'s new layers with v(n-1)'s replaced layers as prefix (issue #7), with
that encoder's time and peak memory.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import itertools
import json
import math
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

DEFAULT_OUT = HERE / "corpus"
GITIGNORE = "# bench/oci_corpus.py builds here; only this file is committed\n*\n!.gitignore\n"
SCHEMA = 1
REF_NAME = "org.opencontainers.image.ref.name"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
SUITE = "bookworm"
SITE = "usr/local/lib/python3.11/dist-packages"  # where Debian's python3 finds pip installs
PIP_TARGET_FLAGS = [
    "--only-binary=:all:",
    "--no-deps",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "manylinux2014_x86_64",
]

# --- recipes -----------------------------------------------------------------------------

#: debian: per version, the apt sources and the packages installed on top of minbase.
DEBIAN_SOURCES_RELEASE = [f"deb {MIRROR} {SUITE} main"]
DEBIAN_SOURCES_UPDATES = [
    f"deb {MIRROR} {SUITE} main",
    f"deb {MIRROR} {SUITE}-updates main",
    f"deb {SECURITY_MIRROR} {SUITE}-security main",
]
DEBIAN_VERSIONS: list[dict[str, Any]] = [
    {
        "tag": "v1",
        "sources": DEBIAN_SOURCES_RELEASE,
        "install": ["python3", "ca-certificates", "curl", "git"],
        "change": "install python3 ca-certificates curl git (bookworm point release)",
    },
    {
        "tag": "v2",
        "sources": DEBIAN_SOURCES_UPDATES,
        "install": ["python3", "ca-certificates", "curl", "git"],
        "change": "same packages rebuilt with bookworm-updates/-security: apt-get upgrade",
    },
    {
        "tag": "v3",
        "sources": DEBIAN_SOURCES_UPDATES,
        "install": [
            "python3",
            "ca-certificates",
            "curl",
            "git",
            "python3-pip",
            "python3-venv",
            "openssh-client",
        ],
        "change": "adds python3-pip python3-venv openssh-client",
    },
]

#: pyapp: pins of v1, then the bumps of each later version (real successive releases).
PYAPP_V1 = {
    "Django": "4.2.11",
    "asgiref": "3.7.2",
    "sqlparse": "0.4.4",
    "boto3": "1.34.100",
    "botocore": "1.34.100",
    "s3transfer": "0.10.1",
    "jmespath": "1.0.1",
    "python-dateutil": "2.9.0.post0",
    "six": "1.16.0",
    "requests": "2.31.0",
    "urllib3": "2.2.1",
    "certifi": "2024.2.2",
    "idna": "3.6",
    "charset-normalizer": "3.3.2",
    "Flask": "3.0.2",
    "Werkzeug": "3.0.1",
    "Jinja2": "3.1.3",
    "MarkupSafe": "2.1.5",
    "click": "8.1.7",
    "itsdangerous": "2.1.2",
    "blinker": "1.7.0",
    "PyYAML": "6.0.1",
    "typing_extensions": "4.10.0",
    "packaging": "24.0",
    "attrs": "23.2.0",
    "sympy": "1.12",
    "mpmath": "1.3.0",
    "Babel": "2.14.0",
    "Pygments": "2.17.2",
}
PYAPP_BUMPS: list[dict[str, str]] = [
    {
        "Django": "4.2.13",
        "requests": "2.32.2",
        "idna": "3.7",
        "Jinja2": "3.1.4",
        "Werkzeug": "3.0.3",
    },
    {
        "boto3": "1.34.130",
        "botocore": "1.34.130",
        "s3transfer": "0.10.2",
        "urllib3": "2.2.2",
        "certifi": "2024.6.2",
        "Babel": "2.15.0",
    },
    {
        "Django": "4.2.14",
        "sympy": "1.12.1",
        "Pygments": "2.18.0",
        "typing_extensions": "4.12.2",
        "packaging": "24.1",
    },
]

MLWHEEL_PACKAGE = "scipy"
MLWHEEL_VERSIONS = ["1.11.4", "1.12.0", "1.13.1", "1.14.1"]

#: quick: stdlib directories of the running Python (no network); app layer per version.
QUICK_BASE = ["encodings", "json", "http", "urllib", "logging", "email", "importlib"]
QUICK_APP: list[tuple[list[str], bool]] = [
    (["asyncio", "xml", "unittest", "idlelib", "lib2to3", "ensurepip"], True),  # v1
    (["asyncio", "xml", "unittest", "idlelib", "distutils", "ensurepip"], True),  # v2: a swap
    (["asyncio", "xml", "unittest", "idlelib", "distutils", "ensurepip"], False),  # v3: reinstall
]


def pyapp_versions() -> list[dict[str, str]]:
    out = [dict(PYAPP_V1)]
    for bump in PYAPP_BUMPS:
        out.append({**out[-1], **bump})
    return out


# --- running tools -----------------------------------------------------------------------


class BuildError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Recorder:
    """Runs commands and records them (with ``$CORPUS``/``$WORK`` for the directories)."""

    def __init__(self, out: Path, work: Path) -> None:
        self.out, self.work = out, work
        self.commands: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def show(self, argv: Sequence[str]) -> str:
        text = shlex.join([str(a) for a in argv])
        text = text.replace(str(self.work), "$WORK").replace(str(self.out), "$CORPUS")
        return text.replace(str(REPO), "$REPO")

    def run(
        self,
        argv: Sequence[str | Path],
        *,
        timeout: float = 1800,
        env: dict[str, str] | None = None,
        what: str = "",
        record: bool = True,
    ) -> str:
        args = [str(a) for a in argv]
        started = time.monotonic()
        try:
            p = subprocess.run(
                args,
                capture_output=True,
                timeout=timeout,
                env={**os.environ, **(env or {})},
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise BuildError(f"timed out after {timeout} s: {self.show(args)}") from exc
        seconds = time.monotonic() - started
        if p.returncode != 0:
            tail = p.stderr.decode(errors="replace")[-4000:]
            raise BuildError(f"{self.show(args)} exited {p.returncode}:\n{tail}")
        if record:
            entry: dict[str, Any] = {"cmd": self.show(args), "seconds": round(seconds, 2)}
            if env:
                entry["env"] = env
            if what:
                entry["what"] = what
            with self.lock:
                self.commands.append(entry)
        return p.stdout.decode(errors="replace")

    def note(self, text: str) -> None:
        """A step done in Python (file writes), recorded as prose."""
        with self.lock:
            self.commands.append({"python": text})


def first_line(argv: Sequence[str]) -> str:
    try:
        p = subprocess.run(list(argv), capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (p.stdout or p.stderr).decode(errors="replace").strip()
    return text.splitlines()[0] if text else "unavailable"


def deb_version(package: str) -> str:
    return first_line(["dpkg-query", "-W", "-f", "${Version}", package])


def tool_versions(network: bool) -> dict[str, str]:
    tools = {
        "umoci": first_line(["umoci", "--version"]),
        "umoci_deb": deb_version("umoci"),
        "python": sys.version.split()[0],
        "pip": first_line([sys.executable, "-m", "pip", "--version"]).split(" from ")[0],
        "tar": first_line(["tar", "--version"]),
    }
    if network:
        tools["debootstrap"] = deb_version("debootstrap")
    return tools


def require(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        raise SystemExit(f"{tool} is not installed: apt-get install -y {package}")


def umoci(rec: Recorder, *args: str | Path, what: str = "") -> str:
    return rec.run(["umoci", *args], what=what)


def finish_layout(rec: Recorder, layout: Path) -> None:
    umoci(rec, "gc", "--layout", layout)
    for path in (layout / "blobs").rglob("*"):
        if path.is_file():
            path.chmod(0o644)


# --- OCI layout reading ----------------------------------------------------------------


def blob_path(layout: Path, digest: str) -> Path:
    algo, hexpart = digest.split(":", 1)
    return layout / "blobs" / algo / hexpart


def read_json_blob(layout: Path, digest: str) -> Any:
    return json.loads(blob_path(layout, digest).read_bytes())


def tags(layout: Path) -> dict[str, dict[str, Any]]:
    index = json.loads((layout / "index.json").read_bytes())
    return {
        m["annotations"][REF_NAME]: m
        for m in index.get("manifests") or []
        if REF_NAME in m.get("annotations", {})
    }


def set_tag(layout: Path, tag: str, desc: dict[str, Any]) -> None:
    index = json.loads((layout / "index.json").read_bytes())
    keep = [
        m for m in index.get("manifests") or [] if m.get("annotations", {}).get(REF_NAME) != tag
    ]
    keep.append({**desc, "annotations": {**desc.get("annotations", {}), REF_NAME: tag}})
    index["manifests"] = keep
    (layout / "index.json").write_text(json.dumps(index))


def link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_image(src: Path, src_tag: str, dst: Path, dst_tag: str) -> None:
    """Put ``src:src_tag`` (manifest, config, layers: the same blobs) into ``dst``."""
    desc = tags(src)[src_tag]
    manifest = read_json_blob(src, desc["digest"])
    for d in [
        desc["digest"],
        manifest["config"]["digest"],
        *(x["digest"] for x in manifest["layers"]),
    ]:
        link_or_copy(blob_path(src, d), blob_path(dst, d))
    set_tag(dst, dst_tag, {k: v for k, v in desc.items() if k != "annotations"})


_GUNZIPPED: dict[str, tuple[int, str]] = {}


def gunzip_size(path: Path) -> tuple[int, str]:
    """Uncompressed size and sha256 (the diff_id) of a gzip blob."""
    key = f"{path.name}:{path.stat().st_size}"
    if key not in _GUNZIPPED:
        _GUNZIPPED[key] = _gunzip_size(path)
    return _GUNZIPPED[key]


def _gunzip_size(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with gzip.open(path, "rb") as f:
        while block := f.read(4 << 20):
            h.update(block)
            n += len(block)
    return n, "sha256:" + h.hexdigest()


def describe_image(layout: Path, tag: str, layer_info: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The corpus.json record of one version; ``layer_info[i]`` says what went in layer i."""
    desc = tags(layout)[tag]
    manifest = read_json_blob(layout, desc["digest"])
    config = read_json_blob(layout, manifest["config"]["digest"])
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    history = [h for h in config.get("history", []) if not h.get("empty_layer")]
    layers = []
    for i, layer in enumerate(manifest["layers"]):
        usize, diff_id = gunzip_size(blob_path(layout, layer["digest"]))
        if i < len(diff_ids) and diff_id != diff_ids[i]:
            raise BuildError(f"{layout}:{tag} layer {i}: diff_id mismatch")
        layers.append(
            {
                "digest": layer["digest"],
                "media_type": layer["mediaType"],
                "size": layer["size"],
                "uncompressed_size": usize,
                "diff_id": diff_id,
                "created_by": history[i].get("created_by", "") if i < len(history) else "",
                "content": layer_info[i] if i < len(layer_info) else {},
            }
        )
    return {
        "tag": tag,
        "manifest_digest": desc["digest"],
        "manifest_size": desc["size"],
        "config_digest": manifest["config"]["digest"],
        "layers": layers,
        "size": sum(x["size"] for x in layers),
        "uncompressed_size": sum(x["uncompressed_size"] for x in layers),
    }


# --- the corpus manifest -----------------------------------------------------------------


def load_corpus(out: Path = DEFAULT_OUT) -> dict[str, Any]:
    """``<out>/corpus.json``, or an empty corpus."""
    path = out / "corpus.json"
    if path.exists():
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    return {"schema": SCHEMA, "series": {}}


def save_corpus(out: Path, corpus: dict[str, Any]) -> None:
    tmp = out / "corpus.json.tmp"
    tmp.write_text(json.dumps(corpus, indent=2, sort_keys=False) + "\n")
    tmp.replace(out / "corpus.json")


def series_intact(out: Path, entry: dict[str, Any] | None, recipe: str) -> bool:
    """Is the recorded series built from ``recipe`` and its layout still all there?"""
    if not entry or entry.get("recipe_digest") != recipe:
        return False
    layout = out / entry["layout"]
    try:
        have = tags(layout)
    except (OSError, ValueError):
        return False
    for v in entry["versions"]:
        if have.get(v["tag"], {}).get("digest") != v["manifest_digest"]:
            return False
        digests = [v["manifest_digest"], v["config_digest"], *(x["digest"] for x in v["layers"])]
        if not all(blob_path(layout, d).exists() for d in digests):
            return False
    return True


def recipe_digest(obj: Any) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# --- builders ------------------------------------------------------------------------------


@dataclass
class Ctx:
    out: Path
    cache: Path
    corpus: dict[str, Any]
    force: bool
    built: dict[str, float] = field(default_factory=dict)  # series -> seconds this run
    prefetch: threading.Thread | None = None
    prefetch_error: list[BaseException] = field(default_factory=list)
    prefetch_rec: Recorder | None = None


def new_layout(rec: Recorder, layout: Path) -> None:
    if layout.exists():
        shutil.rmtree(layout)
    umoci(rec, "init", "--layout", layout)


def debootstrap_base(ctx: Ctx, rec: Recorder, root: Path) -> dict[str, Any]:
    """The minbase rootfs at ``root``: restored from the cached tarball, else debootstrap'd
    (and cached). Returns the debootstrap record."""
    tarball = ctx.cache / f"debootstrap-{SUITE}-minbase.tar"
    info_path = ctx.cache / f"debootstrap-{SUITE}-minbase.json"
    root.mkdir(parents=True, exist_ok=True)
    if tarball.exists() and info_path.exists():
        rec.run(
            [
                "tar",
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=*",
                "-xpf",
                tarball,
                "-C",
                root,
            ],
            what="restore the cached debootstrap rootfs",
        )
        info = json.loads(info_path.read_text())
        info["from_cache"] = True
        return info  # type: ignore[no-any-return]
    require("debootstrap", "debootstrap")
    log("debootstrap --variant=minbase (about 1-2 minutes) ...")
    started = time.monotonic()
    sub = Recorder(ctx.out, rec.work)
    sub.run(
        ["debootstrap", "--variant=minbase", SUITE, root, MIRROR],
        what="the Debian minbase rootfs",
    )
    # What Debian's official images do: no downloaded .debs, no apt lists.
    sub.run(["chroot", root, "apt-get", "clean"], what="drop the downloaded .debs")
    for p in (root / "var/lib/apt/lists").glob("*"):
        if p.is_file():
            p.unlink()
    sub.note("rm -f ROOT/var/lib/apt/lists/* (files only; partial/ stays)")
    packages = sub.run(
        ["chroot", root, "dpkg-query", "-W", "-f", "${Package}=${Version}\\n"],
        what="list the packages",
        record=False,
    ).split()
    info = {
        "suite": SUITE,
        "variant": "minbase",
        "mirror": MIRROR,
        "packages": packages,
        "seconds": round(time.monotonic() - started, 1),
        "debootstrap": deb_version("debootstrap"),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commands": sub.commands,
    }
    ctx.cache.mkdir(parents=True, exist_ok=True)
    tmp = tarball.with_suffix(".tmp")
    subprocess.run(
        ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-cpf", tmp, "-C", root, "."],
        check=True,
    )
    tmp.replace(tarball)
    info_path.write_text(json.dumps(info, indent=2))
    rec.commands.extend(sub.commands)
    info["from_cache"] = False
    return info


def dpkg_list(root: Path) -> dict[str, str]:
    out = subprocess.run(
        ["chroot", root, "dpkg-query", "-W", "-f", "${Package}=${Version}\\n"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    return dict(line.split("=", 1) for line in out.split())


def build_debian(ctx: Ctx) -> dict[str, Any]:
    require("umoci", "umoci")
    name = "debian"
    layout = ctx.out / name
    work = ctx.out / "work" / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rec = Recorder(ctx.out, work)
    started = time.monotonic()
    try:
        base_root = work / "minbase"
        base_info = debootstrap_base(ctx, rec, base_root)
        base_packages = dpkg_list(base_root)
        new_layout(rec, layout)
        umoci(rec, "new", "--image", f"{layout}:base")
        created_by = f"debootstrap --variant=minbase {SUITE} / {MIRROR}; apt-get clean; rm lists"
        umoci(
            rec,
            "insert",
            "--image",
            f"{layout}:base",
            "--history.created_by",
            created_by,
            base_root,
            "/",
            what="layer 1: the minbase rootfs",
        )
        shutil.rmtree(base_root)
        base_layer = {
            "kind": "debootstrap",
            "suite": SUITE,
            "variant": "minbase",
            "mirror": MIRROR,
            "packages": [f"{k}={v}" for k, v in sorted(base_packages.items())],
            "debootstrap_from_cache": base_info["from_cache"],
            "debootstrap_built_at": base_info.get("built_at"),
        }
        debs = ctx.cache / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        versions = []
        unpacked = work / "bundle-base"
        umoci(rec, "unpack", "--image", f"{layout}:base", unpacked)
        for spec in DEBIAN_VERSIONS:
            tag = spec["tag"]
            log(f"debian {tag}: {spec['change']}")
            t0 = time.monotonic()
            bundle = work / f"bundle-{tag}"
            rec.run(["cp", "-a", unpacked, bundle], what="a fresh copy of the unpacked base")
            root = bundle / "rootfs"
            resolv = root / "etc/resolv.conf"
            kept = root / "etc/resolv.conf.casd-kept"
            had_resolv = resolv.exists() or resolv.is_symlink()
            if had_resolv:
                resolv.rename(kept)  # put back as it was (mtime too) before the repack
            shutil.copy(Path("/etc/resolv.conf"), resolv)
            (root / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")
            (root / "usr/sbin/policy-rc.d").chmod(0o755)
            (root / "etc/apt/sources.list").write_text("\n".join(spec["sources"]) + "\n")
            rec.note(
                "in the rootfs: /etc/apt/sources.list = "
                + " | ".join(spec["sources"])
                + "; host resolv.conf and a policy-rc.d (exit 101) only during apt"
            )
            archives = root / "var/cache/apt/archives"
            for deb in debs.glob("*.deb"):
                link_or_copy(deb, archives / deb.name)
            env = {"DEBIAN_FRONTEND": "noninteractive"}
            apt = ["chroot", root, "apt-get"]
            rec.run([*apt, "update", "-q"], env=env, what="apt lists")
            rec.run([*apt, "upgrade", "-y", "-q"], env=env, what="upgrade the base")
            rec.run(
                [*apt, "install", "-y", "-q", "--no-install-recommends", *spec["install"]],
                env=env,
                what="the packages of this version",
            )
            for deb in archives.glob("*.deb"):
                link_or_copy(deb, debs / deb.name)
            rec.run([*apt, "clean"], what="drop the downloaded .debs")
            for p in (root / "var/lib/apt/lists").glob("*"):
                if p.is_file():
                    p.unlink()
            after = dpkg_list(root)
            (root / "usr/sbin/policy-rc.d").unlink()
            resolv.unlink()
            if had_resolv:
                kept.rename(resolv)
            created_by = (
                "apt-get update && apt-get upgrade -y && apt-get install -y "
                f"--no-install-recommends {' '.join(spec['install'])} && apt-get clean && "
                "rm -rf /var/lib/apt/lists/*"
            )
            umoci(
                rec,
                "repack",
                "--image",
                f"{layout}:{tag}",
                "--history.created_by",
                created_by,
                bundle,
                what="layer 2: the file diff (umoci's mtree), with whiteouts",
            )
            umoci(
                rec,
                "config",
                "--image",
                f"{layout}:{tag}",
                "--author",
                "casd-bench",
                "--config.cmd",
                "/bin/bash",
            )
            shutil.rmtree(bundle)
            layer2 = {
                "kind": "apt-get install (chroot), captured by umoci repack",
                "sources": spec["sources"],
                "requested": spec["install"],
                "change": spec["change"],
                "added": sorted(f"{k}={v}" for k, v in after.items() if k not in base_packages),
                "upgraded": sorted(
                    f"{k}={base_packages[k]}->{v}"
                    for k, v in after.items()
                    if k in base_packages and base_packages[k] != v
                ),
            }
            versions.append((tag, [base_layer, layer2], round(time.monotonic() - t0, 1)))
        shutil.rmtree(unpacked)
        umoci(rec, "rm", "--image", f"{layout}:base")
        finish_layout(rec, layout)
        records = []
        for tag, info, secs in versions:
            r = describe_image(layout, tag, info)
            r["build_seconds"] = secs
            records.append(r)
        return {
            "kind": "mixed: security upgrades rebuild some packages, added packages, rest same",
            "debootstrap": {k: v for k, v in base_info.items() if k != "packages"},
            "versions": records,
            "commands": rec.commands,
            "build_seconds": round(time.monotonic() - started, 1),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def wheel_dir(ctx: Ctx, series: str) -> Path:
    return ctx.cache / "wheels" / series


def pip_download(rec: Recorder, dest: Path, pins: Iterable[str]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    rec.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--disable-pip-version-check",
            *PIP_TARGET_FLAGS,
            "-d",
            dest,
            *pins,
        ],
        what="fetch the wheels (reuses what the directory has)",
    )


def wheels_for(dest: Path, pins: dict[str, str]) -> list[Path]:
    """The downloaded wheel of each pin (names normalised as PEP 427 does)."""

    def norm(s: str) -> str:
        return s.lower().replace("-", "_").replace(".", "_")

    found = []
    files = {p: p.name.split("-") for p in dest.glob("*.whl")}
    for name, version in pins.items():
        match = [
            p for p, parts in files.items() if norm(parts[0]) == norm(name) and parts[1] == version
        ]
        if not match:
            raise BuildError(f"no wheel of {name}=={version} in {dest}")
        found.append(sorted(match)[0])
    return found


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return "sha256:" + h.hexdigest()


def prefetch_wheels(ctx: Ctx) -> None:
    """pip download of every pyapp/mlwheel pin set, in a thread (overlaps debootstrap)."""
    rec = ctx.prefetch_rec
    assert rec is not None
    try:
        for pins in pyapp_versions():
            pip_download(rec, wheel_dir(ctx, "pyapp"), [f"{k}=={v}" for k, v in pins.items()])
        for v in MLWHEEL_VERSIONS:
            pip_download(rec, wheel_dir(ctx, "mlwheel"), [f"{MLWHEEL_PACKAGE}=={v}"])
    except BaseException as exc:  # reported by the builder that needs it
        ctx.prefetch_error.append(exc)


def wait_prefetch(ctx: Ctx) -> None:
    if ctx.prefetch is not None:
        ctx.prefetch.join()
        ctx.prefetch = None
    if ctx.prefetch_error:
        raise BuildError(f"pip download failed: {ctx.prefetch_error[0]}")


def build_pip_series(
    ctx: Ctx,
    name: str,
    version_pins: list[dict[str, str]],
    kind: str,
) -> dict[str, Any]:
    """FROM debian:v1, plus one layer of ``pip install --target`` per version."""
    require("umoci", "umoci")
    layout = ctx.out / name
    work = ctx.out / "work" / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rec = Recorder(ctx.out, work)
    started = time.monotonic()
    wheels = wheel_dir(ctx, name)
    try:
        wait_prefetch(ctx)
        for pins in version_pins:  # no-ops when the prefetch got them
            if not all(_has_wheel(wheels, k, v) for k, v in pins.items()):
                pip_download(rec, wheels, [f"{k}=={v}" for k, v in pins.items()])
        new_layout(rec, layout)
        debian = ctx.out / ctx.corpus["series"]["debian"]["layout"]
        copy_image(debian, "v1", layout, "base")
        rec.note("$CORPUS/debian:v1 (manifest, config, layer blobs) tagged base in the layout")
        base_layers = ctx.corpus["series"]["debian"]["versions"][0]["layers"]
        versions = []
        previous: dict[str, str] = {}
        for i, pins in enumerate(version_pins):
            tag = f"v{i + 1}"
            t0 = time.monotonic()
            files = wheels_for(wheels, pins)
            stage = work / f"stage-{tag}"
            target = stage / SITE
            target.mkdir(parents=True)
            rec.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--disable-pip-version-check",
                    "--no-index",
                    "--no-compile",
                    *PIP_TARGET_FLAGS,
                    "--target",
                    target,
                    *files,
                ],
                what="the site-packages layer",
            )
            spec = " ".join(f"{k}=={v}" for k, v in pins.items())
            umoci(
                rec,
                "insert",
                "--image",
                f"{layout}:base",
                "--tag",
                tag,
                "--history.created_by",
                f"pip install --no-deps --no-compile --target /{SITE} {spec}",
                stage,
                "/",
                what="layer 3: the installed packages",
            )
            umoci(
                rec,
                "config",
                "--image",
                f"{layout}:{tag}",
                "--author",
                "casd-bench",
                "--config.cmd",
                "/usr/bin/python3",
            )
            shutil.rmtree(stage)
            bumped = {
                k: f"{previous[k]}->{v}"
                for k, v in pins.items()
                if previous.get(k) != v and k in previous
            }
            content = {
                "kind": "pip install --target",
                "target": "/" + SITE,
                "packages": [f"{k}=={v}" for k, v in pins.items()],
                "bumped": [f"{k}=={v}" for k, v in bumped.items()],
                "wheels": {p.name: sha256_file(p) for p in files},
            }
            previous = pins
            base_content = [x["content"] for x in base_layers]
            versions.append((tag, [*base_content, content], round(time.monotonic() - t0, 1)))
        umoci(rec, "rm", "--image", f"{layout}:base")
        finish_layout(rec, layout)
        records = []
        for tag, info, secs in versions:
            r = describe_image(layout, tag, info)
            r["build_seconds"] = secs
            records.append(r)
        return {
            "kind": kind,
            "from": {
                "series": "debian",
                "tag": "v1",
                "manifest_digest": ctx.corpus["series"]["debian"]["versions"][0]["manifest_digest"],
            },
            "versions": records,
            "commands": rec.commands,
            "build_seconds": round(time.monotonic() - started, 1),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _has_wheel(dest: Path, name: str, version: str) -> bool:
    try:
        wheels_for(dest, {name: version})
    except BuildError:
        return False
    return True


def quick_stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def copy_tree(src: Path, dst: Path, keep_mtimes: bool) -> None:
    def ignore(_d: str, names: list[str]) -> list[str]:
        return [n for n in names if n == "__pycache__"]

    if not src.is_dir():  # another Python may lack a directory: the layer is just smaller
        return
    copy = shutil.copy2 if keep_mtimes else shutil.copy
    shutil.copytree(src, dst, ignore=ignore, symlinks=True, copy_function=copy)


def build_quick(ctx: Ctx) -> dict[str, Any]:
    require("umoci", "umoci")
    name = "quick-pystd"
    layout = ctx.out / name
    work = ctx.out / "work" / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rec = Recorder(ctx.out, work)
    started = time.monotonic()
    stdlib = quick_stdlib()
    try:
        new_layout(rec, layout)
        base = work / "base"
        for d in QUICK_BASE:
            copy_tree(stdlib / d, base / "usr/lib/pystd" / d, True)
        rec.note(f"copy {QUICK_BASE} from {stdlib} to $WORK/base/usr/lib/pystd (mtimes kept)")
        umoci(rec, "new", "--image", f"{layout}:base")
        umoci(rec, "insert", "--image", f"{layout}:base", base, "/")
        versions = []
        for i, (dirs, keep) in enumerate(QUICK_APP):
            tag = f"v{i + 1}"
            stage = work / f"stage-{tag}"
            for d in dirs:
                copy_tree(stdlib / d, stage / "opt/app" / d, keep)
            rec.note(
                f"copy {dirs} from {stdlib} to $WORK/stage-{tag}/opt/app "
                f"({'mtimes kept' if keep else 'fresh mtimes'})"
            )
            umoci(rec, "insert", "--image", f"{layout}:base", "--tag", tag, stage, "/")
            versions.append(
                (
                    tag,
                    [
                        {"kind": "stdlib copy", "source": str(stdlib), "dirs": QUICK_BASE},
                        {
                            "kind": "stdlib copy",
                            "source": str(stdlib),
                            "dirs": dirs,
                            "mtimes": "from the files" if keep else "copy time",
                        },
                    ],
                )
            )
        umoci(rec, "rm", "--image", f"{layout}:base")
        finish_layout(rec, layout)
        return {
            "kind": "offline smoke corpus: v2 swaps one directory, v3 reinstalls (new mtimes)",
            "versions": [describe_image(layout, t, info) for t, info in versions],
            "commands": rec.commands,
            "build_seconds": round(time.monotonic() - started, 1),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


SERIES_ORDER = ["debian", "pyapp", "mlwheel"]
DEPENDS = {"pyapp": ["debian"], "mlwheel": ["debian"]}


def recipe_of(name: str, corpus: dict[str, Any]) -> str:
    if name == "debian":
        return recipe_digest({"v": 1, "suite": SUITE, "versions": DEBIAN_VERSIONS})
    base = corpus["series"].get("debian", {}).get("versions", [{}])[0].get("manifest_digest")
    if name == "pyapp":
        return recipe_digest({"v": 1, "base": base, "pins": pyapp_versions(), "site": SITE})
    if name == "mlwheel":
        return recipe_digest(
            {"v": 1, "base": base, "pkg": MLWHEEL_PACKAGE, "versions": MLWHEEL_VERSIONS}
        )
    if name == "quick-pystd":
        return recipe_digest(
            {"v": 1, "stdlib": str(quick_stdlib()), "base": QUICK_BASE, "app": QUICK_APP}
        )
    raise KeyError(name)


def builder(name: str) -> Callable[[Ctx], dict[str, Any]]:
    if name == "debian":
        return build_debian
    if name == "pyapp":
        return lambda ctx: build_pip_series(
            ctx,
            "pyapp",
            pyapp_versions(),
            "high share: pure-Python package bumps (about 5 packages per version)",
        )
    if name == "mlwheel":
        return lambda ctx: build_pip_series(
            ctx,
            "mlwheel",
            [{MLWHEEL_PACKAGE: v} for v in MLWHEEL_VERSIONS],
            "low share: one big compiled wheel (scipy) at successive releases",
        )
    if name == "quick-pystd":
        return build_quick
    raise KeyError(name)


def build(out: Path, names: list[str], *, quick: bool, force: bool) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve().is_relative_to(DEFAULT_OUT.resolve()):
        ignore = DEFAULT_OUT / ".gitignore"
        if not ignore.exists():
            ignore.write_text(GITIGNORE)
    corpus = load_corpus(out)
    corpus["schema"] = SCHEMA
    corpus["quick"] = quick
    corpus.setdefault("series", {})
    ctx = Ctx(out=out, cache=out / "cache", corpus=corpus, force=force)
    wanted: list[str] = []
    for n in names:
        for dep in [*DEPENDS.get(n, []), n]:
            if dep not in wanted:
                wanted.append(dep)
    started = time.monotonic()
    todo = [
        n
        for n in wanted
        if (force and n in names)
        or not series_intact(out, corpus["series"].get(n), recipe_of(n, corpus))
    ]
    if any(n in ("pyapp", "mlwheel") for n in todo):
        ctx.prefetch_rec = Recorder(out, out / "work")
        ctx.prefetch = threading.Thread(target=prefetch_wheels, args=(ctx,), daemon=True)
        ctx.prefetch.start()
    for n in wanted:
        recipe = recipe_of(n, corpus)  # after the dependencies are built
        entry = corpus["series"].get(n)
        if n not in todo and series_intact(out, entry, recipe):
            log(f"{n}: built already ({len(entry['versions'])} versions), reused")  # type: ignore[index]
            continue
        log(f"{n}: building ...")
        t0 = time.monotonic()
        record = builder(n)(ctx)
        if n in ("pyapp", "mlwheel") and ctx.prefetch_rec is not None:
            record["prefetch_commands"] = [
                c for c in ctx.prefetch_rec.commands if f"wheels/{n}" in c.get("cmd", "")
            ]
        record = {
            "layout": n,
            "layout_path": str(out / n),
            "recipe_digest": recipe,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tools": tool_versions(network=not quick),
            **record,
        }
        corpus["series"][n] = record
        ctx.built[n] = time.monotonic() - t0
        save_corpus(out, corpus)
        sizes = ", ".join(
            f"{v['tag']}: " + "+".join(f"{x['uncompressed_size'] / 1e6:.0f}" for x in v["layers"])
            for v in record["versions"]
        )
        log(f"{n}: done in {ctx.built[n]:.0f} s (uncompressed MB per layer: {sizes})")
    wait_prefetch(ctx)
    if not ctx.built:  # nothing built: keep the record of the last real build
        shutil.rmtree(out / "work", ignore_errors=True)
        return corpus
    corpus["last_build"] = {
        "seconds": round(time.monotonic() - started, 1),
        "built": {k: round(v, 1) for k, v in ctx.built.items()},
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
        },
    }
    save_corpus(out, corpus)
    shutil.rmtree(out / "work", ignore_errors=True)
    return corpus


# --- shared fractions ------------------------------------------------------------------------

#: (blob path, cutter) -> [(chunk id, size, zstd -3 size)]
_CHUNKS: dict[tuple[str, str], list[tuple[bytes, int, int]]] = {}


def layer_chunks(path: Path, cutter: str = "tarcut") -> list[tuple[bytes, int, int]]:
    """The chunks of a gzip layer's tar, as ``(id, size, zstd -3 size)``; ``cutter`` is
    ``tarcut`` (tar-aware, as casd ingests layers) or ``fastcdc`` (plain FastCDC)."""
    key = (str(path), cutter)
    if key in _CHUNKS:
        return _CHUNKS[key]
    from casd import zstd
    from casd.chunking import Chunker, chunk_id
    from casd.oci.tarcut import TarCutter

    chunker = Chunker()
    cut = TarCutter(chunker).cut_stream if cutter == "tarcut" else chunker.cut_stream
    out = []
    with gzip.open(path, "rb") as f:
        for c in cut(f):  # type: ignore[arg-type]
            out.append((chunk_id(c), len(c), len(zstd.compress(c, 3))))
    _CHUNKS[key] = out
    return out


@dataclass
class StepShare:
    """What v(n) (``new``) has that v(n-1) (``old``) has not, measured on uncompressed layers.

    "New layers" are v(n)'s layers whose digest v(n-1) lacks: a registry pull with v(n-1)
    present transfers exactly those (``new_gzip_bytes``)."""

    series: str
    old: str
    new: str
    new_layers: int
    image_bytes: int  # uncompressed, all of v(n)'s layers
    new_bytes: int  # uncompressed, the new layers
    new_gzip_bytes: int  # the new layers' blobs as the registry serves them
    shared_tarcut: float  # fraction of new_bytes in chunks v(n-1) has (tar-aware FastCDC)
    shared_fastcdc: float  # the same with plain FastCDC over the tar stream
    shared_image_tarcut: float  # fraction of image_bytes v(n-1) has (unchanged layers count)
    missing_tarcut: int  # bytes of the distinct chunks v(n) has and v(n-1) lacks
    missing_fastcdc: int
    ideal_zstd_tarcut: int  # zstd -3 of those chunks, one frame each
    ideal_zstd_fastcdc: int
    zstd_alone: int | None = None  # zstd -3 --long of the new layers, no prefix
    zstd_prefix: int | None = None  # zstd -3 --long with v(n-1)'s replaced layers as prefix
    prefix_bytes: int | None = None  # uncompressed size of that prefix
    prefix_seconds: float | None = None  # time of the prefix encoding
    prefix_peak_rss: int | None = None  # peak RSS (bytes) of the process that encoded it
    prefix_input_rss: int | None = None  # its RSS with old+new loaded, before encoding


def image_layers(layout: Path, tag: str) -> list[dict[str, Any]]:
    manifest = read_json_blob(layout, tags(layout)[tag]["digest"])
    return manifest["layers"]  # type: ignore[no-any-return]


def layer_share(
    layout: Path | str, old_tag: str, new_tag: str, *, prefix: bool = True, series: str = ""
) -> StepShare:
    """Measure the step ``old_tag`` -> ``new_tag`` of the OCI layout ``layout``."""
    layout = Path(layout)
    old_layers = image_layers(layout, old_tag)
    new_layers = image_layers(layout, new_tag)
    old_digests = {x["digest"] for x in old_layers}
    new_digests = {x["digest"] for x in new_layers}
    fresh = [x for x in new_layers if x["digest"] not in old_digests]
    replaced = [x for x in old_layers if x["digest"] not in new_digests]
    figures: dict[str, tuple[float, int, int]] = {}
    image_bytes = new_bytes = 0
    shared_image = 0
    for cutter in ("tarcut", "fastcdc"):
        have = {
            cid
            for x in old_layers
            for cid, _, _ in layer_chunks(blob_path(layout, x["digest"]), cutter)
        }
        shared = total = missing = ideal = 0
        seen: set[bytes] = set()
        for x in new_layers:
            chunks = layer_chunks(blob_path(layout, x["digest"]), cutter)
            size = sum(s for _, s, _ in chunks)
            if cutter == "tarcut":
                image_bytes += size
            if x["digest"] in old_digests:
                if cutter == "tarcut":
                    shared_image += size
                continue
            for cid, s, z in chunks:
                total += s
                if cid in have:
                    shared += s
                elif cid not in seen:
                    seen.add(cid)
                    missing += s
                    ideal += z
        if cutter == "tarcut":
            new_bytes = total
            shared_image += shared
        figures[cutter] = (shared / total if total else 1.0, missing, ideal)
    step = StepShare(
        series=series,
        old=old_tag,
        new=new_tag,
        new_layers=len(fresh),
        image_bytes=image_bytes,
        new_bytes=new_bytes,
        new_gzip_bytes=sum(x["size"] for x in fresh),
        shared_tarcut=figures["tarcut"][0],
        shared_fastcdc=figures["fastcdc"][0],
        shared_image_tarcut=shared_image / image_bytes if image_bytes else 1.0,
        missing_tarcut=figures["tarcut"][1],
        missing_fastcdc=figures["fastcdc"][1],
        ideal_zstd_tarcut=figures["tarcut"][2],
        ideal_zstd_fastcdc=figures["fastcdc"][2],
    )
    if prefix and fresh:
        res = prefix_encode(
            [blob_path(layout, x["digest"]) for x in replaced],
            [blob_path(layout, x["digest"]) for x in fresh],
        )
        step.zstd_alone = res["alone"]
        step.zstd_prefix = res["prefix"]
        step.prefix_bytes = res["prefix_bytes"]
        step.prefix_seconds = res["seconds"]
        step.prefix_peak_rss = res["peak_rss"]
        step.prefix_input_rss = res["input_rss"]
    return step


def _read_gunzipped(paths: Sequence[str | Path]) -> bytes:
    parts = []
    for p in paths:
        with gzip.open(p, "rb") as f:
            parts.append(f.read())
    return b"".join(parts)


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _prefix_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in its own process so that its peak RSS is the encoder's alone."""
    if sys.version_info >= (3, 14):
        from compression.zstd import CompressionParameter, ZstdCompressor, ZstdDict
    else:
        from backports.zstd import CompressionParameter, ZstdCompressor, ZstdDict

    old = _read_gunzipped(spec["old"])
    new = _read_gunzipped(spec["new"])
    input_rss = _rss_now()
    span = len(old) + len(new)
    window_log = min(31, max(27, math.ceil(math.log2(max(span, 2)))))
    options = {
        CompressionParameter.compression_level: 3,
        CompressionParameter.enable_long_distance_matching: 1,
        CompressionParameter.window_log: window_log,
    }
    t0 = time.monotonic()
    if old:
        comp = ZstdCompressor(options=options, zstd_dict=ZstdDict(old, is_raw=True).as_prefix)
    else:
        comp = ZstdCompressor(options=options)
    with_prefix = len(comp.compress(new, mode=ZstdCompressor.FLUSH_FRAME))
    seconds = time.monotonic() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    alone = len(ZstdCompressor(options=options).compress(new, mode=ZstdCompressor.FLUSH_FRAME))
    return {
        "prefix": with_prefix,
        "alone": alone,
        "prefix_bytes": len(old),
        "new_bytes": len(new),
        "window_log": window_log,
        "seconds": round(seconds, 2),
        "peak_rss": peak,
        "input_rss": input_rss,
    }


def prefix_encode(old: Sequence[Path], new: Sequence[Path]) -> dict[str, Any]:
    """zstd -3 --long of the concatenated ``new`` layers (uncompressed), with and without the
    concatenated ``old`` layers as prefix, in a fresh process (time and peak memory)."""
    spec = {"old": [str(p) for p in old], "new": [str(p) for p in new]}
    p = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--prefix-worker", json.dumps(spec)],
        capture_output=True,
        check=False,
        timeout=1800,
    )
    if p.returncode != 0:
        raise BuildError(f"prefix worker failed:\n{p.stderr.decode(errors='replace')[-3000:]}")
    return json.loads(p.stdout)  # type: ignore[no-any-return]


def series_shares(
    out: Path = DEFAULT_OUT, names: Sequence[str] | None = None, *, prefix: bool = True
) -> Iterator[StepShare]:
    """Every step v(n-1) -> v(n) of the built series (all of them if ``names`` is None)."""
    corpus = load_corpus(out)
    for name, entry in corpus["series"].items():
        if names and name not in names:
            continue
        layout = out / entry["layout"]
        versions = [v["tag"] for v in entry["versions"]]
        for old, new in itertools.pairwise(versions):
            yield layer_share(layout, old, new, prefix=prefix, series=name)


def mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def print_shares(out: Path, names: Sequence[str] | None, prefix: bool) -> list[StepShare]:
    steps = []
    head = (
        f"{'series':<12} {'step':<7} {'new MB':>7} {'gzip MB':>7} {'shared':>7} {'(cdc)':>6} "
        f"{'image':>6} | {'ideal zstd':>10} {'(cdc)':>7} | {'zstd':>7} {'prefix':>7} "
        f"{'pfx s':>6} {'peak MB':>7} {'enc MB':>7}"
    )
    print(head)
    print("-" * len(head))
    for s in series_shares(out, names, prefix=prefix):
        steps.append(s)
        enc = None
        if s.prefix_peak_rss is not None and s.prefix_input_rss is not None:
            enc = s.prefix_peak_rss - s.prefix_input_rss
        print(
            f"{s.series:<12} {s.old + '>' + s.new:<7} {mb(s.new_bytes):>7} "
            f"{mb(s.new_gzip_bytes):>7} "
            f"{100 * s.shared_tarcut:>6.1f}% {100 * s.shared_fastcdc:>5.1f}% "
            f"{100 * s.shared_image_tarcut:>5.1f}% | {mb(s.ideal_zstd_tarcut):>10} "
            f"{mb(s.ideal_zstd_fastcdc):>7} | {mb(s.zstd_alone):>7} {mb(s.zstd_prefix):>7} "
            f"{'-' if s.prefix_seconds is None else s.prefix_seconds:>6} "
            f"{mb(s.prefix_peak_rss):>7} {mb(enc):>7}",
            flush=True,
        )
    print(
        "\nnew MB: uncompressed layers of v(n) that v(n-1) lacks (by digest); gzip MB: their"
        " blobs (what a registry pull transfers).\nshared: fraction of those bytes in chunks"
        " v(n-1) has, tar-aware FastCDC as casd ingests (cdc: plain FastCDC); image: the same"
        " over the whole image.\nideal zstd: zstd -3 of the distinct chunks v(n) has and"
        " v(n-1) lacks, a frame per chunk (cdc: plain FastCDC).\nzstd / prefix: zstd -3 --long"
        " of the new layers alone / with v(n-1)'s replaced layers as prefix; pfx s: that"
        " encoding's time;\npeak MB: peak RSS of the process doing it (old and new layers held"
        " in memory); enc MB: the part above the loaded inputs (the encoder itself)."
    )
    path = out / "share.json"
    path.write_text(json.dumps([asdict(s) for s in steps], indent=2) + "\n")
    print(f"wrote {path}")
    return steps


# --- CLI ---------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--prefix-worker":
        print(json.dumps(_prefix_worker(json.loads(sys.argv[2]))))
        return
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out",
        type=Path,
        help="corpus directory (default bench/corpus, bench/corpus/quick with --quick)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny offline corpus for CI (< 60 s)")
    ap.add_argument("--series", nargs="+", help=f"build only these (of {SERIES_ORDER})")
    ap.add_argument("--force", action="store_true", help="rebuild even what is built")
    ap.add_argument(
        "--share",
        action="store_true",
        help="print the per-step figures (builds nothing; writes <out>/share.json)",
    )
    ap.add_argument(
        "--no-prefix",
        action="store_true",
        help="with --share: skip the zstd prefix encodings (the slow part)",
    )
    args = ap.parse_args()
    out: Path = (args.out or (DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT)).resolve()
    if args.share:
        print_shares(out, args.series, prefix=not args.no_prefix)
        return
    if os.geteuid() != 0 and not args.quick:
        raise SystemExit("the full corpus needs root (debootstrap, chroot apt-get)")
    names = ["quick-pystd"] if args.quick else (args.series or SERIES_ORDER)
    for n in names:
        if n not in (*SERIES_ORDER, "quick-pystd"):
            raise SystemExit(f"unknown series {n!r} (have {SERIES_ORDER})")
    started = time.monotonic()
    try:
        corpus = build(out, names, quick=args.quick, force=args.force)
    except BuildError as exc:
        raise SystemExit(f"corpus build failed: {exc}") from None
    print(f"\n{out}/corpus.json ({time.monotonic() - started:.0f} s)")
    for name, entry in corpus["series"].items():
        for v in entry["versions"]:
            layers = " + ".join(
                f"{x['uncompressed_size'] / 1e6:.1f} MB ({x['size'] / 1e6:.1f} gz)"
                for x in v["layers"]
            )
            print(f"  {name:<12} {v['tag']:<3} {v['manifest_digest'][:19]}  {layers}")


if __name__ == "__main__":
    main()
