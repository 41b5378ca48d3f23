"""Connection: conversations between a real client and server joined by a fake wire.

Each test reads as a conversation (SPEC §3-§7). Rules are checked on both ends: the side
that would break a rule gets LocalProtocolError from send(), and the side that receives
the same frame forged gets RemoteProtocolError from next_event().
"""

from __future__ import annotations

import os
import time

import pytest
from casproto import (
    CLOSED,
    MAX_FRAME,
    NEED_DATA,
    BlobInfo,
    Cancel,
    Chunk,
    ChunkPack,
    Codec,
    Connection,
    ConnState,
    Error,
    ErrorCode,
    Has,
    Have,
    Hello,
    ListNames,
    LocalProtocolError,
    Message,
    Names,
    Ok,
    Pull,
    PullDelta,
    PullInline,
    PushBegin,
    PushDone,
    PushEnd,
    PushRecipe,
    PushWant,
    Recipe,
    RecipeDelta,
    RecipeInline,
    RemoteProtocolError,
    Role,
    Stat,
    Stats,
    StatsResult,
    Sync,
    SyncDone,
    SyncProgress,
    Tag,
    Untag,
    Want,
    WantAt,
    WantDelta,
    Welcome,
    encode_message,
    pack_bitmap,
)
from casproto_testing import (
    EMPTY_DIGEST,
    ConnectionPair,
    chunk_id,
    digest_of,
    drain,
    hello,
    welcome,
)
from hypothesis import given
from hypothesis import strategies as st

A, B, C, D = (chunk_id(label) for label in "abcd")
BLOB = b"aaaabbbbcc"
BLOB_DIGEST = digest_of(BLOB)


def assert_forbidden(
    pair: ConnectionPair,
    sender: Connection,
    message: Message,
    code: ErrorCode = ErrorCode.UNEXPECTED,
) -> None:
    """`sender` may not send `message` now, and its peer rejects it when forged."""
    receiver = pair.peer_of(sender)
    with pytest.raises(LocalProtocolError) as sent:
        sender.send(message)
    assert sent.value.code is code
    assert sender.our_state is ConnState.ERROR
    with pytest.raises(RemoteProtocolError) as received:
        pair.deliver(receiver, encode_message(message))
    assert received.value.code is code
    assert receiver.their_state is ConnState.ERROR
    assert receiver.state is ConnState.ERROR


def assert_rejects(conn: Connection, data: bytes, code: ErrorCode) -> RemoteProtocolError:
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        drain(conn)
    assert info.value.code is code
    return info.value


# --- handshake (SPEC §3) -------------------------------------------------------------


def test_handshake() -> None:
    pair = ConnectionPair()
    for conn in (pair.client, pair.server):
        assert conn.state is ConnState.AWAIT_HELLO
    pair.exchange(pair.client, hello(["zstd", "from-the-future"]))
    assert pair.client.state is pair.server.state is ConnState.AWAIT_WELCOME
    pair.exchange(pair.server, welcome(["zstd"]))
    for conn in (pair.client, pair.server):
        assert conn.state is conn.our_state is conn.their_state is ConnState.READY
        assert conn.features == frozenset({"zstd"})
        assert not conn.open_requests
    assert (pair.client.our_role, pair.client.their_role) == (Role.CLIENT, Role.SERVER)
    assert (pair.server.our_role, pair.server.their_role) == (Role.SERVER, Role.CLIENT)


def test_features_are_empty_before_welcome() -> None:
    pair = ConnectionPair()
    pair.exchange(pair.client, hello(["zstd"]))
    assert pair.server.features == frozenset()


def test_client_sends_nothing_but_hello_first() -> None:
    pair = ConnectionPair()
    assert_forbidden(pair, pair.client, Stat(1, "name"))


def test_server_speaks_only_after_hello() -> None:
    pair = ConnectionPair()
    assert_forbidden(pair, pair.server, welcome())


def test_client_waits_for_welcome() -> None:
    pair = ConnectionPair()
    pair.exchange(pair.client, hello())
    assert_forbidden(pair, pair.client, Stat(1, "name"))


def test_server_answers_hello_with_welcome_only() -> None:
    pair = ConnectionPair()
    pair.exchange(pair.client, hello())
    assert_forbidden(pair, pair.server, Ok(1))


def test_handshake_frames_have_rid_zero() -> None:
    pair = ConnectionPair()
    assert_forbidden(pair, pair.client, Hello(1, 1, (), None, "x"))


def test_handshake_happens_once(pair: ConnectionPair) -> None:
    assert_forbidden(pair, pair.client, hello())


def test_welcome_happens_once(pair: ConnectionPair) -> None:
    assert_forbidden(pair, pair.server, welcome())


def test_other_versions_are_unsupported() -> None:
    pair = ConnectionPair()
    assert_forbidden(pair, pair.client, Hello(0, 2, (), None, "v2"), ErrorCode.UNSUPPORTED_VERSION)


def test_welcome_must_speak_version_1() -> None:
    pair = ConnectionPair()
    pair.exchange(pair.client, hello())
    assert_forbidden(
        pair, pair.server, Welcome(0, 2, (), "s", {}, MAX_FRAME), ErrorCode.UNSUPPORTED_VERSION
    )


