"""Real registries for tests: Debian's docker-registry (distribution 2.8.2) on loopback,
anonymous or with htpasswd basic auth, and :class:`AuthProxy`, a small Python HTTP server
in front of it that adds the bearer-token flow, redirects blob downloads to a separate
"storage" listener, and can corrupt answers on purpose.

Everything listens on 127.0.0.1 with a free port and is stopped by PID (processes) or by
shutting the server down (threads).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.oci.images import CI_HINT, require_tool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(host: str, port: int, path: str, ok: set[int], deadline: float) -> bool:
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(host, port, timeout=1)
        try:
            conn.request("GET", path)
            if conn.getresponse().status in ok:
                return True
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.05)
    return False


# --- docker-registry -------------------------------------------------------------------------


@dataclass
class Registry:
    """A running docker-registry. ``host`` is "127.0.0.1:PORT"; ``url`` its http:// URL."""

    root: Path
    port: int
    users: dict[str, str] | None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def creds(self) -> tuple[str, str] | None:
        """The first user's (name, password), for pushing into an auth registry."""
        return next(iter(self.users.items())) if self.users else None

    @property
    def log(self) -> Path:
        return self.root / "registry.log"

    def start(self, timeout: float = 20.0) -> Registry:
        binary = require_tool("docker-registry")
        storage = self.root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "cache": {"blobdescriptor": "inmemory"},
                "filesystem": {"rootdirectory": str(storage)},
                "delete": {"enabled": True},
            },
            "http": {
                "addr": self.host,
                "secret": "casd-tests-not-a-secret",
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.users:
            htpasswd = require_tool("htpasswd")
            lines = []
            for user, password in self.users.items():
                p = subprocess.run(
                    [htpasswd, "-Bbn", user, password], capture_output=True, check=True
                )
                lines.append(p.stdout.decode().strip())
            (self.root / "htpasswd").write_text("\n".join(lines) + "\n")
            config["auth"] = {
                "htpasswd": {"realm": "casd-tests", "path": str(self.root / "htpasswd")}
            }
        # JSON is YAML: no YAML library needed.
        (self.root / "config.yml").write_text(json.dumps(config, indent=1))
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [binary, "serve", str(self.root / "config.yml")],
                stdout=logf,
                stderr=logf,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited early:\n{self.log.read_text()}")
            if _wait_http("127.0.0.1", self.port, "/v2/", {200, 401}, time.monotonic() + 0.2):
                return self
        self.stop()
        raise RuntimeError(f"docker-registry did not answer on /v2/:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@contextlib.contextmanager
def docker_registry(root: Path, users: Mapping[str, str] | None = None) -> Iterator[Registry]:
    """A docker-registry on 127.0.0.1:<free port> storing under ``root``; with ``users``
    (name -> password) it requires htpasswd basic auth. Stopped on exit."""
    root.mkdir(parents=True, exist_ok=True)
    if shutil.which("docker-registry") is None:
        raise RuntimeError(f"docker-registry is not installed: {CI_HINT}")
    registry = Registry(root, free_port(), dict(users) if users else None)
    for attempt in range(3):  # a free port can be taken between probe and bind
        try:
            registry.start()
            break
        except RuntimeError:
            if attempt == 2:
                raise
            registry.port = free_port()
    try:
        yield registry
    finally:
        registry.stop()


# --- proxy with bearer tokens, redirects and faults --------------------------------------

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
}
_REPO_PATH = re.compile(r"^/v2/(?P<repo>.+?)/(?P<kind>manifests|blobs|tags)/(?P<rest>[^?]*)")


@dataclass
class Seen:
    """One request a test server received."""

    method: str
    path: str
    headers: dict[str, list[str]]  # lowercase name -> values

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


@dataclass
class ProxyState:
    """What an :class:`AuthProxy` does; tests may change fields between requests."""

    #: "bearer": require a token from /token; "none": pass everything through.
    auth: str = "bearer"
    #: Users allowed at /token (name -> password); None = no credentials accepted.
    users: dict[str, str] | None = None
    #: Whether /token issues tokens to anonymous requests.
    anonymous: bool = True
    service: str = "test"
    token_field: str = "token"  # or "access_token"
    token_ttl: int = 300
    #: Redirect blob GETs to the storage listener (through ``redirect_hops`` hops there).
    redirect_blobs: bool = False
    redirect_hops: int = 1
    #: Flip one byte of these answers: blob digests, or "manifest" for every manifest.
    corrupt: set[str] = field(default_factory=set)
    #: Send this Docker-Content-Digest on manifest answers instead of the real one.
    fake_manifest_digest: str | None = None
    #: Drop Content-Type on manifest answers.
    drop_content_type: bool = False
    # --- records ---
    token_hits: int = 0
    token_requests: list[Seen] = field(default_factory=list)
    requests: list[Seen] = field(default_factory=list)
    storage_requests: list[Seen] = field(default_factory=list)
    tokens: dict[str, set[str]] = field(default_factory=dict)  # token -> scopes granted


def _headers(handler: BaseHTTPRequestHandler) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in handler.headers.items():
        out.setdefault(name.lower(), []).append(value)
    return out


def _basic_user(header: str | None, users: Mapping[str, str] | None) -> str | None:
    if not header or not users or not header.lower().startswith("basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:].strip()).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return user if users.get(user) == password else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class AuthProxy:
    """An HTTP front for ``upstream`` (host:port of an anonymous docker-registry) on
    127.0.0.1:<free port>, plus a second listener acting as blob storage on another port.

    With ``state.auth == "bearer"`` every /v2/ request without a valid token gets 401 and
    ``WWW-Authenticate: Bearer realm="http://HOST/token",service="test",scope="repository:
    REPO:pull"``; ``GET /token`` issues tokens (checking basic credentials against
    ``state.users``; anonymous ones if ``state.anonymous``). Authorized requests are relayed
    to the upstream (repeated headers kept). Records every request in ``state``.
    """

    def __init__(self, upstream: str, state: ProxyState | None = None) -> None:
        self.upstream = upstream
        self.state = state or ProxyState()
        self._lock = threading.Lock()
        self._front = _Server(("127.0.0.1", 0), self._front_handler())
        self._storage = _Server(("127.0.0.1", 0), self._storage_handler())
        self._threads = [
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            for s in (self._front, self._storage)
        ]
        for t in self._threads:
            t.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._front.server_address[1]}"

    @property
    def storage_host(self) -> str:
        return f"127.0.0.1:{self._storage.server_address[1]}"

    def close(self) -> None:
        for server in (self._front, self._storage):
            server.shutdown()
            server.server_close()
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> AuthProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- upstream ---

    def _fetch(
        self, method: str, path: str, headers: Mapping[str, list[str]]
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        host, port = self.upstream.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", self.upstream)
            for name, values in headers.items():
                if name in _HOP_BY_HOP or name in ("host", "authorization", "content-length"):
                    continue
                for value in values:
                    conn.putheader(name, value)
            conn.endheaders()
            resp = conn.getresponse()
            body = resp.read()
            return resp.status, resp.getheaders(), body
        finally:
            conn.close()

    # --- handlers ---

    def _front_handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy._front_request(self)

            def do_HEAD(self) -> None:
                proxy._front_request(self)

        return Handler

    def _storage_handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy._storage_request(self)

        return Handler

    def _send(
        self,
        h: BaseHTTPRequestHandler,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> None:
        h.send_response(status)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                h.send_header(name, value)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Connection", "close")
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def _error(
        self, h: BaseHTTPRequestHandler, status: int, code: str, extra: list[tuple[str, str]]
    ) -> None:
        body = json.dumps({"errors": [{"code": code, "message": code.lower()}]}).encode()
        self._send(h, status, [("Content-Type", "application/json"), *extra], body)

    def _front_request(self, h: BaseHTTPRequestHandler) -> None:
        st = self.state
        seen = Seen(h.command, h.path, _headers(h))
        parsed = urllib.parse.urlsplit(h.path)
        if parsed.path == "/token":
            self._token(h, seen, parsed.query)
            return
        with self._lock:
            st.requests.append(seen)
        m = _REPO_PATH.match(parsed.path)
        repo = m.group("repo") if m else None
        if st.auth == "bearer":
            auth = seen.header("authorization") or ""
            token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
            scope = f"repository:{repo}:pull" if repo else None
            with self._lock:
                granted = st.tokens.get(token) if token else None
            if granted is None or (scope is not None and scope not in granted):
                challenge = f'Bearer realm="http://{self.host}/token",service="{st.service}"'
                if scope:
                    challenge += f',scope="{scope}"'
                if token:
                    challenge += ',error="invalid_token"'
                self._error(h, 401, "UNAUTHORIZED", [("WWW-Authenticate", challenge)])
                return
        if m and m.group("kind") == "blobs" and st.redirect_blobs and h.command == "GET":
            target = f"http://{self.storage_host}/hop/{st.redirect_hops}/{repo}/{m.group('rest')}"
            self._send(h, 307, [("Location", target + "?sig=abc%2Cdef")], b"")
            return
        status, headers, body = self._fetch(h.command, h.path, seen.headers)
        if m and status == 200:
            kind, rest = m.group("kind"), m.group("rest")
            if kind == "manifests":
                if "manifest" in st.corrupt and body:
                    body = _flip(body)
                if st.fake_manifest_digest:
                    headers = [(k, v) for k, v in headers if k.lower() != "docker-content-digest"]
                    headers.append(("Docker-Content-Digest", st.fake_manifest_digest))
                if st.drop_content_type:
                    headers = [(k, v) for k, v in headers if k.lower() != "content-type"]
            elif kind == "blobs" and rest in st.corrupt and body:
                body = _flip(body)
        self._send(h, status, headers, body)

    def _token(self, h: BaseHTTPRequestHandler, seen: Seen, query: str) -> None:
        st = self.state
        params = urllib.parse.parse_qs(query)
        with self._lock:
            st.token_hits += 1
            st.token_requests.append(seen)
        auth = seen.header("authorization")
        user = _basic_user(auth, st.users)
        if auth is not None and user is None:
            self._error(h, 401, "UNAUTHORIZED", [("WWW-Authenticate", 'Basic realm="token"')])
            return
        if user is None and not st.anonymous:
            self._error(h, 401, "UNAUTHORIZED", [("WWW-Authenticate", 'Basic realm="token"')])
            return
        if params.get("service") != [st.service]:
            self._error(h, 400, "DENIED", [])
            return
        token = secrets.token_hex(16)
        with self._lock:
            st.tokens[token] = set(params.get("scope", []))
        body = json.dumps(
            {st.token_field: token, "expires_in": st.token_ttl, "issued_at": "2024-01-01T00:00:00Z"}
        ).encode()
        self._send(h, 200, [("Content-Type", "application/json")], body)

    def _storage_request(self, h: BaseHTTPRequestHandler) -> None:
        """/hop/N/REPO/DIGEST redirects (relatively) to /hop/N-1/…; /hop/0/… serves the
        blob, fetched anonymously from the upstream."""
        st = self.state
        seen = Seen(h.command, h.path, _headers(h))
        with self._lock:
            st.storage_requests.append(seen)
        m = re.match(r"^/hop/(\d+)/(.+)/(sha256:[0-9a-f]{64})(?:\?.*)?$", h.path)
        if not m:
            self._error(h, 404, "BLOB_UNKNOWN", [])
            return
        hops, repo, digest = int(m.group(1)), m.group(2), m.group(3)
        if hops > 1:
            self._send(h, 302, [("Location", f"/hop/{hops - 1}/{repo}/{digest}")], b"")
            return
        status, headers, body = self._fetch("GET", f"/v2/{repo}/blobs/{digest}", {})
        if status == 200 and digest in st.corrupt:
            body = _flip(body)
        keep = [(k, v) for k, v in headers if k.lower() in ("content-type",)]
        self._send(h, status, keep, body)


def _flip(body: bytes) -> bytes:
    i = len(body) // 2
    return body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1 :]


@contextlib.contextmanager
def auth_proxy(upstream: str, **state: Any) -> Iterator[AuthProxy]:
    """An :class:`AuthProxy` in front of ``upstream`` (host:port), closed on exit;
    keyword arguments set :class:`ProxyState` fields."""
    proxy = AuthProxy(upstream, ProxyState(**state))
    try:
        yield proxy
    finally:
        proxy.close()
