"""casctl: the command-line client of casd.

Every command talks to one server (``--server`` or ``CASD_SERVER``). Results go to stdout
(one JSON object with ``--json``), progress and summaries to stderr, errors as one line
with a hint and exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from casd import DEFAULT_LISTEN, __version__
from casd.errors import CasdError, PeerRefused, UserError
from casd.oci import cli as oci_cli
from casd.units import human

if TYPE_CHECKING:
    from casd.chunking import Chunker
    from casd.client import Client, TransferResult

# trio and the full client (casd.client) are imported where a command needs them, not
# here: `casctl sync` runs without them (casd.blocking), and starts in 0.17 s, not 0.45.


class _ProgressBar:
    """A rich progress bar on a TTY stderr; nothing at all otherwise."""

    def __init__(self, label: str, total: int | None, enabled: bool) -> None:
        self._progress: Any = None
        if not enabled or not sys.stderr.isatty():
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            transient=True,
        )
        self._task = self._progress.add_task(label, total=total)

    def __enter__(self) -> _ProgressBar:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)


def _chunks_of(
    path: str, chunker: Chunker, stack: contextlib.ExitStack
) -> tuple[Iterator[memoryview], int | None]:
    if path == "-":
        if sys.stdin.isatty():
            raise UserError("refusing to read a blob from a terminal; pipe data in or give a PATH")
        return chunker.cut_stream(sys.stdin.buffer), None
    try:
        f = stack.enter_context(open(path, "rb"))  # noqa: SIM115 - the stack closes it
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from exc
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        return iter(()), 0
    if not os.path.isfile(path):  # a pipe or device: stream it
        return chunker.cut_stream(f), None
    # Zero-copy: chunks are views of the mapped file all the way to the socket.
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return chunker.cut(mm), size


def _summary(verb: str, r: TransferResult, seconds: float) -> str:
    rate = r.size / seconds if seconds > 0 else 0.0
    extra = f", {r.chunks_from_seeds} from seeds" if r.chunks_from_seeds else ""
    return (
        f"{verb} {human(r.size)}: {r.chunks_transferred} of {r.chunks} chunks transferred"
        f"{extra}, {human(r.wire_bytes)} on the wire, {seconds:.2f}s ({human(rate)}/s)"
    )


def _result_json(r: TransferResult, seconds: float, **extra: Any) -> dict[str, Any]:
    return {
        "digest": r.digest,
        "size": r.size,
        "chunks": r.chunks,
        "chunks_transferred": r.chunks_transferred,
        "chunks_from_seeds": r.chunks_from_seeds,
        "chunks_delta": r.chunks_delta,
        "bytes_transferred": r.bytes_transferred,
        "wire_bytes": r.wire_bytes,
        "seconds": round(seconds, 4),
        **extra,
    }


async def cmd_put(client: Client, args: argparse.Namespace) -> int:
    from casd.chunking import DEFAULT_PARAMS, Chunker

    chunker = Chunker(client.chunker_params or DEFAULT_PARAMS)
    with contextlib.ExitStack() as stack:
        chunks, size = _chunks_of(args.path, chunker, stack)
        start = time.perf_counter()
        with _ProgressBar("put", size, not args.quiet) as bar:
            try:
                r = await client.push(chunks, name=args.name, progress=bar.advance, base=args.base)
            except PeerRefused as exc:
                if args.base is None or "delta base" not in exc.remote_message:
                    raise
                if args.path == "-":
                    raise UserError(
                        f"{exc.remote_message}; standard input cannot be sent again: retry "
                        "without --base"
                    ) from exc
                # A base chunk went bad on the server: push again with plain chunks; what
                # crossed already is stored there and is not sent again.
                chunks, size = _chunks_of(args.path, chunker, stack)
                r = await client.push(chunks, name=args.name, progress=bar.advance)
        seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps(_result_json(r, seconds, name=args.name, new_chunks=r.new_chunks)))
    else:
        print(r.digest)
        if not args.quiet:
            print(_summary("put", r, seconds), file=sys.stderr)
    return 0


async def cmd_get(client: Client, args: argparse.Namespace) -> int:
    if args.output in (None, "-") and sys.stdout.isatty() and not args.json:
        raise UserError("refusing to write a blob to a terminal; use -o PATH or a pipe")
    start = time.perf_counter()
    info = await client.stat(args.ref)
    with _ProgressBar("get", info.size, not args.quiet) as bar:
        if args.output in (None, "-"):
            if args.json:
                raise UserError("--json needs -o PATH (stdout carries the JSON)")
            r = await client.pull(
                args.ref, sys.stdout.buffer, seeds=args.seed, progress=bar.advance
            )
            sys.stdout.buffer.flush()
        else:
            r = await _get_to_file(client, args, bar)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps(_result_json(r, seconds, output=args.output)))
    elif not args.quiet:
        print(_summary("got", r, seconds), file=sys.stderr)
    return 0


async def _get_to_file(
    client: Client, args: argparse.Namespace, bar: _ProgressBar
) -> TransferResult:
    # Write beside the target and rename over it only once the digest verified: a failed
    # get never leaves a partial or wrong file at PATH, and a seed may be PATH itself.
    target = os.path.abspath(args.output)  # noqa: ASYNC240 - no I/O beyond getcwd
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".casctl-get-")
    try:
        with os.fdopen(fd, "wb") as out:
            r = await client.pull(args.ref, out, seeds=args.seed, progress=bar.advance)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return r


async def cmd_stat(client: Client, args: argparse.Namespace) -> int:
    info = await client.stat(args.ref)
    if args.json:
        print(
            json.dumps(
                {
                    "digest": info.digest,
                    "size": info.size,
                    "chunks": info.chunks,
                    "names": list(info.names),
                    "chunks_transferred": 0,
                    "wire_bytes": client.peer.wire_bytes,
                }
            )
        )
    else:
        print(
            f"digest  {info.digest}\nsize    {info.size} ({human(info.size)})\n"
            f"chunks  {info.chunks}\nnames   {', '.join(info.names) or '-'}"
        )
    return 0


async def cmd_ls(client: Client, args: argparse.Namespace) -> int:
    entries = await client.list_names(args.prefix)
    if not args.all and not args.prefix.startswith("."):
        # Names starting with "." are casd's bookkeeping (OCI layer records).
        entries = [(n, d) for n, d in entries if not n.startswith(".")]
    if args.json:
        print(json.dumps([{"name": n, "digest": d} for n, d in entries]))
    else:
        for name, digest in entries:
            print(f"{digest}  {name}")
    return 0


async def cmd_tag(client: Client, args: argparse.Namespace) -> int:
    digest = (await client.stat(args.ref)).digest
    await client.tag(args.name, digest)
    print(f"{args.name} -> {digest}", file=sys.stderr)
    return 0


async def cmd_rm(client: Client, args: argparse.Namespace) -> int:
    for name in args.names:
        if name.startswith("sha256:"):
            raise UserError(
                f"{name} is a digest; rm removes names. A blob no name points at is "
                "removed by garbage collection"
            )
        await client.untag(name)
    return 0


async def cmd_fsck(client: Client, args: argparse.Namespace) -> int:
    done = await client.fsck(
        deep=args.deep, repair_from=args.repair_from, token=args.repair_token or args.token
    )
    report = done.report
    if args.json:
        print(json.dumps({**report, "damaged": [d.hex() for d in done.damaged]}))
    else:
        for cid in done.damaged:
            print(f"damaged  {cid.hex()}")
        print(
            f"fsck{' --deep' if args.deep else ''}: {report['chunks_checked']} chunks checked, "
            f"{report['chunks_damaged']} damaged, {report['chunks_missing']} missing, "
            f"{report['chunks_repaired']} repaired; {report['blobs']} blobs "
            f"({report['blobs_incomplete']} incomplete, {report['blobs_damaged']} damaged); "
            f"{report['names']} names ({report['names_dangling']} dangling)",
            file=sys.stderr,
        )
    if not report["clean"]:
        if not args.json:
            print(
                "casctl: error: the store is damaged"
                + ("" if args.repair_from else "; repair it with --repair-from HOST:PORT"),
                file=sys.stderr,
            )
        return 1
    return 0


async def cmd_gc(client: Client, args: argparse.Namespace) -> int:
    def on_progress(p: dict[str, int | float | str]) -> None:
        if not args.quiet and not args.json and sys.stderr.isatty():
            print(
                f"\rgc: {p.get('phase')}: {p.get('blobs_scanned', 0)} blobs, "
                f"{p.get('packs_rewritten', 0)} packs rewritten",
                end="",
                file=sys.stderr,
            )

    request: dict[str, Any] = {"dry_run": args.dry_run, "min_live": args.min_live}
    if args.grace is not None:
        request["grace_s"] = args.grace
    report = await client.call("gc", request, on_progress=on_progress)
    if args.json:
        print(json.dumps(report))
    elif not args.quiet:
        if sys.stderr.isatty():
            print(file=sys.stderr)
        verb = "would free" if args.dry_run else "freed"
        before, after = int(report["pack_bytes_before"]), int(report["pack_bytes_after"])
        print(
            f"gc{' --dry-run' if args.dry_run else ''}: {report['blobs_deleted']} of "
            f"{report['blobs_scanned']} blobs deleted, {report['names_removed']} layer names "
            f"removed, {report['chunks_deleted']} chunks ({human(int(report['bytes_freed']))}) "
            f"{verb}; {report['packs_rewritten']} packs rewritten, packs {human(before)} -> "
            f"{human(after)}; {float(report['seconds']):.2f}s",
            file=sys.stderr,
        )
    return 0


async def cmd_stats(client: Client, args: argparse.Namespace) -> int:
    stats = await client.stats()
    if args.json:
        print(json.dumps(stats))
    else:
        width = max(map(len, stats))
        for k, v in stats.items():
            print(f"{k:<{width}}  {v}")
    return 0


def _inlined(report: dict[str, Any]) -> str:
    """The small chunks that came in recipes (casd.recipeinline), for the sync summary."""
    n = int(report.get("chunks_inlined", 0))
    raw, wire = int(report.get("inline_raw_bytes", 0)), int(report.get("inline_wire_bytes", 0))
    return f"{n} small chunks in recipes ({human(raw)} as {human(wire)}), " if n else ""


def cmd_sync(args: argparse.Namespace) -> int:
    if args.all and args.names:
        raise UserError("give NAMEs or --all, not both")
    if not args.all and not args.names:
        raise UserError("nothing to sync: give NAMEs, or --all for every name SRC has")
    src_token = args.src_token or args.token
    dst_token = args.dst_token or args.token
    start = time.perf_counter()
    with _ProgressBar("sync", None, not args.quiet and not args.json) as bar:
        last = {"bytes_done": 0}

        def on_progress(p: dict[str, int | float | str]) -> None:
            done = int(p.get("bytes_done", 0))
            bar.advance(max(0, done - last["bytes_done"]))
            last["bytes_done"] = done

        if args.via_client:
            import trio

            from casd.client import open_client
            from casd.replicate import relay_sync, resolve_names

            async def relay() -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
                async with (
                    open_client(args.src, token=src_token, tls_ca=args.tls_ca) as src,
                    open_client(args.dst, token=dst_token, tls_ca=args.tls_ca) as dst,
                ):
                    pairs = await resolve_names(src, args.names, args.all)
                    rep = await relay_sync(src, dst, pairs, dry_run=args.dry_run)
                    rep.wire_bytes = src.peer.wire_bytes + dst.peer.wire_bytes
                    return rep.as_dict(), rep.items

            report, items = trio.run(relay)
        else:
            # DST does the work: this side sends one request and prints its reports, on
            # a blocking socket (casd.blocking).
            from casd.blocking import connect

            with connect(args.dst, token=dst_token, tls_ca=args.tls_ca) as dst:
                done = dst.sync_from(
                    args.src,
                    token=src_token,
                    names=args.names,
                    all_names=args.all,
                    dry_run=args.dry_run,
                    on_progress=on_progress,
                )
                report, items = dict(done.report), list(done.items)
    seconds = time.perf_counter() - start
    report = {
        **report,
        "seconds": round(seconds, 4),
        "mode": "relay" if args.via_client else "direct",
    }
    if args.json:
        print(
            json.dumps(
                {**report, "items": [{"name": n, "digest": d, "action": a} for n, d, a in items]}
            )
        )
        return 0
    for name, digest, action in items:
        print(f"{action:<10} {digest}  {name}")
    sys.stdout.flush()  # items before the summary, also when both go to one terminal
    if not args.quiet:
        moved = int(report["bytes_raw_fetched"])
        wire = int(report["wire_bytes"])
        verb = "would move" if args.dry_run else "moved"
        print(
            f"sync {args.src} -> {args.dst}: {report['blobs']} blobs "
            f"({report['blobs_copied']} copied, {report['blobs_present']} present, "
            f"{report['blobs_unchanged']} unchanged); {verb} {report['chunks_fetched']} chunks, "
            f"{human(moved)}, {_inlined(report)}{report['chunks_reused']} chunks reused; "
            f"{human(wire)} on the wire in {seconds:.2f}s ({human(wire / max(seconds, 1e-9))}/s)",
            file=sys.stderr,
        )
        if int(report.get("chunks_delta", 0)):
            print(
                f"deltas: {report['chunks_delta']} chunks, {human(int(report['delta_raw_bytes']))} "
                f"as {human(int(report['delta_wire_bytes']))}, decoded in "
                f"{float(report['delta_decode_s']):.2f}s; the source served "
                f"{report.get('source_delta_batches', 0)} batches encoded and "
                f"{report.get('source_plain_batches', 0)} as stored "
                f"(encoding took {float(report.get('source_delta_encode_s', 0)):.2f}s)",
                file=sys.stderr,
            )
        if int(report.get("layers_streamed", 0)):
            print(
                f"layers: {report['layers_streamed']} with no old version here came as their "
                f"compressed bytes, {human(int(report['layer_stream_bytes']))}, as from a registry",
                file=sys.stderr,
            )
        if int(report.get("layers_deferred", 0)):
            print(
                f"layers: {report['layers_deferred']} serve from the layer cache now; their "
                "tars are stored in the background, for the next version's delta "
                "(`casctl stats`: oci_landings_pending)",
                file=sys.stderr,
            )
        if int(report.get("layers_whole", 0)):
            print(
                f"layers: {report['layers_whole']} made by Go's gzip came whole although an old "
                "version is here: on this link their bytes cross sooner than casd-gogzip would "
                "make them again",
                file=sys.stderr,
            )
        if int(report.get("chunk_delta_frames", 0)) or int(report.get("chunk_delta_fallbacks", 0)):
            print(
                f"deltas: {human(int(report.get('chunk_delta_raw', 0)))} of missing chunks came "
                f"as {human(int(report.get('chunk_delta_bytes', 0)))} of frames against their "
                f"old versions (the source spent "
                f"{float(report.get('source_chunk_delta_encode_s', 0)):.2f}s of CPU on them)"
                + (
                    f"; {report['chunk_delta_fallbacks']} fell back to plain chunks"
                    if int(report.get("chunk_delta_fallbacks", 0))
                    else ""
                ),
                file=sys.stderr,
            )
        if report.get("delta_choice"):
            print(f"delta choice: {report['delta_choice']}", file=sys.stderr)
        if int(report.get("blobs_as_delta", 0)):
            print(
                f"whole-blob deltas: {report['blobs_as_delta']} blobs came as "
                f"{human(int(report['blob_delta_bytes']))} of deltas against their old versions "
                f"(the source spent {float(report.get('source_blob_delta_encode_s', 0)):.2f}s "
                "of CPU encoding them)",
                file=sys.stderr,
            )
    return 0


COMMANDS = {
    "put": cmd_put,
    "get": cmd_get,
    "stat": cmd_stat,
    "ls": cmd_ls,
    "tag": cmd_tag,
    "rm": cmd_rm,
    "stats": cmd_stats,
    "fsck": cmd_fsck,
    "gc": cmd_gc,
    "oci": oci_cli.cmd_oci,
}


def _common_options(defaults: bool) -> argparse.ArgumentParser:
    # Accepted before and after the command. After it, defaults are suppressed so that
    # `casctl --server X put F` is not overridden by the subcommand's own default.
    def d(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        default=d(os.environ.get("CASD_SERVER", DEFAULT_LISTEN)),
        metavar="HOST:PORT",
        help=f"casd server to talk to (default: $CASD_SERVER or {DEFAULT_LISTEN})",
    )
    common.add_argument(
        "--token",
        default=d(os.environ.get("CASD_TOKEN")),
        help="access token, if the server requires one (default: $CASD_TOKEN)",
    )
    common.add_argument(
        "--tls-ca",
        default=d(os.environ.get("CASD_TLS_CA")),
        metavar="PEM",
        help="CAs to trust for tls://HOST:PORT servers (default: $CASD_TLS_CA, else the system's)",
    )
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=d(False),
        help="no progress bar and no summary on stderr",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    top = _common_options(defaults=True)
    common = _common_options(defaults=False)

    p = argparse.ArgumentParser(
        prog="casctl",
        description=(
            "Client of casd, the content-addressed storage daemon. Blobs are cut into "
            "content-defined chunks; only chunks the other side lacks cross the network."
        ),
        parents=[top],
    )
    p.add_argument("--version", action="version", version=f"casctl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "put",
        parents=[common],
        help="store a file or stdin; prints its digest",
        description="Store a blob. Only chunks the server lacks are sent; "
        "prints the blob's sha256 digest.",
    )
    s.add_argument("path", metavar="PATH|-", help="file to store, or - for standard input")
    s.add_argument("--name", help="also point this name at the blob")
    s.add_argument(
        "--base",
        metavar="OLD",
        help="a local older version the server holds: changed chunks travel as deltas "
        "against it (while that is faster than sending them whole)",
    )
    s.add_argument(
        "--no-compress",
        action="store_true",
        help="send chunks uncompressed (zstd is used when the server allows it)",
    )
    s.add_argument("--json", action="store_true", help="print one JSON object with the figures")

    s = sub.add_parser(
        "get",
        parents=[common],
        help="fetch a blob by name or digest",
        description="Fetch a blob. Chunks found in --seed files are not "
        "fetched. The result is verified against the digest before it "
        "replaces PATH.",
    )
    s.add_argument("ref", metavar="NAME|DIGEST")
    s.add_argument("-o", "--output", metavar="PATH", help="write here (default: stdout)")
    s.add_argument(
        "--seed",
        action="append",
        default=[],
        metavar="PATH",
        help="local file that may share chunks with the blob (repeatable)",
    )
    s.add_argument("--json", action="store_true", help="print one JSON object with the figures")

    s = sub.add_parser("stat", parents=[common], help="show a blob's digest, size and names")
    s.add_argument("ref", metavar="NAME|DIGEST")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("ls", parents=[common], help="list names and their digests")
    s.add_argument("prefix", nargs="?", default="", help="only names starting with this")
    s.add_argument(
        "-a",
        "--all",
        action="store_true",
        help="also names starting with '.' (casd's own, e.g. .oci/layer/DIGEST records)",
    )
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("tag", parents=[common], help="point NAME at a blob")
    s.add_argument("name", metavar="NAME")
    s.add_argument("ref", metavar="NAME|DIGEST", help="the blob, by digest or another name")

    s = sub.add_parser("rm", parents=[common], help="remove names")
    s.add_argument("names", nargs="+", metavar="NAME")

    s = sub.add_parser(
        "sync",
        parents=[common],
        help="replicate names and their blobs from SRC to DST",
        description="Replicate blobs between two casd servers: DST ends with the same names "
        "pointing at the same digests, every chunk verified on arrival. Only chunks DST lacks "
        "move. By default DST pulls from SRC directly (the data does not pass through this "
        "machine); --via-client relays through casctl for when DST cannot reach SRC. "
        "Where DST holds an older version under the same name (for an image, the same "
        "layer of its previous version) and the link is slow enough for it to pay, the "
        "chunks it lacks come as zstd frames against that version's bytes; the report says "
        "what was chosen and why (`delta choice`). "
        "Interrupted syncs resume: a re-run moves only what is still missing.",
    )
    s.add_argument("src", metavar="SRC", help="source server, HOST:PORT")
    s.add_argument("dst", metavar="DST", help="destination server, HOST:PORT")
    s.add_argument("names", nargs="*", metavar="NAME", help="names (or digests) to replicate")
    s.add_argument("--all", action="store_true", help="every name SRC has")
    s.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would move (blobs, chunks, bytes); change nothing",
    )
    s.add_argument(
        "--via-client",
        action="store_true",
        help="relay the data through casctl instead of DST pulling from SRC",
    )
    s.add_argument(
        "--src-token",
        default=os.environ.get("CASD_SRC_TOKEN"),
        help="token for SRC (default: $CASD_SRC_TOKEN, else --token)",
    )
    s.add_argument(
        "--dst-token",
        default=os.environ.get("CASD_DST_TOKEN"),
        help="token for DST (default: $CASD_DST_TOKEN, else --token)",
    )
    s.add_argument("--json", action="store_true", help="print one JSON object with the figures")

    s = sub.add_parser(
        "fsck",
        parents=[common],
        help="check the server's store; repair it from a peer",
        description="Check every chunk record against its checksum (--deep: every chunk "
        "against its BLAKE3 id and every blob against its sha256), every recipe against the "
        "index and every name. Exit status 1 when damage remains. --repair-from fetches "
        "damaged or missing chunks from a healthy server, verifies and rewrites them.",
    )
    s.add_argument("--deep", action="store_true", help="also re-hash every chunk and blob")
    s.add_argument("--repair-from", metavar="HOST:PORT", help="server to fetch good copies from")
    s.add_argument("--repair-token", help="token for the repair server (default: --token)")
    s.add_argument("--json", action="store_true", help="print one JSON object")

    s = sub.add_parser(
        "gc",
        parents=[common],
        help="delete blobs no name reaches; reclaim their space",
        description="Garbage collection on the running server, while pushes go on. Roots are "
        "the names (OCI images keep their configs, layers and layer records) and every blob "
        "committed within the grace period; a blob no root reaches is deleted, then every "
        "chunk no blob uses, then packs mostly dead are rewritten to free disk space.",
    )
    s.add_argument("--dry-run", action="store_true", help="report what would go; change nothing")
    s.add_argument(
        "--grace",
        type=float,
        metavar="SECONDS",
        help="spare blobs committed this recently, named or not (server default: 3600)",
    )
    s.add_argument(
        "--min-live",
        type=float,
        default=0.5,
        metavar="FRACTION",
        help="rewrite packs whose live fraction is below this (default: %(default)s; "
        "0 removes only packs with nothing live)",
    )
    s.add_argument("--json", action="store_true", help="print one JSON object with the figures")

    s = sub.add_parser("stats", parents=[common], help="show server and store counters")
    s.add_argument("--json", action="store_true")

    oci_cli.add_parsers(sub, common)
    return p


async def _run(args: argparse.Namespace) -> int:
    from casd.client import open_client

    compress = not getattr(args, "no_compress", False)
    async with open_client(
        args.server, token=args.token, compress=compress, tls_ca=args.tls_ca
    ) as client:
        return await COMMANDS[args.command](client, args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "sync":
            return cmd_sync(args)
        import trio

        return trio.run(_run, args)
    except CasdError as exc:
        print(f"casctl: error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"casctl: hint: {exc.hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("casctl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
