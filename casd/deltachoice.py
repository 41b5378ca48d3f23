"""Choosing, batch by batch, whether delta-encoding pays.

A delta (SPEC §4.3) spends CPU at both ends to save bytes on the link. It pays only where
the link is what holds the transfer back, and there only when the link time a byte saves
is more than the CPU it costs:

    saved bytes / link rate  >  encode CPU + the receiver's decode CPU

The sender measures each side of that inequality instead of guessing:

- the bytes a delta batch saved and the CPU seconds its encoding took (thread CPU time,
  so waiting for the GIL or for a busy core does not count), per raw byte, as running
  averages over the delta batches served;
- the link: the kernel's own estimate of the connection's delivery rate (TCP_INFO, see
  :mod:`casd.tcpinfo`), and whether the sender was keeping the link busy when it was
  taken. A sample the kernel marks application-limited means the link was waiting for
  us, not the other way round: then sending is not the bottleneck, nothing a delta saves
  on the wire shortens the transfer, and its CPU only lengthens it.

The receiver's decode time is not seen from here; it is counted as ``DECODE_SHARE`` of
the encode time (decoding against a prefix does not index it, and measured 0.3-0.5x
the encode time across the benchmark corpus).

Before anything is measured the first batch is served as deltas (the only way to learn
what they save), and while plain chunks are chosen one batch in ``explore_every`` goes
as deltas, so a change of data or link is noticed. Such an *exploring* batch encodes only
its first ``EXPLORE_CHUNKS`` chunks: a batch of large chunks costs a tenth of a second
of CPU to encode whole, which on a fast link is the time the exploration was meant to
save. Where no link figure exists at all (a stream that is not TCP), deltas are served,
as the receiver asked for them.

What a connection measured outlives it (:class:`Choosers`): each sync is a new
connection, and one that started from nothing explored its first batch even where the
last sync from the same host had found that deltas do not pay.
Not thread-safe: used from the event loop only.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

#: The receiver's decode CPU, as a share of the sender's encode CPU.
DECODE_SHARE = 0.5

#: Chunks an exploring batch encodes as deltas; the rest of it goes plain.
EXPLORE_CHUNKS = 8

#: Hosts whose measurements a server keeps, the least recently seen dropped first.
HOSTS_KEPT = 256


@dataclass
class DeltaChooser:
    #: While plain chunks win, one batch in this many goes as deltas to re-measure.
    explore_every: int = 16
    #: Weight of the newest measurement in each running average.
    alpha: float = 0.3
    #: Bytes a delta saved on the wire, per raw byte of the chunks it encoded.
    saved_per_raw: float | None = None
    #: CPU seconds encoding took, per raw byte.
    cpu_per_raw: float | None = None
    #: The link's delivery rate in bytes per second, from samples taken while the
    #: sender kept it busy; ``app_limited``: the latest sample found it waiting for us.
    link_rate: float | None = None
    app_limited: bool = False
    link_known: bool = False
    batches: dict[bool, int] = field(default_factory=lambda: {True: 0, False: 0})
    #: Whether the last True from :meth:`choose` was to measure (encode a sample only:
    #: EXPLORE_CHUNKS) rather than because deltas pay.
    exploring: bool = False
    _since_explore: int = 0

    def choose(self) -> bool:
        """Whether the next batch should be delta-encoded; :attr:`exploring` says
        whether only a sample of it."""
        self.exploring = False
        if self.saved_per_raw is None:  # nothing measured yet: only a delta batch tells
            self.exploring = True
            return True
        if self.pays():
            self._since_explore = 0
            return True
        self._since_explore += 1
        if self._since_explore >= self.explore_every:
            self._since_explore = 0
            self.exploring = True
            return True
        return False

    def pays(self) -> bool:
        """Whether, on what was measured so far, a delta saves more time than it costs."""
        if not self.link_known:
            return True
        if self.app_limited or not self.link_rate:
            return False
        assert self.saved_per_raw is not None
        assert self.cpu_per_raw is not None
        return self.saved_per_raw / self.link_rate > self.cpu_per_raw * (1 + DECODE_SHARE)

    def record(self, delta: bool, raw_bytes: int, saved_bytes: int = 0, cpu_s: float = 0.0) -> None:
        """A batch of ``raw_bytes`` chunk bytes went out; as deltas, it saved
        ``saved_bytes`` on the wire for ``cpu_s`` seconds of encoding."""
        self.batches[delta] += 1
        if not delta or raw_bytes <= 0:
            return
        saved, cpu = max(saved_bytes, 0) / raw_bytes, max(cpu_s, 0.0) / raw_bytes
        if self.saved_per_raw is None or self.cpu_per_raw is None:
            self.saved_per_raw, self.cpu_per_raw = saved, cpu
        else:
            self.saved_per_raw += self.alpha * (saved - self.saved_per_raw)
            self.cpu_per_raw += self.alpha * (cpu - self.cpu_per_raw)

    def observe_link(self, rate: float, app_limited: bool) -> None:
        """The kernel's latest delivery-rate sample for this connection (bytes/s)."""
        self.link_known = True
        self.app_limited = app_limited
        if not app_limited and rate > 0:
            old = self.link_rate
            self.link_rate = rate if old is None else old + self.alpha * (rate - old)


class Choosers:
    """One :class:`DeltaChooser` per client host, kept across its connections (at most
    HOSTS_KEPT hosts)."""

    def __init__(self, limit: int = HOSTS_KEPT) -> None:
        self._limit = limit
        self._by_host: OrderedDict[str, DeltaChooser] = OrderedDict()

    def for_host(self, host: str) -> DeltaChooser:
        chooser = self._by_host.pop(host, None) or DeltaChooser()
        self._by_host[host] = chooser
        while len(self._by_host) > self._limit:
            self._by_host.popitem(last=False)
        return chooser