def test_server_reports_an_unsupported_version_and_closes() -> None:
    pair = ConnectionPair()
    error = assert_rejects(
        pair.server, encode_message(Hello(0, 9, (), None, "v9")), ErrorCode.UNSUPPORTED_VERSION
    )
    # The peer broke the protocol, not us: we may still say why, once.
    events = pair.send(pair.server, Error(0, error.code, str(error)))
    assert events == [Error(0, ErrorCode.UNSUPPORTED_VERSION, str(error)), CLOSED]
    assert pair.server.our_state is ConnState.CLOSED
    assert pair.client.state is ConnState.CLOSED


def test_welcome_enables_only_offered_features() -> None:
    pair = ConnectionPair()
    pair.exchange(pair.client, hello(["zstd"]))
    assert_forbidden(pair, pair.server, welcome(["zstd", "delta"]), ErrorCode.INVALID)


def test_welcome_max_frame_must_be_positive() -> None:
    pair = ConnectionPair()
    pair.exchange(pair.client, hello())
    assert_forbidden(pair, pair.server, welcome(max_frame=0), ErrorCode.INVALID)


def test_welcome_max_frame_bounds_what_the_client_sends() -> None:
    pair = ConnectionPair()
    pair.exchange(pair.client, hello())
    pair.exchange(pair.server, welcome(max_frame=1000))
    assert pair.client.their_max_frame == 1000
    assert pair.server.their_max_frame == MAX_FRAME
    big = Has(1, (A,) * 30)  # 30 x 34 bytes of ids
    with pytest.raises(LocalProtocolError, match="max_frame of 1000") as info:
        pair.client.send(big)
    assert info.value.code is ErrorCode.TOO_LARGE
    assert_rejects(pair.server, encode_message(big), ErrorCode.TOO_LARGE)


def test_welcome_max_frame_is_capped_at_max_frame() -> None:
    pair = ConnectionPair()
    pair.exchange(pair.client, hello())
    pair.exchange(pair.server, welcome(max_frame=2**40))
    assert pair.client.their_max_frame == MAX_FRAME


def test_server_may_refuse_before_hello() -> None:
    pair = ConnectionPair()
    events = pair.send(pair.server, Error(0, ErrorCode.BUSY, "try later"))
    assert events == [Error(0, ErrorCode.BUSY, "try later"), CLOSED]


def test_eof_before_welcome_is_a_clean_close() -> None:
    pair = ConnectionPair()
    pair.exchange(pair.client, hello())
    pair.client.receive_data(b"")
    assert pair.client.next_event() is CLOSED
    assert pair.client.state is ConnState.CLOSED


# --- single-answer requests (SPEC §4) ------------------------------------------------

SIMPLE = [
    (Has(5, (A, B, C)), Have(5, pack_bitmap([True, False, True]))),
    (Has(5, ()), Have(5, b"")),
    (Stat(5, "release"), BlobInfo(5, BLOB_DIGEST, len(BLOB), 3, ("release",))),
    (ListNames(5, "rel"), Names(5, (("rel/a", BLOB_DIGEST), ("rel/b", EMPTY_DIGEST)))),
    (Tag(5, "release", BLOB_DIGEST), Ok(5)),
    (Untag(5, "release"), Ok(5)),
    (Stats(5), StatsResult(5, {"chunks": 3, "ratio": 0.5, "version": "1.0"})),
]


@pytest.mark.parametrize(("request_", "answer"), SIMPLE, ids=lambda m: type(m).__name__)
def test_each_request_kind_gets_its_answer(
    pair: ConnectionPair, request_: Message, answer: Message
) -> None:
    pair.exchange(pair.client, request_)
    assert set(pair.client.open_requests) == set(pair.server.open_requests) == {5}
    pair.exchange(pair.server, answer)
    assert not pair.client.open_requests
    assert not pair.server.open_requests


@pytest.mark.parametrize(("request_", "answer"), SIMPLE, ids=lambda m: type(m).__name__)
def test_each_request_kind_refuses_other_answers(
    pair: ConnectionPair, request_: Message, answer: Message
) -> None:
    pair.exchange(pair.client, request_)
    wrong = Ok(5) if not isinstance(answer, Ok) else StatsResult(5, {})
    assert_forbidden(pair, pair.server, wrong)


@pytest.mark.parametrize("request_", [request_ for request_, _ in SIMPLE])
def test_single_answer_requests_take_nothing_more_from_the_client(
    pair: ConnectionPair, request_: Message
) -> None:
    pair.exchange(pair.client, request_)
    assert_forbidden(pair, pair.client, PushEnd(5, 0, EMPTY_DIGEST))


def test_have_must_answer_every_id(pair: ConnectionPair) -> None:
    pair.exchange(pair.client, Has(1, (A, B, C)))
    assert_forbidden(pair, pair.server, Have(1, b"\x01\x00"), ErrorCode.MALFORMED)


def test_error_ends_just_its_request(pair: ConnectionPair) -> None:
    pair.exchange(pair.client, Stat(1, "missing"), Stat(2, "present"))
    pair.exchange(pair.server, Error(1, ErrorCode.NOT_FOUND, "no such name"))
    assert set(pair.client.open_requests) == set(pair.server.open_requests) == {2}
    assert pair.client.state is pair.server.state is ConnState.READY
    pair.exchange(pair.server, BlobInfo(2, BLOB_DIGEST, 10, 3, ("present",)))


def test_requests_interleave(pair: ConnectionPair) -> None:
    pair.exchange(pair.client, Stats(1), Pull(2, "x"), Has(3, (A,)))
    pair.exchange(
        pair.server,
        Have(3, b"\x01"),
        Recipe(2, BLOB_DIGEST, 10, (A,), (4,), False),
        StatsResult(1, {}),
        Recipe(2, BLOB_DIGEST, 10, (B,), (6,), True),
    )
    assert not pair.client.open_requests


