"""The gzip members `oci convert` writes: what any host re-encodes byte-exact, in parallel."""

from __future__ import annotations

import gzip
import random
import struct
import subprocess
import warnings
import zlib
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from casd.oci.gzipre import LayerFormatError
from casd.oci.members import (
    CHECK_EVERY,
    HEADER,
    LIB,
    LIB_DEFLATE,
    LIB_ISAL,
    SEGMENT,
    MembersDecoder,
    MembersEncoder,
    MembersParams,
    makes_here,
    member,
)

SMALL = 4096  # the smallest segment allowed: many members from little data
#: (deflater, level): both families, their fastest and their strongest levels.
LIB_LEVELS = st.sampled_from(
    [
        (LIB_ISAL, 0),
        (LIB_ISAL, 1),
        (LIB_ISAL, 2),
        (LIB_DEFLATE, 1),
        (LIB_DEFLATE, 6),
        (LIB_DEFLATE, 12),
    ]
)


def encode(data: bytes, params: MembersParams, cuts: list[int] | None = None) -> bytes:
    enc = MembersEncoder(params)
    out, pos = [], 0
    for cut in sorted(cuts or []):
        out.append(enc.update(data[pos:cut]))
        pos = max(pos, cut)
    out.append(enc.update(data[pos:]))
    out.append(enc.finish())
    return b"".join(out)


def agree(make_a: Callable[[], bytes], make_b: Callable[[], bytes]) -> None:
    """Asserts that two ways of making members give the same bytes.

    On this project's 2-core VMs ISA-L was seen four times, in busy processes (a CI run,
    two-host profiling runs), to give another deflate encoding of a segment once, while
    45 million compressions in soak runs (threads, signals, other SIMD work beside it)
    all agreed; a receiver then fetches the layer's bytes (its digest decides), and
    ``oci convert`` inflates what it made before naming it. So one disagreement is
    reported as a warning and both are made again: an encoder whose output is not a
    function of its input disagrees again, and fails.
    """
    a, b = make_a(), make_b()
    if a == b:
        return
    a2, b2 = make_a(), make_b()
    assert a2 == b2, "the same input made different members twice"
    at = (
        next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
        if a[: len(b)] != b[: len(a)]
        else min(len(a), len(b))
    )
    warnings.warn(
        f"members made once differently (first difference at byte {at}; "
        f"{'the first' if a != a2 else 'the second'} way), then alike",
        stacklevel=2,
    )


def members_of(stream: bytes) -> list[tuple[bytes, int]]:
    """(deflate body, ISIZE) of each member, parsed by decompressing member by member."""
    out = []
    while stream:
        assert stream[:10] == HEADER
        d = zlib.decompressobj(-15)
        data = d.decompress(stream[10:])
        assert d.eof
        crc, size = struct.unpack("<II", d.unused_data[:8])
        assert crc == zlib.crc32(data)
        assert size == len(data)
        out.append((data, size))
        stream = d.unused_data[8:]
    return out


