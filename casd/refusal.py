"""A server's ERROR as the exception casctl reports, with a hint where one helps; shared
by the trio client and the blocking one."""

from __future__ import annotations

import casproto

from casd.errors import PeerRefused


def refused(err: casproto.Error) -> PeerRefused:
    code = casproto.ErrorCode(err.code)
    exc = PeerRefused(int(code), code.name, err.message)
    if code == casproto.ErrorCode.NOT_FOUND:
        exc.hint = "`casctl ls` lists the names the server knows"
    elif code == casproto.ErrorCode.UNAUTHORIZED:
        exc.hint = "pass the server's token with --token or CASD_TOKEN"
    elif code == casproto.ErrorCode.NO_SPACE:
        exc.hint = (
            "the server's disk is full; nothing partial became visible, retry after freeing space"
        )
    return exc