# --- rids ----------------------------------------------------------------------------


def test_rid_reuse_after_end_is_allowed(pair: ConnectionPair) -> None:
    for _ in range(3):
        pair.exchange(pair.client, Tag(7, "n", BLOB_DIGEST))
        pair.exchange(pair.server, Ok(7))


def test_duplicate_open_rid_is_rejected(pair: ConnectionPair) -> None:
    pair.exchange(pair.client, Stat(7, "a"))
    assert_forbidden(pair, pair.client, Pull(7, "b"))


def test_rid_zero_names_the_connection(pair: ConnectionPair) -> None:
    assert_forbidden(pair, pair.client, Stat(0, "a"))


def test_unknown_rid_is_rejected_by_the_client(pair: ConnectionPair) -> None:
    assert_forbidden(pair, pair.server, Ok(9))


def test_unknown_rid_is_rejected_by_the_server(pair: ConnectionPair) -> None:
    assert_forbidden(pair, pair.client, PushEnd(9, 0, EMPTY_DIGEST))


def test_server_cannot_fail_an_unknown_rid(pair: ConnectionPair) -> None:
    assert_forbidden(pair, pair.server, Error(9, ErrorCode.NOT_FOUND, "?"))


def test_client_ends_requests_with_cancel_not_error(pair: ConnectionPair) -> None:
    pair.exchange(pair.client, Stat(1, "a"))
    assert_forbidden(pair, pair.client, Error(1, ErrorCode.CANCELLED, "never mind"))


# --- push (SPEC §5) ------------------------------------------------------------------


def test_full_push(pair: ConnectionPair) -> None:
    client, server = pair.client, pair.server
    # Recipe A B A C | B D: the server has C, and asks for each id once.
    pair.exchange(
        client,
        PushBegin(1, "release"),
        PushRecipe(1, (A, B, A, C), (4, 4, 4, 2)),
        PushRecipe(1, (B, D), (4, 3)),  # need not wait for the first PUSH_WANT
    )
    pair.exchange(server, PushWant(1, pack_bitmap([True, True, False, False])))
    pair.exchange(client, Chunk(1, A, Codec.RAW, b"aaaa"))
    pair.exchange(server, PushWant(1, pack_bitmap([False, True])))
    pair.exchange(
        client,
        Chunk(1, B, Codec.ZSTD, b"(zstd of bbbb)"),
        Chunk(1, D, Codec.RAW, b"ddd"),
        PushEnd(1, 21, BLOB_DIGEST),
    )
    assert set(client.open_requests) == set(server.open_requests) == {1}
    pair.exchange(server, PushDone(1, BLOB_DIGEST, 21, 6, 3, 11))
    assert not client.open_requests
    assert not server.open_requests


def test_push_of_an_empty_blob(pair: ConnectionPair) -> None:
    pair.exchange(pair.client, PushBegin(1, None), PushEnd(1, 0, EMPTY_DIGEST))
    pair.exchange(pair.server, PushDone(1, EMPTY_DIGEST, 0, 0, 0, 0))


def test_push_that_needs_nothing(pair: ConnectionPair) -> None:
    pair.exchange(pair.client, PushBegin(1, None), PushRecipe(1, (A,), (4,)))
    pair.exchange(pair.server, PushWant(1, b"\x00"))
    pair.exchange(pair.client, PushEnd(1, 4, digest_of(b"aaaa")))


@pytest.fixture
def pushing(pair: ConnectionPair) -> ConnectionPair:
    """A push of recipe A B | C whose first batch wants both entries."""
    pair.exchange(
        pair.client, PushBegin(1, "x"), PushRecipe(1, (A, B), (4, 4)), PushRecipe(1, (C,), (2,))
    )
    pair.exchange(pair.server, PushWant(1, b"\x03"))
    return pair


def test_out_of_order_chunk_is_rejected(pushing: ConnectionPair) -> None:
    assert_forbidden(pushing, pushing.client, Chunk(1, B, Codec.RAW, b"bbbb"))


def test_unwanted_chunk_is_rejected(pushing: ConnectionPair) -> None:
    pushing.exchange(pushing.client, Chunk(1, A, Codec.RAW, b"a"), Chunk(1, B, Codec.RAW, b"b"))
    # C's PUSH_WANT has not arrived: no chunk is wanted now.
    assert_forbidden(pushing, pushing.client, Chunk(1, C, Codec.RAW, b"cc"))


def test_push_end_before_every_push_want_is_rejected(pushing: ConnectionPair) -> None:
    pushing.exchange(pushing.client, Chunk(1, A, Codec.RAW, b"a"), Chunk(1, B, Codec.RAW, b"b"))
    assert_forbidden(pushing, pushing.client, PushEnd(1, 10, BLOB_DIGEST))


def test_push_end_before_every_wanted_chunk_is_rejected(pushing: ConnectionPair) -> None:
    pushing.exchange(pushing.server, PushWant(1, b"\x00"))
    pushing.exchange(pushing.client, Chunk(1, A, Codec.RAW, b"a"))
    assert_forbidden(pushing, pushing.client, PushEnd(1, 10, BLOB_DIGEST))


def test_push_end_happens_once(pair: ConnectionPair) -> None:
    pair.exchange(pair.client, PushBegin(1, None), PushEnd(1, 0, EMPTY_DIGEST))
    assert_forbidden(pair, pair.client, PushEnd(1, 0, EMPTY_DIGEST))


