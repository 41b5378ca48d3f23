"""The text identities of SPEC §1: blob digests and names.

The codec does not apply these checks: a bad name or digest in a request is the
request's INVALID error (SPEC §6), which the application answers with `Error(rid, ...)`
while the connection carries on.
"""

from __future__ import annotations

import re
from typing import Final

#: Digests are written as OCI writes them (SPEC §1).
DIGEST_PREFIX: Final = "sha256:"

#: Longest name in UTF-8 bytes (SPEC §1): fits a one-byte length and common key limits.
MAX_NAME_BYTES: Final = 255

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# Unicode category Cc: C0 controls (which include NUL), DEL and C1 controls.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def is_valid_digest(text: str) -> bool:
    """Tell whether `text` is a blob digest: `sha256:` and 64 lowercase hex digits.

    Args:
        text: Candidate digest.

    Returns:
        True if it is one.
    """
    return isinstance(text, str) and _DIGEST.fullmatch(text) is not None


def is_valid_name(text: str) -> bool:
    """Tell whether `text` may name a blob (SPEC §1).

    A name is 1-255 bytes of UTF-8 without control characters (NUL included) and does not
    start with `sha256:`, so that a reference parses unambiguously.

    Args:
        text: Candidate name.

    Returns:
        True if it is one.
    """
    if not isinstance(text, str) or text.startswith(DIGEST_PREFIX):
        return False
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates have no UTF-8 form
        return False
    return 1 <= size <= MAX_NAME_BYTES and _CONTROL.search(text) is None
