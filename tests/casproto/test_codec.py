"""The codec: message <-> body (SPEC §2-4) and the frame decoder."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from itertools import pairwise

import msgpack  # type: ignore[import-untyped, unused-ignore]
import pytest
from casproto import (
    MAX_BATCH,
    MAX_FRAME,
    MESSAGE_CLASSES,
    BlobInfo,
    Chunk,
    ChunkPack,
    Codec,
    ErrorCode,
    FrameDecoder,
    Has,
    Hello,
    LocalProtocolError,
    Message,
    Names,
    Ok,
    PushRecipe,
    Stat,
    StatsResult,
    Tag,
    Want,
    decode_body,
    encode_message,
)
from casproto._codec import _FIELDS
from casproto_testing import MESSAGES, chunk_id, messages
from hypothesis import given
from hypothesis import strategies as st

ID = chunk_id("a")


def pack(*items: object) -> bytes:
    body: bytes = msgpack.packb(list(items), use_bin_type=True)
    return body


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


# --- round trips ----------------------------------------------------------------------


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=lambda cls: cls.__name__)
@given(data=st.data())
def test_every_message_round_trips(cls: type[Message], data: st.DataObject) -> None:
    message = data.draw(MESSAGES[cls])
    encoded = encode_message(message)
    assert int.from_bytes(encoded[:4], "big") == len(encoded) - 4
    decoded = decode_body(encoded[4:])
    assert decoded == message
    assert type(decoded) is cls


def test_wire_form_is_type_rid_then_fields_in_spec_order() -> None:
    message = BlobInfo(7, "sha256:" + "0" * 64, 10, 2, ("a", "b"))
    assert msgpack.unpackb(encode_message(message)[4:]) == [
        13,
        7,
        "sha256:" + "0" * 64,
        10,
        2,
        ["a", "b"],
    ]


def test_field_table_follows_dataclass_order() -> None:
    for cls in MESSAGE_CLASSES:
        names = [field.name for field in dataclasses.fields(cls)]
        assert names[0] == "rid"
        assert [name for name, _ in _FIELDS[cls]] == names[1:], cls.__name__


def test_type_codes_are_unique() -> None:
    assert len({cls.TYPE for cls in MESSAGE_CLASSES}) == len(MESSAGE_CLASSES)


def test_decoded_fields_have_exact_types() -> None:
    decoded = decode_body(encode_message(Chunk(1, ID, 1, bytearray(b"xy")))[4:])  # type: ignore[arg-type]
    assert isinstance(decoded, Chunk)
    assert decoded.codec is Codec.ZSTD
    assert type(decoded.data) is bytes
    has = decode_body(encode_message(Has(1, [ID]))[4:])  # type: ignore[arg-type]  # a list goes out as an array
    assert has == Has(1, (ID,))


def test_unknown_trailing_fields_are_ignored() -> None:
    assert decode_body(pack(Has.TYPE, 1, [ID], "added later", {"x": 1})) == Has(1, (ID,))
    assert decode_body(pack(Ok.TYPE, 3, None)) == Ok(3)


# --- the CHUNK fast path equals msgpack ----------------------------------------------

RID_EDGES = [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]
SIZE_EDGES = [0, 1, 255, 256, 65535, 65536, 70000]


@pytest.mark.parametrize("rid", RID_EDGES)
@pytest.mark.parametrize("size", SIZE_EDGES)
def test_chunk_frames_match_msgpack(rid: int, size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    for codec in Codec:
        encoded = encode_message(Chunk(rid, ID, codec, data))
        assert encoded[4:] == pack(Chunk.TYPE, rid, ID, int(codec), data)
        assert decode_body(encoded[4:]) == Chunk(rid, ID, codec, data)


@pytest.mark.parametrize(
    "data", [bytearray(b"abc"), memoryview(b"abc"), memoryview(b"xabc")[1:]], ids=repr
)
def test_chunk_data_may_be_any_contiguous_buffer(data: bytes) -> None:
    assert encode_message(Chunk(1, ID, Codec.RAW, data)) == encode_message(
        Chunk(1, ID, Codec.RAW, b"abc")
    )


def test_chunk_codec_may_be_a_plain_int() -> None:
    assert encode_message(Chunk(1, ID, 1, b"z")) == encode_message(  # type: ignore[arg-type]
        Chunk(1, ID, Codec.ZSTD, b"z")
    )


def test_chunk_repr_shows_size_not_data() -> None:
    assert repr(Chunk(1, ID, Codec.RAW, b"x" * 1000)).endswith("data=<1000 bytes>)")
    assert "data='text'" in repr(Chunk(1, "id", Codec.RAW, "text"))  # type: ignore[arg-type]


def test_decoding_a_chunk_with_odd_fields_takes_the_checked_path() -> None:
    with pytest.raises(LocalProtocolError, match=r"unknown message type 33\.0"):
        decode_body(pack(33.0, 1, ID, 0, b""))
    with pytest.raises(LocalProtocolError, match=r"Chunk\.codec"):
        decode_body(pack(Chunk.TYPE, 1, ID, 7, b""))


# --- malformed bodies ---------------------------------------------------------------

DEEP = b"\x91" * 100_000 + b"\xc0"


@pytest.mark.parametrize(
    ("body", "code", "match"),
    [
        (b"", ErrorCode.MALFORMED, "msgpack"),
        (b"\xc1", ErrorCode.MALFORMED, "msgpack"),
        (b"\xa2\xff\xfe", ErrorCode.MALFORMED, "msgpack"),  # invalid UTF-8 str
        (DEEP, ErrorCode.MALFORMED, "msgpack"),
        (pack(Ok.TYPE, 1) + b"\x00", ErrorCode.MALFORMED, "msgpack"),  # extra data
        (msgpack.packb(Ok.TYPE), ErrorCode.MALFORMED, "array"),
        (pack(Ok.TYPE), ErrorCode.MALFORMED, "array"),
        (pack(99, 1), ErrorCode.MALFORMED, "unknown message type"),
        (pack("Has", 1, []), ErrorCode.MALFORMED, "unknown message type"),
        (pack(True, 1), ErrorCode.MALFORMED, "unknown message type"),  # True == 1 == HELLO
        (pack(Ok.TYPE, -1), ErrorCode.MALFORMED, r"Ok\.rid"),
        (pack(Ok.TYPE, True), ErrorCode.MALFORMED, r"Ok\.rid"),
        (pack(Ok.TYPE, 1.0), ErrorCode.MALFORMED, r"Ok\.rid"),
        (pack(Has.TYPE, 1), ErrorCode.MALFORMED, "needs 1 fields"),
        (pack(Has.TYPE, 1, [b"short"]), ErrorCode.MALFORMED, r"Has\.ids"),
        (pack(Has.TYPE, 1, ["x" * 32]), ErrorCode.MALFORMED, r"Has\.ids"),
        (pack(Has.TYPE, 1, ID), ErrorCode.MALFORMED, r"Has\.ids"),
        (pack(Has.TYPE, 1, [ID] * (MAX_BATCH + 1)), ErrorCode.TOO_LARGE, r"Has\.ids"),
        (pack(Want.TYPE, 1, []), ErrorCode.INVALID, r"Want\.ids"),
        (pack(PushRecipe.TYPE, 1, [], []), ErrorCode.INVALID, r"PushRecipe\.ids"),
        (pack(PushRecipe.TYPE, 1, [ID], [1, 2]), ErrorCode.INVALID, r"PushRecipe\.sizes"),
        (pack(PushRecipe.TYPE, 1, [ID], [-1]), ErrorCode.MALFORMED, r"PushRecipe\.sizes"),
        (pack(PushRecipe.TYPE, 1, [ID], [True]), ErrorCode.MALFORMED, r"PushRecipe\.sizes"),
        (pack(PushRecipe.TYPE, 1, [ID], [0] * (MAX_BATCH + 1)), ErrorCode.TOO_LARGE, "sizes"),
        (pack(Chunk.TYPE, 1, ID, 3, b""), ErrorCode.INVALID, r"Chunk\.codec"),
        (pack(Chunk.TYPE, 1, ID, True, b""), ErrorCode.MALFORMED, r"Chunk\.codec"),
        (pack(Chunk.TYPE, 1, ID, 0, "data"), ErrorCode.MALFORMED, r"Chunk\.data"),
        (pack(Chunk.TYPE, 1, ID[:31], 0, b""), ErrorCode.MALFORMED, r"Chunk\.id"),
        (pack(3, 0, 99, "x"), ErrorCode.INVALID, r"Error\.code"),
        (pack(3, 0, "NOT_FOUND", "x"), ErrorCode.MALFORMED, r"Error\.code"),
        (pack(41, 1, "d", 0, [], [], 1), ErrorCode.MALFORMED, r"Recipe\.last"),
        (pack(Names.TYPE, 1, [["b", "d"], ["a", "d"]]), ErrorCode.INVALID, "sorted"),
        (pack(Names.TYPE, 1, [["a", "d"], ["a", "e"]]), ErrorCode.INVALID, "sorted"),
        (pack(Names.TYPE, 1, [["a"]]), ErrorCode.MALFORMED, "pairs"),
        (pack(Names.TYPE, 1, [["a", 1]]), ErrorCode.MALFORMED, "pairs"),
        (pack(Names.TYPE, 1, ["ab"]), ErrorCode.MALFORMED, "array"),
        (pack(11, 1, b"\0" * (MAX_BATCH // 8 + 1)), ErrorCode.TOO_LARGE, r"Have\.bitmap"),
        (pack(11, 1, "bits"), ErrorCode.MALFORMED, r"Have\.bitmap"),
        (pack(StatsResult.TYPE, 1, {b"k": 1}), ErrorCode.MALFORMED, "string keys"),
        (pack(StatsResult.TYPE, 1, {1: 1}), ErrorCode.MALFORMED, "msgpack"),  # strict_map_key
        (pack(StatsResult.TYPE, 1, {"k": None}), ErrorCode.MALFORMED, "stats"),
        (pack(StatsResult.TYPE, 1, {"k": [1]}), ErrorCode.MALFORMED, "stats"),
        (pack(StatsResult.TYPE, 1, {"k": False}), ErrorCode.MALFORMED, "stats"),
        (pack(StatsResult.TYPE, 1, []), ErrorCode.MALFORMED, "map"),
        (pack(2, 0, 1, [], "a", {"min": -1}, 5), ErrorCode.MALFORMED, r"Welcome\.chunker"),
        (pack(2, 0, 1, [], "a", {"min": 1.5}, 5), ErrorCode.MALFORMED, r"Welcome\.chunker"),
        (pack(Hello.TYPE, 0, 1, [], 7, "a"), ErrorCode.MALFORMED, r"Hello\.token"),
        (pack(Hello.TYPE, 0, 1, "zstd", None, "a"), ErrorCode.MALFORMED, r"Hello\.features"),
        (pack(Hello.TYPE, 0, 1, [1], None, "a"), ErrorCode.MALFORMED, r"Hello\.features"),
        (pack(Stat.TYPE, 1, msgpack.ExtType(1, b"x")), ErrorCode.MALFORMED, "msgpack"),
        (pack(Stat.TYPE, 1, msgpack.ExtType(1, b"")), ErrorCode.MALFORMED, r"Stat\.ref"),
        (pack(Stat.TYPE, 1, b"ref"), ErrorCode.MALFORMED, r"Stat\.ref"),
    ],
)
def test_malformed_bodies_are_rejected(body: bytes, code: ErrorCode, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match) as info:
        decode_body(body)
    assert info.value.code is code


def test_body_over_max_frame_is_too_large() -> None:
    with pytest.raises(LocalProtocolError) as info:
        decode_body(bytes(MAX_FRAME + 1))
    assert info.value.code is ErrorCode.TOO_LARGE


@given(st.binary(max_size=200))
def test_random_bodies_only_raise_protocol_errors(body: bytes) -> None:
    with contextlib.suppress(LocalProtocolError):
        decode_body(body)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=12,
)


@given(st.sampled_from(MESSAGE_CLASSES), msgpack_values, st.lists(msgpack_values, max_size=7))
def test_wrongly_typed_fields_only_raise_protocol_errors(
    cls: type[Message], rid: object, fields: list[object]
) -> None:
    try:
        message = decode_body(pack(cls.TYPE, rid, *fields))
    except LocalProtocolError:
        return
    assert type(message) is cls


@given(messages, st.data())
def test_mutated_bodies_only_raise_protocol_errors(message: Message, data: st.DataObject) -> None:
    body = bytearray(encode_message(message)[4:])
    index = data.draw(st.integers(0, len(body) - 1))
    body[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(body)))
    with contextlib.suppress(LocalProtocolError):
        decode_body(bytes(body[:cut]))


# --- encoding checks fields too --------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "code", "match"),
    [
        (Has(1, (b"x",)), ErrorCode.MALFORMED, r"Has\.ids"),
        (Has(1, (ID,) * (MAX_BATCH + 1)), ErrorCode.TOO_LARGE, r"Has\.ids"),
        (Want(1, ()), ErrorCode.INVALID, r"Want\.ids"),
        (PushRecipe(1, (ID,), ()), ErrorCode.INVALID, r"PushRecipe\.sizes"),
        (PushRecipe(1, (ID,), (2**64,)), ErrorCode.MALFORMED, r"PushRecipe\.sizes"),
        (Chunk(1, ID, 5, b""), ErrorCode.INVALID, r"Chunk\.codec"),  # type: ignore[arg-type]
        (Chunk(1, ID, Codec.RAW, "text"), ErrorCode.MALFORMED, r"Chunk\.data"),  # type: ignore[arg-type]
        (Chunk(1, ID, Codec.RAW, memoryview(b"abcd")[::2]), ErrorCode.MALFORMED, r"Chunk\.data"),  # type: ignore[arg-type]
        (Chunk(2**64, ID, Codec.RAW, b""), ErrorCode.MALFORMED, r"Chunk\.rid"),
        (Chunk(1, bytearray(ID), Codec.RAW, b""), ErrorCode.MALFORMED, r"Chunk\.id"),  # type: ignore[arg-type]
        (Ok(-1), ErrorCode.MALFORMED, r"Ok\.rid"),
        (Ok(True), ErrorCode.MALFORMED, r"Ok\.rid"),
        (Tag(1, "\ud800", "d"), ErrorCode.MALFORMED, "cannot encode Tag"),
        (Names(1, (("b", "d"), ("a", "d"))), ErrorCode.INVALID, r"Names\.entries"),
        (StatsResult(1, {"a": 2**64}), ErrorCode.MALFORMED, r"StatsResult\.stats"),
        (StatsResult(1, {"a": True}), ErrorCode.MALFORMED, r"StatsResult\.stats"),
        (Message(1), ErrorCode.MALFORMED, "not a protocol message"),
        (Stat(1, "x" * MAX_FRAME), ErrorCode.TOO_LARGE, "MAX_FRAME"),
        (ChunkPack(1, Codec.RAW, (), b""), ErrorCode.INVALID, r"ChunkPack\.lengths"),
        (ChunkPack(1, Codec.RAW, (0,), b""), ErrorCode.INVALID, r"ChunkPack\.lengths"),
        (ChunkPack(1, Codec.RAW, (2, 1), b"ab"), ErrorCode.INVALID, r"ChunkPack\.data"),
        (ChunkPack(1, Codec.ZSTD_PREFIX, (1,), b"a"), ErrorCode.INVALID, r"ChunkPack\.data"),
        (
            ChunkPack(1, Codec.ZSTD, (MAX_FRAME + 1,), b""),
            ErrorCode.INVALID,
            r"ChunkPack\.lengths",
        ),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Message) else None,
)
def test_encoding_rejects_what_decoding_would(
    message: Message, code: ErrorCode, match: str
) -> None:
    with pytest.raises(LocalProtocolError, match=match) as info:
        encode_message(message)
    assert info.value.code is code


def test_encoding_a_chunk_over_max_frame_is_too_large() -> None:
    data = memoryview(bytearray(MAX_FRAME))
    with pytest.raises(LocalProtocolError, match="MAX_FRAME") as info:
        encode_message(Chunk(1, ID, Codec.RAW, data))  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.TOO_LARGE


# --- framing --------------------------------------------------------------------------


def frames_of(decoder: FrameDecoder) -> list[Message]:
    out = []
    while (message := decoder.next_message()) is not None:
        out.append(message)
    return out


@given(st.lists(messages, max_size=6), st.lists(st.integers(0, 2000), max_size=8))
def test_framing_is_independent_of_how_the_stream_is_split(
    sent: list[Message], cuts: list[int]
) -> None:
    stream = b"".join(encode_message(message) for message in sent)
    bounds = sorted({0, len(stream), *(cut for cut in cuts if cut < len(stream))})
    decoder = FrameDecoder()
    received: list[Message] = []
    for start, end in pairwise(bounds):
        decoder.feed(stream[start:end])
        received += frames_of(decoder)
    assert received == sent
    assert decoder.buffered == 0


@given(st.lists(messages, min_size=1, max_size=3))
def test_framing_one_byte_at_a_time(sent: list[Message]) -> None:
    stream = b"".join(encode_message(message) for message in sent)
    decoder = FrameDecoder()
    received: list[Message] = []
    for byte in stream:
        decoder.feed(bytes((byte,)))
        received += frames_of(decoder)
    assert received == sent


def test_next_frame_returns_body_copies() -> None:
    decoder = FrameDecoder()
    bodies = [encode_message(Ok(n))[4:] for n in (1, 2)]
    decoder.feed(b"".join(frame(body) for body in bodies) + b"\x00\x00")
    assert decoder.next_frame() == bodies[0]
    assert decoder.next_frame() == bodies[1]
    assert decoder.next_frame() is None
    assert decoder.buffered == 2
    decoder.feed(b"\x00\x01\x90")
    assert decoder.next_frame() == b"\x90"


def test_empty_frame_is_malformed_and_stays_so() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00\x00\x00")
    for _ in range(2):
        with pytest.raises(LocalProtocolError) as info:
            decoder.next_frame()
        assert info.value.code is ErrorCode.MALFORMED


def test_oversized_length_is_rejected_before_its_body_arrives() -> None:
    decoder = FrameDecoder()
    decoder.feed((MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(LocalProtocolError) as info:
        decoder.next_message()
    assert info.value.code is ErrorCode.TOO_LARGE


def test_max_frame_can_be_lowered() -> None:
    decoder = FrameDecoder(max_frame=3)
    decoder.feed(frame(b"\x91\x11\x01"[:3]))
    assert decoder.next_frame() == b"\x91\x11\x01"
    decoder.feed(frame(b"\x92\x11\x01"[:2] + b"\x02\x00"))
    with pytest.raises(LocalProtocolError, match="limit of 3"):
        decoder.next_frame()


def test_a_frame_that_fails_to_decode_is_consumed() -> None:
    decoder = FrameDecoder()
    decoder.feed(frame(b"\xc1") + encode_message(Ok(5)))
    with pytest.raises(LocalProtocolError):
        decoder.next_message()
    assert decoder.next_message() == Ok(5)


@given(st.binary(max_size=300))
def test_random_streams_only_raise_protocol_errors(stream: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(stream)
    with contextlib.suppress(LocalProtocolError):
        frames_of(decoder)


def test_decoder_is_linear_in_the_bytes_fed() -> None:
    # 8 MiB in 4 KiB reads: a decoder that copied its whole buffer per read would move
    # ~8 GiB here and take many seconds.
    body = pack(Chunk.TYPE, 1, ID, 0, bytes(8 * 1024 * 1024 - 64))
    stream = frame(body) * 2
    decoder = FrameDecoder()
    started = time.perf_counter()
    got = []
    for offset in range(0, len(stream), 4096):
        decoder.feed(stream[offset : offset + 4096])
        got += frames_of(decoder)
    assert len(got) == 2
    assert time.perf_counter() - started < 5


def test_feeding_after_partial_consumption_keeps_the_unread_tail() -> None:
    decoder = FrameDecoder()
    first, second = encode_message(Has(1, (ID,) * 3)), encode_message(Stat(2, "name"))
    decoder.feed(first + second[:5])
    assert decoder.next_message() == Has(1, (ID,) * 3)
    decoder.feed(second[5:])  # consumed part outweighs the tail: compacts
    assert decoder.next_message() == Stat(2, "name")