def test_no_recipe_after_push_end(pair: ConnectionPair) -> None:
    pair.exchange(pair.client, PushBegin(1, None), PushEnd(1, 0, EMPTY_DIGEST))
    assert_forbidden(pair, pair.client, PushRecipe(1, (A,), (1,)))


def test_no_more_push_wants_than_recipes(pushing: ConnectionPair) -> None:
    pushing.exchange(pushing.server, PushWant(1, b"\x00"))
    assert_forbidden(pushing, pushing.server, PushWant(1, b"\x00"))


def test_push_want_must_cover_its_recipe(pushing: ConnectionPair) -> None:
    # The next recipe has one entry: its bitmap is one byte with only bit 0 usable.
    assert_forbidden(pushing, pushing.server, PushWant(1, b"\x02"), ErrorCode.MALFORMED)


def test_push_done_only_after_push_end(pushing: ConnectionPair) -> None:
    assert_forbidden(pushing, pushing.server, PushDone(1, BLOB_DIGEST, 10, 3, 3, 10))


def test_push_may_fail_with_an_error(pushing: ConnectionPair) -> None:
    pushing.exchange(pushing.server, Error(1, ErrorCode.NO_SPACE, "disk full"))
    assert not pushing.client.open_requests
    assert not pushing.server.open_requests


def test_server_sends_no_chunks_into_a_push(pushing: ConnectionPair) -> None:
    assert_forbidden(pushing, pushing.server, Chunk(1, A, Codec.RAW, b"a"))


# --- pull (SPEC §4.1) ----------------------------------------------------------------


def test_pull(pair: ConnectionPair) -> None:
    client, server = pair.client, pair.server
    pair.exchange(client, Pull(1, "release"))
    pair.exchange(server, Recipe(1, BLOB_DIGEST, 10, (A, B), (4, 4), False))
    pair.exchange(server, Recipe(1, BLOB_DIGEST, 10, (A,), (2,), True))
    assert not client.open_requests
    pair.exchange(client, Want(2, (A, B)), Want(3, (A,)))  # several WANTs in flight
    pair.exchange(server, Chunk(2, A, Codec.RAW, b"aaaa"), Chunk(3, A, Codec.RAW, b"aaaa"))
    assert set(client.open_requests) == set(server.open_requests) == {2}
    pair.exchange(server, Chunk(2, B, Codec.ZSTD, b"(zstd)"))
    assert not client.open_requests
    assert not server.open_requests


def test_pull_of_an_empty_blob(pair: ConnectionPair) -> None:
    pair.exchange(pair.client, Pull(1, EMPTY_DIGEST))
    pair.exchange(pair.server, Recipe(1, EMPTY_DIGEST, 0, (), (), True))
    assert not pair.client.open_requests


def test_want_chunks_come_in_the_order_asked(pair: ConnectionPair) -> None:
    pair.exchange(pair.client, Want(1, (A, B)))
    assert_forbidden(pair, pair.server, Chunk(1, B, Codec.RAW, b"b"))


def test_want_ends_after_len_ids_chunks(pair: ConnectionPair) -> None:
    pair.exchange(pair.client, Want(1, (A,)))
    pair.exchange(pair.server, Chunk(1, A, Codec.RAW, b"a"))
    assert_forbidden(pair, pair.server, Chunk(1, A, Codec.RAW, b"a"))


def test_want_may_end_with_not_found(pair: ConnectionPair) -> None:
    pair.exchange(pair.client, Want(1, (A, B, C)))
    pair.exchange(pair.server, Chunk(1, A, Codec.RAW, b"a"), Error(1, ErrorCode.NOT_FOUND, "B"))
    assert not pair.client.open_requests


def test_client_sends_no_chunks_into_a_want(pair: ConnectionPair) -> None:
    pair.exchange(pair.client, Want(1, (A,)))
    assert_forbidden(pair, pair.client, Chunk(1, A, Codec.RAW, b"a"))


def test_chunks_belong_to_wants_and_pushes_only(pair: ConnectionPair) -> None:
    pair.exchange(pair.client, Pull(1, "x"))
    assert_forbidden(pair, pair.server, Chunk(1, A, Codec.RAW, b"a"))


# --- features ------------------------------------------------------------------------


def test_zstd_chunks_need_the_zstd_feature() -> None:
    pair = ConnectionPair()
    pair.handshake(features=())
    pair.exchange(pair.client, Want(1, (A, B)))
    pair.exchange(pair.server, Chunk(1, A, Codec.RAW, b"a"))
    assert_forbidden(pair, pair.server, Chunk(1, B, Codec.ZSTD, b"(zstd)"))


def test_zstd_push_chunks_need_the_zstd_feature() -> None:
    pair = ConnectionPair()
    pair.handshake(features=())
    pair.exchange(pair.client, PushBegin(1, None), PushRecipe(1, (A,), (1,)))
    pair.exchange(pair.server, PushWant(1, b"\x01"))
    assert_forbidden(pair, pair.client, Chunk(1, A, Codec.ZSTD, b"(zstd)"))


# --- cancel (SPEC §7) ----------------------------------------------------------------


