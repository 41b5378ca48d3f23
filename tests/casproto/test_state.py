"""The transition tables of _state.py (SPEC §3, §7) and the machine's invariants."""

from __future__ import annotations

from collections import deque

import pytest
from casproto import (
    MESSAGE_CLASSES,
    BlobInfo,
    Call,
    CallData,
    CallDone,
    CallProgress,
    Cancel,
    Chunk,
    ChunkDelta,
    ChunkPack,
    Codec,
    ConnState,
    Error,
    ErrorCode,
    Fsck,
    FsckDone,
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
)
from casproto._state import _FOLLOW_UPS, _HANDSHAKE, _STARTS, ConversationState
from casproto_testing import chunk_id, hello, welcome
from hypothesis import given
from hypothesis import strategies as st

# The direction column of SPEC §3 and §4.
CLIENT_SENDS = {Hello, Has, Stat, ListNames, Tag, Untag, Stats, PushBegin, PushRecipe, PushEnd}
CLIENT_SENDS |= {PullInline}
CLIENT_SENDS |= {Cancel, Pull, PullDelta, Want, WantDelta, WantAt, Sync, Fsck, Call, ChunkDelta}
SERVER_SENDS = {Welcome, Have, BlobInfo, Names, Ok, StatsResult, PushWant, PushDone, Recipe}
SERVER_SENDS |= {RecipeDelta, RecipeInline}
SERVER_SENDS |= {SyncProgress, SyncDone, FsckDone, CallProgress, CallDone, CallData, ChunkPack}
BOTH_SEND = {Chunk, Error}


def test_spec_directions_cover_every_message() -> None:
    assert set(MESSAGE_CLASSES) == CLIENT_SENDS | SERVER_SENDS | BOTH_SEND
    assert not CLIENT_SENDS & SERVER_SENDS


def test_tables_follow_the_spec_directions() -> None:
    for (sender, _), moves in _HANDSHAKE.items():
        assert set(moves) <= (CLIENT_SENDS if sender is Role.CLIENT else SERVER_SENDS)
    assert set(_STARTS) <= CLIENT_SENDS
    for client_then, server_then in _FOLLOW_UPS.values():
        assert client_then <= CLIENT_SENDS | BOTH_SEND
        assert server_then <= SERVER_SENDS | BOTH_SEND


def test_every_message_has_a_place_in_the_tables() -> None:
    placed = {Error, Cancel} | set(_STARTS)
    for moves in _HANDSHAKE.values():
        placed |= set(moves)
    for client_then, server_then in _FOLLOW_UPS.values():
        placed |= client_then | server_then
    assert placed == set(MESSAGE_CLASSES)


def test_every_request_has_a_terminal_answer() -> None:
    terminal_capable = {
        Have,
        BlobInfo,
        Names,
        Ok,
        StatsResult,
        Recipe,
        RecipeDelta,
        RecipeInline,
        Chunk,
        PushDone,
        SyncDone,
        FsckDone,
        CallDone,
    }
    for opener, (_, server_then) in _FOLLOW_UPS.items():
        assert server_then & terminal_capable, opener.__name__


@pytest.mark.parametrize("role", list(Role))
def test_handshake_walks_the_phases(role: Role) -> None:
    state = ConversationState(role)
    phases = [state.phase]
    state.process(Role.CLIENT, hello())
    phases.append(state.phase)
    state.process(Role.SERVER, welcome())
    phases.append(state.phase)
    assert phases == [ConnState.AWAIT_HELLO, ConnState.AWAIT_WELCOME, ConnState.READY]


# --- a rejected message changes nothing ----------------------------------------------

A, B = chunk_id("a"), chunk_id("b")
rids = st.sampled_from([0, 1, 2])
ids = st.sampled_from([(A,), (B,), (A, B), (B, A)])
codecs = st.sampled_from(Codec)
vocabulary: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        Error, rids, st.sampled_from([ErrorCode.NOT_FOUND, ErrorCode.CANCELLED]), st.just("")
    ),
    st.builds(Has, rids, ids),
    st.builds(Have, rids, st.sampled_from([b"", b"\x01", b"\x03"])),
    st.builds(Stat, rids, st.just("x")),
    st.builds(Ok, rids),
    st.builds(Pull, rids, st.just("x")),
    st.builds(Recipe, rids, st.just("d"), st.just(1), st.just((A,)), st.just((1,)), st.booleans()),
    st.builds(Want, rids, ids),
    st.builds(Chunk, rids, st.sampled_from([A, B]), codecs, st.just(b"")),
    st.builds(ChunkPack, rids, codecs, st.sampled_from([(1,), (1, 1), (1, 1, 1)]), st.just(b"")),
    st.builds(PushBegin, rids, st.none()),
    st.builds(lambda rid, batch: PushRecipe(rid, batch, (1,) * len(batch)), rids, ids),
    st.builds(PushWant, rids, st.sampled_from([b"\x00", b"\x01", b"\x02", b"\x03"])),
    st.builds(PushEnd, rids, st.just(0), st.just("d")),
    st.builds(PushDone, rids, st.just("d"), st.just(0), st.just(0), st.just(0), st.just(0)),
    st.builds(Cancel, rids),
    st.just(hello()),
    st.just(welcome()),
)


def snapshot(value: object) -> object:
    """A comparable copy of the machine's state, requests included."""
    if isinstance(value, dict):
        return {key: snapshot(item) for key, item in value.items()}
    if isinstance(value, deque | list | tuple):
        return tuple(snapshot(item) for item in value)
    slots = [name for cls in type(value).__mro__ for name in getattr(cls, "__slots__", ())]
    if slots:
        return (type(value).__name__, {name: snapshot(getattr(value, name)) for name in slots})
    return value


@given(
    st.sampled_from(Role),
    st.sampled_from([(), ("zstd",), ("zstd", "chunk-packs"), ("chunk-packs",)]),
    st.lists(st.tuples(st.sampled_from(Role), vocabulary), max_size=40),
)
def test_rejected_messages_leave_the_state_unchanged(
    our_role: Role, features: tuple[str, ...], moves: list[tuple[Role, Message]]
) -> None:
    state = ConversationState(our_role)
    state.process(Role.CLIENT, hello(features))
    state.process(Role.SERVER, welcome(features))
    for sender, message in moves:
        before = snapshot(state)
        try:
            state.process(sender, message)
        except LocalProtocolError:
            assert snapshot(state) == before
