"""Choosing, batch by batch, whether delta-encoding pays.

A delta (SPEC §4.3) saves link time and spends encoding time. Which wins depends on the
link, the data and the CPU, so the sender measures instead of guessing: it serves each
batch of a WANT_DELTA either delta-encoded or as stored, times how fast each kind
delivers chunk bytes (raw bytes per second of the interval between two batches leaving,
which in a steady stream is the slower of producing and sending), and keeps to the
faster kind, trying the other now and then in case the link or the data changed.

On a slow link deltas deliver many raw bytes per wire byte and win; on a fast link where
encoding is slower than sending, sending chunks as stored wins, and the chooser settles
on it after two batches. Not thread-safe: one per connection, used from the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DeltaChooser:
    #: Every this-many batches, serve one the other way to keep its estimate fresh.
    explore_every: int = 8
    #: Weight of the newest measurement in each kind's running estimate.
    alpha: float = 0.4
    #: Raw bytes per second, per kind (True: delta), once measured.
    goodput: dict[bool, float] = field(default_factory=dict)
    batches: dict[bool, int] = field(default_factory=lambda: {True: 0, False: 0})
    _tried: set[bool] = field(default_factory=set)
    _since_explore: int = 0

    def choose(self) -> bool:
        """Whether the next batch should be delta-encoded."""
        for kind in (True, False):  # serve each kind once, deltas first
            if kind not in self._tried:
                self._tried.add(kind)
                return kind
        best = self._best()
        self._since_explore += 1
        if self._since_explore >= self.explore_every:
            self._since_explore = 0
            return not best
        return best

    def record(self, delta: bool, raw_bytes: int, seconds: float) -> None:
        """A batch of ``raw_bytes`` chunk bytes took ``seconds`` to go out."""
        self.batches[delta] += 1
        if raw_bytes <= 0:
            return
        rate = raw_bytes / max(seconds, 1e-6)
        old = self.goodput.get(delta)
        self.goodput[delta] = rate if old is None else old + self.alpha * (rate - old)

    def _best(self) -> bool:
        d, p = self.goodput.get(True), self.goodput.get(False)
        if d is None:
            return p is None
        if p is None:
            return True
        return d >= p