def test_cancel_a_pull(pair: ConnectionPair) -> None:
    client, server = pair.client, pair.server
    pair.exchange(client, Pull(1, "big"))
    pair.exchange(server, Recipe(1, BLOB_DIGEST, 10, (A,), (4,), False))
    pair.exchange(client, Cancel(1))
    # The server may still be sending; the client takes it until the request ends.
    pair.exchange(server, Recipe(1, BLOB_DIGEST, 10, (B,), (4,), False))
    pair.exchange(server, Error(1, ErrorCode.CANCELLED, "cancelled"))
    assert not client.open_requests
    assert not server.open_requests


def test_cancelled_request_may_still_end_normally(pair: ConnectionPair) -> None:
    pair.exchange(pair.client, Want(1, (A,)), Cancel(1))
    pair.exchange(pair.server, Chunk(1, A, Codec.RAW, b"a"))
    assert not pair.client.open_requests


def test_client_sends_nothing_more_after_cancel(pushing: ConnectionPair) -> None:
    pushing.exchange(pushing.client, Cancel(1))
    assert_forbidden(pushing, pushing.client, Chunk(1, A, Codec.RAW, b"a"))


def test_cancel_happens_once(pair: ConnectionPair) -> None:
    pair.exchange(pair.client, Stat(1, "x"), Cancel(1))
    assert_forbidden(pair, pair.client, Cancel(1))


def test_cancel_of_a_cancelled_push_then_error(pushing: ConnectionPair) -> None:
    pushing.exchange(pushing.client, Cancel(1))
    pushing.exchange(pushing.server, PushWant(1, b"\x00"))  # crossed the CANCEL on the wire
    pushing.exchange(pushing.server, Error(1, ErrorCode.CANCELLED, "cancelled"))
    pushing.exchange(pushing.client, PushBegin(1, None))  # the rid is free again


def test_client_cannot_cancel_what_is_not_open(pair: ConnectionPair) -> None:
    with pytest.raises(LocalProtocolError) as info:
        pair.client.send(Cancel(4))
    assert info.value.code is ErrorCode.UNEXPECTED


# --- frames that cross on the wire ---------------------------------------------------


def test_cancel_crossing_the_answer_is_ignored_by_the_server(pair: ConnectionPair) -> None:
    pair.exchange(pair.client, Stat(1, "x"))
    to_server = pair.client.send(Cancel(1))
    to_client = pair.server.send(BlobInfo(1, BLOB_DIGEST, 10, 3, ()))
    assert pair.deliver(pair.client, to_client) == [BlobInfo(1, BLOB_DIGEST, 10, 3, ())]
    assert pair.deliver(pair.server, to_server) == []  # its request is over: nothing to do
    assert pair.server.state is ConnState.READY
    pair.exchange(pair.client, Stat(1, "again"))


def test_push_frames_crossing_a_server_error_are_ignored(pushing: ConnectionPair) -> None:
    client, server = pushing.client, pushing.server
    in_flight = b"".join(
        client.send(message)
        for message in (
            Chunk(1, A, Codec.RAW, b"a"),
            Chunk(1, B, Codec.RAW, b"b"),
            Cancel(1),
        )
    )
    error = Error(1, ErrorCode.CHUNK_CORRUPT, "A does not hash to its id")
    assert pushing.deliver(client, server.send(error)) == [error]
    assert pushing.deliver(server, in_flight) == []
    # Once the client has seen the ERROR it may reuse the rid.
    pushing.exchange(client, PushBegin(1, None), PushRecipe(1, (A,), (1,)))
    assert set(server.open_requests) == {1}


def test_frames_for_a_finished_push_are_still_rejected(pair: ConnectionPair) -> None:
    pair.exchange(pair.client, PushBegin(1, None), PushEnd(1, 0, EMPTY_DIGEST))
    pair.exchange(pair.server, PushDone(1, EMPTY_DIGEST, 0, 0, 0, 0))
    assert_rejects(pair.server, encode_message(PushRecipe(1, (A,), (1,))), ErrorCode.UNEXPECTED)


def test_client_ignores_nothing(pair: ConnectionPair) -> None:
    pair.exchange(pair.client, Stat(1, "x"))
    pair.exchange(pair.server, Error(1, ErrorCode.NOT_FOUND, "x"))
    assert_rejects(pair.client, encode_message(Ok(1)), ErrorCode.UNEXPECTED)


# --- end of the connection -----------------------------------------------------------


def test_sentinels_have_readable_reprs() -> None:
    assert (repr(NEED_DATA), repr(CLOSED)) == ("NEED_DATA", "CLOSED")


def test_eof_at_a_frame_boundary_closes(pair: ConnectionPair) -> None:
    pair.exchange(pair.client, Stat(1, "x"))
    pair.server.receive_data(b"")
    pair.server.receive_data(b"")  # repeating EOF is harmless
    assert pair.server.next_event() is CLOSED
    assert pair.server.next_event() is CLOSED
    assert pair.server.state is pair.server.their_state is ConnState.CLOSED
    assert pair.server.our_state is ConnState.READY
    with pytest.raises(RuntimeError):
        pair.server.receive_data(b"more")


def test_frames_before_eof_are_still_delivered() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(encode_message(hello()))
    server.receive_data(b"")
    assert drain(server) == [hello(), CLOSED]


def test_eof_inside_a_frame_is_malformed() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(encode_message(hello())[:-1])
    assert server.next_event() is NEED_DATA
    assert_rejects(server, b"", ErrorCode.MALFORMED)


