"""Chunking: cut points are part of the format, pinned by golden vectors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from casd.chunking import DEFAULT_PARAMS, Chunker, ChunkerParams, chunk_id
from casd.errors import ConfigError

GOLDEN = Path(__file__).parent.parent / "data" / "chunker_golden.json"


def golden_input() -> bytes:
    """4 MiB of BLAKE3 XOF output (stable by specification) with repeated text inside."""
    noise = blake3.blake3(b"casd chunker golden input").digest(length=3 * 1024 * 1024)
    text = b"The quick brown fox jumps over the lazy dog. " * 23_000
    return noise[:1_500_000] + text + noise[1_500_000:]


def cuts(data: bytes) -> list[list[object]]:
    out: list[list[object]] = []
    offset = 0
    for view in Chunker().cut(data):
        out.append([offset, len(view), chunk_id(view).hex()])
        offset += len(view)
    return out


def test_cut_points_match_the_golden_vectors() -> None:
    expected = json.loads(GOLDEN.read_text())
    assert expected["params"] == DEFAULT_PARAMS.to_dict()
    assert cuts(golden_input()) == expected["chunks"]


def test_chunks_respect_the_size_bounds() -> None:
    sizes = [c[1] for c in cuts(golden_input())]
    assert all(DEFAULT_PARAMS.min <= s <= DEFAULT_PARAMS.max for s in sizes[:-1])
    assert sum(sizes) == len(golden_input())


@settings(max_examples=25)
@given(
    size=st.integers(0, 3_000_000),
    window_chunks=st.integers(4, 12),
    read_size=st.integers(1000, 2_000_000),
    seed=st.binary(min_size=1, max_size=8),
)
def test_stream_cutting_equals_buffer_cutting(
    size: int, window_chunks: int, read_size: int, seed: bytes
) -> None:
    data = blake3.blake3(seed).digest(length=size)
    chunker = Chunker()
    whole = [bytes(v) for v in chunker.cut(data)]
    window = window_chunks * DEFAULT_PARAMS.max
    views = list(chunker.cut_stream(Trickle(data, read_size), window=window))
    # Views stay valid after later windows were filled: compare only at the end.
    streamed = [bytes(v) for v in views]
    assert streamed == whole


class Trickle(io.RawIOBase):
    """A pipe that hands out at most ``step`` bytes per read."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = memoryview(data)
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self._step, len(self._data))
        b[:n] = self._data[:n]
        self._data = self._data[n:]
        return n


def test_invalid_parameters_are_refused() -> None:
    with pytest.raises(ConfigError):
        Chunker(ChunkerParams(min=1024, avg=512, max=4096))
    with pytest.raises(ConfigError):
        Chunker(ChunkerParams(algo="rabin"))


def make_golden() -> None:  # pragma: no cover - run by hand when the format changes
    GOLDEN.write_text(
        json.dumps({"params": DEFAULT_PARAMS.to_dict(), "chunks": cuts(golden_input())}, indent=0)
    )


if __name__ == "__main__":  # pragma: no cover
    make_golden()
