"""The OCI pull API over HTTP/1.1: trio sockets driven through h11's state machine.

``casd serve --oci-listen HOST:PORT`` runs :func:`serve_oci` next to the casd protocol
listener. The server is read-only and knows nothing about the store: everything it serves
comes from an :class:`OciSource`, so it can be tested against dictionaries.

Routes (``<name>`` may contain ``/``; grammar from the distribution spec):

- ``GET /v2/`` → ``200 {}`` with ``Docker-Distribution-Api-Version: registry/2.0``.
- ``GET|HEAD /v2/<name>/manifests/<tag|digest>`` → the exact stored bytes with
  ``Content-Type`` = the manifest's media type, ``Docker-Content-Digest``,
  ``Content-Length`` and ``ETag``. ``Accept`` is ignored on purpose: the stored manifest
  is served whatever the client lists (distribution 2.8's 404 on a mismatch breaks
  clients that send repeated ``Accept`` lines).
- ``GET|HEAD /v2/<name>/blobs/<digest>`` → the bytes, streamed from the source in
  pieces with backpressure. ``Range`` on GET: one range (``a-b``, ``a-``, ``-n``) → 206
  with ``Content-Range``; an unsatisfiable one → 416 with ``Content-Range: bytes */size``.
  A multi-range request, or one that does not parse, is answered with the whole body
  (200): RFC 9110 §14.2 lets a server ignore Range, and every client copes with 200,
  whereas a multipart/byteranges body is something no registry client asks for.
  ``If-Range`` that does not match the ETag also gives the whole body.
- ``GET|HEAD /v2/<name>/tags/list[?n=&last=]`` → sorted tags, ``n``/``last``/``Link``
  as the spec says; ``n=0`` → an empty list and no ``Link``.
- Any other method on a ``/v2/`` path → 405 ``UNSUPPORTED`` (the push API is not
  implemented yet). Names and digests in the path are validated first, so a malformed
  one is a 400 whatever the method.
- Unknown paths → 404 with an OCI error body (code ``UNSUPPORTED``; ``referrers`` falls
  here too, which the spec defines as "API not supported").

Every error body is ``{"errors":[{"code","message","detail"}]}`` with one of the 14 codes
of the spec. ``Content-Encoding`` is never applied.

Connections: one task each, at most ``OciLimits.max_connections`` at a time (further
clients wait in the kernel's accept queue). Keep-alive is supported and
``Connection: close`` honoured (h11 does both). A request must arrive in
``header_timeout`` seconds and every write must make progress in ``send_timeout``
seconds, so a stalled client cannot pin a task. Garbage, such as the TLS ClientHello
skopeo sends before falling back to plain HTTP, is an h11 protocol error: it is answered
with a 400 when h11 still allows a response, and the connection is closed. Nothing a
client sends, and no failure of the source, ends the server: a connection task logs and
closes its own connection. A source that fails after the headers went out makes the
server drop the connection mid-body, the only honest signal once ``Content-Length`` is
on the wire.
"""

from __future__ import annotations

import errno
import http
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Protocol, cast
from urllib.parse import parse_qs, quote, unquote, urlsplit

import h11
import trio

from casd.errors import BlobMissing, CasdError, InvalidRef

log = logging.getLogger("casd.oci.http")

__all__ = [
    "OCI_ERROR_CODES",
    "ManifestHit",
    "OciLimits",
    "OciSource",
    "OciStats",
    "RangeNotSatisfiable",
    "serve_oci",
    "serve_oci_listeners",
]

# --- the source the server reads from ----------------------------------------------------


@dataclass(frozen=True)
class ManifestHit:
    """A manifest or index as stored: its exact bytes, media type and digest."""

    data: bytes
    media_type: str
    digest: str


class OciSource(Protocol):
    """What the server needs from whatever holds the images.

    Methods may raise :class:`casd.errors.CasdError`: ``BlobMissing`` is answered as a
    404 (the content vanished between two calls), ``InvalidRef`` as a 400, anything else
    as a 500 before the headers were sent, or by dropping the connection after.
    """

    async def has_repository(self, repo: str) -> bool:
        """Whether ``repo`` exists at all (decides NAME_UNKNOWN vs MANIFEST_UNKNOWN)."""
        ...

    async def manifest(self, repo: str, reference: str) -> ManifestHit | None:
        """The manifest ``reference`` (a tag or a ``sha256:`` digest) names in ``repo``."""
        ...

    async def blob_size(self, repo: str, digest: str) -> int | None:
        """The size of blob ``digest`` as served from ``repo``, None if it is not there."""
        ...

    def open_blob(
        self, repo: str, digest: str, start: int, end: int
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes | memoryview]]:
        """The bytes ``[start, end)`` of a blob, in pieces of bounded size."""
        ...

    async def tags(self, repo: str) -> list[str] | None:
        """The tags of ``repo`` in any order; None if the repository is unknown."""
        ...


