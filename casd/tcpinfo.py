"""The kernel's view of a TCP connection's link: its delivery rate (Linux TCP_INFO).

Linux keeps, per connection, the rate at which the peer acknowledged data over the most
recent round trip (``tcpi_delivery_rate``, since 4.9; the estimate BBR is built on), and
flags a sample taken while the application did not keep the link busy
(``tcpi_delivery_rate_app_limited``): such a sample says the sender was the bottleneck,
not the link. It also keeps, in microseconds since the connection began, how long it was
busy sending and how much of that it waited for the receiver's window
(``tcpi_busy_time``, ``tcpi_rwnd_limited``, since 4.10): a sender held back by the
window is paced by the receiver, not the link. casd's delta choice
(:mod:`casd.deltachoice`) uses all of these.
"""

from __future__ import annotations

import socket
import struct
import sys
from dataclasses import dataclass
from typing import Any

# struct tcp_info (include/uapi/linux/tcp.h): eight u8 fields, the eighth holding the
# app-limited bit in its lowest bit; tcpi_delivery_rate is the u64 at byte 160.
_APP_LIMITED_BYTE = 7
_DELIVERY_RATE = struct.Struct("=Q")
_DELIVERY_RATE_AT = 160
_NEEDED = _DELIVERY_RATE_AT + _DELIVERY_RATE.size
# tcpi_busy_time and tcpi_rwnd_limited: the u64s that follow it.
_CHRONO = struct.Struct("=QQ")
_CHRONO_AT = 168


@dataclass(frozen=True)
class Delivery:
    rate: float  # bytes per second
    app_limited: bool
    #: Microseconds, since the connection began, it was busy sending, and of those it
    #: waited for the receiver's window; None on kernels that do not say.
    busy_us: int | None = None
    rwnd_limited_us: int | None = None


# tcpi_rtt: the smoothed round-trip time in microseconds, the u32 at byte 68.
_RTT = struct.Struct("=I")
_RTT_AT = 68


def _tcp_info(stream: Any) -> bytes | None:
    if not sys.platform.startswith("linux"):
        return None
    while hasattr(stream, "transport_stream"):  # trio.SSLStream
        stream = stream.transport_stream
    sock = getattr(stream, "socket", None)
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        return bytes(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256))
    except OSError:
        return None


def rtt(stream: Any) -> float | None:
    """The kernel's smoothed round-trip time of the TCP connection under ``stream``, in
    seconds; None where there is none (not Linux, not TCP, or no sample yet)."""
    info = _tcp_info(stream)
    if info is None or len(info) < _RTT_AT + _RTT.size:
        return None
    (us,) = _RTT.unpack_from(info, _RTT_AT)
    return us / 1e6 if us else None


def delivery(stream: Any) -> Delivery | None:
    """The latest delivery-rate sample of the TCP connection under ``stream`` (a trio
    SocketStream, possibly inside SSLStreams), or None where there is none: not Linux,
    not TCP, or a kernel too old to report it."""
    info = _tcp_info(stream)
    if info is None or len(info) < _NEEDED:
        return None
    (rate,) = _DELIVERY_RATE.unpack_from(info, _DELIVERY_RATE_AT)
    busy = rwnd = None
    if len(info) >= _CHRONO_AT + _CHRONO.size:
        busy, rwnd = _CHRONO.unpack_from(info, _CHRONO_AT)
    return Delivery(float(rate), bool(info[_APP_LIMITED_BYTE] & 1), busy, rwnd)
