"""casproto stays sans-I/O: stdlib and msgpack only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import casproto

FORBIDDEN = ("trio", "lmdb", "blake3", "casd")


def test_importing_casproto_loads_no_io_or_storage_modules(tmp_path: Path) -> None:
    # A fresh interpreter, started outside the repository so nothing shadows the package.
    script = (
        "import json, sys, casproto; print(json.dumps([sorted(sys.modules), casproto.__file__]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    modules, location = json.loads(result.stdout)
    assert Path(location).parent == Path(casproto.__file__).parent
    loaded = {name.partition(".")[0] for name in modules}
    assert loaded.isdisjoint(FORBIDDEN), loaded & set(FORBIDDEN)


def test_public_names_are_exported() -> None:
    assert sorted(casproto.__all__) == sorted(set(casproto.__all__))
    for name in casproto.__all__:
        assert hasattr(casproto, name), name


def test_the_promised_api_is_there() -> None:
    promised = [
        *("PROTOCOL_VERSION", "MAX_FRAME", "MAX_BATCH", "ID_SIZE", "Codec", "ErrorCode"),
        *("ProtocolError", "LocalProtocolError", "RemoteProtocolError", "Role", "ConnState"),
        *("NEED_DATA", "CLOSED", "Message", "Hello", "Welcome", "Error", "Has", "Have", "Stat"),
        *("BlobInfo", "ListNames", "Names", "Tag", "Ok", "Untag", "Stats", "StatsResult"),
        *("PushBegin", "PushRecipe", "PushWant", "Chunk", "PushEnd", "PushDone", "Cancel"),
        *("Pull", "Recipe", "Want", "Connection", "encode_message", "decode_body"),
        *("FrameDecoder", "pack_bitmap", "unpack_bitmap", "is_valid_name", "is_valid_digest"),
    ]
    assert set(promised) <= set(casproto.__all__)
    assert (casproto.PROTOCOL_VERSION, casproto.MAX_FRAME) == (1, 16 * 1024 * 1024)
    assert (casproto.MAX_BATCH, casproto.ID_SIZE) == (16384, 32)