# --- settings and counters -----------------------------------------------------------------


@dataclass(frozen=True)
class OciLimits:
    #: Connections served at once; more wait in the accept queue.
    max_connections: int = 256
    #: Seconds a client has to send a complete request head (also the keep-alive idle time).
    header_timeout: float = 30.0
    #: Seconds one write may wait for the client to read before the connection is dropped.
    send_timeout: float = 120.0
    #: Request body bytes read and discarded before answering; beyond this the answer
    #: carries ``Connection: close`` (nothing the server handles takes a body).
    max_discard: int = 64 * 1024
    #: Bytes asked of the socket per receive.
    receive_size: int = 64 * 1024


@dataclass
class OciStats:
    """Counters the daemon can expose. Mutated only from the trio thread."""

    connections: int = 0  # accepted in total
    active: int = 0  # open right now
    requests: int = 0  # complete request heads received
    errors: int = 0  # responses with status >= 400
    aborted: int = 0  # connections dropped: bad protocol, timeouts, failed sources
    bytes_sent: int = 0  # everything handed to sockets (heads and bodies)
    body_bytes: int = 0  # manifest and blob body bytes among them
    by_status: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- lexical rules -------------------------------------------------------------------------

#: The error codes the distribution spec allows in an error body.
OCI_ERROR_CODES = frozenset(
    {
        "BLOB_UNKNOWN",
        "BLOB_UPLOAD_INVALID",
        "BLOB_UPLOAD_UNKNOWN",
        "DIGEST_INVALID",
        "MANIFEST_BLOB_UNKNOWN",
        "MANIFEST_INVALID",
        "MANIFEST_UNKNOWN",
        "NAME_INVALID",
        "NAME_UNKNOWN",
        "SIZE_INVALID",
        "UNAUTHORIZED",
        "DENIED",
        "UNSUPPORTED",
        "TOOMANYREQUESTS",
    }
)

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_MAX_NAME = 255
_TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_DIGEST_RE = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
#: Algorithms the server accepts in a path, with the hex length of their digests.
_DIGEST_HEX = {"sha256": 64, "sha512": 128}
_HEX_RE = re.compile(r"[0-9a-f]+")

_ROUTE_BASE = re.compile(r"/v2/?")
_ROUTE_UPLOADS = re.compile(r"/v2/(.+)/blobs/uploads(?:/.*)?")
_ROUTE_CONTENT = re.compile(r"/v2/(.+)/(manifests|blobs)/([^/]+)")
_ROUTE_TAGS = re.compile(r"/v2/(.+)/tags/list")
_READ_METHODS = frozenset({"GET", "HEAD"})
_ALLOW = "GET, HEAD"
_RANGE_SPEC = re.compile(r"(\d{0,19})[ \t]*-[ \t]*(\d{0,19})")

_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def is_valid_name(name: str) -> bool:
    return len(name) <= _MAX_NAME and _NAME_RE.fullmatch(name) is not None


def is_valid_digest(digest: str) -> bool:
    """A well-formed digest of an algorithm the server supports."""
    m = _DIGEST_RE.fullmatch(digest)
    if m is None:
        return False
    hex_len = _DIGEST_HEX.get(m.group(1))
    return (
        hex_len is not None and len(m.group(2)) == hex_len and bool(_HEX_RE.fullmatch(m.group(2)))
    )


class RangeNotSatisfiable(ValueError):
    """A Range no byte of the body can satisfy (answered 416)."""


