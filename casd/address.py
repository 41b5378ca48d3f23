"""Server addresses as casctl and casd take them (here, so that parsing one imports
neither the server nor trio)."""

from __future__ import annotations

from casd import DEFAULT_PORT
from casd.errors import ConfigError


def parse_hostport(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` or ``[v6]:PORT`` into (host, port).

    Raises:
        ConfigError: not an address.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or (host.count(":") and not host.startswith("[")):
        host, port_text = text, str(default_port)
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"bad address {text!r}: expected HOST:PORT") from None
    if not (0 <= port <= 65535) or not host:
        raise ConfigError(f"bad address {text!r}: expected HOST:PORT")
    return host, port
