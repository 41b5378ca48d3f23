"""A client for the OCI Distribution API (pull side), on trio through httpx.

The daemon uses it to import images: :func:`parse_reference` turns what the user typed
into an :class:`ImageRef`, and a :class:`RegistryClient` fetches manifests (exact bytes,
verified against their digest) and streams blobs with bounded memory, verifying size and
digest when the stream ends.

Authentication follows what registries ask for in ``WWW-Authenticate``: anonymous first,
HTTP basic with the user's credentials, or the bearer-token flow (token fetched from the
challenge's realm, cached per scope). Redirects are followed by this module, not by
httpx, so that ``Authorization`` never reaches another host than the registry (blob
downloads are often redirected to object storage).

Every failure is a :class:`RegistryError` whose message says what to do about it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import httpx
from casproto import ErrorCode

from casd.errors import UpstreamError, UserError
from casd.oci import media

# --- references ----------------------------------------------------------------------------

DOCKER_HUB: Final = "registry-1.docker.io"
_DOCKER_HUB_ALIASES: Final = frozenset({"docker.io", "index.docker.io", DOCKER_HUB})

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE: Final = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST_RE: Final = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[A-Za-z0-9=_-]+")
_HOST_RE: Final = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)
#: Digest algorithms this client can verify, with the length of their hex encoding.
_ALGORITHMS: Final = {"sha256": 64, "sha512": 128}


class BadReference(UserError, ValueError):
    """An image reference (REGISTRY/REPO:TAG or @DIGEST) is not well formed."""

    hint = "write images as HOST[:PORT]/REPO[:TAG] or HOST[:PORT]/REPO@sha256:HEX"


@dataclass(frozen=True)
class ImageRef:
    """A parsed image reference. ``digest`` wins over ``tag`` when both are given."""

    registry: str  # host[:port]; Docker Hub is "registry-1.docker.io"
    repository: str  # e.g. "library/debian"
    tag: str | None  # "latest" when neither tag nor digest was given
    digest: str | None  # "sha256:<hex>"

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest if there is one, else the tag."""
        if self.digest is not None:
            return self.digest
        assert self.tag is not None
        return self.tag

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out


def check_digest(digest: str) -> str:
    """``digest`` if it is a well-formed digest of an algorithm this client verifies.

    Raises:
        BadReference: malformed, or an algorithm other than sha256/sha512.
    """
    if not _DIGEST_RE.fullmatch(digest):
        raise BadReference(f"{digest!r} is not a digest (expected sha256:<64 hex digits>)")
    algorithm, encoded = digest.split(":", 1)
    length = _ALGORITHMS.get(algorithm)
    if length is None:
        raise BadReference(f"digest algorithm {algorithm!r} is not supported (use sha256)")
    if len(encoded) != length or not re.fullmatch(r"[0-9a-f]+", encoded):
        raise BadReference(
            f"{digest!r} is not a valid {algorithm} digest ({length} lowercase hex digits)"
        )
    return digest


def normalize_registry(host: str) -> str:
    """The host[:port] to talk to: Docker Hub's aliases become registry-1.docker.io."""
    return DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


def parse_reference(text: str) -> ImageRef:
    """Parse ``[HOST[:PORT]/]REPO[:TAG][@DIGEST]`` the way docker does.

    The first path component is a registry host if it contains '.' or ':' or is
    'localhost'; otherwise the image is on Docker Hub, where one-component names get the
    ``library/`` prefix. Without tag and digest the tag is ``latest``.

    Raises:
        BadReference: the reference is not well formed; the message says which part.
    """
    original = text
    text = text.strip()
    if not text:
        raise BadReference("the image reference is empty")
    if "://" in text:
        raise BadReference(
            f"{original!r}: write the image without a scheme (HOST/REPO:TAG); "
            "use --insecure for a plain-HTTP registry"
        )
    if any(c.isspace() for c in text):
        raise BadReference(f"{original!r}: an image reference cannot contain whitespace")

    digest: str | None = None
    if "@" in text:
        text, digest = text.split("@", 1)
        check_digest(digest)

    registry = DOCKER_HUB
    rest = text
    first, sep, remainder = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        if not _HOST_RE.fullmatch(first):
            raise BadReference(f"{original!r}: {first!r} is not a valid registry host[:port]")
        registry = normalize_registry(first)
        rest = remainder

    tag: str | None = None
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > last_slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise BadReference(
                f"{original!r}: tag {tag!r} is not valid (letters, digits, '_', '.', '-'; "
                "at most 128 characters, not starting with '.' or '-')"
            )
    if not rest:
        raise BadReference(f"{original!r}: the repository name is missing")
    if rest != rest.lower() and _NAME_RE.fullmatch(rest.lower()):
        raise BadReference(f"{original!r}: repository names must be lowercase ({rest.lower()!r})")
    if not _NAME_RE.fullmatch(rest):
        raise BadReference(
            f"{original!r}: {rest!r} is not a valid repository name (lowercase letters, "
            "digits and separators '.', '_', '__', '-' between path components)"
        )
    if registry == DOCKER_HUB and "/" not in rest:
        rest = f"library/{rest}"
    if len(registry) + 1 + len(rest) > 255:
        raise BadReference(f"{original!r}: the repository name is longer than 255 characters")
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef(registry, rest, tag, digest)


