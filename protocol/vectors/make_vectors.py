"""Golden frames of the casd wire protocol: one or more for every message type.

`frames.json` maps a vector's name to the hex of its whole frame (length prefix
included) and a description of the message. It was written once by this script and is
the reference: tests/casproto/test_vectors.py checks that the current encoder still
produces these bytes and that the decoder turns them back into VECTORS. Regenerate it
only together with a change to protocol/SPEC.md:

    python protocol/vectors/make_vectors.py          # rewrite frames.json
    python protocol/vectors/make_vectors.py --check  # exit 1 if it is out of date

The sample blob is b"chunk onechunk twochunk one", cut into "chunk one", "chunk two",
"chunk one"; the chunk ids are real BLAKE3-256 hashes, written out here so this script
needs nothing beyond casproto and the standard library.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from casproto import (
    MAX_FRAME,
    PROTOCOL_VERSION,
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
    Error,
    ErrorCode,
    Fsck,
    FsckDone,
    Has,
    Have,
    Hello,
    ListNames,
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

FRAMES = Path(__file__).with_name("frames.json")

ONE, TWO = b"chunk one", b"chunk two"
BLOB = ONE + TWO + ONE
ID_ONE = bytes.fromhex("9ce5ba4025566a041e43bb1c852d25de2b5f007abcd1724fe7727c298d7ae268")
ID_TWO = bytes.fromhex("037cb1eb2edd164ee32103e6485180b915a4cb54d8a40dce48c6bd06daf31be5")
# zstd.compress(b"chunk two") at the default level: one frame holding the raw block.
ZSTD_TWO = bytes.fromhex("28b52ffd20094900006368756e6b2074776f")
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
EMPTY_DIGEST = "sha256:" + hashlib.sha256(b"").hexdigest()
CHUNKER: dict[str, str | int] = {"algo": "fastcdc2020", "min": 16384, "avg": 65536, "max": 262144}

#: Raw bytes of each chunk vector, by name, for checks that hash them.
CHUNK_DATA = {"chunk_raw": ONE, "chunk_zstd": TWO}

VECTORS: dict[str, Message] = {
    "hello": Hello(0, PROTOCOL_VERSION, ("zstd",), "s3cr3t", "casctl/0.1.0"),
    "hello_no_token": Hello(0, PROTOCOL_VERSION, (), None, "casctl/0.1.0"),
    "welcome": Welcome(0, PROTOCOL_VERSION, ("zstd",), "casd/0.1.0", CHUNKER, MAX_FRAME),
    "error_connection": Error(0, ErrorCode.UNAUTHORIZED, "token missing or wrong"),
    "error_request": Error(7, ErrorCode.NOT_FOUND, "no blob named release"),
    "has": Has(1, (ID_ONE, ID_TWO)),
    "have": Have(1, pack_bitmap([True, False])),
    "stat": Stat(2, "release"),
    "blob_info": BlobInfo(2, DIGEST, len(BLOB), 3, ("latest", "release")),
    "list": ListNames(3, "rel"),
    "names": Names(3, (("release", DIGEST), ("release-empty", EMPTY_DIGEST))),
    "tag": Tag(4, "latest", DIGEST),
    "ok": Ok(4),
    "untag": Untag(5, "latest"),
    "stats": Stats(6),
    "stats_result": StatsResult(
        6, {"blobs": 2, "chunks": 2, "dedup_ratio": 1.5, "version": "0.1.0"}
    ),
    "push_begin": PushBegin(300, "release"),
    "push_begin_unnamed": PushBegin(301, None),
    "push_recipe": PushRecipe(300, (ID_ONE, ID_TWO, ID_ONE), (len(ONE), len(TWO), len(ONE))),
    "push_want": PushWant(300, pack_bitmap([True, True, False])),
    "chunk_raw": Chunk(300, ID_ONE, Codec.RAW, ONE),
    "chunk_zstd": Chunk(300, ID_TWO, Codec.ZSTD, ZSTD_TWO),
    "push_end": PushEnd(300, len(BLOB), DIGEST),
    "push_end_empty": PushEnd(301, 0, EMPTY_DIGEST),
    "push_done": PushDone(300, DIGEST, len(BLOB), 3, 2, len(ONE) + len(TWO)),
    "cancel": Cancel(301),
    "pull": Pull(70000, "release"),
    "recipe_part": Recipe(70000, DIGEST, len(BLOB), (ID_ONE, ID_TWO), (len(ONE), len(TWO)), False),
    "recipe_last": Recipe(70000, DIGEST, len(BLOB), (ID_ONE,), (len(ONE),), True),
    "pull_delta": PullDelta(70002, "release", DIGEST, 0x0123456789ABCDEF),
    "recipe_delta": RecipeDelta(70002, DIGEST, len(BLOB), 3, b"\x28\xb5\x2f\xfd-entries"),
    "pull_inline": PullInline(70004, "release", DIGEST, 0x0123456789ABCDEF, 16384, 2_500_000),
    "recipe_inline": RecipeInline(
        70004,
        DIGEST,
        len(BLOB),
        3,
        b"\x28\xb5\x2f\xfd-entries",
        0xFEDCBA9876543210,
        b"\x28\xb5\x2f\xfd-inlined",
        True,
    ),
    "want": Want(70001, (ID_ONE, ID_TWO)),
    "want_delta": WantDelta(70002, (ID_TWO,), ((ID_ONE,),)),
    "want_at": WantAt(70003, DIGEST, 0, b"\x05"),
    "fsck": Fsck(90, True, "198.18.0.1:7420", None),
    "fsck_done": FsckDone(90, {"chunks": 2, "chunks_damaged": 1}, (ID_ONE,)),
    "sync": Sync(80, "198.18.0.1:7420", None, ("release",), False, False),
    "sync_progress": SyncProgress(80, {"bytes_done": 1024, "bytes_total": 4096}),
    "sync_done": SyncDone(
        80, {"blobs": 1, "blobs_copied": 1, "seconds": 0.5}, (("release", DIGEST, "copied"),)
    ),
    "chunk_delta": ChunkDelta(30, ID_TWO, (ID_ONE,), b"\x28\xb5\x2f\xfd-delta"),
    "chunk_pack_raw": ChunkPack(70001, Codec.RAW, (len(ONE), len(TWO)), ONE + TWO),
    "call": Call(100, "gc", {"dry_run": True, "grace_s": 3600}),
    "call_progress": CallProgress(100, {"chunks_scanned": 512}),
    "call_data": CallData(100, b"\x28\xb5\x2f\xfd-piece"),
    "call_done": CallDone(
        100, {"chunks_deleted": 2, "bytes_freed": 131072, "layers": ({"digest": DIGEST},)}
    ),
}


def render() -> str:
    """The contents frames.json must have."""
    frames = {
        name: {"hex": encode_message(message).hex(), "message": repr(message)}
        for name, message in VECTORS.items()
    }
    return json.dumps(frames, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv == ["--check"]:
        current = FRAMES.read_text(encoding="utf-8") if FRAMES.exists() else ""
        if current != text:
            print(f"{FRAMES} is out of date; run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    FRAMES.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
