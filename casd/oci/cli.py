"""``casctl oci ...``: import, inspect, convert and export container images."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
from typing import TYPE_CHECKING, Any

from casd.errors import PeerRefused, UserError
from casd.oci import media
from casd.units import human

if TYPE_CHECKING:
    from casd.client import Client


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    oci = sub.add_parser(
        "oci",
        parents=[common],
        help="container images: import from registries, inspect, convert, export",
        description="casd keeps image layers as uncompressed content-defined chunks, so "
        "versions of an image share what they have in common, and hands out every layer "
        "byte-exact (re-encoded, verified). `casd serve --oci-listen` serves imported images "
        "to skopeo, podman and containerd.",
    )
    osub = oci.add_subparsers(dest="oci_command", required=True, metavar="OCI_COMMAND")

    s = osub.add_parser(
        "import",
        parents=[common],
        help="import an image from a registry (the daemon fetches it)",
        description="The daemon fetches REF's manifest, config and the layers it lacks, "
        "verifies every digest, and points NAME at the image once all of it is stored.",
    )
    s.add_argument("ref", metavar="REGISTRY/REPO:TAG|REGISTRY/REPO@DIGEST")
    s.add_argument("--name", help="casd name for the image (default: REPO:TAG)")
    g = s.add_mutually_exclusive_group()
    g.add_argument(
        "--platform", metavar="OS/ARCH", help="from an index, this platform (default: the host's)"
    )
    g.add_argument(
        "--all-platforms",
        action="store_true",
        help="from an index, every platform (the index digest is kept)",
    )
    s.add_argument(
        "--insecure", action="store_true", help="talk plain HTTP to the registry (no TLS)"
    )
    s.add_argument(
        "--creds",
        metavar="USER:PASS",
        default=os.environ.get("CASD_REGISTRY_CREDS"),
        help="registry credentials, for basic or token auth (default: $CASD_REGISTRY_CREDS)",
    )
    s.add_argument("--json", action="store_true", help="print the import report as JSON")

    s = osub.add_parser(
        "inspect",
        parents=[common],
        help="per layer: media type, sizes, how it is stored, bytes unique in the store",
    )
    s.add_argument("name", metavar="NAME")
    s.add_argument("--json", action="store_true")

    s = osub.add_parser(
        "convert",
        parents=[common],
        help="re-compress layers into casd's own gzip, so the image syncs as fast deltas",
        description="Writes a new image whose gzip and zstd layers are re-compressed "
        "deterministically (gzip members of 1 MiB of tar each, made by ISA-L or "
        "libdeflate; no file name, mtime 0), so any casd host re-encodes them in parallel "
        "and byte-exact: layers casd cannot make again at all (zstd; Go's gzip without "
        "casd-gogzip) and "
        "those it makes again more slowly (zlib's gzip; Go's gzip with casd-gogzip, about "
        "a third of members' speed). The config (image "
        "id) and every diff_id stay identical; the layer and manifest digests change. "
        "Prints the new manifest digest.",
    )
    s.add_argument("name", metavar="NAME")
    s.add_argument("new_name", metavar="NEWNAME")
    s.add_argument(
        "--lib",
        choices=("isal", "libdeflate"),
        default="isal",
        help="the deflater (default isal: every casd host that syncs the layer deflates it "
        "again, on every sync, and ISA-L does that 2.5x faster than libdeflate, for ~4%% "
        "larger layers for plain registry clients; layers made by either re-encode on any "
        "casd host)",
    )
    s.add_argument(
        "--level",
        type=int,
        default=None,
        choices=range(0, 13),
        metavar="N",
        help="the deflater's level: isal 0-2 (default 2; ISA-L's level 3 makes other bytes "
        "on other CPUs), libdeflate 1-12 (default 1; 6 makes ~8%% smaller layers 3x more "
        "slowly)",
    )
    s.add_argument("--json", action="store_true")

    s = osub.add_parser(
        "export",
        parents=[common],
        help="write an OCI image layout directory (for skopeo copy oci:DIR:TAG ...)",
    )
    s.add_argument("name", metavar="NAME")
    s.add_argument("dir", metavar="DIR")
    s.add_argument("--tag", help="tag in the layout's index.json (default: NAME's tag part)")


async def cmd_oci(client: Client, args: argparse.Namespace) -> int:
    return int(await _COMMANDS[args.oci_command](client, args))


def _progress_printer(args: argparse.Namespace) -> Any:
    if args.quiet or not sys.stderr.isatty():
        return None
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        transient=True,
    )
    return bar


async def _import(client: Client, args: argparse.Namespace) -> int:
    bar = _progress_printer(args)
    task = None

    def on_progress(p: dict[str, int | float | str]) -> None:
        nonlocal task
        if bar is None:
            return
        if task is None:
            bar.start()
            task = bar.add_task("import", total=int(p.get("bytes_total", 0)) or None)
        bar.update(task, completed=int(p.get("bytes_done", 0)))

    try:
        result = await client.call(
            "oci.import",
            {
                "ref": args.ref,
                "name": args.name,
                "platform": args.platform,
                "all_platforms": args.all_platforms,
                "insecure": args.insecure,
                "creds": args.creds,
            },
            on_progress=on_progress,
        )
    finally:
        if bar is not None and task is not None:
            bar.stop()
    if args.json:
        print(json.dumps(result))
        return 0
    for layer in result["layers"]:
        note = f"  ({layer['note']})" if layer.get("note") else ""
        print(
            f"{layer['digest'][:19]}  {human(layer['size']):>10}  {layer['stored']:<12}"
            f"  new {human(layer['new_bytes'])}{note}",
            file=sys.stderr,
        )
    print(
        f"imported {result['name']} -> {result['digest']}: {result['manifests']} manifest(s), "
        f"{len(result['layers'])} layer(s), {human(result['bytes_downloaded'])} downloaded "
        f"in {result['seconds']:.2f}s",
        file=sys.stderr,
    )
    print(result["digest"])
    return 0


async def _inspect(client: Client, args: argparse.Namespace) -> int:
    result = await client.call("oci.inspect", {"name": args.name})
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['name']}  {result['digest']}  {result['media_type']}")
    for m in result["manifests"]:
        print(f"  manifest {m['digest']}  config {m['config']}")
        head = f"{'layer':<19}  {'media type':<46}  {'size':>10}  {'tar':>10}  {'stored':<12}"
        print(f"    {head}  unique")
        for layer in m["layers"]:
            print(
                f"    {layer['digest'][:19]}  {layer['media_type'][:46]:<46}  "
                f"{human(layer['size']):>10}  {human(layer['uncompressed_size']):>10}  "
                f"{layer['stored']:<12}  {human(layer['unique_bytes'])}"
            )
    return 0


async def _convert(client: Client, args: argparse.Namespace) -> int:
    result = await client.call(
        "oci.convert",
        {
            "name": args.name,
            "new_name": args.new_name,
            "lib": args.lib,
            **({"level": args.level} if args.level is not None else {}),
        },
    )
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{result['new_name'] if 'new_name' in result else result['name']}: "
        f"{result['layers_converted']} layer(s) re-compressed",
        file=sys.stderr,
    )
    print(result["digest"])
    return 0


# --- export: an OCI image layout, written by the client ---------------------------------


async def _fetch_blob(client: Client, digest: str, path: str) -> None:
    """Write blob ``digest`` to ``path``: as stored, or re-encoded from its layer record
    and verified. Skips a file that is already there and correct."""
    if os.path.exists(path) and _sha256_file(path) == digest:
        return
    tmp = path + ".tmp"
    try:
        try:
            await client.stat(digest)
            with open(tmp, "wb") as f:
                await client.pull(digest, f)
        except PeerRefused as exc:
            if exc.code_name != "NOT_FOUND":
                raise
            await _reencode(client, digest, tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


async def _reencode(client: Client, digest: str, out_path: str) -> None:
    from casd.oci.layers import LayerRecord, make_encoder

    with tempfile.TemporaryFile() as f:
        try:
            await client.pull(media.layer_record_name(digest), f)
        except PeerRefused as exc:
            if exc.code_name == "NOT_FOUND":
                raise UserError(
                    f"the server has neither blob {digest} nor a record of it"
                ) from None
            raise
        f.seek(0)
        record = LayerRecord.from_json(f.read())
    with tempfile.TemporaryFile() as plain:
        await client.pull(record.uncompressed, plain)
        plain.seek(0)
        enc = make_encoder(record.encoding, record.digest)
        sha = hashlib.sha256()
        with open(out_path, "wb") as out:
            while piece := plain.read(1024 * 1024):
                data = enc.update(piece)
                sha.update(data)
                out.write(data)
            data = enc.finish()
            sha.update(data)
            out.write(data)
    from casd.chunking import format_digest

    if format_digest(sha.digest()) != digest:
        raise UserError(f"re-encoding layer {digest} on this machine did not reproduce it")


def _sha256_file(path: str) -> str:
    from casd.chunking import format_digest

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1024 * 1024):
            h.update(piece)
    return format_digest(h.digest())


async def _export(client: Client, args: argparse.Namespace) -> int:
    info = await client.stat(args.name)
    top = info.digest
    blobs_dir = os.path.join(args.dir, "blobs", "sha256")
    os.makedirs(blobs_dir, exist_ok=True)

    def path_of(digest: str) -> str:
        return os.path.join(blobs_dir, digest.split(":", 1)[1])

    await _fetch_blob(client, top, path_of(top))
    with open(path_of(top), "rb") as f:
        top_data = f.read()
    try:
        doc = media.parse_document(top_data)
    except media.NotAnImageDocument:
        raise UserError(f"{args.name!r} is not an image (manifest or index)") from None
    manifests = [doc] if doc.kind == "manifest" else []
    for m in doc.manifests:
        await _fetch_blob(client, m.digest, path_of(m.digest))
        with open(path_of(m.digest), "rb") as f:
            manifests.append(media.parse_document(f.read()))
    total = 0
    for mdoc in manifests:
        assert mdoc.config is not None
        for desc in (mdoc.config, *mdoc.layers):
            await _fetch_blob(client, desc.digest, path_of(desc.digest))
            total += desc.size
    tag = args.tag or (args.name.rsplit(":", 1)[1] if ":" in args.name else "latest")
    with open(os.path.join(args.dir, "oci-layout"), "w") as out:
        json.dump({"imageLayoutVersion": "1.0.0"}, out)
    index_path = os.path.join(args.dir, "index.json")
    entries: list[dict[str, Any]] = []
    if os.path.exists(index_path):
        with open(index_path) as old:
            entries = [
                e
                for e in json.load(old).get("manifests", [])
                if e.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag
            ]
    entries.append(
        {
            "mediaType": doc.media_type,
            "digest": top,
            "size": len(top_data),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }
    )
    with open(index_path, "w") as out:
        json.dump({"schemaVersion": 2, "mediaType": media.OCI_INDEX, "manifests": entries}, out)
    if not args.quiet:
        print(
            f"exported {args.name} ({top}) to {args.dir} as {tag}: {human(total)}", file=sys.stderr
        )
    return 0


_COMMANDS = {"import": _import, "inspect": _inspect, "convert": _convert, "export": _export}