def test_fatal_error_from_the_peer(pair: ConnectionPair) -> None:
    pair.exchange(pair.client, Stat(1, "x"))
    data = pair.server.send(Error(0, ErrorCode.SHUTTING_DOWN, "bye"))
    assert pair.server.our_state is ConnState.CLOSED
    pair.client.receive_data(data + encode_message(Ok(1)))  # whatever follows is moot
    assert pair.client.next_event() == Error(0, ErrorCode.SHUTTING_DOWN, "bye")
    assert pair.client.next_event() is CLOSED
    assert pair.client.next_event() is CLOSED
    pair.client.receive_data(b"still more")
    assert pair.client.next_event() is CLOSED
    assert pair.client.state is pair.client.their_state is ConnState.CLOSED


def test_sender_of_a_fatal_error_sends_nothing_more(pair: ConnectionPair) -> None:
    pair.server.send(Error(0, ErrorCode.INTERNAL, "oops"))
    with pytest.raises(LocalProtocolError):
        pair.server.send(Error(0, ErrorCode.INTERNAL, "again"))
    assert pair.server.our_state is ConnState.ERROR


def test_client_may_end_the_connection_with_an_error(pair: ConnectionPair) -> None:
    events = pair.send(pair.client, Error(0, ErrorCode.MALFORMED, "your frames are bad"))
    assert events == [Error(0, ErrorCode.MALFORMED, "your frames are bad"), CLOSED]


def test_remote_errors_are_sticky(pair: ConnectionPair) -> None:
    first = assert_rejects(pair.server, (MAX_FRAME + 1).to_bytes(4, "big"), ErrorCode.TOO_LARGE)
    pair.server.receive_data(encode_message(Stats(1)))  # dropped: the peer is past saving
    with pytest.raises(RemoteProtocolError) as again:
        pair.server.next_event()
    assert again.value.code is ErrorCode.TOO_LARGE
    assert str(first) in str(again.value)
    assert pair.server.state is ConnState.ERROR
    # Our side is fine, so we can still say what went wrong.
    pair.server.send(Error(0, first.code, str(first)))
    assert pair.server.our_state is ConnState.CLOSED
    assert pair.server.state is ConnState.ERROR


def test_local_errors_are_sticky(pair: ConnectionPair) -> None:
    with pytest.raises(LocalProtocolError):
        pair.client.send(Ok(1))  # a server message
    with pytest.raises(LocalProtocolError, match="our side is ERROR"):
        pair.client.send(Stat(1, "x"))
    # Receiving is unaffected.
    assert pair.send(pair.server, Error(0, ErrorCode.BUSY, "x"))[0] == Error(0, ErrorCode.BUSY, "x")


def test_send_failed_poisons_sending(pair: ConnectionPair) -> None:
    pair.client.send_failed()
    assert pair.client.our_state is pair.client.state is ConnState.ERROR
    with pytest.raises(LocalProtocolError):
        pair.client.send(Stat(1, "x"))


def test_malformed_send_poisons_sending(pair: ConnectionPair) -> None:
    with pytest.raises(LocalProtocolError) as info:
        pair.client.send(Has(1, (b"short",)))
    assert info.value.code is ErrorCode.MALFORMED
    assert pair.client.our_state is ConnState.ERROR


def test_zero_length_frame_is_malformed(pair: ConnectionPair) -> None:
    assert_rejects(pair.client, b"\x00\x00\x00\x00", ErrorCode.MALFORMED)


def test_oversized_length_is_rejected_at_once() -> None:
    server = Connection(Role.SERVER)
    assert_rejects(server, (MAX_FRAME + 1).to_bytes(4, "big"), ErrorCode.TOO_LARGE)


def test_undecodable_body_is_malformed(pair: ConnectionPair) -> None:
    assert_rejects(pair.client, b"\x00\x00\x00\x01\xc1", ErrorCode.MALFORMED)


# --- hostile input -------------------------------------------------------------------


def ready_client_with_open_requests() -> Connection:
    pair = ConnectionPair()
    pair.handshake()
    pair.exchange(
        pair.client,
        Has(1, (A, B)),
        Pull(2, "x"),
        Want(3, (A, B)),
        PushBegin(4, None),
        PushRecipe(4, (A, B, C), (1, 2, 3)),
        Stat(5, "x"),
        Tag(6, "x", BLOB_DIGEST),
    )
    return pair.client


SERVER_SAYS = b"".join(
    encode_message(message)
    for message in (
        Have(1, b"\x02"),
        Recipe(2, BLOB_DIGEST, 10, (A,), (4,), True),
        Chunk(3, A, Codec.RAW, b"a"),
        PushWant(4, b"\x05"),
        BlobInfo(5, BLOB_DIGEST, 10, 2, ("x",)),
        Ok(6),
    )
)


def test_the_hostile_input_baseline_is_valid() -> None:
    client = ready_client_with_open_requests()
    client.receive_data(SERVER_SAYS)
    assert len(drain(client)) == 6
    assert set(client.open_requests) == {3, 4}  # B of the WANT, and the push


def take_all(conn: Connection, data: bytes) -> None:
    conn.receive_data(data)
    conn.receive_data(b"")
    try:
        while conn.next_event() is not CLOSED:
            pass
    except RemoteProtocolError:
        assert conn.their_state is ConnState.ERROR


@given(st.binary(max_size=300))
def test_random_bytes_only_raise_remote_protocol_errors(data: bytes) -> None:
    take_all(Connection(Role.SERVER), data)
    take_all(ready_client_with_open_requests(), data)