def text(n: int, seed: int = 0) -> bytes:
    rnd = random.Random(seed)
    words = [b"import", b"def", b"return", b"self", b"casd", b"layer", b"\n", b"    "]
    return b" ".join(rnd.choice(words) for _ in range(n // 5))[:n]


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=40_000) | st.integers(0, 60_000).map(text),
    cuts=st.lists(st.integers(0, 60_000), max_size=6),
    lib_level=LIB_LEVELS,
)
def test_the_stream_is_the_same_however_the_input_is_split_and_decodes_to_it(
    data: bytes, cuts: list[int], lib_level: tuple[str, int]
) -> None:
    lib, level = lib_level
    params = MembersParams(level, segment=SMALL, lib=lib)
    whole = encode(data, params)
    agree(lambda: encode(data, params, cuts), lambda: encode(data, params))
    assert gzip.decompress(whole) == data
    sizes = [size for _, size in members_of(whole)]
    # One member per segment; an empty input is one empty member.
    tail = [len(data) % SMALL] if len(data) % SMALL or not data else []
    assert sizes == [SMALL] * (len(data) // SMALL) + tail


def test_each_member_depends_on_its_segment_alone() -> None:
    """What lets hosts compress segments in parallel and agree byte for byte."""
    a = text(10 * SMALL, seed=1)
    b = a[: 3 * SMALL] + text(SMALL, seed=2) + a[4 * SMALL :]
    params = MembersParams(1, segment=SMALL)
    pieces_a = [member(a[i : i + SMALL], 1) for i in range(0, len(a), SMALL)]
    pieces_b = [member(b[i : i + SMALL], 1) for i in range(0, len(b), SMALL)]
    agree(lambda: encode(a, params), lambda: b"".join(pieces_a))
    agree(lambda: encode(b, params), lambda: b"".join(pieces_b))
    assert [x == y for x, y in zip(pieces_a, pieces_b, strict=True)].count(False) == 1


def test_gnu_gzip_reads_the_members_as_one_stream() -> None:
    data = text(3 * SEGMENT + 1234, seed=3)
    out = subprocess.run(
        ["gzip", "-dc"], input=encode(data, MembersParams(1)), capture_output=True, check=True
    )
    assert out.stdout == data


def test_parameters_round_trip_and_bad_ones_are_refused() -> None:
    for p in (MembersParams(3, segment=SMALL), MembersParams(9, lib=LIB_DEFLATE)):
        assert MembersParams.from_dict(p.to_dict()) == p
    assert LIB == LIB_ISAL  # what `oci convert` makes by default
    for bad in (
        {"level": 4, "segment": SEGMENT, "lib": LIB_ISAL},
        {"level": 0, "segment": SEGMENT, "lib": LIB_DEFLATE},
        {"level": 13, "segment": SEGMENT, "lib": "x"},
        {"level": 1, "segment": 100, "lib": "x"},
        {"level": "one", "segment": SEGMENT, "lib": "x"},
        {"segment": SEGMENT, "lib": "x"},
    ):
        with pytest.raises(LayerFormatError):
            MembersParams.from_dict(bad)


def test_members_of_a_deflater_this_host_lacks_are_read_not_made() -> None:
    """A record from a host with another deflater parses (its layer then comes whole);
    making or checking its members is refused by name."""
    params = MembersParams.from_dict({"level": 5, "segment": SEGMENT, "lib": "zopfli (1.0)"})
    with pytest.raises(LayerFormatError, match="zopfli"):
        encode(b"data", params)
    with pytest.raises(LayerFormatError, match="zopfli"):
        decode(encode(b"data", MembersParams(1)), params)


def test_isal_level_3_layers_are_read_but_their_members_not_made() -> None:
    """ISA-L picks its code by the CPU: level 3 gave other bytes from its AVX2 code than
    from its AVX-512 code, so no host counts on making such members again (they were made
    for a day); levels 0-2 gave the same from both."""
    params = MembersParams.from_dict({"level": 3, "segment": SEGMENT, "lib": LIB_ISAL})
    assert params.level == 3
    assert not makes_here(LIB_ISAL, 3)
    assert all(makes_here(LIB_ISAL, level) for level in (0, 1, 2))
    assert makes_here(LIB_DEFLATE, 12)
    assert not makes_here("zopfli (1.0)", 1)
    with pytest.raises(LayerFormatError):
        MembersParams.from_dict({"level": 4, "segment": SEGMENT, "lib": LIB_ISAL})


def test_the_deflaters_make_different_bytes_that_any_gzip_reader_takes() -> None:
    data = text(3 * SMALL, seed=4)
    made = {
        lib: encode(data, MembersParams(1, segment=SMALL, lib=lib))
        for lib in (LIB_ISAL, LIB_DEFLATE)
    }
    assert made[LIB_ISAL] != made[LIB_DEFLATE]
    for stream in made.values():
        assert gzip.decompress(stream) == data
        assert [size for _, size in members_of(stream)] == [SMALL] * 3


def test_the_encoder_refuses_use_after_finish() -> None:
    enc = MembersEncoder(MembersParams(1))
    enc.update(b"abc")
    enc.finish()
    with pytest.raises(ValueError, match="after finish"):
        enc.update(b"more")
    with pytest.raises(ValueError, match="twice"):
        enc.finish()


def decode(stream: bytes, params: MembersParams, cuts: list[int] | None = None) -> bytes:
    dec = MembersDecoder(params)
    out: list[bytes | bytearray] = []
    pos = 0
    for cut in sorted(cuts or []):
        out.extend(dec.feed(stream[pos:cut]))
        pos = max(pos, cut)
    out.extend(dec.feed(stream[pos:]))
    out.extend(dec.finish())
    return b"".join(out)


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=40_000) | st.integers(0, 60_000).map(text),
    cuts=st.lists(st.integers(0, 60_000), max_size=6),
    lib_level=LIB_LEVELS,
)
def test_a_series_decodes_to_its_input_however_the_bytes_arrive(
    data: bytes, cuts: list[int], lib_level: tuple[str, int]
) -> None:
    lib, level = lib_level
    params = MembersParams(level=level, segment=SMALL, lib=lib)
    assert decode(encode(data, params), params, cuts) == data