def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """The half-open byte range one ``Range`` value asks of a ``size``-byte body.

    None means "serve the whole body": a unit other than bytes, several ranges, or a
    value that does not parse (RFC 9110 lets a server ignore those).

    Raises:
        RangeNotSatisfiable: the range starts past the end, or is an empty suffix.
    """
    unit, sep, spec = value.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    m = _RANGE_SPEC.fullmatch(spec.strip())
    if m is None or not (m.group(1) or m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(0, size - n), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable
    end = min(size, int(last) + 1) if last else size
    return start, end


# --- responses -----------------------------------------------------------------------------


class _HttpError(Exception):
    """An error answer: status, OCI code, message, detail and extra headers."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = list(headers)


@dataclass
class _BlobBody:
    repo: str
    digest: str
    start: int
    end: int


@dataclass
class _Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    blob: _BlobBody | None = None  # streamed from the source instead of ``body``

    @property
    def length(self) -> int:
        return self.blob.end - self.blob.start if self.blob is not None else len(self.body)


def _json_response(status: int, obj: object, headers: Sequence[tuple[str, str]] = ()) -> _Response:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _Response(status, [("Content-Type", "application/json"), *headers], body)


def _error_response(err: _HttpError) -> _Response:
    entry = {"code": err.code, "message": err.message, "detail": err.detail or {}}
    return _json_response(err.status, {"errors": [entry]}, err.headers)


def _plain_error(status: int, text: str) -> _Response:
    return _Response(status, [("Content-Type", "text/plain; charset=utf-8")], text.encode())


class _Abort(Exception):
    """Drop the connection without finishing the response."""


class _Request:
    def __init__(self, event: h11.Request) -> None:
        self.method = event.method.decode("ascii", "replace").upper()
        self.target = event.target.decode("ascii", "replace")
        split = urlsplit(self.target)
        self.path = unquote(split.path)
        self.query = parse_qs(split.query, keep_blank_values=True)
        self.headers = event.headers

    def header_values(self, name: str) -> list[str]:
        key = name.lower().encode()
        return [v.decode("latin-1") for k, v in self.headers if k == key]

    def etag_matches(self, digest: str) -> bool:
        want = f'"{digest}"'
        for value in self.header_values("If-None-Match"):
            for tag in value.split(","):
                tag = tag.strip()
                if tag == "*" or tag.removeprefix("W/") == want:
                    return True
        return False


# --- the application: request → response ---------------------------------------------------


class _App:
    def __init__(self, source: OciSource) -> None:
        self.source = source

    async def respond(self, req: _Request) -> _Response:
        try:
            return await self._route(req)
        except _HttpError as err:
            return _error_response(err)
        except BlobMissing as exc:
            return _error_response(_HttpError(404, "BLOB_UNKNOWN", str(exc)))
        except InvalidRef as exc:
            return _error_response(_HttpError(400, "NAME_INVALID", str(exc)))
        except CasdError as exc:
            log.warning("oci: %s %s failed: %s", req.method, req.target, exc)
            return _plain_error(500, f"casd could not answer: {exc}\n")

    async def _route(self, req: _Request) -> _Response:
        path = req.path
        if _ROUTE_BASE.fullmatch(path):
            self._check_method(req)
            return _json_response(200, {})
        if m := _ROUTE_UPLOADS.fullmatch(path):
            self._check_name(m.group(1))
            self._check_method(req)
            raise _HttpError(404, "BLOB_UPLOAD_UNKNOWN", "this registry takes no uploads")
        if m := _ROUTE_CONTENT.fullmatch(path):
            name, kind, ref = m.groups()
            self._check_name(name)
            if kind == "manifests":
                self._check_reference(ref)
                self._check_method(req)
                return await self._manifest(req, name, ref)
            self._check_digest(ref)
            self._check_method(req)
            return await self._blob(req, name, ref)
        if m := _ROUTE_TAGS.fullmatch(path):
            self._check_name(m.group(1))
            self._check_method(req)
            return await self._tags(req, m.group(1))
        if path.startswith("/v2/") and req.method not in _READ_METHODS:
            self._check_method(req)
        raise _HttpError(404, "UNSUPPORTED", f"no such endpoint: {path}", {"path": path})

    @staticmethod
    def _check_method(req: _Request) -> None:
        if req.method not in _READ_METHODS:
            raise _HttpError(
                405,
                "UNSUPPORTED",
                f"{req.method} is not supported: this registry is read-only",
                {"method": req.method},
                [("Allow", _ALLOW)],
            )

    @staticmethod
    def _check_name(name: str) -> None:
        if not is_valid_name(name):
            raise _HttpError(400, "NAME_INVALID", "invalid repository name", {"name": name})

    @staticmethod
    def _check_digest(digest: str) -> None:
        if not is_valid_digest(digest):
            raise _HttpError(
                400, "DIGEST_INVALID", "invalid or unsupported digest", {"digest": digest}
            )

    def _check_reference(self, ref: str) -> None:
        if ":" in ref:
            self._check_digest(ref)
        elif not _TAG_RE.fullmatch(ref):
            # No manifest can have this tag; the spec has no TAG_INVALID code.
            raise _HttpError(404, "MANIFEST_UNKNOWN", "not a valid tag", {"tag": ref})

    async def _unknown(self, name: str, code: str, what: str, detail: dict[str, str]) -> _HttpError:
        if not await self.source.has_repository(name):
            return _HttpError(404, "NAME_UNKNOWN", f"repository {name} is unknown", {"name": name})
        return _HttpError(404, code, f"{what} is unknown to repository {name}", detail)

    async def _manifest(self, req: _Request, name: str, ref: str) -> _Response:
        try:
            hit = await self.source.manifest(name, ref)
        except BlobMissing:
            hit = None
        if hit is None:
            raise await self._unknown(name, "MANIFEST_UNKNOWN", f"manifest {ref}", {"ref": ref})
        headers = [
            ("Docker-Content-Digest", hit.digest),
            ("ETag", f'"{hit.digest}"'),
        ]
        if req.etag_matches(hit.digest):
            return _Response(304, headers)
        return _Response(200, [("Content-Type", hit.media_type), *headers], hit.data)

    async def _blob(self, req: _Request, name: str, digest: str) -> _Response:
        size = await self.source.blob_size(name, digest)
        if size is None:
            raise await self._unknown(name, "BLOB_UNKNOWN", f"blob {digest}", {"digest": digest})
        etag = f'"{digest}"'
        headers = [
            ("Docker-Content-Digest", digest),
            ("ETag", etag),
            ("Accept-Ranges", "bytes"),
        ]
        if req.etag_matches(digest):
            return _Response(304, headers)
        start, end, status = 0, size, 200
        ranges = req.header_values("Range")
        if req.method == "GET" and len(ranges) == 1:
            if_range = req.header_values("If-Range")
            if not if_range or if_range == [etag]:
                try:
                    wanted = parse_range(ranges[0], size)
                except RangeNotSatisfiable:
                    raise _HttpError(
                        416,
                        "SIZE_INVALID",
                        f"range {ranges[0]!r} is outside the blob's {size} bytes",
                        {"range": ranges[0], "size": size},
                        [*headers, ("Content-Range", f"bytes */{size}")],
                    ) from None
                if wanted is not None:
                    (start, end), status = wanted, 206
                    headers.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
        headers.insert(0, ("Content-Type", "application/octet-stream"))
        return _Response(status, headers, blob=_BlobBody(name, digest, start, end))

    async def _tags(self, req: _Request, name: str) -> _Response:
        tags = await self.source.tags(name)
        if tags is None:
            raise _HttpError(404, "NAME_UNKNOWN", f"repository {name} is unknown", {"name": name})
        tags = sorted(set(tags))
        last = req.query.get("last", [None])[-1]
        if last is not None and last != "":
            tags = [t for t in tags if t > last]
        n_text = req.query.get("n", [None])[-1]
        if n_text is None or n_text == "":
            return _json_response(200, {"name": name, "tags": tags})
        if not n_text.isdigit() or len(n_text) > 9:
            # The spec has no code for a bad page size; UNSUPPORTED is the closest.
            raise _HttpError(400, "UNSUPPORTED", "n must be a non-negative integer", {"n": n_text})
        n = int(n_text)
        page = tags[:n]
        headers: list[tuple[str, str]] = []
        if 0 < n < len(tags):
            link = f"/v2/{name}/tags/list?n={n}&last={quote(page[-1], safe='')}"
            headers.append(("Link", f'<{link}>; rel="next"'))
        return _json_response(200, {"name": name, "tags": page}, headers)


# --- one connection ------------------------------------------------------------------------


class _Connection:
    def __init__(
        self, stream: trio.abc.Stream, app: _App, stats: OciStats, limits: OciLimits
    ) -> None:
        self.stream = stream
        self.app = app
        self.stats = stats
        self.limits = limits
        self.h11 = h11.Connection(h11.SERVER)

    async def run(self) -> None:
        while True:
            try:
                event = await self._next_request()
                if event is None:
                    return
                self.stats.requests += 1
                req = _Request(event)
                close = await self._discard_body()
            except h11.RemoteProtocolError as exc:
                await self._refuse(exc)
                return
            resp = await self.app.respond(req)
            if close:
                resp.headers.append(("Connection", "close"))
            await self._send_response(req, resp)
            if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                return  # MUST_CLOSE, or a body we did not read
            self.h11.start_next_cycle()

    async def _receive(self) -> None:
        data = await self.stream.receive_some(self.limits.receive_size)
        self.h11.receive_data(bytes(data))  # b"" is EOF, which h11 turns into ConnectionClosed

    async def _next_request(self) -> h11.Request | None:
        """The next request head, or None when the client is done or too slow."""
        with trio.move_on_after(self.limits.header_timeout):
            while True:
                event = self.h11.next_event()
                if event is h11.NEED_DATA:
                    await self._receive()
                elif isinstance(event, h11.Request):
                    return event
                else:  # ConnectionClosed, or PAUSED (cannot happen between cycles)
                    return None
        if self.h11.their_state is not h11.IDLE or self.h11.trailing_data[0]:
            self.stats.aborted += 1
            log.info("oci: client sent no complete request in %.0fs", self.limits.header_timeout)
        return None

    async def _discard_body(self) -> bool:
        """Read and drop a request body; True if the connection must close afterwards."""
        if self.h11.they_are_waiting_for_100_continue:
            return True
        discarded = 0
        with trio.move_on_after(self.limits.header_timeout):
            while discarded <= self.limits.max_discard:
                event = self.h11.next_event()
                if event is h11.NEED_DATA:
                    await self._receive()
                elif isinstance(event, h11.Data):
                    discarded += len(event.data)
                else:
                    return not isinstance(event, h11.EndOfMessage)
        return True

    async def _send(self, event: h11.Event) -> None:
        if isinstance(event, h11.Data):
            pieces = self.h11.send_with_data_passthrough(event) or []
        else:
            pieces = [self.h11.send(event) or b""]
        for piece in pieces:
            if not piece:
                continue
            self.stats.bytes_sent += len(piece)  # handed to the socket, as body_bytes
            with trio.move_on_after(self.limits.send_timeout) as scope:
                await self.stream.send_all(piece)
            if scope.cancelled_caught:
                raise _Abort(f"client read nothing for {self.limits.send_timeout:.0f}s")

    async def _send_head(self, resp: _Response) -> None:
        self.stats.by_status[resp.status] = self.stats.by_status.get(resp.status, 0) + 1
        if resp.status >= 400:
            self.stats.errors += 1
        headers = [
            *resp.headers,
            ("Content-Length", str(resp.length)),
            ("Docker-Distribution-Api-Version", "registry/2.0"),
        ]
        reason = http.HTTPStatus(resp.status).phrase.encode()
        await self._send(h11.Response(status_code=resp.status, headers=headers, reason=reason))

    async def _send_response(self, req: _Request, resp: _Response) -> None:
        head_only = req.method == "HEAD" or resp.status == 304
        if resp.blob is None or head_only:
            await self._send_head(resp)
            if resp.body and not head_only:
                # Counted as handed to the socket: a client that has read the body must
                # find it in the stats (the send returns after the bytes may have arrived).
                self.stats.body_bytes += len(resp.body)
                await self._send(h11.Data(data=resp.body))
            await self._send(h11.EndOfMessage())
            return
        blob = resp.blob
        async with AsyncExitStack() as stack:
            try:
                pieces = await stack.enter_async_context(
                    self.app.source.open_blob(blob.repo, blob.digest, blob.start, blob.end)
                )
            except CasdError as exc:  # nothing sent yet: a proper answer is still possible
                if isinstance(exc, BlobMissing):
                    err = _HttpError(404, "BLOB_UNKNOWN", str(exc), {"digest": blob.digest})
                    alt = _error_response(err)
                else:
                    log.warning("oci: cannot open blob %s: %s", blob.digest, exc)
                    alt = _plain_error(500, f"casd could not read the blob: {exc}\n")
                await self._send_response(req, alt)
                return
            await self._send_head(resp)
            want, sent, began = blob.end - blob.start, 0, trio.current_time()
            async for piece in pieces:
                if not piece:
                    continue
                sent += len(piece)
                if sent > want:
                    raise _Abort(f"source gave more than the {want} bytes of {blob.digest}")
                # h11 passes the piece through untouched; a memoryview needs no copy.
                self.stats.body_bytes += len(piece)
                await self._send(h11.Data(data=cast(bytes, piece)))
            if sent != want:
                raise _Abort(f"source gave {sent} of the {want} bytes of {blob.digest}")
        await self._send(h11.EndOfMessage())
        log.debug(
            "oci: sent %s [%d, %d) in %.3fs",
            blob.digest,
            blob.start,
            blob.end,
            trio.current_time() - began,
        )

    async def _refuse(self, exc: h11.RemoteProtocolError) -> None:
        """Answer a request h11 could not parse, if h11 still allows an answer."""
        self.stats.aborted += 1
        log.debug("oci: bad request from client: %s", exc)
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status = exc.error_status_hint if 400 <= exc.error_status_hint < 600 else 400
        resp = _plain_error(status, f"bad request: {exc}\n")
        resp.headers.append(("Connection", "close"))
        try:
            await self._send_head(resp)
            await self._send(h11.Data(data=resp.body))
            await self._send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            pass


async def _serve_connection(
    app: _App, stats: OciStats, limits: OciLimits, stream: trio.abc.Stream
) -> None:
    stats.connections += 1
    stats.active += 1
    try:
        await _Connection(stream, app, stats, limits).run()
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug("oci: client went away: %s", exc)
    except _Abort as exc:
        stats.aborted += 1
        log.info("oci: dropped a connection: %s", exc)
    except CasdError as exc:
        stats.aborted += 1
        log.warning("oci: dropped a connection mid-response: %s", exc)
    except Exception:  # one bad request must never end the server
        stats.aborted += 1
        log.exception("oci: unexpected failure serving a connection")
    finally:
        stats.active -= 1
        await trio.aclose_forcefully(stream)


# --- listeners -----------------------------------------------------------------------------


async def _accept_loop(
    listener: trio.SocketListener,
    slots: trio.Semaphore,
    handle: Callable[[trio.abc.Stream], Any],
) -> None:
    async with listener, trio.open_nursery() as connections:
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                slots.release()
                if exc.errno not in _ACCEPT_RESOURCE_ERRORS:
                    raise
                log.warning("oci: cannot accept a connection (%s); retrying", exc)
                await trio.sleep(0.1)
                continue
            except BaseException:
                slots.release()
                raise
            connections.start_soon(_release_after, slots, handle, stream)


async def _release_after(
    slots: trio.Semaphore, handle: Callable[[trio.abc.Stream], Any], stream: trio.abc.Stream
) -> None:
    try:
        await handle(stream)
    finally:
        slots.release()


def _bound(listeners: Sequence[trio.SocketListener]) -> list[tuple[str, int]]:
    out = []
    for lst in listeners:
        name = lst.socket.getsockname()
        out.append((str(name[0]), int(name[1])))
    return out


async def _serve(
    source: OciSource,
    listeners: Sequence[trio.SocketListener],
    stats: OciStats | None,
    limits: OciLimits | None,
    ready: Callable[[list[tuple[str, int]]], None],
) -> None:
    stats = stats if stats is not None else OciStats()
    limits = limits or OciLimits()
    slots = trio.Semaphore(limits.max_connections)
    handle = partial(_serve_connection, _App(source), stats, limits)
    bound = _bound(listeners)
    async with trio.open_nursery() as nursery:
        for lst in listeners:
            nursery.start_soon(_accept_loop, lst, slots, handle)
        for host, port in bound:
            log.info("oci: serving the OCI pull API on %s:%d", host, port)
        ready(bound)


async def serve_oci_listeners(
    source: OciSource,
    listeners: Sequence[trio.SocketListener],
    *,
    stats: OciStats | None = None,
    limits: OciLimits | None = None,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the OCI pull API on already bound listeners until cancelled.

    Each listener gets its own accept loop and nursery of connection tasks; the listeners
    are closed on exit. ``task_status.started`` gets the bound (host, port) pairs.
    """
    await _serve(source, listeners, stats, limits, task_status.started)


async def serve_oci(
    source: OciSource,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    stats: OciStats | None = None,
    limits: OciLimits | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` (0 picks a free port) and serve until cancelled.

    For ``await nursery.start(serve_oci, source, host, port)``: ``task_status.started``
    gets the (host, port) of the first bound socket. A host name that resolves to several
    addresses binds them all; with port 0 they may get different ports, so use
    :func:`serve_oci_listeners` to learn every one.

    Raises:
        OSError: the address cannot be bound.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    await _serve(source, listeners, stats, limits, lambda bound: task_status.started(bound[0]))
