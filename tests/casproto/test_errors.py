"""The exceptions say who broke the protocol and carry the code to report."""

from __future__ import annotations

import pickle

import pytest
from casproto import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError


def test_error_codes_follow_the_spec_table() -> None:
    assert [(code.name, code.value) for code in ErrorCode] == [
        ("MALFORMED", 1),
        ("UNEXPECTED", 2),
        ("UNSUPPORTED_VERSION", 3),
        ("UNAUTHORIZED", 4),
        ("FORBIDDEN", 5),
        ("NOT_FOUND", 6),
        ("INVALID", 7),
        ("CHUNK_CORRUPT", 8),
        ("DIGEST_MISMATCH", 9),
        ("TOO_LARGE", 10),
        ("NO_SPACE", 11),
        ("INTERNAL", 12),
        ("CANCELLED", 13),
        ("BUSY", 14),
        ("SHUTTING_DOWN", 15),
        ("UNREACHABLE", 16),
        ("UNSUPPORTED", 17),
    ]


@pytest.mark.parametrize("cls", [LocalProtocolError, RemoteProtocolError])
def test_protocol_errors_carry_a_code(cls: type[ProtocolError]) -> None:
    error = cls("bad frame", ErrorCode.MALFORMED)
    assert isinstance(error, ProtocolError)
    assert error.code is ErrorCode.MALFORMED
    assert str(error) == "bad frame"
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.code) == (cls, "bad frame", ErrorCode.MALFORMED)


def test_protocol_error_itself_is_abstract() -> None:
    with pytest.raises(TypeError):
        ProtocolError("who did it?", ErrorCode.INTERNAL)
