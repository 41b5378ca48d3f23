"""What a client reports when a server refuses it (its ERROR), cannot be reached, fails
TLS or hangs up: the exception casctl prints, with a hint where one helps. Shared by the
trio client (casd.client) and the blocking one (casd.blocking), so both say the same."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import casproto

from casd.errors import ConfigError, PeerError, PeerGone, PeerRefused

if TYPE_CHECKING:
    import ssl


def refused(err: casproto.Error) -> PeerRefused:
    code = casproto.ErrorCode(err.code)
    exc = PeerRefused(int(code), code.name, err.message)
    if code == casproto.ErrorCode.NOT_FOUND:
        exc.hint = "`casctl ls` lists the names the server knows"
    elif code == casproto.ErrorCode.UNAUTHORIZED:
        exc.hint = "pass the server's token with --token or CASD_TOKEN"
    elif code == casproto.ErrorCode.NO_SPACE:
        exc.hint = (
            "the server's disk is full; nothing partial became visible, retry after freeing space"
        )
    return exc


def unreachable(address: str, exc: OSError | None) -> PeerError:
    """Connecting failed with ``exc``, or (None) timed out."""
    if exc is None:
        return PeerError(f"cannot connect to casd at {address}: timed out")
    err = PeerError(f"cannot connect to casd at {address}: {exc.strerror or exc}")
    err.hint = "is `casd serve` running there? set the address with --server or CASD_SERVER"
    return err


def tls_context(tls_ca: str | None) -> ssl.SSLContext:
    """A client's TLS context, trusting ``tls_ca`` (default: $CASD_TLS_CA, else the
    system's CAs). Raises ConfigError when the CA file is unusable."""
    import ssl  # here: a plain connection need not load it

    cafile = tls_ca or os.environ.get("CASD_TLS_CA") or None
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS CA file {cafile}: {exc}") from exc


def tls_failed(address: str, cause: BaseException) -> PeerError:
    err = PeerError(f"TLS with casd at {address} failed: {cause}")
    err.hint = (
        "check that the server runs with --tls-cert, and pass its CA with --tls-ca or CASD_TLS_CA"
    )
    return err


def hung_up(address: str) -> PeerGone:
    """The server closed the connection before answering the handshake."""
    err = PeerGone(f"{address} closed the connection during the handshake")
    if not address.startswith("tls://"):
        err.hint = "if the server runs with --tls-cert, connect to tls://HOST:PORT"
    return err