# --- errors --------------------------------------------------------------------------------


class RegistryError(UpstreamError):
    """A registry failed a request, or its answer could not be trusted.

    ``kind`` says what happened, for callers that react to it: one of the ``KIND_*``
    constants below. ``status`` is the HTTP status when there was one, ``oci_code`` the
    first code of the registry's OCI error body (e.g. ``MANIFEST_UNKNOWN``).
    """

    UNAUTHORIZED: Final = "unauthorized"  # 401, or the token endpoint refused
    DENIED: Final = "denied"  # 403
    MANIFEST_UNKNOWN: Final = "manifest-unknown"
    NAME_UNKNOWN: Final = "name-unknown"  # repository unknown
    BLOB_UNKNOWN: Final = "blob-unknown"
    NOT_FOUND: Final = "not-found"  # 404 without a recognised code
    TOO_MANY_REQUESTS: Final = "too-many-requests"
    TLS: Final = "tls"  # handshake or certificate failure
    CONNECT: Final = "connect"  # refused, DNS, unreachable
    TIMEOUT: Final = "timeout"
    PROTOCOL: Final = "protocol"  # not HTTP, broken response, redirect loop
    DIGEST_MISMATCH: Final = "digest-mismatch"
    SIZE_MISMATCH: Final = "size-mismatch"
    TOO_LARGE: Final = "too-large"
    BAD_RESPONSE: Final = "bad-response"  # malformed manifest, token or tag list
    HTTP: Final = "http"  # any other HTTP status

    _CODES: Final = {
        UNAUTHORIZED: ErrorCode.FORBIDDEN,
        DENIED: ErrorCode.FORBIDDEN,
        MANIFEST_UNKNOWN: ErrorCode.NOT_FOUND,
        NAME_UNKNOWN: ErrorCode.NOT_FOUND,
        BLOB_UNKNOWN: ErrorCode.NOT_FOUND,
        NOT_FOUND: ErrorCode.NOT_FOUND,
        TOO_MANY_REQUESTS: ErrorCode.BUSY,
        DIGEST_MISMATCH: ErrorCode.DIGEST_MISMATCH,
        SIZE_MISMATCH: ErrorCode.DIGEST_MISMATCH,
        TOO_LARGE: ErrorCode.TOO_LARGE,
        BAD_RESPONSE: ErrorCode.INVALID,
    }

    def __init__(
        self,
        message: str,
        kind: str,
        *,
        status: int | None = None,
        oci_code: str | None = None,
        hint: str | None = None,
    ) -> None:
        code = self._CODES.get(kind, ErrorCode.UNREACHABLE)
        # The hint is also in the message: only the message crosses the casd protocol.
        super().__init__(f"{message}; {hint}" if hint else message, int(code))
        self.kind = kind
        self.status = status
        self.oci_code = oci_code
        self.hint = hint


# --- WWW-Authenticate ----------------------------------------------------------------------

_TOKEN_CHARS: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TOKEN68: Final = re.compile(r"[A-Za-z0-9._~+/-]+=*")


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lowercase: "basic", "bearer", ...
    params: dict[str, str]  # parameter names lowercase


def parse_www_authenticate(values: Sequence[str]) -> list[Challenge]:
    """The challenges in one or more ``WWW-Authenticate`` header values (RFC 9110 §11.6.1):
    ``Scheme k=v, k="quoted, with \\"escapes\\""`` possibly several per header. Malformed
    remainders are skipped rather than raised: the caller only needs what it understands."""
    out: list[Challenge] = []
    for value in values:
        pos, n = 0, len(value)

        def skip_ws(p: int, value: str = value, n: int = n) -> int:
            while p < n and value[p] in " \t":
                p += 1
            return p

        current: Challenge | None = None
        while pos < n:
            pos = skip_ws(pos)
            if pos < n and value[pos] == ",":
                pos += 1
                continue
            m = _TOKEN_CHARS.match(value, pos)
            if not m:
                break  # garbage: stop parsing this header
            token, after = m.group(0), skip_ws(m.end())
            if current is not None and after < n and value[after] == "=":
                # another auth-param of the current challenge (or token68 padding)
                pos = skip_ws(after + 1)
                if pos < n and value[pos] == '"':
                    chars: list[str] = []
                    pos += 1
                    while pos < n and value[pos] != '"':
                        if value[pos] == "\\" and pos + 1 < n:
                            pos += 1
                        chars.append(value[pos])
                        pos += 1
                    pos += 1  # closing quote (or end)
                    current.params[token.lower()] = "".join(chars)
                else:
                    vm = _TOKEN_CHARS.match(value, pos)
                    current.params[token.lower()] = vm.group(0) if vm else ""
                    pos = vm.end() if vm else pos
                continue
            # a new challenge: scheme, then params or a token68
            current = Challenge(token.lower(), {})
            out.append(current)
            pos = after
            t68 = _TOKEN68.match(value, pos)
            if t68:
                tail = skip_ws(t68.end())
                if tail >= n or value[tail] == ",":
                    current.params["token68"] = t68.group(0)
                    pos = tail
    return out


