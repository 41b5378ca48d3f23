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
  :mod:`casd.tcpinfo`), the most it was seen to deliver lately, and whether the sender
  was keeping the link busy when it was taken. A sample the kernel marks
  application-limited means the link was waiting for us, not the other way round: then
  sending is not the bottleneck, nothing a delta saves on the wire shortens the transfer, and its
  CPU only lengthens it. Likewise when the sender spends most of its time waiting for
  the receiver's window (the receiver, not the link, sets the pace): such samples do not
  count as the link's rate either.

The receiver's decode time is not seen from here; it is counted as ``DECODE_SHARE`` of
the encode time (decoding against a prefix does not index it, and measured 0.3-0.5x
the encode time across the benchmark corpus).

Before anything is measured the first batch is served as deltas (the only way to learn
what they save), and while plain chunks are chosen one batch in ``explore_every`` goes
as deltas, so a change of data or link is noticed (not on a link where they could not
pay even if they saved every byte). A batch's figures count as soon as it is encoded:
the next batches are chosen before it is sent. Where no link figure exists at all (a
stream that is not TCP), deltas are served, as the receiver asked for them.

Each sync is a connection of its own. What deltas save depends on the data, so each
connection measures that afresh; the link and the CPU a byte of encoding costs belong
to the client's host, so they are kept across its connections (:class:`HostFigures`).
A connection from a host whose link is known to be so fast that a delta could not pay
even if it saved every byte (1 Gbit/s here) does not encode its first batch to find out.
Two things that were tried and lost: keeping the savings too (a step whose deltas saved
little turned them off for the next image's, which saved a third); and measuring on 8
chunks of a batch instead of all of it (each read its bases alone where neighbours in a
batch share them, so the CPU per byte came out several times too high).
Not thread-safe: used from the event loop only.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

#: The receiver's decode CPU, as a share of the sender's encode CPU.
DECODE_SHARE = 0.5

#: Hosts whose measurements a server keeps, the least recently seen dropped first.
HOSTS_KEPT = 256

#: Weight of the newest batch in the running figures.
ALPHA = 0.3
#: What the link's rate estimate keeps of its maximum per new sample (see observe_link).
LINK_FADE = 0.9
#: When the sender spent more than this share of its busy time waiting for the
#: receiver's window, the receiver paces the transfer, not the link.
RWND_BOUND = 0.5


@dataclass
class _Ratio:
    """A ratio of two running sums, each decayed by ``1 - alpha`` per batch: a batch
    weighs by its size. A batch of one small chunk whose bases had to be read costs much
    CPU per byte; averaged per batch, one such batch outweighed sixty-four-chunk ones and
    turned deltas off over 20 Mbit/s."""

    alpha: float
    num: float = 0.0
    den: float = 0.0

    def add(self, num: float, den: float) -> None:
        self.num = self.num * (1 - self.alpha) + num
        self.den = self.den * (1 - self.alpha) + den

    @property
    def value(self) -> float | None:
        return self.num / self.den if self.den > 0 else None


@dataclass
class HostFigures:
    """What a client host's connections measured that outlives them: its link's delivery
    rate (bytes/s) and the CPU a raw byte of delta encoding cost."""

    link_rate: float | None = None
    cpu: _Ratio = field(default_factory=lambda: _Ratio(ALPHA))

    @property
    def cpu_per_raw(self) -> float | None:
        return self.cpu.value

    def could_pay(self) -> bool:
        """Whether a delta could pay on this link at all: if it saved every byte."""
        if self.link_rate is None or self.cpu_per_raw is None:
            return True
        return 1.0 / self.link_rate > self.cpu_per_raw * (1 + DECODE_SHARE)


@dataclass
class DeltaChooser:
    #: While plain chunks win, one batch in this many goes as deltas to re-measure.
    explore_every: int = 16
    #: Weight of the newest batch in each running figure.
    alpha: float = ALPHA
    #: The link's delivery rate in bytes per second, from samples taken while the
    #: sender kept it busy; ``app_limited``: the latest sample found it waiting for us.
    link_rate: float | None = None
    app_limited: bool = False
    link_known: bool = False
    #: Whether, lately, the sender mostly waited for the receiver's window.
    receiver_limited: bool = False
    batches: dict[bool, int] = field(default_factory=lambda: {True: 0, False: 0})
    #: The client host's figures, shared with its other connections.
    host: HostFigures = field(default_factory=HostFigures)
    _since_explore: int = 0
    _saved: _Ratio | None = None
    _cpu: _Ratio | None = None
    _chrono: tuple[int, int] | None = None  # the last (busy, rwnd-limited) microseconds
    _rwnd: _Ratio = field(default_factory=lambda: _Ratio(ALPHA))

    @property
    def saved_per_raw(self) -> float | None:
        """Bytes a delta saved on the wire, per raw byte of the chunks it encoded."""
        return self._saved.value if self._saved is not None else None

    @property
    def cpu_per_raw(self) -> float | None:
        """CPU seconds encoding took, per raw byte."""
        return self._cpu.value if self._cpu is not None else None

    def choose(self) -> bool:
        """Whether the next batch should be delta-encoded."""
        if self.saved_per_raw is None and self.host.could_pay():
            return True  # nothing measured yet: only a delta batch tells
        if self.pays():
            self._since_explore = 0
            return True
        self._since_explore += 1
        # Re-measuring is for a link slow enough that deltas might pay: on one where they
        # could not even if they saved every byte, it only spends CPU.
        if self._since_explore >= self.explore_every and self.host.could_pay():
            self._since_explore = 0
            return True
        return False

    def pays(self) -> bool:
        """Whether, on what was measured so far, a delta saves more time than it costs."""
        if self.saved_per_raw is None:
            return False  # not measured on this connection, and the host's link says no
        if self.link_known:
            if self.app_limited or self.receiver_limited or not self.link_rate:
                return False
            rate = self.link_rate
        elif self.host.link_rate is not None:
            # This connection has sent nothing yet (its first batches are chosen while
            # the first is read): its host's link is the best guess.
            rate = self.host.link_rate
        else:
            return True
        saved, cpu = self.saved_per_raw, self.cpu_per_raw
        assert saved is not None
        assert cpu is not None
        return saved / rate > cpu * (1 + DECODE_SHARE)

    def record(self, delta: bool, raw_bytes: int, saved_bytes: int = 0, cpu_s: float = 0.0) -> None:
        """A batch of ``raw_bytes`` chunk bytes went out; as deltas, it saved
        ``saved_bytes`` on the wire for ``cpu_s`` seconds of encoding."""
        self.batches[delta] += 1
        if not delta or raw_bytes <= 0:
            return
        if self._saved is None or self._cpu is None:
            self._saved, self._cpu = _Ratio(self.alpha), _Ratio(self.alpha)
        self._saved.add(max(saved_bytes, 0), raw_bytes)
        self._cpu.add(max(cpu_s, 0.0), raw_bytes)
        self.host.cpu.add(max(cpu_s, 0.0), raw_bytes)

    def describe(self) -> str:
        """What it chose and why, for the log."""

        def f(x: float | None, scale: float, unit: str) -> str:
            return "?" if x is None else f"{x * scale:.3g} {unit}"

        return (
            f"delta batches {self.batches[True]}, plain {self.batches[False]}; saved "
            f"{f(self.saved_per_raw, 100, '%')} of raw, encode {f(self.cpu_per_raw, 1e9, 'ns/B')}, "
            f"link {f(self.link_rate, 8e-6, 'Mbit/s')}, waiting for the receiver "
            f"{f(self._rwnd.value, 100, '%')} of the time (host: "
            f"{f(self.host.link_rate, 8e-6, 'Mbit/s')}, {f(self.host.cpu_per_raw, 1e9, 'ns/B')})"
        )

    def observe_link(
        self,
        rate: float,
        app_limited: bool,
        busy_us: int | None = None,
        rwnd_limited_us: int | None = None,
    ) -> None:
        """The kernel's latest delivery-rate sample for this connection (bytes/s), and
        its running counts of time busy and time held back by the receiver's window
        (casd.tcpinfo.Delivery)."""
        self.link_known = True
        self.app_limited = app_limited
        if busy_us is not None and rwnd_limited_us is not None:
            if self._chrono is not None:
                busy = busy_us - self._chrono[0]
                if busy > 0:
                    self._rwnd.add(max(rwnd_limited_us - self._chrono[1], 0), busy)
            self._chrono = (busy_us, rwnd_limited_us)
            share = self._rwnd.value
            self.receiver_limited = share is not None and share > RWND_BOUND
        # A sample taken while the receiver held the sender back measures the receiver.
        if not app_limited and not self.receiver_limited and rate > 0:
            # What the link can carry is the most it was seen to deliver: lower samples
            # come from a connection still in slow start (each sync opens one), or that
            # lost a packet. Averaged in, they made a 1 Gbit/s link look slow enough for
            # deltas to pay in syncs over it. The maximum fades (by LINK_FADE a
            # sample), so a link that became slower is seen to be.
            old = self.link_rate if self.link_rate is not None else self.host.link_rate
            self.link_rate = rate if old is None else max(rate, old * LINK_FADE)
            self.host.link_rate = self.link_rate


class Choosers:
    """Per client host, its :class:`HostFigures` (at most HOSTS_KEPT hosts, the least
    recently seen dropped first); a connection's chooser starts from them."""

    def __init__(self, limit: int = HOSTS_KEPT) -> None:
        self._limit = limit
        self._by_host: OrderedDict[str, HostFigures] = OrderedDict()

    def for_host(self, host: str) -> DeltaChooser:
        figures = self._by_host.pop(host, None) or HostFigures()
        self._by_host[host] = figures
        while len(self._by_host) > self._limit:
            self._by_host.popitem(last=False)
        return DeltaChooser(host=figures)
