"""Who may do what: tokens with scopes.

A token grants one scope; each includes the ones below it:

- ``read``: stat, ls, get (PULL/WANT), has, stats;
- ``write``: also put, tag, rm, and sync *into* this server;
- ``admin``: also fsck (which can rewrite chunks).

With no token configured (the loopback default) everyone is admin. Tokens are compared
in constant time against every configured token, so timing tells nothing about which,
or how much of one, matched.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import IntEnum

import casproto

from casd.errors import ConfigError


class Scope(IntEnum):
    READ = 1
    WRITE = 2
    ADMIN = 3


# The scope each request needs. Requests not listed need READ.
REQUIRED: dict[type[casproto.Message], Scope] = {
    casproto.PushBegin: Scope.WRITE,
    casproto.Tag: Scope.WRITE,
    casproto.Untag: Scope.WRITE,
    casproto.Sync: Scope.WRITE,
    casproto.Fsck: Scope.ADMIN,
}


@dataclass(frozen=True)
class TokenTable:
    """The tokens a server accepts, each with its scope."""

    entries: tuple[tuple[bytes, Scope], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.entries)

    def scope_of(self, given: str | None) -> Scope | None:
        """The scope ``given`` grants, or None. Constant time in the matching token."""
        if not self.entries:
            return Scope.ADMIN
        if given is None:
            return None
        probe = given.encode()
        found: Scope | None = None
        for token, scope in self.entries:  # every entry, whatever matched before
            if hmac.compare_digest(probe, token):
                found = scope
        return found

    @classmethod
    def build(cls, pairs: list[tuple[str, Scope]]) -> TokenTable:
        return cls(tuple((t.encode(), s) for t, s in pairs if t))


def parse_token_lines(text: str, source: str) -> list[tuple[str, Scope]]:
    """``TOKEN [read|write|admin]`` per line (admin when no scope); ``#`` comments.

    Raises:
        ConfigError: a line has an unknown scope or more than two words.
    """
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 2:
            raise ConfigError(f"{source}:{n}: expected `TOKEN [read|write|admin]`")
        scope = Scope.ADMIN
        if len(words) == 2:
            try:
                scope = Scope[words[1].upper()]
            except KeyError:
                raise ConfigError(
                    f"{source}:{n}: unknown scope {words[1]!r} (read, write or admin)"
                ) from None
        out.append((words[0], scope))
    return out


def required_scope(message: casproto.Message) -> Scope:
    return REQUIRED.get(type(message), Scope.READ)