# --- the client ----------------------------------------------------------------------------

_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS: Final = 5
CHUNK_SIZE: Final = 1 << 20
_ERROR_BODY_LIMIT: Final = 64 * 1024
_TOKEN_BODY_LIMIT: Final = 1 << 20
_TAGS_BODY_LIMIT: Final = 4 * 1024 * 1024
_MAX_TAG_PAGES: Final = 10_000


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return (url.scheme, url.host, url.port)


def _hasher(digest: str) -> Any:
    return hashlib.new(digest.split(":", 1)[0])


def _strip_params(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLError):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


class BlobStream:
    """The body of one blob, verified as it goes. Iterate it with ``async for``: chunks
    are at most ~1 MiB; the iteration ends normally only after the size and digest were
    checked, and raises :class:`RegistryError` (DIGEST_MISMATCH, SIZE_MISMATCH) instead
    of ending when they are wrong. Commit what you received only after the loop ended."""

    def __init__(
        self,
        response: httpx.Response,
        digest: str,
        expected_size: int | None,
        registry: str,
        chunk_size: int,
    ) -> None:
        self._response = response
        self._digest = digest
        self._hash = _hasher(digest)
        self._chunks = response.aiter_raw(chunk_size)
        self.expected_size = expected_size
        self.registry = registry
        #: The Content-Length the server announced, if any.
        self.content_length: int | None = None
        length = response.headers.get("content-length")
        if length is not None and length.isdigit():
            self.content_length = int(length)
        self.received = 0
        self.verified = False

    @property
    def digest(self) -> str:
        return self._digest

    @property
    def size(self) -> int | None:
        """The size the blob will have, if known in advance."""
        return self.expected_size if self.expected_size is not None else self.content_length

    def __aiter__(self) -> BlobStream:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            chunk = None
        except httpx.TimeoutException as exc:
            raise RegistryError(
                f"{self.registry} stopped sending blob {self._digest} after "
                f"{self.received} bytes (timed out)",
                RegistryError.TIMEOUT,
            ) from exc
        except httpx.TransportError as exc:
            raise RegistryError(
                f"the download of blob {self._digest} from {self.registry} broke off after "
                f"{self.received} bytes: {exc}",
                RegistryError.PROTOCOL,
            ) from exc
        if chunk is None:
            self._finish()  # raises if the size or digest is wrong
            raise StopAsyncIteration
        self.received += len(chunk)
        limit = self.size
        if limit is not None and self.received > limit:
            raise RegistryError(
                f"{self.registry} sent more than the {limit} bytes of blob {self._digest}",
                RegistryError.SIZE_MISMATCH,
            )
        self._hash.update(chunk)
        return bytes(chunk)

    def _finish(self) -> None:
        expected = self.size
        if expected is not None and self.received != expected:
            raise RegistryError(
                f"blob {self._digest} from {self.registry} has {self.received} bytes, "
                f"expected {expected}",
                RegistryError.SIZE_MISMATCH,
            )
        actual = f"{self._digest.split(':', 1)[0]}:{self._hash.hexdigest()}"
        if actual != self._digest:
            raise RegistryError(
                f"blob from {self.registry} does not match its digest: expected "
                f"{self._digest}, got {actual}",
                RegistryError.DIGEST_MISMATCH,
                hint="the registry or something between it and casd altered the data; retry",
            )
        self.verified = True

    async def read_all(self, limit: int) -> bytes:
        """The whole verified blob, if it is at most ``limit`` bytes (for configs)."""
        if self.size is not None and self.size > limit:
            raise RegistryError(
                f"blob {self._digest} has {self.size} bytes, more than the {limit} allowed",
                RegistryError.TOO_LARGE,
            )
        out = bytearray()
        async for chunk in self:
            out += chunk
            if len(out) > limit:
                raise RegistryError(
                    f"blob {self._digest} is larger than the {limit} bytes allowed",
                    RegistryError.TOO_LARGE,
                )
        return bytes(out)