@given(st.data())
def test_mutated_frames_only_raise_remote_protocol_errors(data: st.DataObject) -> None:
    stream = bytearray(SERVER_SAYS)
    for _ in range(data.draw(st.integers(1, 3))):
        stream[data.draw(st.integers(0, len(stream) - 1))] = data.draw(st.integers(0, 255))
    take_all(ready_client_with_open_requests(), bytes(stream))


@given(st.data())
def test_mutated_client_frames_only_raise_remote_protocol_errors(data: st.DataObject) -> None:
    stream = bytearray(encode_message(hello()) + encode_message(Stat(1, "x")))
    for _ in range(data.draw(st.integers(1, 3))):
        stream[data.draw(st.integers(0, len(stream) - 1))] = data.draw(st.integers(0, 255))
    take_all(Connection(Role.SERVER), bytes(stream))


# --- performance ---------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["want", "push"])
def test_chunk_throughput(direction: str) -> None:
    # 12,000 chunks of 64 KiB (750 MiB) through send, receive_data and next_event on both
    # ends. About 0.3 s on a slow 2-core VM; the bound catches per-chunk work gone
    # quadratic or an extra copy of every chunk, not jitter.
    count, data = 12_000, os.urandom(64 * 1024)
    ids = [index.to_bytes(32, "big") for index in range(count)]
    pair = ConnectionPair()
    pair.handshake()
    client, server = pair.client, pair.server
    started = time.perf_counter()
    if direction == "want":
        for start in range(0, count, 1000):
            batch = tuple(ids[start : start + 1000])
            pair.exchange(client, Want(1, batch))
            for ident in batch:
                client.receive_data(server.send(Chunk(1, ident, Codec.RAW, data)))
                assert type(client.next_event()) is Chunk
    else:
        pair.exchange(client, PushBegin(1, None))
        for start in range(0, count, 4000):
            batch = tuple(ids[start : start + 4000])
            pair.exchange(client, PushRecipe(1, batch, (len(data),) * len(batch)))
            pair.exchange(server, PushWant(1, pack_bitmap([True] * len(batch))))
            for ident in batch:
                server.receive_data(client.send(Chunk(1, ident, Codec.RAW, data)))
                assert type(server.next_event()) is Chunk
        pair.exchange(client, PushEnd(1, count * len(data), BLOB_DIGEST))
    assert time.perf_counter() - started < 3.0


def test_sync_reports_progress_then_ends_with_sync_done(pair: ConnectionPair) -> None:
    pair.exchange(pair.client, Sync(9, "198.18.0.1:7420", None, ("release",), False, False))
    pair.exchange(pair.server, SyncProgress(9, {"bytes_done": 1}), SyncProgress(9, {}))
    assert set(pair.client.open_requests) == {9}
    pair.exchange(pair.server, SyncDone(9, {"blobs": 1}, (("release", BLOB_DIGEST, "copied"),)))
    assert not pair.client.open_requests
    assert not pair.server.open_requests


def test_sync_of_all_names_no_blob(pair: ConnectionPair) -> None:
    with pytest.raises(LocalProtocolError, match="all=true"):
        pair.client.send(Sync(9, "198.18.0.1:7420", None, ("x",), True, False))


def delta_pair() -> ConnectionPair:
    p = ConnectionPair()
    p.handshake(("zstd", "zstd-prefix"))
    return p


def test_want_delta_answers_may_be_encoded_against_their_bases() -> None:
    p = delta_pair()
    p.exchange(p.client, WantDelta(5, (A, B), ((B,), ())))
    p.exchange(p.server, Chunk(5, A, Codec.ZSTD_PREFIX, b"(delta)"), Chunk(5, B, Codec.RAW, b"b"))
    assert not p.client.open_requests


def test_zstd_prefix_answers_only_want_delta() -> None:
    p = delta_pair()
    p.exchange(p.client, Want(5, (A,)))
    assert_forbidden(p, p.server, Chunk(5, A, Codec.ZSTD_PREFIX, b"(delta)"))


def test_want_delta_needs_the_feature(pair: ConnectionPair) -> None:
    with pytest.raises(LocalProtocolError, match="zstd-prefix"):
        pair.client.send(WantDelta(5, (A,), ((B,),)))


# --- WANT_AT (SPEC §4.1) -------------------------------------------------------------


def test_want_at_is_answered_by_one_chunk_per_set_bit() -> None:
    p = ConnectionPair()
    p.handshake(("chunk-packs", "want-at"))
    p.exchange(p.client, WantAt(5, EMPTY_DIGEST, 10, b"\x05\x01"))  # positions 10, 12, 18
    p.exchange(p.server, Chunk(5, A, Codec.RAW, b"a"))
    assert p.client.open_requests
    p.exchange(p.server, ChunkPack(5, Codec.RAW, (1, 1), b"bc"))
    assert not p.client.open_requests


def test_want_at_gets_no_more_than_it_asked() -> None:
    p = ConnectionPair()
    p.handshake(("chunk-packs", "want-at"))
    p.exchange(p.client, WantAt(5, EMPTY_DIGEST, 0, b"\x01"))
    assert_forbidden(p, p.server, ChunkPack(5, Codec.RAW, (1, 1), b"ab"))


def test_want_at_wants_something_and_needs_the_feature(pair: ConnectionPair) -> None:
    with pytest.raises(LocalProtocolError, match="want-at"):
        pair.client.send(WantAt(5, EMPTY_DIGEST, 0, b"\x01"))
    p = ConnectionPair()
    p.handshake(("want-at",))
    with pytest.raises(LocalProtocolError, match="at least one"):
        p.client.send(WantAt(5, EMPTY_DIGEST, 0, b"\x00"))


