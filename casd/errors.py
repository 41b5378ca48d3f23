"""The one exception hierarchy of casd.

Everything casd raises on purpose derives from :class:`CasdError`. Foreign exceptions
(``lmdb.Error``, ``OSError``, ``trio.BrokenResourceError``) are translated once, where
they enter casd, with ``raise ... from exc`` so the cause stays visible. Messages are
written for the person who has to act on them: what failed, on what, and what to do.
"""

from __future__ import annotations


class CasdError(Exception):
    """Root of every error casd raises on purpose."""

    #: A hint that tells the user what to do about it; ``casctl`` prints it after the message.
    hint: str | None = None


# --- storage -----------------------------------------------------------------------------


class StoreError(CasdError):
    """The store failed or found its data inconsistent."""


class ChunkMissing(StoreError, LookupError):
    """A chunk id is not in the store."""

    def __init__(self, chunk_id: bytes) -> None:
        super().__init__(f"chunk {chunk_id.hex()} is not in the store")
        self.chunk_id = chunk_id


class ChunkCorrupt(StoreError):
    """Stored or received chunk bytes do not match their id or checksum."""

    hint = "run `casctl fsck` on the store; repair the chunk from a healthy peer"

    def __init__(self, chunk_id: bytes, reason: str) -> None:
        super().__init__(f"chunk {chunk_id.hex()} is corrupt: {reason}")
        self.chunk_id = chunk_id
        self.reason = reason


class BlobMissing(StoreError, LookupError):
    """A blob digest or name is not in the store."""

    def __init__(self, ref: str) -> None:
        super().__init__(f"no blob named or addressed {ref!r}")
        self.ref = ref


class BlobIncomplete(StoreError):
    """A recipe names chunks the store does not hold, so the blob cannot be committed."""

    def __init__(self, digest: str, missing: int) -> None:
        super().__init__(f"blob {digest} cannot be committed: {missing} of its chunks are missing")
        self.digest = digest
        self.missing = missing


class DigestMismatch(StoreError):
    """Assembled bytes do not have the size or digest that was claimed for them."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"content does not match its digest: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class PackBroken(StoreError):
    """A pack file write failed; that pack takes no more data."""


class NoSpace(StoreError):
    """The disk under the store is full. Nothing partial became visible."""

    hint = "free disk space under the store's data directory and retry; stored chunks are kept"


class StoreFormatError(StoreError):
    """The data directory was written by an incompatible casd, or is not a casd store."""


class ChunkerParamsMismatch(StoreFormatError):
    """The store was created with other chunker parameters than the ones requested."""


class InvalidRef(CasdError, ValueError):
    """A name or digest is not well formed."""


# --- configuration and peers ----------------------------------------------------------


class ConfigError(CasdError):
    """casd was started or invoked with settings that cannot work."""


class PeerError(CasdError):
    """The other end of a connection failed us."""


class PeerGone(PeerError):
    """The peer closed the connection or the network broke it."""


class PeerRefused(PeerError):
    """The peer answered a request with an error frame."""

    def __init__(self, code: int, code_name: str, message: str) -> None:
        super().__init__(f"server refused: {message} ({code_name})")
        self.code = code
        self.code_name = code_name
        self.remote_message = message


class UpstreamError(PeerError):
    """A server we contacted on a client's behalf (a sync source) failed.

    ``code`` is the protocol error code to pass on: the upstream's own code when it
    refused, UNREACHABLE (16) when it could not be reached or broke off.
    """

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Forbidden(CasdError):
    """The client's token does not grant what its request needs."""


class UserError(CasdError):
    """A mistake in how casctl was invoked; printed as one line, exit status 1."""
