"""Token scopes: parsing and constant-time lookup."""

from __future__ import annotations

import casproto
import pytest

from casd.auth import Scope, TokenTable, parse_token_lines, required_scope
from casd.errors import ConfigError


def test_token_lines_with_and_without_scopes() -> None:
    text = "# comment\nalpha read\nbeta write  # trailing\n\ngamma\ndelta ADMIN\n"
    assert parse_token_lines(text, "f") == [
        ("alpha", Scope.READ),
        ("beta", Scope.WRITE),
        ("gamma", Scope.ADMIN),
        ("delta", Scope.ADMIN),
    ]


@pytest.mark.parametrize("line", ["tok owner", "a b c"])
def test_bad_token_lines_name_the_line(line: str) -> None:
    with pytest.raises(ConfigError, match="f:2"):
        parse_token_lines(f"ok\n{line}\n", "f")


def test_lookup() -> None:
    table = TokenTable.build([("r", Scope.READ), ("w", Scope.WRITE)])
    assert table.scope_of("r") is Scope.READ
    assert table.scope_of("w") is Scope.WRITE
    assert table.scope_of("x") is None
    assert table.scope_of(None) is None
    assert TokenTable().scope_of(None) is Scope.ADMIN  # no tokens configured: open


def test_required_scopes() -> None:
    assert required_scope(casproto.Stat(1, "x")) is Scope.READ
    assert required_scope(casproto.PushBegin(1, None)) is Scope.WRITE
    assert required_scope(casproto.Fsck(1, False, None, None)) is Scope.ADMIN