def test_decoding_checks_that_this_host_makes_each_member_again() -> None:
    data = text(30_000, seed=3)
    params = MembersParams(level=1, segment=SMALL)
    good = encode(data, params)
    # Made at another level, or by the other deflater: valid gzip that decodes fine
    # elsewhere, but not what this host's encoder makes with the recorded parameters.
    for other_params in (
        MembersParams(level=3, segment=SMALL),
        MembersParams(1, SMALL, LIB_DEFLATE),
    ):
        other = encode(data, other_params)
        assert gzip.decompress(other) == data
        with pytest.raises(LayerFormatError, match="does not make"):
            decode(other, params)
    # A flipped bit, a member gone, the stream cut short, or something else than members.
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10
    first = len(member(data[:SMALL], 1))
    dropped = good[:first] + good[2 * first :]
    for bad in (bytes(flipped), dropped, good[: len(good) - 5], gzip.compress(data)):
        with pytest.raises(LayerFormatError):
            decode(bad, params)
    with pytest.raises(LayerFormatError):
        decode(b"", params)


def _odd_member(segment: bytes) -> bytes:
    """A valid gzip member of ``segment`` with casd's header that this host's deflater
    does not make (zlib's deflate body)."""
    body = zlib.compressobj(9, zlib.DEFLATED, -15)
    odd = body.compress(segment) + body.flush()
    made = HEADER + odd + struct.pack("<II", zlib.crc32(segment), len(segment))
    assert made != member(segment, 1)
    return made


def test_a_series_from_one_of_this_hosts_deflaters_is_deflated_again_in_a_sample() -> None:
    data = text(40 * SMALL, seed=5)
    segs = [data[i : i + SMALL] for i in range(0, len(data), SMALL)]
    params = MembersParams(level=1, segment=SMALL)
    assert params.lib == LIB
    assert len(segs) > CHECK_EVERY + 2
    # Member 1 is not in the sample (0, CHECK_EVERY, ... and the last are).
    stream = b"".join(_odd_member(s) if i == 1 else member(s, 1) for i, s in enumerate(segs))
    dec = MembersDecoder(params)
    assert b"".join([*dec.feed(stream), *dec.finish()]) == data
    assert not dec.fully_checked  # so its bytes are kept until re-encoded in full
    # Deflated again in full when asked, or when another library made the series.
    for dec in (
        MembersDecoder(params, sample=False),
        MembersDecoder(MembersParams(level=1, segment=SMALL, lib="libdeflate 0.0")),
    ):
        assert dec.fully_checked
        with pytest.raises(LayerFormatError, match="does not make"):
            [*dec.feed(stream), *dec.finish()]
    # A member in the sample that differs is found; so is a bad CRC outside it.
    for i in (0, CHECK_EVERY, len(segs) - 1):
        bad = b"".join(_odd_member(s) if k == i else member(s, 1) for k, s in enumerate(segs))
        with pytest.raises(LayerFormatError, match="does not make"):
            decode(bad, params)
    wrong_crc = bytearray(member(segs[2], 1))
    wrong_crc[-8] ^= 1
    bad = b"".join(bytes(wrong_crc) if k == 2 else member(s, 1) for k, s in enumerate(segs))
    with pytest.raises(LayerFormatError, match="CRC"):
        decode(bad, params)