# --- recipe deltas (SPEC §4.1) -------------------------------------------------------


def test_pull_delta_is_answered_by_one_recipe_delta_or_by_recipes() -> None:
    p = ConnectionPair()
    p.handshake(("recipe-delta",))
    p.exchange(p.client, PullDelta(5, "x", EMPTY_DIGEST, 7))
    p.exchange(p.server, RecipeDelta(5, EMPTY_DIGEST, 0, 0, b"(frame)"))
    assert not p.client.open_requests
    # A server whose recipe of the base differs answers as it answers PULL.
    p.exchange(p.client, PullDelta(6, "x", EMPTY_DIGEST, 7))
    p.exchange(p.server, Recipe(6, EMPTY_DIGEST, 1, (A,), (1,), False))
    p.exchange(p.server, Recipe(6, EMPTY_DIGEST, 1, (), (), True))
    assert not p.client.open_requests


def test_recipe_delta_answers_only_pull_delta() -> None:
    p = ConnectionPair()
    p.handshake(("recipe-delta",))
    p.exchange(p.client, Pull(5, "x"))
    assert_forbidden(p, p.server, RecipeDelta(5, EMPTY_DIGEST, 0, 0, b"(frame)"))


def test_pull_delta_needs_the_feature(pair: ConnectionPair) -> None:
    with pytest.raises(LocalProtocolError, match="recipe-delta"):
        pair.client.send(PullDelta(5, "x", EMPTY_DIGEST, 7))


def test_pull_inline_is_answered_by_one_recipe_inline_or_as_pull_delta() -> None:
    p = ConnectionPair()
    p.handshake(("recipe-delta", "recipe-inline"))
    p.exchange(p.client, PullInline(5, "x", EMPTY_DIGEST, 7, 16384, 0))
    p.exchange(p.server, RecipeInline(5, EMPTY_DIGEST, 0, 0, b"(entries)", 9, b"(frame)", False))
    assert not p.client.open_requests
    p.exchange(p.client, PullInline(6, "x", EMPTY_DIGEST, 7, 16384, 0))
    p.exchange(p.server, RecipeDelta(6, EMPTY_DIGEST, 0, 0, b"(frame)"))
    p.exchange(p.client, PullInline(7, "x", EMPTY_DIGEST, 7, 16384, 0))
    p.exchange(p.server, Recipe(7, EMPTY_DIGEST, 0, (), (), True))
    assert not p.client.open_requests


def test_recipe_inline_answers_only_pull_inline() -> None:
    p = ConnectionPair()
    p.handshake(("recipe-delta", "recipe-inline"))
    p.exchange(p.client, PullDelta(5, "x", EMPTY_DIGEST, 7))
    assert_forbidden(p, p.server, RecipeInline(5, EMPTY_DIGEST, 0, 0, b"", 0, b"", False))


def test_pull_inline_needs_the_feature() -> None:
    p = ConnectionPair()
    p.handshake(("recipe-delta",))
    with pytest.raises(LocalProtocolError, match="recipe-inline"):
        p.client.send(PullInline(5, "x", EMPTY_DIGEST, 7, 16384, 0))


# --- chunk packs (SPEC §4.1) ---------------------------------------------------------


def pack_pair(features: tuple[str, ...] = ("zstd", "chunk-packs")) -> ConnectionPair:
    p = ConnectionPair()
    p.handshake(features)
    return p


def test_a_pack_answers_as_many_ids_as_it_holds() -> None:
    p = pack_pair()
    p.exchange(p.client, Want(5, (A, B, C)))
    p.exchange(p.server, ChunkPack(5, Codec.RAW, (1, 2), b"abb"))
    assert set(p.client.open_requests) == set(p.server.open_requests) == {5}
    p.exchange(p.server, Chunk(5, C, Codec.RAW, b"c"))
    assert not p.client.open_requests
    assert not p.server.open_requests


def test_a_pack_may_end_a_want_and_answer_want_delta_too() -> None:
    p = pack_pair(("zstd", "zstd-prefix", "chunk-packs"))
    p.exchange(p.client, WantDelta(5, (A, B), ((C,), ())))
    p.exchange(p.server, ChunkPack(5, Codec.ZSTD, (1, 1), b"(zstd of ab)"))
    assert not p.client.open_requests


def test_a_pack_longer_than_what_is_left_is_unexpected() -> None:
    p = pack_pair()
    p.exchange(p.client, Want(5, (A, B)))
    p.exchange(p.server, Chunk(5, A, Codec.RAW, b"a"))
    assert_forbidden(p, p.server, ChunkPack(5, Codec.RAW, (1, 1), b"bc"))


def test_packs_need_the_feature(pair: ConnectionPair) -> None:
    pair.exchange(pair.client, Want(5, (A, B)))
    assert_forbidden(pair, pair.server, ChunkPack(5, Codec.RAW, (1, 1), b"ab"))


def test_a_zstd_pack_needs_zstd() -> None:
    p = pack_pair(("chunk-packs",))
    p.exchange(p.client, Want(5, (A, B)))
    assert_forbidden(p, p.server, ChunkPack(5, Codec.ZSTD, (1, 1), b"(zstd)"))


def test_the_client_sends_no_packs_into_a_push(pushing: ConnectionPair) -> None:
    assert_forbidden(pushing, pushing.client, ChunkPack(1, Codec.RAW, (1,), b"a"))
