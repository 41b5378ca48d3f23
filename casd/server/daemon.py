"""`casd serve`: the daemon's entry point, listener and lifecycle.

Shutdown on SIGINT/SIGTERM is graceful, hypercorn-style: stop accepting first, then give
open connections ``grace`` seconds to finish their requests before cancelling them. A
push cut off by shutdown never becomes visible (its blob commits only at PUSH_END);
chunks it already stored stay, reusable by the retry.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from casd import DEFAULT_LISTEN, __version__
from casd.address import parse_hostport
from casd.auth import Scope, TokenTable, parse_token_lines
from casd.chunking import ChunkerParams
from casd.errors import CasdError, ConfigError
from casd.nursery import open_nursery
from casd.oci.landing import Landings
from casd.oci.layers import LayerCache, reencodes
from casd.server.service import ServerContext, handle_stream
from casd.storage.disk import DiskStore

log = logging.getLogger("casd")

# How long a thread running Python keeps the GIL while another waits for it (CPython's
# default is 5 ms). The daemon's worker threads make many short calls that release the
# GIL (zstd, hashing, LMDB, deflate) and must take it back after each: with the default,
# each such return can wait up to 5 ms behind the event loop or another worker. Measured
# on the OCI benchmark's pyapp steps over 100 Mbit/s (sum of three steps, casd path):
# 15.6 s at 5 ms, 14.5 s at 0.5 ms, 14.8 s at 1 ms, 15.6 s at 0.1 ms; delta decoding time
# on the receiver halved at 0.5 ms.
SWITCH_INTERVAL_S = 0.0005


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return os.path.join(base, "casd")


@dataclass(frozen=True)
class ServeConfig:
    data: str
    host: str
    port: int
    tokens: TokenTable = field(default_factory=TokenTable)
    insecure: bool = False
    level: int = 3
    grace: float = 10.0
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    # None: an existing store keeps its own; a new one gets the defaults.
    chunker: ChunkerParams | None = None
    # The OCI pull API (read-only, no tokens): off unless asked for.
    oci_listen: tuple[str, int] | None = None
    oci_cache_bytes: int = 8 * 1024**3
    deltas: bool = True
    # HOST:PORT of a casd the OCI API pulls through from (casd.server.mirror).
    upstream: str | None = None


def server_tls_context(cert: str, key: str | None) -> ssl.SSLContext:
    """TLS for incoming connections, from PEM files.

    Raises:
        ConfigError: the files cannot be read or do not match.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate {cert} / key {key}: {exc}") from exc
    return context


def parse_chunker(text: str) -> ChunkerParams:
    """``MIN:AVG:MAX`` in bytes.

    Raises:
        ConfigError: not three sizes, or sizes FastCDC cannot use.
    """
    try:
        lo, avg, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"bad --chunker {text!r}: expected MIN:AVG:MAX in bytes") from None
    params = ChunkerParams(min=lo, avg=avg, max=hi)
    params.validate()
    return params


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_tokens(tokens: Sequence[str], token_file: str | None) -> TokenTable:
    """Tokens from --token (admin), CASD_TOKEN (admin) and a token file (with scopes)."""
    pairs = [(t, Scope.ADMIN) for t in tokens if t]
    if env := os.environ.get("CASD_TOKEN"):
        pairs.append((env, Scope.ADMIN))
    if token_file:
        try:
            with open(token_file) as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"cannot read token file {token_file}: {exc.strerror}") from exc
        pairs.extend(parse_token_lines(text, token_file))
    return TokenTable.build(pairs)