class RegistryClient:
    """A connection pool to one registry, with its credentials and cached tokens.

    Use it as ``async with RegistryClient("127.0.0.1:5000", insecure=True) as rc:``.
    ``insecure`` means plain HTTP; there is no silent fallback between HTTP and HTTPS.
    ``ca_file`` adds trusted CAs for HTTPS (the system store is used otherwise).
    """

    def __init__(
        self,
        registry: str,
        *,
        insecure: bool = False,
        creds: tuple[str, str] | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 15.0,
        ca_file: str | None = None,
        trust_env: bool = True,
        chunk_size: int = CHUNK_SIZE,
        user_agent: str = "casd",
    ) -> None:
        self.registry = normalize_registry(registry)
        if not _HOST_RE.fullmatch(self.registry):
            raise BadReference(f"{registry!r} is not a registry host[:port]")
        self.insecure = insecure
        self.creds = creds
        self.chunk_size = chunk_size
        self.base = httpx.URL(f"{'http' if insecure else 'https'}://{self.registry}")
        verify: ssl.SSLContext | bool = False
        if not insecure:
            verify = ssl.create_default_context(cafile=ca_file)
        self._http = httpx.AsyncClient(
            follow_redirects=False,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            verify=verify,
            trust_env=trust_env,
            headers={"User-Agent": user_agent, "Accept-Encoding": "identity"},
        )
        #: What the registry asked for last: None (nothing yet), "basic" or "bearer".
        self._scheme: str | None = None
        self._bearer: Challenge | None = None
        self._tokens: dict[tuple[str, str, str], tuple[str, float]] = {}
        #: How many tokens were fetched from a token endpoint (for tests and logs).
        self.token_fetches = 0

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- public API --------------------------------------------------------------------

    async def ping(self) -> None:
        """GET /v2/: checks that the registry is there and speaks the API (auth aside)."""
        async with self._request("GET", "/v2/", repo=None, what="the registry API") as resp:
            await resp.aread()

    async def get_manifest(
        self, repo: str, reference: str, accept: Sequence[str] = media.ACCEPT
    ) -> tuple[bytes, str, str]:
        """The manifest or index ``repo:reference`` as ``(exact bytes, media type, sha256
        digest of the bytes)``. A digest reference, and a Docker-Content-Digest header,
        are verified against the bytes. The media type is the Content-Type (parameters
        stripped), else the document's own ``mediaType``.

        Raises:
            RegistryError: not found (MANIFEST_UNKNOWN / NAME_UNKNOWN), auth, transport,
                digest mismatch, larger than media.MAX_MANIFEST_SIZE, or not a manifest.
        """
        is_digest = ":" in reference
        if is_digest:
            check_digest(reference)
        elif not _TAG_RE.fullmatch(reference):
            raise BadReference(f"{reference!r} is not a valid tag")
        what = f"manifest {repo}{'@' if is_digest else ':'}{reference}"
        headers = {"Accept": ", ".join(accept)}
        try:
            data, content_type, header_digest = await self._get_manifest(
                repo, reference, what, headers
            )
        except RegistryError as exc:
            if exc.kind in (RegistryError.MANIFEST_UNKNOWN, RegistryError.NOT_FOUND):
                raise await self._explain_missing(repo, reference, what, exc) from exc
            raise

        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        for claimed, source in (
            (reference if is_digest else None, "requested"),
            (header_digest, "Docker-Content-Digest"),
        ):
            if claimed is None:
                continue
            claimed = claimed.strip()
            algorithm = claimed.split(":", 1)[0]
            if algorithm not in _ALGORITHMS:
                continue  # a header with an algorithm we cannot check proves nothing
            actual = (
                digest
                if algorithm == "sha256"
                else f"{algorithm}:" + hashlib.new(algorithm, data).hexdigest()
            )
            if actual != claimed:
                raise RegistryError(
                    f"{what} from {self.registry} does not match the {source} digest: "
                    f"expected {claimed}, got {actual}",
                    RegistryError.DIGEST_MISMATCH,
                    hint="the registry or something between it and casd altered the data",
                )

        media_type = content_type
        if media_type in ("", "application/json", "text/plain", "application/octet-stream"):
            media_type = self._document_media_type(data, what)
        return data, media_type, digest

    async def _get_manifest(
        self, repo: str, reference: str, what: str, headers: Mapping[str, str]
    ) -> tuple[bytes, str, str | None]:
        path = f"/v2/{repo}/manifests/{reference}"
        async with self._request("GET", path, repo=repo, what=what, headers=headers) as resp:
            limit = media.MAX_MANIFEST_SIZE
            length = resp.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise RegistryError(
                    f"{what} on {self.registry} has {length} bytes, more than the "
                    f"{limit} casd accepts",
                    RegistryError.TOO_LARGE,
                )
            body = bytearray()
            try:
                async for chunk in resp.aiter_raw(self.chunk_size):
                    body += chunk
                    if len(body) > limit:
                        raise RegistryError(
                            f"{what} on {self.registry} is larger than the {limit} bytes "
                            "casd accepts",
                            RegistryError.TOO_LARGE,
                        )
            except httpx.HTTPError as exc:
                raise self._transport_error(exc, what) from exc
            content_type = _strip_params(resp.headers.get("content-type"))
            header_digest = resp.headers.get("docker-content-digest")
        return bytes(body), content_type, header_digest

    async def _explain_missing(
        self, repo: str, reference: str, what: str, exc: RegistryError
    ) -> RegistryError:
        """Registries (distribution 2.8 among them) answer MANIFEST_UNKNOWN for unknown
        repositories too; the tag list tells the two apart and shows what does exist."""
        try:
            tags = await self.list_tags(repo)
        except RegistryError as probe:
            if probe.kind == RegistryError.NAME_UNKNOWN:
                return probe
            return exc
        shown = ", ".join(sorted(tags)[:10]) + (", ..." if len(tags) > 10 else "")
        kind = "digest" if ":" in reference else "tag"
        return RegistryError(
            f"{what} not found on {self.registry}: repository {repo} has no such {kind}"
            + (f" (its tags: {shown})" if tags else " (it has no tags)"),
            RegistryError.MANIFEST_UNKNOWN,
            status=exc.status,
            oci_code=exc.oci_code,
            hint="check the tag or digest",
        )

    @asynccontextmanager
    async def stream_blob(
        self, repo: str, digest: str, expected_size: int | None = None
    ) -> AsyncIterator[BlobStream]:
        """Open blob ``digest`` of ``repo`` for streaming; see :class:`BlobStream`.

        ``async with rc.stream_blob(repo, d, size) as blob: async for chunk in blob: ...``
        Memory stays bounded by the chunk size. Redirects to storage hosts are followed
        without the registry's Authorization header.
        """
        check_digest(digest)
        what = f"blob {digest} of {repo}"
        async with self._request("GET", f"/v2/{repo}/blobs/{digest}", repo=repo, what=what) as r:
            stream = BlobStream(r, digest, expected_size, self.registry, self.chunk_size)
            if (
                expected_size is not None
                and stream.content_length is not None
                and stream.content_length != expected_size
            ):
                raise RegistryError(
                    f"{what} on {self.registry} has {stream.content_length} bytes, "
                    f"the manifest says {expected_size}",
                    RegistryError.SIZE_MISMATCH,
                )
            yield stream

    async def fetch_blob(
        self, repo: str, digest: str, expected_size: int | None = None, *, limit: int
    ) -> bytes:
        """A whole small blob (a config), verified; refuses blobs over ``limit`` bytes."""
        async with self.stream_blob(repo, digest, expected_size) as blob:
            return await blob.read_all(limit)

    async def list_tags(self, repo: str, page_size: int | None = None) -> list[str]:
        """All tags of ``repo``, following ``Link: <…>; rel="next"`` pagination."""
        path: str | None = f"/v2/{repo}/tags/list"
        params = {"n": str(page_size)} if page_size else None
        tags: list[str] = []
        what = f"the tags of {repo}"
        for _ in range(_MAX_TAG_PAGES):
            if path is None:
                return tags
            async with self._request("GET", path, repo=repo, what=what, params=params) as resp:
                body = await self._read_limited(resp, _TAGS_BODY_LIMIT, what)
                link = resp.headers.get("link")
            try:
                doc = json.loads(body)
                page = doc.get("tags") or []
                if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                    raise ValueError("tags is not a list of strings")
            except (ValueError, AttributeError) as exc:
                raise RegistryError(
                    f"{self.registry} sent a malformed tag list for {repo}: {exc}",
                    RegistryError.BAD_RESPONSE,
                ) from exc
            tags.extend(page)
            path, params = self._next_link(link), None
        raise RegistryError(
            f"{self.registry} paginates the tags of {repo} endlessly", RegistryError.PROTOCOL
        )

    # --- internals ---------------------------------------------------------------------

    @staticmethod
    def _next_link(link: str | None) -> str | None:
        if not link:
            return None
        for part in link.split(","):
            m = re.match(r"\s*<([^>]*)>\s*;(.*)", part)
            if m and re.search(r'rel\s*=\s*"?next"?', m.group(2)):
                return m.group(1)
        return None

    def _document_media_type(self, data: bytes, what: str) -> str:
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(
                f"{what} from {self.registry} is not JSON: {exc}", RegistryError.BAD_RESPONSE
            ) from exc
        if isinstance(doc, dict):
            own = doc.get("mediaType")
            if isinstance(own, str) and own:
                return own
            if doc.get("schemaVersion") == 2:
                if "manifests" in doc:
                    return media.OCI_INDEX
                if "config" in doc:
                    return media.OCI_MANIFEST
            if doc.get("schemaVersion") == 1:
                raise RegistryError(
                    f"{what} on {self.registry} is a Docker schema 1 manifest, which casd "
                    "does not import",
                    RegistryError.BAD_RESPONSE,
                    hint="push the image again with a current docker, skopeo or buildah",
                )
        raise RegistryError(
            f"{what} from {self.registry} has no media type and is not an image manifest",
            RegistryError.BAD_RESPONSE,
        )

    async def _read_limited(self, resp: httpx.Response, limit: int, what: str) -> bytes:
        body = bytearray()
        try:
            async for chunk in resp.aiter_raw(self.chunk_size):
                body += chunk
                if len(body) > limit:
                    raise RegistryError(
                        f"{what}: {self.registry} sent more than {limit} bytes",
                        RegistryError.TOO_LARGE,
                    )
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, what) from exc
        return bytes(body)

    def _url(self, path: str) -> httpx.URL:
        return self.base.join(path)

    def _scope(self, repo: str | None) -> str | None:
        return f"repository:{repo}:pull" if repo is not None else None

    async def _auth_header(self, repo: str | None, what: str) -> str | None:
        """The Authorization to send up front, from what the registry asked before: once
        it asked for bearer tokens, a new scope gets its token without a 401 first."""
        if self._scheme == "basic" and self.creds is not None:
            return self._basic()
        if self._scheme == "bearer" and self._bearer is not None:
            key = self._token_key(self._bearer, repo)
            cached = self._tokens.get(key)
            if cached is None or cached[1] <= time.monotonic():
                if repo is None:
                    return None
                cached = await self._fetch_token(self._bearer, repo, what)
                self._tokens[key] = cached
            return f"Bearer {cached[0]}"
        return None

    def _basic(self) -> str:
        assert self.creds is not None
        user, password = self.creds
        raw = f"{user}:{password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def _token_key(self, challenge: Challenge, repo: str | None) -> tuple[str, str, str]:
        scope = self._scope(repo) or challenge.params.get("scope", "")
        return (challenge.params.get("realm", ""), challenge.params.get("service", ""), scope)

    @asynccontextmanager
    async def _request(
        self,
        method: str,
        path: str,
        *,
        repo: str | None,
        what: str,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """Send a request with auth and redirects handled; yields a 2xx streaming
        response (closed on exit) or raises RegistryError."""
        url = self._url(path)
        if params:
            url = url.copy_merge_params(dict(params))
        # A Link (pagination) may point anywhere: credentials go to the registry only.
        on_registry = _origin(url) == _origin(self.base)
        auth = await self._auth_header(repo, what) if on_registry else None
        retried_auth = False
        while True:
            resp = await self._send_following(method, url, headers or {}, auth, what)
            if resp.status_code == 401 and not retried_auth:
                retried_auth = True
                challenges = parse_www_authenticate(resp.headers.get_list("www-authenticate"))
                await self._discard(resp)
                new_auth = None
                if on_registry:
                    new_auth = await self._answer_challenge(challenges, repo, auth, what)
                if new_auth is not None:
                    auth = new_auth
                    continue
                raise self._unauthorized(what, challenges, sent=auth is not None)
            try:
                if resp.status_code == 401:
                    challenges = parse_www_authenticate(resp.headers.get_list("www-authenticate"))
                    raise self._unauthorized(what, challenges, sent=True)
                if not 200 <= resp.status_code < 300:
                    raise await self._status_error(resp, what, repo)
                yield resp
            finally:
                await resp.aclose()
            return

    async def _answer_challenge(
        self, challenges: list[Challenge], repo: str | None, sent: str | None, what: str
    ) -> str | None:
        """The Authorization to retry with, or None if there is nothing better to send."""
        by_scheme = {c.scheme: c for c in challenges}
        bearer = by_scheme.get("bearer")
        if bearer is not None and bearer.params.get("realm"):
            self._scheme, self._bearer = "bearer", bearer
            key = self._token_key(bearer, repo)
            self._tokens.pop(key, None)  # the one we sent (if any) was refused
            token, expires = await self._fetch_token(bearer, repo, what)
            self._tokens[key] = (token, expires)
            return f"Bearer {token}"
        if "basic" in by_scheme:
            self._scheme = "basic"
            if self.creds is not None and (sent is None or not sent.startswith("Basic ")):
                return self._basic()
        return None

    async def _fetch_token(
        self, challenge: Challenge, repo: str | None, what: str
    ) -> tuple[str, float]:
        realm = challenge.params["realm"]
        try:
            realm_url = httpx.URL(realm)
        except httpx.InvalidURL as exc:
            raise RegistryError(
                f"{self.registry} named an invalid token realm {realm!r}",
                RegistryError.BAD_RESPONSE,
            ) from exc
        if realm_url.scheme not in ("http", "https"):
            raise RegistryError(
                f"{self.registry} named a token realm that is not HTTP(S): {realm!r}",
                RegistryError.BAD_RESPONSE,
            )
        query: list[tuple[str, str | int | float | bool | None]] = []
        if "service" in challenge.params:
            query.append(("service", challenge.params["service"]))
        scopes = []
        if (own := self._scope(repo)) is not None:
            scopes.append(own)
        if (theirs := challenge.params.get("scope")) and theirs not in scopes:
            scopes.append(theirs)
        query.extend(("scope", s) for s in scopes)
        query.append(("client_id", "casd"))
        headers = {"Accept": "application/json"}
        if self.creds is not None:
            headers["Authorization"] = self._basic()
        request_url = realm_url.copy_merge_params(httpx.QueryParams(tuple(query)))
        token_what = f"a token for {what} from {realm_url.copy_with(query=None)}"
        started = time.monotonic()
        resp = await self._send_following("GET", request_url, headers, None, token_what)
        try:
            if resp.status_code in (401, 403):
                creds = (
                    "the credentials given with --creds were refused"
                    if self.creds
                    else ("anonymous access is not allowed")
                )
                raise RegistryError(
                    f"{self.registry} requires authentication for {what}: the token "
                    f"service {realm_url.host} answered HTTP {resp.status_code} ({creds})",
                    RegistryError.UNAUTHORIZED,
                    status=resp.status_code,
                    hint="pass valid credentials with --creds USER:PASS",
                )
            if resp.status_code != 200:
                raise await self._status_error(resp, token_what, None)
            body = await self._read_limited(resp, _TOKEN_BODY_LIMIT, token_what)
        finally:
            await resp.aclose()
        self.token_fetches += 1
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
            if not isinstance(token, str) or not token:
                raise ValueError("no token or access_token in it")
            expires_in = doc.get("expires_in", 60)
            if not isinstance(expires_in, int | float) or expires_in <= 0:
                expires_in = 60
        except (ValueError, AttributeError) as exc:
            raise RegistryError(
                f"the token service of {self.registry} sent a malformed answer: {exc}",
                RegistryError.BAD_RESPONSE,
            ) from exc
        # Renew a little early so a token does not expire between check and use.
        return token, started + max(float(expires_in) - 10.0, float(expires_in) / 2)

    async def _send_following(
        self,
        method: str,
        url: httpx.URL,
        headers: Mapping[str, str],
        auth: str | None,
        what: str,
    ) -> httpx.Response:
        """Send, following up to MAX_REDIRECTS redirects. ``auth`` goes only to the
        origin of ``url`` (the registry or the token realm), never to another host."""
        home = _origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            sent = dict(headers)
            if auth is not None and _origin(url) == home:
                sent["Authorization"] = auth
            request = self._http.build_request(method, url, headers=sent)
            try:
                resp = await self._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise self._transport_error(exc, what, url) from exc
            if resp.status_code not in _REDIRECTS:
                return resp
            location = resp.headers.get("location")
            await self._discard(resp)
            if not location:
                raise RegistryError(
                    f"{url.host} redirected {what} without a Location",
                    RegistryError.PROTOCOL,
                    status=resp.status_code,
                )
            try:
                url = url.join(location)
            except httpx.InvalidURL as exc:
                raise RegistryError(
                    f"{url.host} redirected {what} to an invalid URL {location!r}",
                    RegistryError.PROTOCOL,
                ) from exc
            if url.scheme not in ("http", "https"):
                raise RegistryError(
                    f"{what} was redirected to a non-HTTP URL {location!r}",
                    RegistryError.PROTOCOL,
                )
            if resp.status_code == 303:
                method = "GET"
        raise RegistryError(
            f"{what}: more than {MAX_REDIRECTS} redirects (last to {url.host})",
            RegistryError.PROTOCOL,
        )

    @staticmethod
    async def _discard(resp: httpx.Response) -> None:
        """Close a response we do not use; drain a small body so the connection can be
        reused, but never read much."""
        try:
            length = resp.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) <= 65536:
                await resp.aread()
        except httpx.HTTPError:
            pass
        finally:
            await resp.aclose()

    def _transport_error(
        self, exc: httpx.HTTPError, what: str, url: httpx.URL | None = None
    ) -> RegistryError:
        host = url.host if url is not None else self.registry
        where = (
            self.registry
            if url is None or _origin(url) == _origin(self.base)
            else (f"{url.host}:{url.port}" if url.port else url.host)
        )
        if isinstance(exc, httpx.TimeoutException):
            return RegistryError(
                f"{what}: {where} did not answer in time ({type(exc).__name__})",
                RegistryError.TIMEOUT,
                hint="check the registry address and the network; retry",
            )
        ssl_error = _ssl_cause(exc)
        text = str(exc) or type(exc).__name__
        if ssl_error is not None or "SSL" in text or "TLS" in text:
            detail = str(ssl_error) if ssl_error is not None else text
            if isinstance(ssl_error, ssl.SSLCertVerificationError) or "CERTIFICATE" in detail:
                return RegistryError(
                    f"{what}: the TLS certificate of {where} is not trusted: {detail}",
                    RegistryError.TLS,
                    hint="give the CA that signed it to casd, or check the host name",
                )
            return RegistryError(
                f"{what}: TLS handshake with {where} failed: {detail}",
                RegistryError.TLS,
                hint=f"if {where} serves plain HTTP, pass --insecure",
            )
        if isinstance(exc, httpx.ConnectError):
            refused = "refused" in text.lower() or "errno 111" in text.lower()
            return RegistryError(
                f"{what}: cannot connect to {where}: {text}",
                RegistryError.CONNECT,
                hint=(
                    "is the registry running, and is the port right?"
                    if refused
                    else "check the registry host name and the network"
                ),
            )
        if isinstance(exc, httpx.RemoteProtocolError) and not self.insecure:
            return RegistryError(
                f"{what}: {where} broke the HTTP exchange: {text}",
                RegistryError.PROTOCOL,
            )
        hint = None
        if isinstance(exc, httpx.RemoteProtocolError) and self.insecure:
            hint = f"if {host} serves HTTPS, drop --insecure"
        return RegistryError(
            f"{what}: talking to {where} failed: {text}", RegistryError.PROTOCOL, hint=hint
        )

    def _unauthorized(self, what: str, challenges: list[Challenge], *, sent: bool) -> RegistryError:
        schemes = ", ".join(c.scheme for c in challenges) or "no scheme offered"
        if sent and self.creds is not None:
            message = f"{self.registry} refused the credentials given with --creds for {what}"
            hint = "check the user name and password passed with --creds USER:PASS"
        elif sent:
            message = f"{self.registry} refused the token it issued for {what}"
            hint = "the account may lack pull access; pass credentials with --creds USER:PASS"
        else:
            message = f"{self.registry} requires authentication for {what} ({schemes})"
            hint = "pass credentials with --creds USER:PASS"
        return RegistryError(message, RegistryError.UNAUTHORIZED, status=401, hint=hint)

    async def _status_error(
        self, resp: httpx.Response, what: str, repo: str | None
    ) -> RegistryError:
        status = resp.status_code
        code, detail = None, ""
        body = b""
        try:
            async for chunk in resp.aiter_raw():
                body += chunk
                if len(body) > _ERROR_BODY_LIMIT:
                    break
            doc = json.loads(body[:_ERROR_BODY_LIMIT])
            errors = doc.get("errors") if isinstance(doc, dict) else None
            if isinstance(errors, list) and errors and isinstance(errors[0], dict):
                first = errors[0]
                code = first.get("code") if isinstance(first.get("code"), str) else None
                message = first.get("message")
                detail = message if isinstance(message, str) else ""
        except (httpx.HTTPError, ValueError, UnicodeDecodeError):
            pass
        said = f" ({code}: {detail})" if code and detail else (f" ({code})" if code else "")
        where = self.registry
        if status == 400 and self.insecure and b"HTTPS" in body[:1024]:
            return RegistryError(
                f"{where} expects HTTPS, but casd spoke plain HTTP to it ({what})",
                RegistryError.PROTOCOL,
                status=status,
                hint="drop --insecure for a registry that serves HTTPS",
            )
        if status == 404 or code in ("MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"):
            if code == "NAME_UNKNOWN":
                return RegistryError(
                    f"repository {repo} not found on {where}{said}",
                    RegistryError.NAME_UNKNOWN,
                    status=status,
                    oci_code=code,
                    hint="check the repository name (Docker Hub images need library/ or "
                    "a user name)",
                )
            if code == "MANIFEST_UNKNOWN":
                return RegistryError(
                    f"{what} not found on {where}{said}",
                    RegistryError.MANIFEST_UNKNOWN,
                    status=status,
                    oci_code=code,
                    hint="list the repository's tags to find the right one",
                )
            if code == "BLOB_UNKNOWN":
                return RegistryError(
                    f"{what} not found on {where}{said}; the image is incomplete there",
                    RegistryError.BLOB_UNKNOWN,
                    status=status,
                    oci_code=code,
                )
            return RegistryError(
                f"{what} not found on {where} (HTTP {status}{', ' + code if code else ''})",
                RegistryError.NOT_FOUND,
                status=status,
                oci_code=code,
                hint="check the repository name and the tag or digest",
            )
        if status == 403 or code == "DENIED":
            return RegistryError(
                f"{where} denied access to {what}{said}",
                RegistryError.DENIED,
                status=status,
                oci_code=code,
                hint="the account given with --creds lacks pull access to this repository",
            )
        if status == 429 or code == "TOOMANYREQUESTS":
            after = resp.headers.get("retry-after")
            return RegistryError(
                f"{where} is rate-limiting requests ({what}){said}",
                RegistryError.TOO_MANY_REQUESTS,
                status=status,
                oci_code=code,
                hint=f"retry after {after} seconds" if after else "retry later",
            )
        return RegistryError(
            f"{where} answered HTTP {status} for {what}{said}",
            RegistryError.HTTP,
            status=status,
            oci_code=code,
            hint="retry later" if status >= 500 else None,
        )