async def serve(
    config: ServeConfig,
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until cancelled or signalled. Never returns normally.

    ``task_status.started`` gets the bound (host, port) pairs, so
    ``await nursery.start(serve, config)`` resolves once the daemon accepts connections.
    """
    if not is_loopback(config.host) and not config.tokens and not config.insecure:
        raise ConfigError(
            f"refusing to listen on non-loopback address {config.host} without a token: "
            "pass --token/--token-file (or CASD_TOKEN), or --insecure to allow anyone"
        )
    if (
        config.oci_listen is not None
        and not is_loopback(config.oci_listen[0])
        and config.tokens
        and not config.insecure
    ):
        raise ConfigError(
            f"refusing to serve the OCI pull API on non-loopback {config.oci_listen[0]}: it "
            "has no tokens, so anyone could read every image; use a loopback address or "
            "--insecure"
        )
    if config.upstream is not None and config.oci_listen is None:
        raise ConfigError(
            "--upstream is what the OCI pull API pulls through from: add --oci-listen"
        )
    store = await trio.to_thread.run_sync(
        partial(DiskStore, config.data, level=config.level, params=config.chunker)
    )
    try:
        cache = LayerCache(os.path.join(config.data, "oci-cache"), config.oci_cache_bytes)
        cache.checker = partial(reencodes, store)
        landings = Landings(store, cache)
        ctx = ServerContext(
            store=store,
            tokens=config.tokens,
            tls_ca=config.tls_ca,
            data_dir=config.data,
            oci_cache=cache,
            landings=landings,
            deltas=config.deltas,
        )
        tcp_listeners = await trio.open_tcp_listeners(config.port, host=config.host)
        bound = [lst.socket.getsockname()[:2] for lst in tcp_listeners]
        listeners: list[trio.abc.Listener[Any]] = list(tcp_listeners)
        if config.tls_cert:
            context = server_tls_context(config.tls_cert, config.tls_key)
            listeners = [trio.SSLListener(lst, context) for lst in tcp_listeners]
        stop = trio.Event()
        async with open_nursery() as outer:
            handlers = await outer.start(_run_handlers, stop)
            # Landings due from before a restart resume here; stopped with the handlers
            # (one interrupted is due again on the next start).
            background = trio.CancelScope()

            async def land() -> None:
                with background:
                    await landings.run()

            outer.start_soon(land)

            async with open_nursery() as accept:
                if config.oci_listen is not None:
                    # Read-only and stateless: stopped at once on shutdown, with accepting.
                    from casd.oci.http import serve_oci
                    from casd.oci.source import StoreSource

                    oci_host, oci_port = config.oci_listen
                    source = StoreSource(store, ctx.run, cache, landings)
                    if config.upstream is not None:
                        from casd.server.mirror import Mirror, MirrorSource, upstream_from

                        # Pulls run beside the connection handlers: a shutdown gives
                        # them the same grace.
                        upstream = upstream_from(config.upstream)
                        assert upstream is not None
                        source = MirrorSource(Mirror(ctx, upstream, handlers))
                    oci_bound = await accept.start(serve_oci, source, oci_host, oci_port)
                    log.info(
                        "OCI pull API at http://%s:%d/v2/%s",
                        *oci_bound[:2],
                        f" (pulling through from {config.upstream})" if config.upstream else "",
                    )
                accept.start_soon(
                    partial(
                        trio.serve_listeners,
                        partial(handle_stream, ctx),
                        listeners,
                        handler_nursery=handlers,
                    )
                )
                for host, port in bound:
                    log.info(
                        "casd %s ready: listening on %s:%d, data in %s",
                        __version__,
                        host,
                        port,
                        config.data,
                    )
                task_status.started(bound)
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        log.info(
                            "received %s: no new connections; %.0fs for open ones to finish",
                            signal.Signals(signum).name,
                            config.grace,
                        )
                        break
                accept.cancel_scope.cancel()
            handlers.cancel_scope.deadline = trio.current_time() + config.grace
            background.cancel()
            stop.set()
    finally:
        await trio.to_thread.run_sync(store.close)
        log.info("casd stopped")


async def _run_handlers(
    stop: trio.Event, *, task_status: trio.TaskStatus[trio.Nursery] = trio.TASK_STATUS_IGNORED
) -> None:
    # The nursery that owns connection handlers. It outlives the accept loop so shutdown
    # can stop accepting first, then wait for handlers until they finish or the deadline.
    async with open_nursery() as nursery:
        task_status.started(nursery)
        await stop.wait()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="casd",
        description="casd: content-addressed storage daemon with delta sync.",
    )
    p.add_argument("--version", action="version", version=f"casd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser(
        "serve",
        help="run the daemon",
        description=(
            "Serve a store over the casd protocol. The store is a directory of pack files "
            "and an LMDB index; it is created on first use. Stops gracefully on SIGINT or "
            "SIGTERM."
        ),
    )
    s.add_argument(
        "--data",
        default=os.environ.get("CASD_DATA") or default_data_dir(),
        help="store directory (default: $CASD_DATA or %(default)s)",
    )
    s.add_argument(
        "--listen",
        default=os.environ.get("CASD_LISTEN", DEFAULT_LISTEN),
        metavar="HOST:PORT",
        help="address to listen on; port 0 picks a free one (default: %(default)s)",
    )
    s.add_argument(
        "--token",
        action="append",
        default=[],
        help="accept clients presenting this token (repeatable; also CASD_TOKEN)",
    )
    s.add_argument(
        "--token-file",
        help="file of accepted tokens, one per line: TOKEN [read|write|admin] "
        "(admin when no scope is given; read: get/stat/ls; write: also put/tag/rm/sync)",
    )
    s.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback listen address without any token",
    )
    s.add_argument(
        "--compress-level",
        type=int,
        default=3,
        metavar="N",
        help="zstd level for chunks at rest, 0 to store raw (default: %(default)s)",
    )
    s.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="serve TLS with this certificate (chain); see README for making one",
    )
    s.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert (if separate)")
    s.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="CAs to trust for this daemon's own connections to tls:// sync and "
        "repair sources (default: $CASD_TLS_CA, else the system's)",
    )
    s.add_argument(
        "--chunker",
        metavar="MIN:AVG:MAX",
        help="chunk sizes in bytes for a NEW store (default 16384:65536:262144); an existing "
        "store keeps the sizes it was created with, and refuses others. Stores with "
        "different sizes still sync; they only dedup less between each other",
    )
    s.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on shutdown, how long open requests may run on (default: %(default)s)",
    )
    s.add_argument(
        "--oci-listen",
        metavar="HOST:PORT",
        help="also serve the OCI pull API (GET /v2/...) here, read-only, for skopeo, podman "
        "and containerd; an image named REPO:TAG is served as REPO:TAG",
    )
    s.add_argument(
        "--upstream",
        metavar="HOST:PORT",
        help="with --oci-listen: an image tag a client asks for and this store lacks is "
        "pulled from the casd at HOST:PORT as `casctl sync` would (deltas against what is "
        "here), and served as it lands, layers as their bytes arrive; its token from "
        "CASD_UPSTREAM_TOKEN",
    )
    s.add_argument(
        "--oci-cache",
        type=float,
        default=8.0,
        metavar="GIB",
        help="disk for re-encoded compressed layers, so a layer is re-encoded once "
        "(default: %(default)s GiB; 0 re-encodes on every pull)",
    )
    s.add_argument(
        "--no-delta",
        action="store_true",
        help="when syncing from another server, ask for chunks only, never deltas against "
        "what is held here (to compare; by default, where a blob's old version is here, "
        "the first chunks measure the link and, where that pays, the rest come as zstd "
        "frames against the old version's bytes around them; the source may also send "
        "single chunks as deltas where the link time they save exceeds their CPU)",
    )
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    f = sub.add_parser(
        "fsck",
        help="check a store directory offline (the daemon must not be running on it)",
        description="Check a store without a daemon: every chunk record against its "
        "checksum (--deep: against its id, and every blob against its sha256), every recipe "
        "and name. Exit status 1 when damage is found. To repair from a peer, run the "
        "daemon and use `casctl fsck --repair-from HOST:PORT`.",
    )
    f.add_argument("--data", default=os.environ.get("CASD_DATA") or default_data_dir())
    f.add_argument("--deep", action="store_true", help="also re-hash every chunk and blob")
    return p


def fsck_offline(data: str, deep: bool) -> int:
    try:
        with DiskStore(data, params=None, create=False) as store:
            result = store.check(deep=deep)
    except CasdError as exc:
        print(f"casd: error: {exc}", file=sys.stderr)
        return 1
    for cid in [*result.damaged, *result.missing]:
        print(f"damaged  {cid.hex()}")
    for digest in result.blobs_incomplete + result.blobs_damaged:
        print(f"blob     {digest}")
    for name in result.names_dangling:
        print(f"name     {name}")
    print(" ".join(f"{k}={v}" for k, v in result.as_dict().items()), file=sys.stderr)
    return 0 if result.clean else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "fsck":
        return fsck_offline(args.data, args.deep)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        host, port = parse_hostport(args.listen)
        chunker = parse_chunker(args.chunker) if args.chunker else None
        config = ServeConfig(
            data=os.path.abspath(args.data),
            host=host,
            port=port,
            tokens=load_tokens(args.token, args.token_file),
            insecure=args.insecure,
            level=args.compress_level,
            grace=args.grace,
            chunker=chunker,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_ca=args.tls_ca,
            oci_listen=parse_hostport(args.oci_listen, 5000) if args.oci_listen else None,
            oci_cache_bytes=int(args.oci_cache * 1024**3),
            deltas=not args.no_delta,
            upstream=args.upstream,
        )
        trio.run(serve, config)
    except CasdError as exc:
        print(f"casd: error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"casd: hint: {exc.hint}", file=sys.stderr)
        return 1
    except OSError as exc:  # binding failed: port in use, permission
        print(
            f"casd: error: cannot listen on {args.listen}: {exc.strerror or exc}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
